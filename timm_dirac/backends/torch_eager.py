""" The PyTorch backend: eager, or torch.compile with frozen weights (inductor folds BatchNorm into convs and
prepacks oneDNN weights); fp32, or bf16 under CPU autocast. """
import copy
from contextlib import nullcontext

import torch
import torch.nn as nn

from . import Runner

__all__ = ['PRECISIONS', 'prepare']

PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def _autocast(precision: str):
    return nullcontext() if precision == 'fp32' else torch.autocast('cpu', dtype=PRECISIONS[precision])


def prepare(model: nn.Module, precision: str = 'fp32', compile: bool = False) -> Runner:
    """ `model` (eval) run without gradients in `precision`, compiled first with `compile` (a copy). """
    if compile:
        model = torch.compile(copy.deepcopy(model), dynamic=False, options={'freezing': True})

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _autocast(precision):
            return model(x)
    return Runner(predict=predict, bind=lambda x: lambda: predict(x), precision=precision)
