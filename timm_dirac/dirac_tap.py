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
"""
import copy
from typing import List, Tuple

import torch
import torch.nn as nn

from .diracnet import DiracBlock

__all__ = ['SplitDiracConv', 'split_dirac_taps', 'centre_tap_ratio', 'diagonal_centre']


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


def split_dirac_taps(model: nn.Module) -> nn.Module:
    """ A copy of a folded DiracNet whose Dirac layers are `SplitDiracConv`s (the same function, in float). """
    blocks = [m for m in model.modules() if isinstance(m, DiracBlock)]
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no Dirac layers to split: the split int8 flow is for DiracNets; '
                         f'use --flow plain for other models.')
    if any(not isinstance(b.bn, nn.Identity) for b in blocks):
        raise ValueError('The model is in the train form: fold it first (model.reparameterize()).')
    split = copy.deepcopy(model).eval()
    for block in [m for m in split.modules() if isinstance(m, DiracBlock)]:
        block.conv = SplitDiracConv(block.conv)
    return split


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
