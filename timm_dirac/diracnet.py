""" DiracNets: deep plain convolutional networks without skip connections

Paper: `DiracNets: Training Very Deep Neural Networks Without Skip-Connections` - https://arxiv.org/abs/1706.00388

Each layer is `ReLU -> DiracConv3x3 -> BatchNorm` (v2 of the authors' code, the version of their released
weights): no skip connection anywhere, 2x2 max-pooling between stages. `reparameterize()` folds the Dirac term
and every BatchNorm into plain convs, leaving a VGG-like chain of conv-ReLU pairs.

The ImageNet nets (DiracNet-18/34) and the CIFAR nets (DiracNet-D-W, named like Wide ResNets) are one class:
`style` picks the stem, the stage widths and the depth rule; `depth`, `width` or `layers` pick any member.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._input import update_model_args

from .layers import DiracConv2d, fold_bn, is_folded
from .state_dict import (
    check_dirac_pairs, fold_state_dict, is_folded_state_dict, stage_structure, to_timm_state_dict, unfold_state_dict)

__all__ = ['DiracNet', 'DiracBlock', 'DiracStage', 'DiracStem', 'DiracStyle', 'STYLES', 'dirac_layers']

CIFAR_MEAN = (0.4914, 0.4820, 0.4467)  # per-channel statistics of the CIFAR-10 train split
CIFAR_STD = (0.2471, 0.2435, 0.2616)


@dataclass(frozen=True)
class DiracStyle:
    """ What a DiracNet style fixes: the stem, the stage base widths and the rule from depth to layers per stage.

    The depth counts like ResNets': the Dirac layers plus `depth_extra`. A style with a `depth_table` has only the
    depths listed there; one without has stages of equal, even layer counts (depth = 2n * stages + depth_extra).
    """
    widths: Tuple[int, ...]  # base width of each stage, times the `width` multiplier
    stem_kernel: int
    stem_downsample: bool  # a stride-2 stem conv and a 3x3/2 max-pool (4x), else a stride-1 stem conv
    depth_extra: int
    depth_table: Optional[Dict[int, Tuple[int, ...]]] = None

    def layers(self, depth: int, name: str) -> Tuple[int, ...]:
        """ Dirac layers per stage for `depth`; a ValueError names the valid depths. """
        if self.depth_table is not None:
            if depth not in self.depth_table:
                raise ValueError(
                    f'DiracNet ({name} style) has no depth {depth}: valid depths are {sorted(self.depth_table)}. '
                    f'For another shape pass layers=(...) with the Dirac layers per stage, e.g. '
                    f'layers={(2,) * len(self.widths)}.')
            return self.depth_table[depth]
        step = 2 * len(self.widths)
        if depth < step + self.depth_extra or (depth - self.depth_extra) % step:
            valid = ', '.join(str(step * n + self.depth_extra) for n in range(1, 9))
            raise ValueError(
                f'DiracNet ({name} style) has no depth {depth}: the depth must be {step}n+{self.depth_extra} with '
                f'n >= 1 ({valid}, ..., 100, ...), giving 2n Dirac layers in each of the {len(self.widths)} stages.')
        return (2 * ((depth - self.depth_extra) // step),) * len(self.widths)

    def depth(self, layers: Sequence[int]) -> int:
        """ The depth a network of `layers` Dirac layers per stage is named by. """
        return sum(layers) + self.depth_extra


STYLES = {
    # ResNet-18/34 shapes: two Dirac layers per basic block
    'imagenet': DiracStyle(widths=(64, 128, 256, 512), stem_kernel=7, stem_downsample=True, depth_extra=2,
                           depth_table={18: (4, 4, 4, 4), 34: (6, 8, 12, 6)}),
    # DiracNet-D-W, named like WRN-D-W
    'cifar': DiracStyle(widths=(16, 32, 64), stem_kernel=3, stem_downsample=False, depth_extra=4),
}


def get_style(style: str) -> DiracStyle:
    if style not in STYLES:
        raise ValueError(f"Unknown DiracNet style {style!r}: use one of {sorted(STYLES)}.")
    return STYLES[style]


def dirac_layers(depth: int, style: str = 'imagenet') -> Tuple[int, ...]:
    """ Dirac layers per stage for a network `depth` (counted like ResNets: convs plus the stem and the head). """
    return get_style(style).layers(depth, style)


class DiracBlock(nn.Module):
    """ One plain layer: ReLU -> Dirac 3x3 conv -> BatchNorm (v2 ordering). Folds into ReLU -> conv. """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            dirac: bool = True,
            inference_mode: bool = False,
            inplace_act: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.act = nn.ReLU(inplace=inplace_act)
        if inference_mode:
            self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=True, **dd)
            self.bn = nn.Identity()
        else:
            if dirac:
                self.conv = DiracConv2d(in_chs, out_chs, 3, bias=False, **dd)
            else:
                self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False, **dd)
                nn.init.kaiming_normal_(self.conv.weight)
            self.bn = nn.BatchNorm2d(out_chs, **dd)
            _init_bn(self.bn)

    @torch.no_grad()
    def reparameterize(self):
        """ Fold the Dirac term and the BatchNorm into one conv with bias (in place, idempotent). """
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        if isinstance(self.conv, DiracConv2d):
            self.conv.reparameterize()
        self.conv = _conv_with_bn_folded(self.conv, self.bn)
        self.bn = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.act(x)))


class DiracStage(nn.Module):
    """ Optional 2x2 max-pool, then a chain of Dirac layers; the first one changes the width. """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            downsample: bool,
            inplace_input: bool = False,
            dirac: bool = True,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()
        # the input may be a feature tap of the previous stage: ReLU it in place only behind a pool or if told so
        self.inplace_input = downsample or inplace_input
        self.blocks = nn.Sequential(*[
            DiracBlock(
                in_chs if i == 0 else out_chs,
                out_chs,
                dirac=dirac,
                inference_mode=inference_mode,
                inplace_act=self.inplace_input or i > 0,
                device=device,
                dtype=dtype,
            )
            for i in range(depth)
        ])

    def set_grad_checkpointing(self, enable: bool = True):
        """ Checkpointed segments re-run from their saved input, so no ReLU may then work in place on it. """
        self.grad_checkpointing = enable
        for i, block in enumerate(self.blocks):
            block.act.inplace = not enable and (self.inplace_input or i > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class DiracStem(nn.Sequential):
    """ conv -> BatchNorm (-> max-pool for ImageNet). The authors' CIFAR stem also ends in a ReLU, which the
    first Dirac layer's ReLU already applies, so it is left out (same function, no double ReLU). """

    @torch.no_grad()
    def reparameterize(self):
        """ Fold the stem BatchNorm into the stem conv (in place, idempotent). """
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        self.conv = _conv_with_bn_folded(self.conv, self.bn)
        self.bn = nn.Identity()


