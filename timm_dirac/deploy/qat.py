""" Quantization-aware fine-tuning for the split int8 flow (`timm-dirac quantize --flow split`).

`prepare_qat` folds a DiracNet, splits its Dirac taps out (`dirac_tap`) and puts every weight that the split flow
stores in int8 through the grid it will be stored on (symmetric per output channel, 7-bit, the scale set by the
channel's largest weight: the grid ONNX Runtime derives), so that after `merge_qat` the split flow stores exactly the
trained weights. The identity taps stay fixed and the learned convs keep a zero diagonal centre tap, so the split of
the merged model finds the same two parts. Ours rather than torch.ao's QAT modules: their observers set the scale
from running statistics, not from each channel's largest weight as ONNX Runtime does.
"""
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .dirac_tap import SplitDiracConv, diagonal_centre, split_dirac_taps
from ..loading import fold

__all__ = ['WeightFakeQuant', 'prepare_qat', 'merge_qat']

WEIGHT_QMAX = 64  # the split flow's 7-bit weights (ONNX Runtime's reduce_range)


class WeightFakeQuant(nn.Module):
    """ Per-output-channel symmetric fake quantization of a weight (`torch.fake_quantize_per_channel_affine`, the
    scale set by each channel's largest weight), straight-through gradient; with `mask`, the weight is multiplied by
    it first (zeros stay zero). """

    def __init__(self, qmax: int = WEIGHT_QMAX, mask: torch.Tensor = None):
        super().__init__()
        self.qmax = qmax
        self.register_buffer('mask', mask, persistent=mask is not None)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            weight = weight * self.mask
        scale = weight.detach().flatten(1).abs().amax(1).clamp_min(1e-12) / self.qmax
        zero_point = torch.zeros(len(scale), dtype=torch.int32, device=weight.device)
        # every weight is within +-qmax steps, so torch's clipped straight-through gradient passes all of them
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -self.qmax, self.qmax)


def _off_diagonal_centre(conv: nn.Conv2d) -> torch.Tensor:
    mask = torch.ones_like(conv.weight)
    mask[diagonal_centre(mask)] = 0.
    return mask


def prepare_qat(model: nn.Module) -> nn.Module:
    """ Fold, split the Dirac taps and fake-quantize the weights the split int8 flow quantizes (a new model). """
    model = split_dirac_taps(fold(model))
    identities = {id(m.identity) for m in model.modules() if isinstance(m, SplitDiracConv)}
    learned = {id(m.learned) for m in model.modules() if isinstance(m, SplitDiracConv)}
    for module in list(model.modules()):
        if id(module) in identities:
            module.weight.requires_grad_(False)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            mask = _off_diagonal_centre(module) if id(module) in learned else None
            parametrize.register_parametrization(module, 'weight', WeightFakeQuant(mask=mask))
    return model.train()


@torch.no_grad()
def merge_qat(model: nn.Module) -> nn.Module:
    """ The folded DiracNet that a `prepare_qat` model computes (in place): weights on their int8 grid, each split
    conv summed back into one conv. `timm-dirac quantize --flow split` splits it again into the same weights. """
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, 'weight'):
            parametrize.remove_parametrizations(module, 'weight', leave_parametrized=True)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SplitDiracConv):
                setattr(parent, name, child.merged())
    model.eval()
    if hasattr(model, 'reparameterize'):
        model.reparameterize()  # already folded: records inference_mode in the model's arguments
    return model
