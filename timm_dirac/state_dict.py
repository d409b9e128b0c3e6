""" DiracNet state dicts: the train form <-> the folded form, and the authors' checkpoint formats in our keys

Train form: `stem.conv.weight` + `stem.bn.*`, per Dirac layer `...conv.{weight,alpha,beta}` + `...bn.*`.
Folded form: `stem.conv.{weight,bias}`, per layer `...conv.{weight,bias}`, no BatchNorm.

Folding uses the BN running statistics; unfolding is exact: a folded conv (Wf, bf)
is reproduced by alpha = 0, beta = ||Wf[o]||, W = Wf, BN weight 1, bias bf, mean 0, var 1 - eps.

The authors' releases (github.com/szagoruyko/diracnets, v2) come in two formats, told apart by their keys:
- folded state dicts: `features.conv.*`, `features.group{g}.block{b}.conv.*`, `fc.*`;
- functional checkpoints: `{'params': ..., 'stats': ...}` or `{'params': ..., 'epoch': ..., 'optimizer': ...}` with
  `conv`, `bn.*`, `group{g}.block{b}.{conv,alpha,beta,bn.*}`, `fc.*` and identity tensors `eye*` (dropped).

Pure tensor math on dicts: no files, no model. Reading files is `checkpoint_io`; bringing a state dict into a model's
form is the model's `checkpoint_filter_fn` (diracnet.py).
"""
import re
from typing import Any, Dict, Mapping, Tuple

import torch
from timm.models import clean_state_dict

from .layers import dirac_kernel, fold_bn_stats

__all__ = [
    'BN_EPS', 'fold_state_dict', 'unfold_state_dict', 'is_folded_state_dict', 'detect_format',
    'convert_authors_checkpoint', 'to_timm_state_dict', 'check_dirac_pairs', 'stage_structure',
]

BN_EPS = 1e-5
_BN_STATS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
_AUTHORS_FOLDED_RE = re.compile(r'^features\.group(\d+)\.block(\d+)\.conv\.(weight|bias)$')
_AUTHORS_LAYER_RE = re.compile(r'^group(\d+)\.block(\d+)\.(conv|alpha|beta|bn\.\w+)$')
_LAYER_RE = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.conv\.weight$')


def is_folded_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """ True for a folded DiracNet state dict (stem conv with bias, no BatchNorm). """
    return 'stem.conv.bias' in state_dict and 'stem.bn.running_var' not in state_dict


def fold_state_dict(state_dict: Dict[str, torch.Tensor], eps: float = BN_EPS) -> Dict[str, torch.Tensor]:
    """ Fold a train-form state dict: Dirac term and BatchNorm into conv weight and bias (float64 math). """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith('bn.running_var')]:
        prefix = key[:-len('bn.running_var')]
        conv, bn = prefix + 'conv.', prefix + 'bn.'
        dtype = out[conv + 'weight'].dtype
        weight = out.pop(conv + 'weight').double()
        if conv + 'alpha' in out:
            weight = dirac_kernel(weight, out.pop(conv + 'alpha').double(), out.pop(conv + 'beta').double())
        weight, bias = fold_bn_stats(weight, out.get(conv + 'bias'), out[bn + 'running_mean'],
                                     out[bn + 'running_var'], out[bn + 'weight'], out[bn + 'bias'], eps)
        out[conv + 'weight'], out[conv + 'bias'] = weight.to(dtype), bias.to(dtype)
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


def _cleaned(checkpoint: Any) -> Dict[str, Any]:
    """ A state dict's keys without DDP / torch.compile prefixes (timm's `clean_state_dict`; the containers of
    training checkpoints are opened when the file is read, `checkpoint_io.load_checkpoint_file`). """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'Not a DiracNet checkpoint: it holds a {type(checkpoint).__name__}, not a dict of tensors.')
    return clean_state_dict({str(k): v for k, v in checkpoint.items()})


def detect_format(checkpoint: Any) -> str:
    """ Which DiracNet checkpoint format `checkpoint` is, from its keys: 'timm' (train form), 'timm_folded',
    'authors_folded' or 'authors_functional'. Raises ValueError, naming what it found, for anything else. """
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get('params'), Mapping):
        return 'authors_functional'
    state_dict = _cleaned(checkpoint)
    if 'stem.conv.weight' in state_dict:
        return 'timm_folded' if is_folded_state_dict(state_dict) else 'timm'
    if 'features.conv.weight' in state_dict:
        return 'authors_folded'
    if 'conv' in state_dict and 'bn.running_var' in state_dict:
        return 'authors_functional'  # a functional `params` dict saved on its own
    keys = ', '.join(list(state_dict)[:8]) or 'no keys'
    raise ValueError(
        f'Not a DiracNet checkpoint: found {keys}{", ..." if len(state_dict) > 8 else ""}. Expected a timm-dirac state '
        f'dict (stem.conv.weight, stages.*), an authors\' folded one (features.conv.weight, features.group*, fc.*) or '
        f'an authors\' functional checkpoint (a dict with params). Check that the file is the DiracNet weight file.')