class DiracNet(nn.Module):
    """ DiracNet: a plain stack of ReLU -> Dirac conv -> BN layers with max-pool downsampling.

    `style='imagenet'`: 7x7/2 stem + 3x3/2 max-pool, four stages of widths (64, 128, 256, 512) * width.
    `style='cifar'`: 3x3 stem, three stages of widths (16, 32, 64) * width (DiracNet-D-W).
    """
    __jit_unused_properties__ = ['inference_mode']

    def __init__(
            self,
            depth: int = 18,
            width: float = 1.,
            layers: Optional[Sequence[int]] = None,
            style: str = 'imagenet',
            dirac: bool = True,
            inference_mode: bool = False,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            depth: Network depth counted like ResNets; picks `layers` (ImageNet: 18 or 34; CIFAR: 6n+4).
            width: Width multiplier of the stage widths (the W of DiracNet-D-W).
            layers: Dirac layers per stage, overrides `depth` (ImageNet style: 4 stages, CIFAR style: 3).
            style: 'imagenet' or 'cifar': the stem, the stage base widths and the depth rule.
            dirac: Use Dirac convs; False builds the same net with plain conv + BN (the paper's baseline).
            inference_mode: Build the folded (reparameterized) form: convs with bias, no BatchNorm.
            num_classes: Number of classifier outputs (0 for no classifier).
            in_chans: Number of input image channels.
            global_pool: Global pooling type ('' for none).
            drop_rate: Dropout rate before the classifier.
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        cfg = get_style(style)
        stage_layers = tuple(layers) if layers is not None else cfg.layers(depth, style)
        if len(stage_layers) != len(cfg.widths) or min(stage_layers) < 1:
            raise ValueError(f'layers={stage_layers} must give {len(cfg.widths)} positive layer counts, one per '
                             f'stage of the {style} style.')
        widths = [int(round(w * width)) for w in cfg.widths]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        stem_chs = widths[0]
        stem_reduction = 2 if cfg.stem_downsample else 1
        stem_conv = nn.Conv2d(in_chans, stem_chs, cfg.stem_kernel, stride=stem_reduction,
                              padding=cfg.stem_kernel // 2, bias=inference_mode, **dd)
        stem_pool = nn.MaxPool2d(3, stride=2, padding=1) if cfg.stem_downsample else nn.Identity()
        stem_bn = nn.Identity() if inference_mode else _init_bn(nn.BatchNorm2d(stem_chs, **dd))
        nn.init.kaiming_normal_(stem_conv.weight)
        self.stem = DiracStem(OrderedDict(conv=stem_conv, bn=stem_bn, pool=stem_pool))
        self.feature_info = [dict(num_chs=stem_chs, reduction=stem_reduction, module='stem.bn')]

        reduction = stem_reduction * (2 if cfg.stem_downsample else 1)
        in_chs = stem_chs
        stages = []
        for i, (num_layers, out_chs) in enumerate(zip(stage_layers, widths)):
            if i > 0:
                reduction *= 2
            stages.append(DiracStage(
                in_chs, out_chs, num_layers, downsample=i > 0,
                inplace_input=cfg.stem_downsample,  # behind the stem pool, not the stem tap itself
                dirac=dirac, inference_mode=inference_mode, **dd))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        # the last layer ends in BN; the head applies ReLU first ("norm" in timm's feature API terms)
        self.final_act = nn.ReLU()
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self._init_head()

    @property
    def inference_mode(self) -> bool:
        """ Whether the model is folded, read from its structure, so a model folded by timm's
        `reparameterize_model` (which never calls this class's own `reparameterize`) says so too. """
        return is_folded(self)

    @torch.no_grad()
    def _init_head(self):
        fc = self.head.fc
        if isinstance(fc, nn.Linear):
            nn.init.kaiming_normal_(fc.weight)
            nn.init.zeros_(fc.bias)

    @torch.no_grad()
    def reparameterize(self):
        """ Fold every Dirac layer and BatchNorm in place into plain convs with bias; records the folded form so
        that `save_for_hf` / `push_to_hf_hub` configs rebuild it. Eval-mode (running statistics) semantics. """
        for module in self.modules():
            if module is not self and hasattr(module, 'reparameterize'):
                module.reparameterize()
        update_model_args(self, inference_mode=True)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.blocks\.(\d+)',
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            if isinstance(stage, DiracStage):
                stage.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))
        self._init_head()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates (index 0: stem, before its pooling; then each stage).

        Args:
            x: Input image tensor.
            indices: Take last n features if int, all if None, select matching indices if sequence.
            norm: Apply the final ReLU to the last stage's intermediate.
            stop_early: Stop iterating over stages when the last desired intermediate is hit.
            output_fmt: Shape of intermediate feature outputs (only 'NCHW').
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)

        x = self.stem.conv(x)
        x = self.stem.bn(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.stem.pool(x)

        last_idx = len(self.stages)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.final_act(x) if norm and feat_idx == last_idx else x)

        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.final_act(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """ Prune the layers not needed for the intermediates at `indices`. """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.stages)
        if prune_norm or prune_end:
            self.final_act = nn.Identity()
        self.stages = self.stages[:max_index]
        if max_index == 0:
            self.stem.pool = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.final_act(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


@torch.no_grad()
def _conv_with_bn_folded(conv: Union[nn.Conv2d, DiracConv2d], bn: nn.BatchNorm2d) -> nn.Conv2d:
    """ A plain conv with bias computing bn(conv(x)) in eval mode; `conv` must hold its final kernel in `weight`. """
    weight, bias = fold_bn(conv.weight, conv.bias, bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, getattr(conv, 'stride', 1),
                      conv.padding, conv.dilation, bias=True, device=weight.device, dtype=weight.dtype)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused


def _init_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """ The authors' BatchNorm init: weight ~ U[0, 1), bias 0. """
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.zero_()
    return bn


def _check_structure(state_dict: Mapping[str, torch.Tensor], model: nn.Module):
    """ Refuse a state dict (our keys) of another DiracNet shape than `model`, naming both shapes. """
    got, want = stage_structure(state_dict), stage_structure(model.state_dict())
    if got != want:
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        raise ValueError(
            f'This checkpoint is another DiracNet: Dirac layers per stage {got[0]} and stage widths {got[1]}, but '
            f'the model {name} has {want[0]} and {want[1]}. Create the model of the checkpoint\'s shape (e.g. '
            f'layers={got[0]} and the width that gives stage widths {got[1]}).')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """ timm `pretrained_filter_fn`: bring any supported DiracNet checkpoint (ours in either form, the authors'
    folded or functional ones) into the form (train or folded) and keys of `model`. """
    if not isinstance(model, DiracNet):  # e.g. a config.json or --model naming another architecture
        raise ValueError(f'DiracNet weights cannot be loaded into a {type(model).__name__}: the model name or the '
                         f'config.json architecture must be a DiracNet (diracnet*).')
    state_dict = to_timm_state_dict(state_dict)
    _check_structure(state_dict, model)
    check_dirac_pairs(state_dict)
    model_folded = is_folded(model)
    if model_folded and not is_folded_state_dict(state_dict):
        return fold_state_dict(state_dict)
    if not model_folded and is_folded_state_dict(state_dict):
        dirac = any(name.endswith('conv.alpha') for name, _ in model.named_parameters())
        return unfold_state_dict(state_dict, dirac=dirac)
    return state_dict


def _create_diracnet(variant: str, pretrained: bool = False, **kwargs) -> DiracNet:
    num_levels = 1 + len(get_style(kwargs.get('style', 'imagenet')).widths)
    return build_model_with_cfg(
        DiracNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_levels))),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv',
        'classifier': 'head.fc',
        'paper_ids': 'arXiv:1706.00388',
        'paper_name': 'DiracNets: Training Very Deep Neural Networks Without Skip-Connections',
        **kwargs,
    }


