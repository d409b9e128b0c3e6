""" DiracNets: deep plain convolutional networks without skip connections

Paper: `DiracNets: Training Very Deep Neural Networks Without Skip-Connections` - https://arxiv.org/abs/1706.00388
Original code and weights: https://github.com/szagoruyko/diracnets

Every layer is `ReLU -> DiracConv3x3 -> BatchNorm` (v2, the version of the released weights) with the kernel
`alpha * delta + beta * W / ||W||`: the identity (Dirac delta) is inside the kernel, so the signal passes through
hundreds of layers at initialisation without any skip connection. Stages are joined by 2x2 max-pooling.
`reparameterize()` folds the Dirac term and every BatchNorm into plain convs with bias, leaving a VGG-like chain of
conv-ReLU pairs.

The ImageNet nets (DiracNet-18/34, the shapes of ResNet-18/34) and the CIFAR nets (DiracNet-D-W, the shapes of
WRN-D-W) differ only in their stem, `layers` and `channels`. `checkpoint_filter_fn` loads the authors' folded and
functional checkpoints, and either form (train or folded) of ours into either form of the model.
"""
import re
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, get_device_dtype
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._helpers import clean_state_dict
from timm.models._manipulate import checkpoint_seq, named_apply
from timm.models._registry import generate_default_cfgs, register_model
from timm.models._input import update_model_args

__all__ = ['DiracNet', 'DiracConv2d']

CIFAR_MEAN = (0.4914, 0.4820, 0.4467)  # per-channel statistics of the CIFAR-10 train split
CIFAR_STD = (0.2471, 0.2435, 0.2616)
CIFAR10_LABELS = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def dirac_kernel(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ `alpha * delta + beta * normalize(weight)` for a conv weight of shape (C_out, C_in, *kernel).

    `delta` is the identity on the first min(C_out, C_in) channels at the centre tap (`nn.init.dirac_`). Each filter
    is scaled by beta / ||W[o]||, then alpha is added in place on the centre-tap diagonal: no delta tensor is made,
    and the kernel keeps the weight's dtype and memory format (a channels_last weight gives a channels_last kernel).
    """
    dims = weight.dim()
    norm = torch.linalg.vector_norm(weight, dim=list(range(1, dims)), keepdim=True)
    kernel = weight * (beta.view([-1] + [1] * (dims - 1)) / norm.clamp_min(1e-12))  # F.normalize's eps
    shared = torch.arange(min(weight.shape[0], weight.shape[1]), device=weight.device)
    centre = [torch.full_like(shared, k // 2) for k in weight.shape[2:]]
    return kernel.index_put_([shared, shared] + centre, alpha[:shared.shape[0]], accumulate=True)


torch.fx.wrap('dirac_kernel')  # one leaf for torch.fx (timm's tracer included): its indexing depends on shapes


def fold_bn(
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
        bn_weight: Optional[torch.Tensor],
        bn_bias: Optional[torch.Tensor],
        dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ The weight and bias of one conv computing eval-mode BatchNorm(conv(x)): the one fold of modules and state
    dicts. `torch.nn.utils.fusion.fuse_conv_bn_weights` in float64, returned in `dtype` (default: the weight's). """
    def f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().double()

    with torch.no_grad():
        fused_weight, fused_bias = fuse_conv_bn_weights(
            f64(weight), f64(bias), f64(running_mean), f64(running_var), eps, f64(bn_weight), f64(bn_bias))
    dtype = dtype or weight.dtype
    return fused_weight.detach().to(dtype), fused_bias.detach().to(dtype)


class DiracConvNd(nn.Module):
    """ A stride-1, size-preserving conv whose kernel is `alpha * delta + beta * normalize(weight)`.

    The parameters are `weight` (C_out, C_in, *kernel), `alpha` and `beta` (C_out,) and an optional `bias`;
    `reparameterize()` bakes the kernel into `weight` so that the layer is a plain conv. Subclasses set the number of
    spatial dims and the functional conv.
    """
    num_spatial_dims: int = 2

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: Union[int, Sequence[int]],
            stride: Union[int, Sequence[int]] = 1,
            padding: Union[int, Sequence[int], str] = 'same',
            dilation: Union[int, Sequence[int]] = 1,
            bias: bool = True,
            alpha_init: float = 1.,
            beta_init: float = 0.1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        dims = self.num_spatial_dims
        kernel_size = _ntuple(kernel_size, dims, 'kernel_size')
        dilation = _ntuple(dilation, dims, 'dilation')
        if any(s != 1 for s in _ntuple(stride, dims, 'stride')):
            raise ValueError(
                f'{type(self).__name__} got stride={stride}, but a Dirac conv must keep the spatial size (its '
                f'identity term maps each pixel to itself). Use stride=1 and downsample with pooling, as DiracNets do.')
        if any(k % 2 == 0 for k in kernel_size):
            raise ValueError(f'{type(self).__name__} got kernel_size={kernel_size}; it needs odd kernel sizes '
                             f'so that the identity term has a centre tap.')
        same = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
        if padding != 'same' and _ntuple(padding, dims, 'padding') != same:
            raise ValueError(
                f'{type(self).__name__} got padding={padding}; a Dirac conv must preserve the spatial size, '
                f'which for kernel_size={kernel_size} and dilation={dilation} needs padding={same} (or "same").')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.padding = same
        self.alpha_init = alpha_init
        self.beta_init = beta_init
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels) + kernel_size, **dd))
        self.alpha: Optional[nn.Parameter] = nn.Parameter(torch.empty(out_channels, **dd))
        self.beta: Optional[nn.Parameter] = nn.Parameter(torch.empty(out_channels, **dd))
        self.bias: Optional[nn.Parameter] = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """ The paper's start: He-normal weight, alpha = `alpha_init`, beta = `beta_init`, zero bias. """
        nn.init.kaiming_normal_(self.weight)
        if self.alpha is not None and self.beta is not None:
            self.alpha.fill_(self.alpha_init)
            self.beta.fill_(self.beta_init)
        if self.bias is not None:
            self.bias.zero_()

    @torch.no_grad()
    def folded_weight(self) -> torch.Tensor:
        """ The plain conv kernel this layer computes, in float64 (the precision every fold uses). """
        return dirac_kernel(self.weight.double(), self.alpha.double(), self.beta.double())

    @torch.no_grad()
    def reparameterize(self):
        """ Bake the Dirac kernel into `weight` (float64 math): the layer becomes a plain conv. """
        if self.alpha is None or self.beta is None:
            return
        self.weight.copy_(self.folded_weight())
        self.alpha = None
        self.beta = None

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, alpha, beta = self.weight, self.alpha, self.beta
        if alpha is not None and beta is not None:
            weight = dirac_kernel(weight, alpha, beta)
        return self._conv(x, weight)

    def extra_repr(self) -> str:
        s = f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}'
        if any(d != 1 for d in self.dilation):
            s += f', dilation={self.dilation}'
        if self.bias is None:
            s += ', bias=False'
        if self.alpha is None:
            s += ', folded=True'
        return s


