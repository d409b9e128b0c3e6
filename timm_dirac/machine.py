""" The machine a run happens on: the one probe of its CPU (name, features), what speed numbers depend on
(`machine_info`), and the precision that is fast there (`auto_precision`).

CPUs without AMX or AVX512-BF16 emulate bf16 autocast, which made a DiracNet training step about 2.8x *slower* than
fp32 on an AVX-512 Xeon without them (and 2.7x faster on one with AMX), so bf16 is picked on a CPU only where one of
them is found. `torch.backends.cpu.get_cpu_capability()` says 'AVX512' on both kinds and `_is_mkldnn_bf16_supported()`
is True on both, but PyTorch's cpuinfo probes (`torch.cpu.get_capabilities()`, `torch.cpu._is_avx512_bf16_supported()`,
`_is_amx_tile_supported()`, `_is_vnni_supported()`) do tell an AMX Xeon, an AVX-512 Xeon without bf16 or VNNI and an
AMD EPYC with avx512_bf16 and VNNI apart: they are what is read here.
"""
import os
import platform
from pathlib import Path
from typing import Any, Dict, Set, Tuple

import torch

__all__ = ['cpu_name', 'cpu_features', 'machine_info', 'auto_precision']

# the features reported, named as Linux's /proc/cpuinfo flags, with the torch.cpu probe of each for a torch without
# the public torch.cpu.get_capabilities(); `get_capabilities` spells AVX-512 foundation 'avx512_f'
FEATURES = {
    'avx2': '_is_avx2_supported', 'avx512f': '_is_avx512_supported', 'avx512_vnni': '_is_vnni_supported',
    'avx512_bf16': '_is_avx512_bf16_supported', 'amx_tile': '_is_amx_tile_supported',
    'amx_fp16': '_is_amx_fp16_supported', 'avx_vnni': None, 'amx_bf16': None, 'amx_int8': None,
}
BF16_CPU_FEATURES = ('amx_tile', 'avx512_bf16')  # the CPU computes bf16 matmuls natively


def cpu_features() -> Set[str]:
    """ The CPU's vector and matrix features of `FEATURES` that PyTorch's cpuinfo finds (empty off x86). """
    capabilities = getattr(torch.cpu, 'get_capabilities', None)
    if capabilities is not None:
        found = capabilities()
        return {name for name in FEATURES if found.get('avx512_f' if name == 'avx512f' else name, False) is True}
    return {name for name, probe in FEATURES.items() if probe and getattr(torch.cpu, probe, lambda: False)()}


def cpu_name() -> str:
    """ The CPU's model name (PyTorch's cpuinfo, else Linux's /proc/cpuinfo, else the platform's machine type). """
    capabilities = getattr(torch.cpu, 'get_capabilities', None)
    name = capabilities().get('cpu_name') if capabilities is not None else None
    if not name:
        try:
            name = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                         if line.startswith('model name')), None)
        except OSError:
            pass
    return name or platform.processor() or platform.machine()


def machine_info() -> Dict[str, Any]:
    """ What speed numbers depend on: the CPU and its features, threads, library versions. """
    import timm
    versions = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__)
    try:
        import onnxruntime
        versions['onnxruntime'] = onnxruntime.__version__
    except ImportError:
        pass
    return dict(cpu=cpu_name(), logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                isa=sorted(cpu_features()), versions=versions)


def auto_precision(device_type: str) -> Tuple[str, str]:
    """ ('bf16' | 'fp16' | 'fp32', why) for training or inference on `device_type` ('cuda', 'cpu', ...). """
    if device_type == 'cuda':
        if torch.cuda.is_bf16_supported():
            return 'bf16', 'the CUDA GPU computes bf16'
        return 'fp16', 'the CUDA GPU has no bf16: fp16 with a loss scaler'
    if device_type == 'cpu':
        found = sorted(set(BF16_CPU_FEATURES) & cpu_features())
        if found:
            return 'bf16', f'the CPU has {" and ".join(found)}'
        return 'fp32', ('the CPU has neither AMX (amx_tile) nor avx512_bf16, so bf16 would be emulated and about 3x '
                        'slower than fp32')
    return 'fp32', f'no bf16 rule for {device_type} devices'
