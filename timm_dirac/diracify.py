""" diracify: train any plain CNN with Dirac-parameterized convs, then fold it back into the original architecture

`diracify(model)` swaps each eligible `nn.Conv1d/2d/3d` of a model (a timm VGG, a user's own net, ...) for a
Dirac-parameterized conv of the same shape, `W_hat = alpha * delta + beta * normalize(W)` (DiracNets,
arXiv:1706.00388), keeping the attribute name and the conv's `weight`/`bias` keys. Two starting points:

* fresh training (default): the paper's alpha=1, beta=0.1, so a deep plain stack starts near the identity;
* `from_pretrained=True`: alpha=0, beta=||W|| per output filter, so a trained model computes the same function and
  can be fine-tuned in Dirac form.

Eligible convs are those whose Dirac kernel folds back exactly and whose identity term maps each pixel to itself:
plain `nn.ConvNd` (not a subclass with its own forward), odd kernel, stride 1, groups 1, zero 'same' padding; any
in/out width (the identity covers the channels both share, as `torch.nn.init.dirac_` does). Every other conv is
left alone and listed in the plan (`plan_diracify`, `verbose=True`, or the log).

`timm.utils.reparameterize_model(model)` folds the model back: each Dirac conv's `fuse()` returns an `nn.ConvNd` of
the original class and arguments, so the folded `state_dict()` loads strictly into the untouched original model and
nothing of timm-dirac is needed to use it.
"""
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn

import torch.nn.functional as F

from .diracnet import DiracConv2d, DiracConvNd

__all__ = ['diracify', 'plan_diracify', 'is_folded', 'DiracifyPlan', 'DiracConv1d', 'DiracConv3d', 'DiracifiedConv1d',
           'DiracifiedConv2d', 'DiracifiedConv3d']

_logger = logging.getLogger(__name__)

class DiracConv1d(DiracConvNd):
    """ Dirac-parameterized `nn.Conv1d` replacement (stride 1, size-preserving padding). """
    num_spatial_dims = 1

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, weight, self.bias, 1, self.padding, self.dilation)


class DiracConv3d(DiracConvNd):
    """ Dirac-parameterized `nn.Conv3d` replacement (stride 1, size-preserving padding). """
    num_spatial_dims = 3

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, weight, self.bias, 1, self.padding, self.dilation)


def is_folded(model: nn.Module) -> bool:
    """ Whether `model` is in its folded (inference) form: no BatchNorm and no Dirac-parameterized conv left,
    however it was folded (`reparameterize()`, timm's `reparameterize_model`, or built with `inference_mode=True`). """
    return not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, DiracConvNd)) for m in model.modules())


ELIGIBILITY = 'plain nn.Conv1d/2d/3d with odd kernel, stride 1, groups 1 and zero "same" padding'