class DiracConv2d(DiracConvNd):
    """ Dirac-parameterized `nn.Conv2d` replacement (stride 1, size-preserving padding). """
    num_spatial_dims = 2

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, self.bias, 1, self.padding, self.dilation)


def _ntuple(value: Union[int, Sequence[int]], n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f'{name}={value} has {len(value)} entries; this {n}d Dirac conv needs an int or {n} ints.')
    return value


def _folded_conv(conv: nn.Module, weight: torch.Tensor, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """ A plain conv with bias computing eval-mode bn(conv(x)), where `weight` is the kernel `conv` computes. """
    fused_weight, fused_bias = fold_bn(
        weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias, dtype=conv.weight.dtype)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, getattr(conv, 'stride', 1),
                      conv.padding, conv.dilation, bias=True, device=fused_weight.device, dtype=fused_weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(fused_weight)
        fused.bias.copy_(fused_bias)
    return fused


class DiracBlock(nn.Module):
    """ One plain layer, ReLU -> Dirac 3x3 conv -> BatchNorm; folded (`inference_mode`), ReLU -> conv with bias. """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            dirac: bool = True,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        # not in place: the input may be a feature tap, or a checkpointed segment's saved input
        self.act = nn.ReLU()
        if inference_mode:
            self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1, **dd)
            self.bn = nn.Identity()
        else:
            conv_layer = DiracConv2d if dirac else partial(nn.Conv2d, padding=1)
            self.conv = conv_layer(in_chs, out_chs, 3, bias=False, **dd)
            self.bn = nn.BatchNorm2d(out_chs, **dd)

    @torch.no_grad()
    def reparameterize(self):
        """ Fold the Dirac term and the BatchNorm into one conv with bias (eval-mode statistics; idempotent). """
        if isinstance(self.bn, nn.Identity):
            return
        weight = self.conv.folded_weight() if isinstance(self.conv, DiracConvNd) else self.conv.weight
        self.conv = _folded_conv(self.conv, weight, self.bn)
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
            dirac: bool = True,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            DiracBlock(in_chs if i == 0 else out_chs, out_chs, dirac, inference_mode, device=device, dtype=dtype)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class DiracStem(nn.Sequential):
    """ conv -> BatchNorm (-> 3x3/2 max-pool, ImageNet). The authors' CIFAR stem also ends in a ReLU, which the first
    Dirac layer's ReLU applies, so it is left out (same function). A Sequential, so that timm's feature extraction
    taps the stem after its BatchNorm. """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int,
            pool: bool,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__(OrderedDict(
            conv=nn.Conv2d(
                in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=inference_mode, **dd),
            bn=nn.Identity() if inference_mode else nn.BatchNorm2d(out_chs, **dd),
            pool=nn.MaxPool2d(3, stride=2, padding=1) if pool else nn.Identity(),
        ))

    @torch.no_grad()
    def reparameterize(self):
        """ Fold the BatchNorm into the conv (eval-mode statistics; idempotent). """
        if isinstance(self.bn, nn.Identity):
            return
        self.conv = _folded_conv(self.conv, self.conv.weight, self.bn)
        self.bn = nn.Identity()


