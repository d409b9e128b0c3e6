""" Inference backends behind one interface: each module turns a model into a `Runner`.

- `torch_eager`: PyTorch eager, or torch.compile with frozen weights; fp32 or bf16 autocast.
- `onnxruntime`: ONNX export, graph check, ONNX Runtime sessions, static int8 (the `split` and `plain` flows).
- `pt2e`: PyTorch 2 export int8 (torchao's x86 inductor quantizer) lowered to oneDNN kernels.

`timm-dirac benchmark` times runners (`timing.time_interleaved` on `runner.bind(x)`), `timm-dirac quantize` scores
and times them; a new backend is a new module with a `prepare(...) -> Runner`.
"""
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ['Runner']


@dataclass
class Runner:
    """ A model ready to run on one backend. """
    predict: Callable[[torch.Tensor], torch.Tensor]  # images (N, C, H, W) -> logits
    bind: Callable[[torch.Tensor], Callable[[], Any]]  # an input prepared once -> a call to time
    precision: str
    static_batch: Optional[int] = None  # a lowered graph runs only this batch size
    file: Optional[str] = None  # the file the backend runs, where it writes one
