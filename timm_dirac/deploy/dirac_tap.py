""" The Dirac tap of a folded DiracNet, out of the int8 weights: `split_dirac_taps` and `chain_dirac_taps` rewrite
the folded model into the same function in float, whose int8 weights represent it well.

Why: folding leaves each Dirac layer as one 3x3 conv whose centre tap on the diagonal (output channel o reading input
channel o) carries `s * alpha`, larger than any learned weight of the filter (per-layer medians over channels:
16-52x in our DiracNet-16-4 weights, 18-110x in our DiracNet-34-2; docs/results.md). A per-channel int8 scale is set
by the largest weight, so the learned part of the filter gets only a few int8 steps, and pre-VNNI x86 kernels (u8 x
s8 pairs summed in saturating 16-bit registers) overflow on that tap. No quantization library has this rewrite.
"""
import copy
from typing import List, Tuple

import torch
import torch.nn as nn

from ..diracnet import DiracBlock

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
    """ A copy of a folded DiracNet whose Dirac layers are `SplitDiracConv`s (the same function, in float):

        y = conv3x3(x, W - D) + conv1x1(x, d)        D: the diagonal centre taps of W, d: their values

    The 3x3 conv holds only what was learned, so its per-channel scale fits the learned weights. The 1x1 conv
    (depthwise where the width does not change) carries one weight per output channel, which a per-channel symmetric
    int8 scale represents exactly (q = +-qmax). The quantized graph runs both as int8 convs and adds them (QLinearAdd
    in ONNX Runtime). """
    _folded_blocks(model)
    split = copy.deepcopy(model).eval()
    for block in [m for m in split.modules() if isinstance(m, DiracBlock)]:
        block.conv = SplitDiracConv(block.conv)
    return split


def _floored_taps(conv: nn.Conv2d) -> torch.Tensor:
    """ A same-width layer's diagonal centre taps (float64), floored at a quarter of their median positive value so
    that a small or negative tap cannot send its channel's units towards zero. """
    taps = conv.weight[diagonal_centre(conv.weight)].double()
    positive = taps[taps > 0]
    floor = positive.median() / 4 if len(positive) else taps.new_tensor(1.)
    return taps.clamp(min=floor)


def _starting_units(run: List[nn.Conv2d], like: torch.Tensor) -> torch.Tensor:
    """ The units a run of same-width layers starts from: the inverse per-channel geometric mean of the products of
    their taps (1, d1, d1 d2, ...), so that the units along the run are centred on 1; shaped like `like` (the
    incoming units, ones when the run has no layers). """
    logs = [torch.zeros_like(like)]
    for conv in run:
        logs.append(logs[-1] + _floored_taps(conv).log())
    return torch.stack(logs).mean(0).neg().exp()


def _divide_rows(conv: nn.Conv2d, units: torch.Tensor) -> None:
    """ Output channel o of `conv` (weights and bias) divided by units[o]: its output in those units. """
    conv.weight.div_(units.view(-1, 1, 1, 1).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.div_(units.to(conv.bias.dtype))


@torch.no_grad()
def chain_dirac_taps(model: nn.Module) -> nn.Module:
    """ A copy of a folded DiracNet computing the same function (in float) with its activations in per-channel
    units in which the Dirac taps of same-width layers are identity adds (`IdentityDiracConv`); width-changing layers
    are `SplitDiracConv`s. The classifier takes the last layer's units where a Linear follows an average or max
    global pool; otherwise the last layer is split and returns to the model's own units.

    A tap is a per-channel scaled identity, and a positive per-channel scale commutes with ReLU, max-pooling and
    global pooling, so the activations can be carried in per-channel units in which the tap of a same-width layer is
    exactly 1: with x = s * x' and t = s * d (d: the layer's taps, floored at a quarter of their median positive
    value),

        z / t = conv3x3(x', (W - D) * s_in / t_out + R) + b / t + x'        R: the diagonal centre taps d * s / t - 1

    so the layer is one int8 conv plus an identity Add (QLinearAdd) of its own uint8 input; R is zero but for the few
    taps under the floor (or negative). The units compound along a run of same-width layers (s after k layers is the
    product of the k taps), so each run starts from units chosen to centre that product: the per-channel geometric
    mean of the run's units is 1, so they spread around 1 instead of drifting with the product of the taps. The stem
    conv's or a width-changing layer's output rows carry a run's starting units, and the classifier's input columns
    take the last layer's units. On our CIFAR-10 weights (full test split, fp32 90.00, 512 calibration images) this
    scores 89.93-90.16 in int8 over four calibration sets; resetting the units to 1 every 2 layers instead scored
    89.69-89.92, and uncentred chains (with taps floored at a twentieth of their median) 29-38. """
    _folded_blocks(model)
    out = copy.deepcopy(model).eval()
    blocks = [m for m in out.modules() if isinstance(m, DiracBlock)]
    fc = getattr(out.head, 'fc', None)
    pool = getattr(getattr(out.head, 'global_pool', None), 'pool_type', None)
    absorbs_units = isinstance(fc, nn.Linear) and pool in ('avg', 'max', 'avgmax')
    identity = [b.conv.in_channels == b.conv.out_channels and (absorbs_units or i < len(blocks) - 1)
                for i, b in enumerate(blocks)]

    def run_after(i: int) -> List[nn.Conv2d]:  # the same-width layers from block i + 1 to the next split one
        run = []
        for block, same in zip(blocks[i + 1:], identity[i + 1:]):
            if not same:
                break
            run.append(block.conv)
        return run

    dd = dict(dtype=torch.float64, device=blocks[0].conv.weight.device)
    units = _starting_units(run_after(-1), torch.ones(blocks[0].conv.in_channels, **dd))
    _divide_rows(out.stem.conv, units)
    for i, block in enumerate(blocks):
        conv = block.conv
        weight = conv.weight.double() * units.view(1, -1, 1, 1)  # the incoming units into the input channels
        if not identity[i]:
            conv.weight.copy_(weight)
            block.conv = split = SplitDiracConv(conv)
            units = _starting_units(run_after(i), torch.ones(conv.out_channels, **dd))
            _divide_rows(split.learned, units)
            _divide_rows(split.identity, units)
            continue
        where = diagonal_centre(weight)
        out_units = units * _floored_taps(conv)
        weight[where] = conv.weight[where].double() * units - out_units  # (d * s / t - 1) once divided by t
        conv.weight.copy_(weight / out_units.view(-1, 1, 1, 1))
        if conv.bias is not None:
            conv.bias.copy_(conv.bias.double() / out_units)
        block.conv = IdentityDiracConv(conv)
        units = out_units
    if absorbs_units:
        fc.weight.mul_(units.to(fc.weight.dtype))
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
