""" Bad numbers are refused, never written as a result: one check for weights that are not finite floats.

Used by the commands where weights are loaded (convert, and `loading.load_model` behind validate, export-onnx and
quantize), after folding, and by the training loop before each checkpoint. The model's checkpoint filter does not
scan values: the Python API loads what it is given, as timm does.
"""
from typing import Mapping

import torch

__all__ = ['check_weights']

INTEGER_KEYS = ('num_batches_tracked',)  # BatchNorm's step counter: the one integer tensor of a DiracNet


def check_weights(state_dict: Mapping[str, torch.Tensor], source: str, floating: bool = True) -> None:
    """ Raise ValueError naming `source` and the first bad tensors if any tensor holds NaN or inf, or (with
    `floating`, for DiracNet state dicts) if a weight other than BatchNorm's step counter is not floating point
    (integer weights would be truncated to zeros by folding and by the model). """
    if floating:
        wrong = [(k, v.dtype) for k, v in state_dict.items() if isinstance(v, torch.Tensor)
                 and not v.is_floating_point() and not k.endswith(INTEGER_KEYS)]
        if wrong:
            names = ', '.join(f'{k} ({str(dtype).replace("torch.", "")})' for k, dtype in wrong[:3])
            raise ValueError(f'{source}: {len(wrong)} weight tensors are not floating point, e.g. {names}; '
                             f'weights must be float32/float16/bfloat16: save them from the trained model as floats.')
    bad = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f'{source}: {len(bad)} tensors hold NaN or infinite values (e.g. {", ".join(bad[:3])}); '
                         f'these weights are broken (a diverged training run?): use an earlier checkpoint.')