# (stem kernel, stem stride, stem max-pool) of the two stems: ImageNet's 7x7/2 + 3x3/2 pool, CIFAR's 3x3/1
STEM_TYPES = {'imagenet': (7, 2, True), 'cifar': (3, 1, False)}


class DiracNet(nn.Module):
    """ DiracNet: a stem, then stages of ReLU -> Dirac conv -> BN layers joined by 2x2 max-pooling, then ReLU,
    global pooling and a linear classifier. """
    __jit_unused_properties__ = ['inference_mode']

    def __init__(
            self,
            layers: Sequence[int] = (4, 4, 4, 4),
            channels: Sequence[int] = (64, 128, 256, 512),
            stem_type: str = 'imagenet',
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
            layers: Dirac layers per stage (DiracNet-18: (4, 4, 4, 4); DiracNet-D-W: three stages of (D - 4) / 3).
            channels: Width of each stage (the stem has the first one).
            stem_type: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3 conv).
            dirac: Dirac convs; False builds the same net with plain conv + BN (the paper's baseline).
            inference_mode: Build the folded (reparameterized) form: convs with bias, no BatchNorm.
            num_classes: Number of classifier outputs (0 for no classifier).
            in_chans: Number of input image channels.
            global_pool: Global pooling type ('' for none).
            drop_rate: Dropout rate before the classifier.
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if stem_type not in STEM_TYPES:
            raise ValueError(f'Unknown stem_type {stem_type!r}: use one of {sorted(STEM_TYPES)}.')
        if len(layers) != len(channels) or min(layers, default=0) < 1:
            raise ValueError(f'layers={tuple(layers)} and channels={tuple(channels)} must give one positive layer '
                             f'count and one width per stage.')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        stem_kernel, stem_stride, stem_pool = STEM_TYPES[stem_type]
        self.stem = DiracStem(in_chans, channels[0], stem_kernel, stem_stride, stem_pool, inference_mode, **dd)
        self.feature_info = [dict(num_chs=channels[0], reduction=stem_stride, module='stem.bn')]

        reduction = stem_stride * (2 if stem_pool else 1)
        in_chs = channels[0]
        stages = []
        for i, (depth, out_chs) in enumerate(zip(layers, channels)):
            reduction *= 2 if i > 0 else 1
            stages.append(DiracStage(in_chs, out_chs, depth, i > 0, dirac, inference_mode, **dd))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        # the last layer ends in BN; the head applies ReLU first ("norm" in timm's feature API terms)
        self.final_act = nn.ReLU()
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """ The authors' init: He-normal conv and classifier weights, BN weight ~ U[0, 1), zero biases. """
        named_apply(_init_weights, self)

    @property
    def inference_mode(self) -> bool:
        """ Whether the model is folded: its stem conv has the bias that folding gives it. """
        return self.stem.conv.bias is not None

    @torch.no_grad()
    def reparameterize(self):
        """ Fold every Dirac layer and BatchNorm into plain convs with bias, in place, with eval-mode statistics;
        records `inference_mode=True` so that `save_for_hf` / `push_to_hf_hub` configs rebuild the folded form. """
        for module in [self.stem] + [block for stage in self.stages for block in stage.blocks]:
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
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))
        named_apply(_init_weights, self.head)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates (index 0: the stem, before its pooling; then each stage).

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

        x = self.stem.bn(self.stem.conv(x))
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


def _init_weights(module: nn.Module, name: str = ''):
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, DiracConvNd):
        module.reset_parameters()
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.uniform_(module.weight)
        nn.init.zeros_(module.bias)


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