class _Diracified:
    """ A Dirac conv that stands in for a plain `nn.ConvNd` and folds back into one (`fuse`). """
    plain_type: Type[nn.modules.conv._ConvNd]

    @classmethod
    @torch.no_grad()
    def from_conv(
            cls,
            conv: nn.modules.conv._ConvNd,
            from_pretrained: bool = False,
            alpha_init: float = 1.,
            beta_init: float = 0.1,
    ) -> '_Diracified':
        """ The Dirac form of an eligible `conv`; it starts from the conv's own weight and bias. """
        weight = conv.weight
        # built on the meta device: every value is set below, so no initialisation runs (the RNG stream is untouched)
        dirac = cls(conv.in_channels, conv.out_channels, conv.kernel_size, padding='same', dilation=conv.dilation,
                    bias=conv.bias is not None, alpha_init=alpha_init, beta_init=beta_init, device='meta',
                    dtype=weight.dtype).to_empty(device=weight.device)
        dirac.weight.copy_(weight)
        if conv.bias is not None:
            dirac.bias.copy_(conv.bias)
        if from_pretrained:  # beta * normalize(W) == W: the conv computes what it did
            dirac.alpha.zero_()
            dirac.beta.copy_(weight.flatten(1).norm(dim=1))
        else:
            dirac.alpha.fill_(alpha_init)
            dirac.beta.fill_(beta_init)
        dirac.plain_padding = conv.padding
        dirac.train(conv.training)
        return dirac

    @torch.no_grad()
    def fuse(self) -> nn.modules.conv._ConvNd:
        """ The plain conv this layer computes (float64 fold), of the class and arguments it replaced. """
        weight = self.weight
        conv = self.plain_type(
            self.in_channels, self.out_channels, self.kernel_size, padding=self.plain_padding,
            dilation=self.dilation, bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(self.folded_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv.train(self.training)


class DiracifiedConv1d(_Diracified, DiracConv1d):
    """ `DiracConv1d` standing in for an `nn.Conv1d`; `fuse()` gives the `nn.Conv1d` back. """
    plain_type = nn.Conv1d


class DiracifiedConv2d(_Diracified, DiracConv2d):
    """ `DiracConv2d` standing in for an `nn.Conv2d`; `fuse()` gives the `nn.Conv2d` back. """
    plain_type = nn.Conv2d


class DiracifiedConv3d(_Diracified, DiracConv3d):
    """ `DiracConv3d` standing in for an `nn.Conv3d`; `fuse()` gives the `nn.Conv3d` back. """
    plain_type = nn.Conv3d


_DIRACIFIED = {cls.plain_type: cls for cls in (DiracifiedConv1d, DiracifiedConv2d, DiracifiedConv3d)}


@dataclass
class DiracifyPlan:
    """ Which convs of a model `diracify` replaces (`eligible`) and which it leaves alone, with the reason. """
    eligible: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f'diracify: {len(self.eligible)} conv(s) Dirac-parameterized, {len(self.skipped)} left alone']
        lines += [f'  kept {name}: {reason}' for name, reason in self.skipped.items()]
        return '\n'.join(lines)


def _ineligible_reason(conv: nn.Module) -> Optional[str]:
    """ Why `conv` cannot be Dirac-parameterized with an exact fold, or None if it can. """
    if type(conv) not in _DIRACIFIED:
        return f'{type(conv).__name__} is not a plain nn.Conv1d/2d/3d'
    kernel, dilation = conv.kernel_size, conv.dilation
    if any(k % 2 == 0 for k in kernel):
        return f'even kernel_size {kernel} (the identity needs a center tap)'
    if any(s != 1 for s in conv.stride):
        return f'stride {conv.stride} (the identity needs stride 1)'
    if conv.groups != 1:
        return f'groups={conv.groups} (the identity needs groups=1)'
    if conv.padding_mode != 'zeros':
        return f"padding_mode={conv.padding_mode!r} (the fold keeps only 'zeros')"
    same = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    padding = (0,) * len(kernel) if conv.padding == 'valid' else conv.padding
    if padding != 'same' and tuple(padding) != same:
        return f'padding {conv.padding} changes the size (the identity needs padding {same})'
    return None


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan_diracify(model: nn.Module, layers: Optional[Union[str, Sequence[str]]] = None) -> DiracifyPlan:
    """ The convs of `model` (named as in `named_modules`) that `diracify(model, layers)` would replace or keep.

    `layers`: glob pattern(s) over module names (e.g. 'features.*'); None takes every conv.
    Raises ValueError for a model that already has (unfolded) Dirac convs and for a pattern that names no conv.
    """
    patterns = [layers] if isinstance(layers, str) else (list(layers) if layers is not None else None)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, DiracConvNd))]
    for name, module in convs:
        if isinstance(module, DiracConvNd) and module.alpha is not None:
            raise ValueError(
                f'{type(model).__name__} already has Dirac-parameterized convs ({name or "the model"} is a '
                f'{type(module).__name__}); diracify takes a plain network: train this one as it is, or fold it '
                f'with timm.utils.reparameterize_model(model) first.')
    for pattern in patterns or ():
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in convs):
            names = ', '.join(n for n, _ in convs[:8]) + (', ...' if len(convs) > 8 else '')
            raise ValueError(f'layers pattern {pattern!r} matches no conv of {type(model).__name__}; its convs are: '
                             f'{names or "none"}.')
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    plan = DiracifyPlan()
    for name, module in convs:
        if not _matches(name, patterns):
            plan.skipped[name] = 'not selected by layers'
        elif len(names[id(module)]) > 1:  # a fold per parent would unshare it
            plan.skipped[name] = f'shared under several names ({", ".join(names[id(module)])})'
        elif (reason := _ineligible_reason(module)) is not None:
            plan.skipped[name] = reason
        else:
            plan.eligible.append(name)
    return plan


def diracify(
        model: nn.Module,
        layers: Optional[Union[str, Sequence[str]]] = None,
        from_pretrained: bool = False,
        alpha_init: Optional[float] = None,
        beta_init: Optional[float] = None,
        verbose: bool = False,
) -> nn.Module:
    """ Replace the eligible convs of `model` (in place) by Dirac-parameterized convs; returns the model.

    Args:
        model: any module; its eligible convs (see the module docstring) are swapped under the same names.
        layers: glob pattern(s) over module names that limit the swap (e.g. 'features.*'); None: every conv.
        from_pretrained: start from the model's trained weights with alpha=0, beta=||W|| (outputs unchanged)
            instead of the paper's fresh-training start alpha=1, beta=0.1.
        alpha_init, beta_init: the fresh-training start (default 1 and 0.1); not with `from_pretrained`.
        verbose: print which convs were swapped and why the others were kept (otherwise logged at INFO).

    Fold back with `timm.utils.reparameterize_model(model)`: the result has the original conv classes and keys.
    """
    if from_pretrained and (alpha_init is not None or beta_init is not None):
        raise ValueError('from_pretrained=True sets alpha=0 and beta=||W|| so that the model keeps its outputs: '
                         'drop alpha_init/beta_init, or start fresh with from_pretrained=False.')
    plan = plan_diracify(model, layers)
    if not plan.eligible:
        reasons = '; '.join(f'{n}: {r}' for n, r in list(plan.skipped.items())[:4])
        raise ValueError(f'diracify found no eligible conv in {type(model).__name__} (eligible: {ELIGIBILITY})'
                         f'{"; kept " + reasons if reasons else ""}.')
    init = dict(from_pretrained=from_pretrained, alpha_init=1. if alpha_init is None else alpha_init,
                beta_init=0.1 if beta_init is None else beta_init)
    if plan.eligible == ['']:  # the model is itself a conv: its Dirac form is returned
        model = _DIRACIFIED[type(model)].from_conv(model, **init)
    else:
        for name in plan.eligible:
            parent_name, _, child_name = name.rpartition('.')
            conv = model.get_submodule(name)
            setattr(model.get_submodule(parent_name), child_name, _DIRACIFIED[type(conv)].from_conv(conv, **init))
    if verbose:
        print(plan)
    else:
        _logger.info(str(plan))
    return model
