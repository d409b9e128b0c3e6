""" State-dict conversion for DiracNets: train form <-> folded form, and the authors' checkpoint formats

Train form: `stem.conv.weight` + `stem.bn.*`, per Dirac layer `...conv.{weight,alpha,beta}` + `...bn.*`.
Folded form: `stem.conv.{weight,bias}`, per layer `...conv.{weight,bias}`, no BatchNorm.

Folding uses the BN running statistics; unfolding is exact: a folded conv (Wf, bf)
is reproduced by alpha = 0, beta = ||Wf[o]||, W = Wf, BN weight 1, bias bf, mean 0, var 1 - eps.

The authors' releases (github.com/szagoruyko/diracnets, v2) come in two formats, told apart by their keys:
- folded state dicts: `features.conv.*`, `features.group{g}.block{b}.conv.*`, `fc.*`;
- functional checkpoints: `{'params': ..., 'stats': ...}` or `{'params': ..., 'epoch': ..., 'optimizer': ...}` with
  `conv`, `bn.*`, `group{g}.block{b}.{conv,alpha,beta,bn.*}`, `fc.*` and identity tensors `eye*` (dropped).
`checkpoint_filter_fn` converts either (and our own forms) into the form of the model being loaded.
"""
import argparse
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .errors import first_sentence
from .finite import check_weights
from .layers import dirac_kernel, fold_bn_stats, is_folded

__all__ = [
    'fold_state_dict', 'unfold_state_dict', 'is_folded_state_dict', 'checkpoint_filter_fn', 'detect_format',
    'convert_authors_checkpoint', 'to_timm_state_dict', 'load_checkpoint_file',
]

BN_EPS = 1e-5
_BN_STATS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
_AUTHORS_FOLDED_RE = re.compile(r'^features\.group(\d+)\.block(\d+)\.conv\.(weight|bias)$')
_AUTHORS_LAYER_RE = re.compile(r'^group(\d+)\.block(\d+)\.(conv|alpha|beta|bn\.\w+)$')
_LAYER_RE = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.conv\.weight$')
_FORMATS = ('timm', 'timm_folded', 'authors_folded', 'authors_functional')


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


def _unwrap(checkpoint: Any) -> Mapping[str, Any]:
    """ The state dict inside common checkpoint containers, with DDP / torch.compile key prefixes removed. """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'Not a DiracNet checkpoint: it holds a {type(checkpoint).__name__}, not a dict of tensors.')
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    out = {}
    for k, v in checkpoint.items():
        k = str(k)
        for prefix in ('module.', '_orig_mod.'):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


def detect_format(checkpoint: Any) -> str:
    """ Which DiracNet checkpoint format `checkpoint` is, from its keys: 'timm' (train form), 'timm_folded',
    'authors_folded' or 'authors_functional'. Raises ValueError, naming what it found, for anything else. """
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get('params'), Mapping):
        return 'authors_functional'
    state_dict = _unwrap(checkpoint)
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
        return _convert_authors_folded(_unwrap(checkpoint))
    if fmt == 'authors_functional':
        return _convert_authors_functional(checkpoint)
    raise ValueError(f'This is a {fmt} checkpoint, not one of the authors\'; use to_timm_state_dict().')


def to_timm_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """ Any supported DiracNet checkpoint (ours or the authors', any container) as our state dict, unchanged in
    form (train or folded). """
    fmt = detect_format(checkpoint)
    if fmt.startswith('authors'):
        return convert_authors_checkpoint(checkpoint)
    return {k: _tensor(k, v) for k, v in _unwrap(checkpoint).items()}