def _cifar_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return _cfg(
        url=url, num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
        mean=CIFAR_MEAN, std=CIFAR_STD, **kwargs)


# The authors' ImageNet weights (folded v2) load from their own address and are converted on load
# (checkpoint_filter_fn); their repository has no licence file, so they are not re-hosted. They were trained and
# evaluated with OpenCV's bicubic resize (cv2.INTER_CUBIC): 'bicubic' is timm's closest setting.
default_cfgs = generate_default_cfgs({
    'diracnet18.v2_in1k': _cfg(
        url='https://s3.amazonaws.com/modelzoo-networks/diracnet18v2folded-a2174e15.pth', interpolation='bicubic',
        origin_url='https://github.com/szagoruyko/diracnets', license='unknown',
        notes=("The authors' folded v2 weights, downloaded from their address and converted on load.",)),
    'diracnet34.v2_in1k': _cfg(
        url='https://s3.amazonaws.com/modelzoo-networks/diracnet34v2folded-dfb15d34.pth', interpolation='bicubic',
        origin_url='https://github.com/szagoruyko/diracnets', license='unknown',
        notes=("The authors' folded v2 weights, downloaded from their address and converted on load.",)),
    'diracnet16_4_cifar.td_cifar10': _cifar_cfg(
        hf_hub_id='timm-dirac/diracnet16_4_cifar.td_cifar10', license='apache-2.0',
        label_names=('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'),
        notes=('Trained by timm-dirac on CIFAR-10 (train split) in 112 min on a 2-core CPU: '
               'train_configs/diracnet16_4_cifar10_cpu.yaml. 90.00% top-1 on the CIFAR-10 test split.',
               'Until pushed to the Hub, pretrained=True loads the copy shipped in the timm-dirac package '
               '(timm_dirac/assets/weights/diracnet16_4_cifar.td_cifar10), offline.')),
    'diracnet28_10_cifar': _cifar_cfg(),
    'diracnet28_5_cifar': _cifar_cfg(),
    'diracnet34_1_cifar': _cifar_cfg(),
    'diracnet34_2_cifar': _cifar_cfg(),
})


