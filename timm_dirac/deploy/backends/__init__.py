""" Inference backends behind one interface, found by name in one registry.

A backend is a function `prepare(model, setup) -> Runner` registered under a name with `@register_backend`; the
commands list the registry, so their choices are what is registered:
- `timm-dirac benchmark --backends` times every registered backend at each precision it runs
  (`timing.time_interleaved` on `runner.bind(x)`);
- `timm-dirac quantize --flow` scores and times every int8 backend (they calibrate on `setup.calib`) against
  ONNX Runtime fp32.

Registered here:
- `torch_eager`: `eager`, `compile` (torch.compile with frozen weights); fp32 or bf16 autocast.
- `onnxruntime`: `onnxruntime` (fp32), and static int8 QDQ by the `split` and `plain` flows, or `onnxruntime-int8`:
  `split` for a folded DiracNet, `plain` for other models.
- `pt2e`: `pt2e`, PyTorch 2 export int8 (torchao's x86 inductor quantizer) lowered to oneDNN kernels.

Adding a backend is one new module with a decorated `prepare`, imported below:

    @register_backend('mybackend', precisions=('fp32',), requires=('mypackage',))
    def prepare(model: nn.Module, setup: Setup) -> Runner:
        import mypackage  # optional packages are imported here, so the CLI stays fast without them
        ...

`requires` names the optional packages a backend imports; the commands refuse the backend with an install hint
where one is missing.
"""
from ._registry import BACKENDS, Backend, Runner, Setup, backend_names, get_backends, register_backend
# each registers its backends; the commands list them in this order
from . import torch_eager, onnxruntime, pt2e  # noqa: F401

__all__ = ['Runner', 'Setup', 'Backend', 'BACKENDS', 'register_backend', 'backend_names', 'get_backends']