def _structure(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """ (Dirac layers per stage, stage widths) of a state dict in our keys. """
    layers: Dict[int, int] = {}
    widths: Dict[int, int] = {}
    for k, v in state_dict.items():
        if m := _LAYER_RE.match(k):
            g, b = int(m[1]), int(m[2])
            layers[g] = max(layers.get(g, 0), b + 1)
            widths[g] = v.shape[0]
    return tuple(layers[g] for g in sorted(layers)), tuple(widths[g] for g in sorted(widths))


def _describe(layers: Tuple[int, ...], widths: Tuple[int, ...], arch: str = '') -> str:
    """ How to build the model of a structure: a registered name, or a registered name of its style (`arch` if it is
    one) with the keyword arguments that shape it (for `timm.create_model` and `timm-dirac convert --model-kwargs`). """
    import timm
    from .diracnet import STYLES
    found = [(name, style) for name, style in STYLES.items() if len(style.widths) == len(layers)]
    if not found:
        return f'a DiracNet with layers={layers} and stage widths {widths}'
    style_name, style = found[0]
    depth, width = style.depth(layers), widths[0] / style.widths[0]
    try:
        by_depth = style.layers(depth, style_name) == layers
    except ValueError:
        by_depth = False
    suffix = '' if style_name == 'imagenet' else f'_{style_name}'
    names = [n for n in timm.list_models('diracnet*') if (n.endswith(suffix) if suffix else n.count('_') == 0)]
    exact = f'diracnet{depth}' + (f'_{width:g}{suffix}' if suffix else '')
    if by_depth and exact in names and (suffix or width == 1):
        return f"timm.create_model('{exact}') (timm-dirac convert --model {exact})"
    name = arch if arch in names else next((n for n in names if n.startswith(f'diracnet{depth}')), names[0])
    kwargs = dict(depth=depth) if by_depth else dict(layers=layers)
    kwargs['width'] = int(width) if width.is_integer() else width
    py = ', '.join(f'{k}={v!r}' for k, v in kwargs.items())
    cli = ' '.join(f'{k}={v!r}'.replace(' ', '') for k, v in kwargs.items())
    return f"timm.create_model('{name}', {py}) (timm-dirac convert --model {name} --model-kwargs {cli})"


def check_structure(state_dict: Mapping[str, torch.Tensor], model: nn.Module):
    """ Raise a clear error when a state dict (our keys) is for another DiracNet shape than `model`. """
    want = _structure(model.state_dict())
    got = _structure(state_dict)
    if got != want:
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        raise ValueError(
            f'This checkpoint has Dirac layers per stage {got[0]} and widths {got[1]}, but the model {name} has '
            f'{want[0]} and {want[1]}: the checkpoint is for another DiracNet. Create the model that matches it: '
            f'{_describe(*got, name)}.')


def check_dirac_pairs(state_dict: Mapping[str, torch.Tensor]) -> None:
    """ Raise if a train-form Dirac layer has one of alpha and beta without the other (a damaged or hand-edited
    checkpoint), naming the missing key. """
    for key in state_dict:
        for have, want in (('conv.alpha', 'conv.beta'), ('conv.beta', 'conv.alpha')):
            if key.endswith(have) and key[:-len(have)] + want not in state_dict:
                raise ValueError(f'The checkpoint has {key} but no {key[:-len(have)] + want}: every Dirac layer of '
                                 f'the train form needs both alpha and beta; the file is damaged or incomplete.')


def check_classifier(state_dict: Mapping[str, torch.Tensor], model: nn.Module, features_only: bool = False):
    """ Make timm load a classifier in the checkpoint that fits `model`, and refuse one that cannot load.

    timm keeps the checkpoint's classifier only when the model's class count is the pretrained cfg's, so a file
    loaded with another `num_classes` than its cfg says (the authors' CIFAR-100 file under a CIFAR-10 name) would
    lose its classifier silently. Here the cfg is made to say what the file holds: a classifier that fits the model
    loads; with another `num_classes` asked for, timm starts a new classifier as for any pretrained weights; with
    the cfg's `num_classes` kept, the mismatch is an error that names the fix. """
    weight = state_dict.get('head.fc.weight')
    cfg = model.pretrained_cfg
    if weight is None or features_only or weight.shape[0] == cfg.get('num_classes'):
        return
    classes = weight.shape[0]
    if model.num_classes == cfg.get('num_classes'):
        raise ValueError(
            f'This checkpoint has a {classes}-class classifier but the model has {model.num_classes} classes. Create '
            f'the model with num_classes={classes} to load it (timm-dirac convert/validate: --num-classes {classes}), '
            f'or with the num_classes you want for a new classifier.')
    cfg['num_classes'] = classes  # the cfg now describes the file: timm keeps a fitting classifier, drops another


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module, features_only: bool = False
                         ) -> Dict[str, torch.Tensor]:
    """ timm `pretrained_filter_fn`: bring any supported DiracNet checkpoint (ours in either form, the authors'
    folded or functional ones) into the form (train or folded) and keys of `model`; a classifier that fits the
    model loads (see `check_classifier`; `features_only`: the classifier is not wanted). """
    from .diracnet import DiracNet
    if not isinstance(model, DiracNet):  # e.g. a config.json or --model naming another architecture
        raise ValueError(f'DiracNet weights cannot be loaded into a {type(model).__name__}: the model name or the '
                         f'config.json architecture must be a DiracNet (diracnet*).')
    state_dict = to_timm_state_dict(state_dict)
    check_structure(state_dict, model)
    check_dirac_pairs(state_dict)
    check_weights(state_dict, 'the checkpoint')
    check_classifier(state_dict, model, features_only)
    model_folded = is_folded(model)
    if model_folded and not is_folded_state_dict(state_dict):
        return fold_state_dict(state_dict)
    if not model_folded and is_folded_state_dict(state_dict):
        dirac = any(name.endswith('conv.alpha') for name, _ in model.named_parameters())
        return unfold_state_dict(state_dict, dirac=dirac)
    return state_dict


