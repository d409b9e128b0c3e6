""" The Dirac tap of a folded DiracNet, split out of the int8 weights.

Folding leaves each Dirac layer as one 3x3 conv whose centre tap on the diagonal (output channel o reading input
channel o) carries `s * alpha`, larger than any learned weight of the filter (per-layer medians over channels:
16-52x in our DiracNet-16-4 weights, 18-110x in our DiracNet-34-2; docs/results.md). A
per-channel int8 scale is set by the largest weight, so the learned part of the filter gets only a few int8 steps,
and pre-VNNI x86 kernels (u8 x s8 pairs summed in saturating 16-bit registers) overflow on that tap.

`split_dirac_taps` rewrites each folded Dirac conv as the sum of two convs that compute the same function:

    y = conv3x3(x, W - D) + conv1x1(x, d)        D: the diagonal centre taps of W, d: their values

The 3x3 conv holds only what was learned, so its per-channel scale fits the learned weights. The 1x1 conv
(depthwise where the width does not change) carries one weight per output channel, which a per-channel symmetric
int8 scale represents exactly (q = +-qmax). The quantized graph runs both as int8 convs and adds them (QLinearAdd
in ONNX Runtime).

`chain_dirac_taps` removes most of those 1x1 convs. A tap is a per-channel scaled identity, and a positive
per-channel scale commutes with ReLU and max-pooling, so the activations can be carried in per-channel units in
which the tap of a same-width layer is exactly 1: with x = s * x' (s from the layer before, 1 at the first),
t = s * max(d, m) (m: the layer's median positive tap) and x'_next = relu(z) / t,

    z / t = conv3x3(x', (W - D) * s_in / t_out + R) + b / t + x'        R: the diagonal centre taps d * s / t - 1

so the layer is one int8 conv plus an identity Add (QLinearAdd) of its own uint8 input. Taps at or above the median
are carried exactly (R = 0); a channel whose tap is below it (or negative) keeps that small part, |R| < 1, in the
learned conv, where it does not dominate the weights. The units compound along the chain, so after `chain` such
layers, at a width change and at the last layer a `SplitDiracConv` (the incoming units folded into its input
channels) returns to s = 1. On our CIFAR-10 weights (full test split, fp32 90.00) chains of 1, 2 and 3 score 89.76,
89.85 and 89.42 in int8 (every layer split: 89.87): 2 is the default.
"""
import copy
from typing import List, Tuple

import torch
import torch.nn as nn

from .diracnet import DiracBlock

__all__ = ['SplitDiracConv', 'IdentityDiracConv', 'split_dirac_taps', 'chain_dirac_taps', 'centre_tap_ratio',
           'diagonal_centre']


