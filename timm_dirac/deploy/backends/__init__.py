""" Inference backends behind one interface, found by name in one registry.

A backend is a function `prepare(model, setup) -> Runner` registered under a name with `@register_backend`; the
commands list the registry, so their choices are what is registered (`benchmark --backends` times every one,
`quantize --flow` scores and times the int8 ones), and adding a backend is one module with a decorated `prepare`,
imported below (docs/deploy.md, "Adding a backend"). Registered here: `torch_eager` (`eager`, `compile`; fp32 or bf16
autocast), `onnxruntime` (`onnxruntime` fp32; int8 `chain`, `split`, `plain`, `onnxruntime-int8`), `pt2e` (torchao's
PyTorch 2 export int8 lowered to oneDNN). A backend names the optional packages it imports in `requires`, imports them
inside `prepare` (so the CLI stays fast), and is refused with an install hint where one is missing.
"""
from ._registry import BACKENDS, Backend, Runner, Setup, backend_names, get_backends, register_backend
# each registers its backends; the commands list them in this order
from . import torch_eager, onnxruntime, pt2e  # noqa: F401

__all__ = ['Runner', 'Setup', 'Backend', 'BACKENDS', 'register_backend', 'backend_names', 'get_backends']