def load_checkpoint_file(path: os.PathLike) -> Any:
    """ Read a checkpoint with `torch.load(weights_only=True)` (never unpickles code) or safetensors, with errors
    that say what is wrong with the file. """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise ValueError(f'{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: '
                             f'download or write it again.') from e
    if path.stat().st_size == 0:
        raise ValueError(f'{path} is empty (0 bytes): write or download the checkpoint again.')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(
            f'{path} could not be read as a checkpoint with torch.load(weights_only=True): {first_sentence(e)}. It '
            f'may be truncated, corrupt, or a pickle that is not a tensor checkpoint (arbitrary pickles are never '
            f'unpickled).') from e


def _pretrained_source(variant: str, pretrained_cfg: Optional[Any] = None,
                       pretrained_cfg_overlay: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], str, str]:
    """ (pretrained cfg as a dict, where timm loads it from: 'file' / 'url' / 'hf-hub' / '', and the location: the
    file, the address or the Hub repo id). """
    from timm.models import resolve_pretrained_cfg
    from ._timm_compat import resolve_pretrained_source

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg or {})
    load_from, location = resolve_pretrained_source(cfg)
    return cfg, load_from, location[0] if isinstance(location, (tuple, list)) else location


def hub_unreachable(variant: str, pretrained_cfg: Optional[Any] = None,
                    pretrained_cfg_overlay: Optional[Dict[str, Any]] = None) -> Optional[OSError]:
    """ Why Hub weights cannot load, found in a second: their source is a Hub repo that is not in the local cache
    and the Hub's host does not resolve (no network). huggingface_hub would retry for about a minute first. """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    _, load_from, repo = _pretrained_source(variant, pretrained_cfg, pretrained_cfg_overlay)
    if load_from != 'hf-hub' or constants.HF_HUB_OFFLINE:
        return None
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ('model.safetensors', 'pytorch_model.bin')):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return OSError(f'no network: {host} does not resolve ({e})')
    return None


def pretrained_source_error(
        variant: str,
        error: OSError,
        pretrained_cfg: Optional[Any] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
) -> RuntimeError:
    """ An error for pretrained weights that could not be fetched, naming the source and the offline fix.

    For `_create_diracnet`: `except OSError as e: raise pretrained_source_error(variant, e, ...) from e`.
    """
    cfg, load_from, location = _pretrained_source(variant, pretrained_cfg, pretrained_cfg_overlay)
    name = f"{cfg.get('architecture', variant)}{'.' + cfg['tag'] if cfg.get('tag') else ''}"
    where = {'hf-hub': 'the Hugging Face Hub repository', 'url': 'the address', 'file': 'the file'}.get(load_from, '')
    filename = os.path.basename(str(cfg.get('url') or 'model.safetensors'))
    fix = (f"If you have a copy of the weights (e.g. {filename}"
           f"{' from ' + cfg['url'] if cfg.get('url') else ''}), load it with timm.create_model('{name}', "
           f"pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/{filename}')).")
    if load_from == 'url':
        fix += f' Or copy it to {os.path.join(torch.hub.get_dir(), "checkpoints", filename)}, where timm looks first.'
    if load_from == 'hf-hub':
        fix += (' Hub weights are also read from the local Hugging Face cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1) once '
                f'downloaded, e.g. with `hf download {location}`.')
    return RuntimeError(f'Could not load the pretrained weights of {name} from {where} {location}: '
                        f'{type(error).__name__}: {error}. {fix}')


# The datasets the authors' training scripts write checkpoints for, by model style and classifier size: their label
# order (torchvision's CIFAR classes, ImageNet's synsets) gives the converted folder its class names.
CIFAR10_LABELS = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_LABELS = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl', 'boy',
    'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock',
    'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish', 'forest',
    'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion', 'lizard',
    'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom', 'oak_tree', 'orange', 'orchid',
    'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree', 'plain', 'plate', 'poppy', 'porcupine', 'possum',
    'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper',
    'snail', 'snake', 'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone',
    'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf',
    'woman', 'worm')


def authors_dataset(model: nn.Module) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """ (dataset, label names) of a model shaped like one the authors' scripts train (ImageNet style with 1000
    classes, CIFAR style with 10 or 100), else None. """
    from timm.data import ImageNetInfo
    imagenet = len(model.stages) == 4
    if imagenet and model.num_classes == 1000:
        return 'imagenet-1k', tuple(ImageNetInfo('imagenet-1k').label_names())
    if not imagenet and model.num_classes in (10, 100):
        return ('cifar10', CIFAR10_LABELS) if model.num_classes == 10 else ('cifar100', CIFAR100_LABELS)
    return None