def diagonal_centre(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """ Where the Dirac taps sit in a (C_out, C_in, k, k) kernel, for `weight[diagonal_centre(weight)]`: the centre
    tap of output channel o reading input channel o, for o < min(C_out, C_in). """
    index = torch.arange(min(weight.shape[0], weight.shape[1]), device=weight.device)
    return index, index, weight.shape[2] // 2, weight.shape[3] // 2


def _diagonal_centre(weight: torch.Tensor) -> torch.Tensor:
    """ The centre taps on the diagonal of a (C_out, C_in, k, k) kernel, zero past min(C_out, C_in). """
    where = diagonal_centre(weight)
    taps = weight.new_zeros(weight.shape[0])
    taps[:len(where[0])] = weight[where]
    return taps


class SplitDiracConv(nn.Module):
    """ A folded Dirac conv as a learned 3x3 conv plus a 1x1 conv holding its diagonal centre taps. """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1 or conv.stride != (1, 1) or conv.kernel_size[0] % 2 == 0 \
                or conv.kernel_size[0] != conv.kernel_size[1] or conv.padding != (conv.kernel_size[0] // 2,) * 2:
            raise ValueError(f'{conv} is not a folded Dirac conv (odd square kernel, stride 1, same padding, '
                             f'groups 1): its centre taps cannot be split out exactly.')
        out_chs, in_chs = conv.out_channels, conv.in_channels
        taps = _diagonal_centre(conv.weight.detach())
        dd = dict(device=taps.device, dtype=taps.dtype)
        self.learned = copy.deepcopy(conv)
        with torch.no_grad():
            self.learned.weight[diagonal_centre(self.learned.weight)] = 0.
        if in_chs == out_chs:  # depthwise: one weight per channel
            self.identity = nn.Conv2d(in_chs, out_chs, 1, groups=out_chs, bias=False, **dd)
            with torch.no_grad():
                self.identity.weight.copy_(taps.view(-1, 1, 1, 1))
        else:  # the identity covers the first min(C_in, C_out) channels
            self.identity = nn.Conv2d(in_chs, out_chs, 1, bias=False, **dd)
            with torch.no_grad():
                self.identity.weight.zero_()
                where = diagonal_centre(self.identity.weight)
                self.identity.weight[where] = taps[:len(where[0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.learned(x) + self.identity(x)

    @torch.no_grad()
    def merged(self) -> nn.Conv2d:
        """ The one conv this pair computes: the learned conv with the identity's taps put back on its diagonal
        (in place on `learned`, which is returned). """
        identity = self.identity.weight
        taps = identity.flatten() if self.identity.groups > 1 else identity[diagonal_centre(identity)]
        where = diagonal_centre(self.learned.weight)
        self.learned.weight[where] = taps[:len(where[0])]
        return self.learned


class IdentityDiracConv(nn.Module):
    """ A same-width folded Dirac conv in the units of `chain_dirac_taps`: `conv(x) + x`. """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x


def _folded_blocks(model: nn.Module) -> List[DiracBlock]:
    blocks = [m for m in model.modules() if isinstance(m, DiracBlock)]
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no Dirac layers to split: the split int8 flow is for DiracNets; '
                         f'use --flow plain for other models.')
    if any(not isinstance(b.bn, nn.Identity) for b in blocks):
        raise ValueError('The model is in the train form: fold it first (model.reparameterize()).')
    return blocks


def split_dirac_taps(model: nn.Module) -> nn.Module:
    """ A copy of a folded DiracNet whose Dirac layers are `SplitDiracConv`s (the same function, in float). """
    _folded_blocks(model)
    split = copy.deepcopy(model).eval()
    for block in [m for m in split.modules() if isinstance(m, DiracBlock)]:
        block.conv = SplitDiracConv(block.conv)
    return split


@torch.no_grad()
def chain_dirac_taps(model: nn.Module, chain: int = 2) -> nn.Module:
    """ A copy of a folded DiracNet computing the same function (in float) with its activations in per-channel
    units in which the Dirac taps of same-width layers are identity adds (`IdentityDiracConv`), `chain` of them at
    most in a row; the other layers are `SplitDiracConv`s that return to the model's own units (module docstring).
    The layers must run in the order `model.modules()` lists them, with only ReLU and max-pooling between. """
    if chain < 0:
        raise ValueError(f'chain must be >= 0, got {chain}.')
    _folded_blocks(model)
    out = copy.deepcopy(model).eval()
    blocks = [m for m in out.modules() if isinstance(m, DiracBlock)]
    dd = dict(dtype=torch.float64, device=blocks[0].conv.weight.device)
    units = torch.ones(blocks[0].conv.in_channels, **dd)
    run = 0
    for i, block in enumerate(blocks):
        conv = block.conv
        weight = conv.weight.double() * units.view(1, -1, 1, 1)
        same_width = conv.in_channels == conv.out_channels
        if not same_width or run == chain or i == len(blocks) - 1:
            conv.weight.copy_(weight)
            block.conv = SplitDiracConv(conv)
            units, run = torch.ones(conv.out_channels, **dd), 0
            continue
        where = diagonal_centre(weight)
        taps = conv.weight[where].double()
        positive = taps[taps > 0]
        median = positive.median() if len(positive) else taps.new_tensor(1.)
        out_units = units * taps.clamp(min=median)
        weight[where] = taps * units - out_units  # what stays in the conv: (d * s / t - 1) once divided by t
        conv.weight.copy_(weight / out_units.view(-1, 1, 1, 1))
        if conv.bias is not None:
            conv.bias.copy_(conv.bias.double() / out_units)
        block.conv = IdentityDiracConv(conv)
        units, run = out_units, run + 1
    return out


@torch.no_grad()
def centre_tap_ratio(model: nn.Module) -> List[float]:
    """ Per folded Dirac layer: the median over output channels of |diagonal centre tap| / max |other weight|. """
    ratios = []
    for block in [m for m in model.modules() if isinstance(m, DiracBlock)]:
        weight = block.conv.weight
        taps = _diagonal_centre(weight).abs()
        count = min(weight.shape[0], weight.shape[1])
        rest = weight.clone()
        rest[diagonal_centre(rest)] = 0.
        others = rest.flatten(1).abs().amax(1)
        ratios.append((taps[:count] / others[:count].clamp_min(1e-12)).median().item())
    return ratios