@register_model
def diracnet18(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-18 (ImageNet): 16 Dirac layers in stages of (4, 4, 4, 4), the shape of ResNet-18. """
    return _create_diracnet('diracnet18', pretrained, **dict(dict(depth=18), **kwargs))


@register_model
def diracnet34(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-34 (ImageNet): 32 Dirac layers in stages of (6, 8, 12, 6), the shape of ResNet-34. """
    return _create_diracnet('diracnet34', pretrained, **dict(dict(depth=34), **kwargs))


@register_model
def diracnet16_4_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-16-4 (CIFAR, 32x32): the shape of WRN-16-4 without its skips, 2.7M parameters. """
    return _create_diracnet('diracnet16_4_cifar', pretrained, **dict(dict(depth=16, width=4, style='cifar'), **kwargs))


@register_model
def diracnet28_10_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-28-10 (CIFAR, 32x32): the shape and size of WRN-28-10 without its skips. """
    return _create_diracnet('diracnet28_10_cifar', pretrained, **dict(dict(depth=28, width=10, style='cifar'), **kwargs))


@register_model
def diracnet28_5_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-28-5 (CIFAR, 32x32). """
    return _create_diracnet('diracnet28_5_cifar', pretrained, **dict(dict(depth=28, width=5, style='cifar'), **kwargs))


@register_model
def diracnet34_1_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-34-1 (CIFAR, 32x32): 0.47M parameters. """
    return _create_diracnet('diracnet34_1_cifar', pretrained, **dict(dict(depth=34, width=1, style='cifar'), **kwargs))


@register_model
def diracnet34_2_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-34-2 (CIFAR, 32x32): 1.9M parameters. """
    return _create_diracnet('diracnet34_2_cifar', pretrained, **dict(dict(depth=34, width=2, style='cifar'), **kwargs))