def _tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f'Not a DiracNet checkpoint: {name!r} holds a {type(value).__name__}, not a tensor.')
    return value.detach()  # saved nn.Parameters / requires_grad tensors of torch 0.3/0.4 -> plain tensors


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _convert_authors_folded(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    out, unknown = {}, []
    for k, v in state_dict.items():
        if k in ('features.conv.weight', 'features.conv.bias'):
            out['stem.' + k[len('features.'):]] = _tensor(k, v)
        elif k in ('fc.weight', 'fc.bias'):
            out['head.' + k] = _tensor(k, v)
        elif m := _AUTHORS_FOLDED_RE.match(k):
            out[f'stages.{m[1]}.blocks.{m[2]}.conv.{m[3]}'] = _tensor(k, v)
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f'Unexpected keys in an authors\' folded DiracNet checkpoint: {unknown[:8]}.')
    if 'stem.conv.bias' not in out:  # bias-free stem conv: a zero bias keeps it a folded state dict
        out['stem.conv.bias'] = torch.zeros(out['stem.conv.weight'].shape[0], dtype=out['stem.conv.weight'].dtype)
    return out


def _convert_authors_functional(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    tensors = _flatten(checkpoint['params']) if isinstance(checkpoint.get('params'), Mapping) else dict(checkpoint)
    if isinstance(checkpoint.get('stats'), Mapping):
        tensors.update(_flatten(checkpoint['stats']))
    out, unknown = {}, []
    for k, v in tensors.items():
        if k.startswith('eye'):
            continue  # the identity kernels, recomputed by DiracConv2d
        if k == 'conv':
            out['stem.conv.weight'] = _tensor(k, v)
        elif k.startswith('bn.'):
            out['stem.' + k] = _tensor(k, v)
        elif k in ('fc.weight', 'fc.bias'):
            out['head.' + k] = _tensor(k, v)
        elif m := _AUTHORS_LAYER_RE.match(k):
            prefix, name = f'stages.{m[1]}.blocks.{m[2]}.', m[3]
            out[prefix + {'conv': 'conv.weight', 'alpha': 'conv.alpha', 'beta': 'conv.beta'}.get(name, name)] = \
                _tensor(k, v)
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f'Unexpected keys in an authors\' functional DiracNet checkpoint: {unknown[:8]}.')
    for key in [k for k in out if k.endswith('conv.weight')]:
        prefix, channels = key[:-len('conv.weight')], out[key].shape[0]
        for name in ('alpha', 'beta'):  # v2 before April 2018 had one alpha / beta per layer: broadcast it
            if prefix + 'conv.' + name in out:
                out[prefix + 'conv.' + name] = out[prefix + 'conv.' + name].reshape(-1).expand(channels).clone()
        missing = [n for n in _BN_STATS[:4] if prefix + 'bn.' + n not in out]
        if missing:
            raise ValueError(
                f'The authors\' functional checkpoint lacks {", ".join(prefix + "bn." + n for n in missing)} '
                f'(BatchNorm statistics; older checkpoints keep them under "stats"): it cannot be converted.')
        out.setdefault(prefix + 'bn.num_batches_tracked', torch.tensor(0))
    return out


def convert_authors_checkpoint(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """ Convert one of the authors' v2 checkpoints into our keys: a folded one into the folded form, a functional
    one (either layout, ImageNet or CIFAR) into the train form. """
    fmt = detect_format(checkpoint)
    if fmt == 'authors_folded':
        return _convert_authors_folded(_cleaned(checkpoint))
    if fmt == 'authors_functional':
        return _convert_authors_functional(checkpoint)
    raise ValueError(f'This is a {fmt} checkpoint, not one of the authors\'; use to_timm_state_dict().')


def to_timm_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """ Any supported DiracNet checkpoint (ours or the authors', any container) as our state dict, unchanged in
    form (train or folded). """
    fmt = detect_format(checkpoint)
    if fmt.startswith('authors'):
        return convert_authors_checkpoint(checkpoint)
    return {k: _tensor(k, v) for k, v in _cleaned(checkpoint).items()}


def stage_structure(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """ (Dirac layers per stage, stage widths) of a state dict in our keys. """
    layers: Dict[int, int] = {}
    widths: Dict[int, int] = {}
    for k, v in state_dict.items():
        if m := _LAYER_RE.match(k):
            g, b = int(m[1]), int(m[2])
            layers[g] = max(layers.get(g, 0), b + 1)
            widths[g] = v.shape[0]
    return tuple(layers[g] for g in sorted(layers)), tuple(widths[g] for g in sorted(widths))


def check_dirac_pairs(state_dict: Mapping[str, torch.Tensor]) -> None:
    """ Raise if a train-form Dirac layer has one of alpha and beta without the other (a damaged or hand-edited
    checkpoint), naming the missing key. """
    for key in state_dict:
        for have, want in (('conv.alpha', 'conv.beta'), ('conv.beta', 'conv.alpha')):
            if key.endswith(have) and key[:-len(have)] + want not in state_dict:
                raise ValueError(f'The checkpoint has {key} but no {key[:-len(have)] + want}: every Dirac layer of '
                                 f'the train form needs both alpha and beta; the file is damaged or incomplete.')
