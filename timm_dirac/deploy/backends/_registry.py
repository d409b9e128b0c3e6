""" The backend registry: what a backend is asked for (`Setup`), what it gives back (`Runner`), and the names the
commands choose from (`BACKENDS`, filled by `@register_backend` as each backend module is imported). """
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['Runner', 'Setup', 'Backend', 'BACKENDS', 'register_backend', 'backend_names', 'get_backends']


@dataclass
class Runner:
    """ A model ready to run on one backend. """
    predict: Callable[[torch.Tensor], torch.Tensor]  # images (N, C, H, W) -> logits
    bind: Callable[[torch.Tensor], Callable[[], Any]]  # an input prepared once -> a call to time
    precision: str
    static_batch: Optional[int] = None  # a lowered graph runs only this batch size
    file: Optional[str] = None  # the file the backend runs, where it writes one
    weight_bits: Optional[int] = None  # int8 runners: the bit width of the stored weights (7 or 8)


@dataclass(frozen=True)
class Setup:
    """ What a backend is asked for: one model input size and precision, and what preparing it may use. """
    input_size: Tuple[int, ...]  # (C, H, W)
    workdir: str  # where a backend writes the file it runs, named after `tag`
    precision: str = 'fp32'  # one of the backend's `precisions`
    tag: str = 'model'
    calib: Optional[torch.Tensor] = None  # real images in the model's eval transform, for int8 calibration
    method: str = 'minmax'  # activation calibration: minmax, percentile or entropy (ONNX Runtime's calibrators)
    batch_size: int = 32  # the batch a static graph is lowered for
    threads: Optional[int] = None  # intra-op threads of a runtime with its own pool (default: torch's)


@dataclass(frozen=True)
class Backend:
    """ A registered backend: the precisions it runs (the first without a choice) and the optional package it
    needs. int8 backends calibrate on real images. """
    name: str
    prepare: Callable[[nn.Module, Setup], Runner]
    precisions: Tuple[str, ...]
    requires: Tuple[str, ...] = ()

    @property
    def int8(self) -> bool:
        return 'int8' in self.precisions

    def run_precisions(self, wanted: Sequence[str]) -> List[str]:
        """ The precisions of `wanted` that this backend runs, else its own first one (ONNX Runtime runs fp32
        whatever the PyTorch precisions asked for; an int8 backend runs int8). """
        return [p for p in wanted if p in self.precisions] or [self.precisions[0]]


BACKENDS: Dict[str, Backend] = {}


def register_backend(name: str, precisions: Sequence[str] = ('fp32',), requires: Sequence[str] = ()):
    """ Decorator registering `prepare(model, setup) -> Runner` as backend `name`; names are unique. """
    def register(prepare: Callable[[nn.Module, Setup], Runner]) -> Callable[[nn.Module, Setup], Runner]:
        if name in BACKENDS:
            raise ValueError(f'backend {name!r} is already registered (by {BACKENDS[name].prepare.__module__}): '
                             f'register yours under another name.')
        BACKENDS[name] = Backend(name, prepare, tuple(precisions), tuple(requires))
        return prepare
    return register


def backend_names(int8: Optional[bool] = None) -> List[str]:
    """ Registered names, in registration order: all, or only the int8 (`int8=True`) or float ones. """
    return [name for name, backend in BACKENDS.items() if int8 is None or backend.int8 == int8]


def get_backends(names: Sequence[str], int8: Optional[bool] = None, what: str = 'backend') -> List[Backend]:
    """ The backends `names` (of `backend_names(int8)`), called `what` in a one-line error naming an unknown one or
    a package one needs and does not find. """
    choices = backend_names(int8)
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise ValueError(f'unknown {what} {unknown or list(names)}: choose from {", ".join(choices)}.')
    backends = [BACKENDS[name] for name in names]
    for backend in backends:
        missing = [package for package in backend.requires if importlib.util.find_spec(package) is None]
        if missing:
            raise ValueError(f'the {backend.name} {what} needs {", ".join(missing)}, not installed: pip install '
                             f'"timm-dirac[export]" (or pip install {" ".join(missing)}), or choose another {what}.')
    return backends