# The authors' v2 releases: folded state dicts (`features.conv.*`, `features.group{g}.block{b}.conv.*`, `fc.*`) and
# functional checkpoints (`{'params': ..., 'stats': ...}` or `{'params': ..., 'epoch': ..., 'optimizer': ...}` with
# `conv`, `bn.*`, `group{g}.block{b}.{conv,alpha,beta,bn.*}`, `fc.*` and identity tensors `eye*`).
_AUTHORS_KEYS = [
    (r'^features\.conv\.(weight|bias)$', r'stem.conv.\1'),
    (r'^features\.group(\d+)\.block(\d+)\.conv\.(weight|bias)$', r'stages.\1.blocks.\2.conv.\3'),
    (r'^conv$', 'stem.conv.weight'),
    (r'^bn\.', 'stem.bn.'),
    (r'^fc\.', 'head.fc.'),
    (r'^group(\d+)\.block(\d+)\.conv$', r'stages.\1.blocks.\2.conv.weight'),
    (r'^group(\d+)\.block(\d+)\.(alpha|beta)$', r'stages.\1.blocks.\2.conv.\3'),
    (r'^group(\d+)\.block(\d+)\.bn\.', r'stages.\1.blocks.\2.bn.'),
]


def checkpoint_format(checkpoint: Mapping[str, Any]) -> str:
    """ 'timm', 'timm_folded', 'authors_folded' or 'authors_functional', told apart by the keys. """
    if isinstance(checkpoint.get('params'), Mapping) or 'conv' in checkpoint:
        return 'authors_functional'
    if 'features.conv.weight' in checkpoint:
        return 'authors_folded'
    return 'timm_folded' if _is_folded_state_dict(checkpoint) else 'timm'


def convert_authors_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """ One of the authors' checkpoints in our keys: a folded one in the folded form, a functional one in the train
    form. Their per-layer scalar alpha/beta (before April 2018) are broadcast per channel; `eye*` are dropped. """
    tensors = _flatten(checkpoint['params']) if isinstance(checkpoint.get('params'), Mapping) else dict(checkpoint)
    if isinstance(checkpoint.get('stats'), Mapping):
        tensors.update(_flatten(checkpoint['stats']))
    out = {}
    for key, value in tensors.items():
        if key.startswith('eye') or not isinstance(value, torch.Tensor):
            continue
        for pattern, replacement in _AUTHORS_KEYS:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value.detach()
    for key in [k for k in out if k.endswith(('conv.alpha', 'conv.beta'))]:
        channels = out[key.rpartition('.')[0] + '.weight'].shape[0]
        out[key] = out[key].reshape(-1).expand(channels).clone()
    if 'stem.conv.weight' in out and 'stem.bn.running_var' not in out and 'stem.conv.bias' not in out:
        out['stem.conv.bias'] = out['stem.conv.weight'].new_zeros(out['stem.conv.weight'].shape[0])
    return out


def _is_folded_state_dict(state_dict: Mapping[str, Any]) -> bool:
    return 'stem.conv.bias' in state_dict and 'stem.bn.running_var' not in state_dict


def fold_state_dict(state_dict: Mapping[str, torch.Tensor], eps: float = 1e-5) -> Dict[str, torch.Tensor]:
    """ A train-form state dict folded: each Dirac kernel and BatchNorm into conv weight and bias (float64 math). """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith('bn.running_var')]:
        conv, bn = key[:-len('bn.running_var')] + 'conv.', key[:-len('running_var')]
        weight = out.pop(conv + 'weight')
        kernel = weight.double()
        if conv + 'alpha' in out:
            kernel = dirac_kernel(kernel, out.pop(conv + 'alpha').double(), out.pop(conv + 'beta').double())
        out[conv + 'weight'], out[conv + 'bias'] = fold_bn(
            kernel, out.get(conv + 'bias'), out.pop(bn + 'running_mean'), out.pop(bn + 'running_var'), eps,
            out.pop(bn + 'weight', None), out.pop(bn + 'bias', None), dtype=weight.dtype)
        out.pop(bn + 'num_batches_tracked', None)
    return out


