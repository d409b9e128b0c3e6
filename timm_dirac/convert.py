""" State-dict conversion between the train form and the folded form of DiracNets

Train form: `stem.conv.weight` + `stem.bn.*`, per Dirac layer `...conv.{weight,alpha,beta}` + `...bn.*`.
Folded form: `stem.conv.{weight,bias}`, per layer `...conv.{weight,bias}`, no BatchNorm.

Folding (REFERENCE.md section 3) uses the BN running statistics; unfolding is exact: a folded conv (Wf, bf)
is reproduced by alpha = 0, beta = ||Wf[o]||, W = Wf, BN weight 1, bias bf, mean 0, var 1 - eps.
"""
from typing import Dict

import torch
import torch.nn as nn

from .layers import dirac_kernel

__all__ = ['fold_state_dict', 'unfold_state_dict', 'is_folded_state_dict', 'checkpoint_filter_fn']

BN_EPS = 1e-5
_BN_STATS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def is_folded_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """ True for a folded DiracNet state dict (stem conv with bias, no BatchNorm). """
    return 'stem.conv.bias' in state_dict and 'stem.bn.running_var' not in state_dict


def fold_state_dict(state_dict: Dict[str, torch.Tensor], eps: float = BN_EPS) -> Dict[str, torch.Tensor]:
    """ Fold a train-form state dict: Dirac term and BatchNorm into conv weight and bias (float64 math). """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith('bn.running_var')]:
        prefix = key[:-len('bn.running_var')]
        conv, bn = prefix + 'conv.', prefix + 'bn.'
        weight = out.pop(conv + 'weight').double()
        dtype = state_dict[conv + 'weight'].dtype
        if conv + 'alpha' in out:
            weight = dirac_kernel(weight, out.pop(conv + 'alpha').double(), out.pop(conv + 'beta').double())
        scale = (state_dict[bn + 'running_var'].double() + eps).rsqrt() * state_dict[bn + 'weight'].double()
        bias = state_dict[bn + 'bias'].double() - state_dict[bn + 'running_mean'].double() * scale
        if conv + 'bias' in out:
            bias = bias + out[conv + 'bias'].double() * scale
        out[conv + 'weight'] = (weight * scale.view(-1, 1, 1, 1)).to(dtype)
        out[conv + 'bias'] = bias.to(dtype)
        for name in _BN_STATS:
            out.pop(bn + name, None)
    return out


def unfold_state_dict(
        state_dict: Dict[str, torch.Tensor],
        dirac: bool = True,
        eps: float = BN_EPS,
) -> Dict[str, torch.Tensor]:
    """ Exactly re-express a folded state dict in the train form, so a folded checkpoint can be fine-tuned.

    Every folded conv becomes alpha = 0, beta = ||W[o]||, W (Dirac layers, if `dirac`) followed by an identity
    BatchNorm carrying the bias. The stem conv keeps its weight; its bias moves to the stem BN.
    """
    out = dict(state_dict)
    conv_keys = [k for k in state_dict if k.endswith('conv.bias')]
    for key in conv_keys:
        prefix = key[:-len('conv.bias')]
        weight, bias = state_dict[prefix + 'conv.weight'], out.pop(key)
        channels = weight.shape[0]
        if dirac and prefix != 'stem.':
            out[prefix + 'conv.alpha'] = torch.zeros(channels, dtype=weight.dtype)
            out[prefix + 'conv.beta'] = weight.double().flatten(1).norm(dim=1).to(weight.dtype)
        out[prefix + 'bn.weight'] = torch.ones(channels, dtype=weight.dtype)
        out[prefix + 'bn.bias'] = bias
        out[prefix + 'bn.running_mean'] = torch.zeros(channels, dtype=weight.dtype)
        out[prefix + 'bn.running_var'] = torch.full((channels,), 1. - eps, dtype=weight.dtype)
        out[prefix + 'bn.num_batches_tracked'] = torch.tensor(0)
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """ timm `pretrained_filter_fn`: bring a DiracNet state dict into the form (train or folded) of `model`. """
    model_folded = not isinstance(model.stem.bn, nn.BatchNorm2d)
    if model_folded and not is_folded_state_dict(state_dict):
        return fold_state_dict(state_dict)
    if not model_folded and is_folded_state_dict(state_dict):
        dirac = any(name.endswith('conv.alpha') for name, _ in model.named_parameters())
        return unfold_state_dict(state_dict, dirac=dirac)
    return state_dict
