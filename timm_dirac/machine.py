""" The precision that is fast where a run happens: bf16 where the hardware computes it natively, fp16 with a loss
scaler on GPUs without bf16, fp32 elsewhere.

CPUs without AMX or AVX512-BF16 emulate bf16 autocast, which made a DiracNet training step about 2.8x *slower* than
fp32 on an AVX-512 Xeon without them (and 2.7x faster on one with AMX), so bf16 is picked on a CPU only when one of
those instruction sets is listed. PyTorch's own probes do not tell the two apart (`get_cpu_capability()` says
'AVX512' on both, `_is_mkldnn_bf16_supported()` is True on both); the kernel's CPU flags do.
"""
from pathlib import Path
from typing import Set, Tuple

import torch

__all__ = ['cpu_flags', 'auto_precision']

BF16_CPU_FLAGS = ('amx_bf16', 'avx512_bf16')


def cpu_flags() -> Set[str]:
    """ The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is not available). """
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('flags'):
                return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return set()


def auto_precision(device_type: str) -> Tuple[str, str]:
    """ ('bf16' | 'fp16' | 'fp32', why) for training or inference on `device_type` ('cuda', 'cpu', ...). """
    if device_type == 'cuda':
        if torch.cuda.is_bf16_supported():
            return 'bf16', 'the CUDA GPU computes bf16'
        return 'fp16', 'the CUDA GPU has no bf16: fp16 with a loss scaler'
    if device_type == 'cpu':
        found = sorted(set(BF16_CPU_FLAGS) & cpu_flags())
        if found:
            return 'bf16', f'the CPU has {" and ".join(found)}'
        return 'fp32', ('the CPU has neither amx_bf16 nor avx512_bf16, so bf16 would be emulated and about 3x slower '
                        'than fp32')
    return 'fp32', f'no bf16 rule for {device_type} devices'