def unfold_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        dirac: bool = True,
        eps: float = 1e-5,
) -> Dict[str, torch.Tensor]:
    """ A folded state dict re-expressed exactly in the train form, so that folded weights can be fine-tuned: each
    conv (Wf, bf) becomes alpha = 0, beta = ||Wf[o]||, W = Wf (Dirac layers, if `dirac`) and a BatchNorm of weight 1,
    bias bf, mean 0 and variance 1 - eps. The stem conv keeps its weight; its bias moves to the stem BN. """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith('conv.bias')]:
        prefix = key[:-len('conv.bias')]
        weight, bias = state_dict[prefix + 'conv.weight'], out.pop(key)
        channels, dtype = weight.shape[0], weight.dtype
        if dirac and prefix != 'stem.':
            out[prefix + 'conv.alpha'] = torch.zeros(channels, dtype=dtype)
            out[prefix + 'conv.beta'] = torch.linalg.vector_norm(weight.double().flatten(1), dim=1).to(dtype)
        out[prefix + 'bn.weight'] = torch.ones(channels, dtype=dtype)
        out[prefix + 'bn.bias'] = bias
        out[prefix + 'bn.running_mean'] = torch.zeros(channels, dtype=dtype)
        out[prefix + 'bn.running_var'] = torch.full((channels,), 1. - eps, dtype=dtype)
        out[prefix + 'bn.num_batches_tracked'] = torch.tensor(0)
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: DiracNet) -> Dict[str, torch.Tensor]:
    """ Bring a DiracNet checkpoint (ours in either form, the authors' folded or functional) into the keys and the
    form (train or folded) of `model`. """
    state_dict = clean_state_dict(state_dict)
    if checkpoint_format(state_dict).startswith('authors'):
        state_dict = convert_authors_checkpoint(state_dict)
    if model.inference_mode and not _is_folded_state_dict(state_dict):
        return fold_state_dict(state_dict)
    if not model.inference_mode and _is_folded_state_dict(state_dict):
        dirac = isinstance(model.stages[0].blocks[0].conv, DiracConvNd)
        return unfold_state_dict(state_dict, dirac=dirac)
    return state_dict


def _create_diracnet(variant: str, pretrained: bool = False, **kwargs) -> DiracNet:
    num_stages = len(kwargs.get('layers', (4, 4, 4, 4)))
    return build_model_with_cfg(
        DiracNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_stages + 1))),
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
        hf_hub_id='timm-dirac/diracnet16_4_cifar.td_cifar10', license='apache-2.0', label_names=CIFAR10_LABELS,
        notes=('Trained by timm-dirac on the CIFAR-10 train split (all 50,000 images, no hold-out); '
               '90.00% top-1 on the CIFAR-10 test split.',)),
    'diracnet16_2_cifar': _cifar_cfg(),
    'diracnet28_10_cifar': _cifar_cfg(),
    'diracnet28_5_cifar': _cifar_cfg(),
    'diracnet34_1_cifar': _cifar_cfg(),
    'diracnet34_2_cifar': _cifar_cfg(),
})


@register_model
def diracnet18(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-18 (ImageNet): 16 Dirac layers in stages of (4, 4, 4, 4), the shape of ResNet-18. """
    model_args = dict(layers=(4, 4, 4, 4))
    return _create_diracnet('diracnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def diracnet34(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-34 (ImageNet): 32 Dirac layers in stages of (6, 8, 12, 6), the shape of ResNet-34. """
    model_args = dict(layers=(6, 8, 12, 6))
    return _create_diracnet('diracnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def diracnet16_2_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-16-2 (CIFAR, 32x32): 0.69M parameters. """
    model_args = dict(layers=(4, 4, 4), channels=(32, 64, 128), stem_type='cifar')
    return _create_diracnet('diracnet16_2_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def diracnet16_4_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-16-4 (CIFAR, 32x32): the shape of WRN-16-4 without its skips, 2.7M parameters. """
    model_args = dict(layers=(4, 4, 4), channels=(64, 128, 256), stem_type='cifar')
    return _create_diracnet('diracnet16_4_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def diracnet28_10_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-28-10 (CIFAR, 32x32): the shape and size of WRN-28-10 without its skips. """
    model_args = dict(layers=(8, 8, 8), channels=(160, 320, 640), stem_type='cifar')
    return _create_diracnet('diracnet28_10_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def diracnet28_5_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-28-5 (CIFAR, 32x32). """
    model_args = dict(layers=(8, 8, 8), channels=(80, 160, 320), stem_type='cifar')
    return _create_diracnet('diracnet28_5_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def diracnet34_1_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-34-1 (CIFAR, 32x32): 0.47M parameters. """
    model_args = dict(layers=(10, 10, 10), channels=(16, 32, 64), stem_type='cifar')
    return _create_diracnet('diracnet34_1_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def diracnet34_2_cifar(pretrained: bool = False, **kwargs) -> DiracNet:
    """ DiracNet-34-2 (CIFAR, 32x32): 1.9M parameters. """
    model_args = dict(layers=(10, 10, 10), channels=(32, 64, 128), stem_type='cifar')
    return _create_diracnet('diracnet34_2_cifar', pretrained, **dict(model_args, **kwargs))
