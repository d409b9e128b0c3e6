""" The PyTorch backends: `eager`, and `compile` (torch.compile with frozen weights: inductor folds BatchNorm into
convs and prepacks oneDNN weights); fp32, or bf16 under CPU autocast. """
import copy
from contextlib import nullcontext

import torch
import torch.nn as nn

from ._registry import Runner, Setup, register_backend

__all__ = ['PRECISIONS', 'prepare_eager', 'prepare_compile']

PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def _autocast(precision: str):
    return nullcontext() if precision == 'fp32' else torch.autocast('cpu', dtype=PRECISIONS[precision])


def _runner(model: nn.Module, precision: str) -> Runner:
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _autocast(precision):
            return model(x)
    return Runner(predict=predict, bind=lambda x: lambda: predict(x), precision=precision)


@register_backend('eager', precisions=tuple(PRECISIONS))
def prepare_eager(model: nn.Module, setup: Setup) -> Runner:
    """ `model` (eval) run without gradients in `setup.precision`. """
    return _runner(model, setup.precision)


@register_backend('compile', precisions=tuple(PRECISIONS))
def prepare_compile(model: nn.Module, setup: Setup) -> Runner:
    """ A copy of `model` (eval) compiled with frozen weights, run without gradients in `setup.precision`. """
    return _runner(torch.compile(copy.deepcopy(model), dynamic=False, options={'freezing': True}), setup.precision)