def is_release(path: os.PathLike, url: Optional[str]) -> bool:
    """ Whether the file at `path` is the one published at `url`: release file names carry a prefix of the file's
    sha256 (`<name>-<hash prefix>.<ext>`, torch.hub's convention), checked here on the bytes. """
    match = torch.hub.HASH_REGEX.search(os.path.basename(url or ''))
    return bool(match) and file_sha256(path).startswith(match.group(1))


def file_sha256(path: os.PathLike) -> str:
    """ The SHA-256 of a file's bytes (hex), read in blocks: release files and checkpoint files are both checked
    by it. """
    import hashlib
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _source_file(source: str) -> Path:
    """ The local file of a path or URL (a URL is downloaded once into torch hub's cache). """
    if '://' not in source:
        return Path(source)
    from timm.models._hub import download_cached_file
    return Path(download_cached_file(source, check_hash=False, progress=True))


def _classifier_size(state_dict: Mapping[str, Any]) -> Optional[int]:
    weight = state_dict.get('head.fc.weight')
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def add_arguments(parser: argparse.ArgumentParser):
    from timm.utils import ParseKwargs

    parser.add_argument('source', help='checkpoint path or URL: ours (train or folded) or the authors\' (folded or '
                                       'functional v2), read with weights_only=True')
    parser.add_argument('--model', required=True, help='architecture (optionally .tag), e.g. diracnet18')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                        help='model shape, e.g. depth=28 width=2 (any CIFAR DiracNet-D-W) or layers=(2,2,2,2)')
    parser.add_argument('--num-classes', type=int, default=None,
                        help="classifier size (default: the checkpoint's, e.g. 100 for a CIFAR-100 file)")
    parser.add_argument('--out', required=True, help='output Hub folder (must not exist unless --overwrite)')
    parser.add_argument('--form', choices=('auto', 'train', 'folded'), default='auto',
                        help='form of the written weights; auto keeps the source\'s form (default)')
    parser.add_argument('--dataset', default=None,
                        help='hfds/<Hub id or local folder> the weights were trained on: its class names go into '
                             "config.json (default for the authors' layouts: ImageNet-1k, CIFAR-10 or CIFAR-100 by "
                             'model style and classifier size)')
    parser.add_argument('--license', default=None, help='licence of weights that are not a registered release '
                                                        '(an SPDX-style Hub id, e.g. apache-2.0; default unknown)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output folder')


def run(args: argparse.Namespace) -> int:
    import timm
    from timm.models import get_pretrained_cfg

    from .hub import save_hub_folder

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f'{args.out} already exists; nothing was written. Choose another --out, or pass '
                              f'--overwrite to replace it.')
    path = _source_file(args.source)
    checkpoint = load_checkpoint_file(path)
    fmt = detect_format(checkpoint)
    folded = fmt.endswith('folded') if args.form == 'auto' else args.form == 'folded'
    num_classes = args.num_classes or _classifier_size(to_timm_state_dict(checkpoint))
    cfg = get_pretrained_cfg(args.model)
    release = (cfg is not None and not args.model_kwargs and num_classes in (None, cfg.num_classes)
               and is_release(path, cfg.url))
    model = timm.create_model(
        args.model, pretrained=True, inference_mode=folded, pretrained_cfg_overlay=dict(state_dict=checkpoint),
        **({} if num_classes is None else dict(num_classes=num_classes)), **args.model_kwargs)
    model.pretrained_cfg.pop('state_dict', None)

    authors = authors_dataset(model) if fmt.startswith('authors') else None
    if args.dataset:
        from .data import hub_dataset_id, label_names
        dataset, labels = hub_dataset_id(args.dataset), label_names(args.dataset)
    elif authors:
        dataset, labels = authors
    else:
        raise ValueError(f'{path.name} is not in the authors\' layout, so its classes are unknown: pass --dataset '
                         f'hfds/<Hub id or local folder> (the data it was trained on) to name them.')
    source = args.source if '://' in args.source else path.name  # a file name, never a local absolute path
    info = {} if release else dict(source=f'{source} ({fmt} format)', dataset=dataset,
                                   license=args.license or 'unknown')
    out = save_hub_folder(model.eval(), args.out, train_info=info, overwrite=args.overwrite, release=release,
                          label_names=labels)
    cfg = model.pretrained_cfg
    what = f"the release {cfg['architecture']}.{cfg['tag']}" if release else 'not a registered release: no tag'
    print(f'wrote {out}: {", ".join(sorted(p.name for p in out.iterdir()))} '
          f'({"folded" if folded else "train"} form, from a checkpoint in the {fmt} format; {what})')
    return 0
