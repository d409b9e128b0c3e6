""" Synthetic checkpoints in the authors' DiracNet v2 formats, and their forward, from the paper's formulas.

Written from the formulas and the released files' key layout, not from the authors' code, so the conversion is
checked against an independent formulation: functional params -> functional forward; folded state dict -> plain
conv chain. (`add_to_hf_cache` is .ci/make_hub_cache.py's, the one copy CI fills its caches with.)
"""
import functools
import importlib.util
from pathlib import Path
from typing import Dict, Sequence

import pytest
import torch
import torch.nn.functional as F

EPS = 1e-5


def make_functional_params(
        layers: Sequence[int],
        widths: Sequence[int],
        style: str = 'imagenet',
        num_classes: int = 1000,
        per_channel: bool = True,
        seed: int = 0,
        empty: bool = False,
) -> Dict[str, torch.Tensor]:
    """ Flat `params` of a functional v2 checkpoint, with random non-trivial values (BN stats included).

    `per_channel=False` gives one alpha / beta per layer (shape (1,)), as v2 checkpoints before April 2018.
    `empty=True` skips the random fill (for big shape-only checkpoints).
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, lo=-1., hi=1.):
        t = torch.empty(shape)
        return t if empty else t.uniform_(lo, hi, generator=g)

    def bn(prefix, n):
        return {prefix + 'weight': rand(n, lo=.5, hi=1.5), prefix + 'bias': rand(n, lo=-.2, hi=.2),
                prefix + 'running_mean': rand(n, lo=-.2, hi=.2), prefix + 'running_var': rand(n, lo=.5, hi=2.)}

    k = 7 if style == 'imagenet' else 3
    p = {'conv': rand(widths[0], 3, k, k, lo=-.2, hi=.2), **bn('bn.', widths[0])}
    cin = widths[0]
    for gi, (n, w) in enumerate(zip(layers, widths)):
        for b in range(n):
            base = f'group{gi}.block{b}.'
            c = 1 if not per_channel else w
            p[base + 'conv'] = rand(w, cin, 3, 3)
            p[base + 'alpha'] = rand(c, lo=.5, hi=1.5)
            p[base + 'beta'] = rand(c, lo=.05, hi=.5)
            p.update(bn(base + 'bn.', w))
            p[f'eye{w}_{cin}_3_3'] = torch.nn.init.dirac_(torch.empty(w, cin, 3, 3))
            cin = w
    p['fc.weight'] = rand(num_classes, cin, lo=-.1, hi=.1)
    p['fc.bias'] = rand(num_classes, lo=-.1, hi=.1)
    return p


def dirac_weight(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ W_hat = alpha * delta + beta * W / ||W[o]|| (the paper's Dirac parameterization, v2: per output channel). """
    delta = torch.nn.init.dirac_(torch.empty_like(w))
    norm = w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return alpha.view(-1, 1, 1, 1) * delta + beta.view(-1, 1, 1, 1) * w / norm


def _groups(params, prefix=''):
    out, g = [], 0
    while f'{prefix}group{g}.block0.conv' in params or f'{prefix}group{g}.block0.conv.weight' in params:
        b = 0
        while f'{prefix}group{g}.block{b}.conv' in params or f'{prefix}group{g}.block{b}.conv.weight' in params:
            b += 1
        out.append(b)
        g += 1
    return out


def functional_forward(params: Dict[str, torch.Tensor], x: torch.Tensor, style: str = 'imagenet') -> torch.Tensor:
    """ The v2 train-form network (ReLU -> Dirac conv -> BN layers) in eval mode, on the authors' flat keys. """
    def bn(o, base):
        return F.batch_norm(o, params[base + 'running_mean'], params[base + 'running_var'],
                            params[base + 'weight'], params[base + 'bias'], False, 0., EPS)

    if style == 'imagenet':
        o = F.max_pool2d(bn(F.conv2d(x, params['conv'], stride=2, padding=3), 'bn.'), 3, 2, 1)
    else:
        o = F.relu(bn(F.conv2d(x, params['conv'], padding=1), 'bn.'))
    for g, n in enumerate(_groups(params)):
        if g > 0:
            o = F.max_pool2d(o, 2)
        for b in range(n):
            base = f'group{g}.block{b}.'
            w = params[base + 'conv']
            alpha = params[base + 'alpha'].expand(w.shape[0])
            beta = params[base + 'beta'].expand(w.shape[0])
            o = bn(F.conv2d(F.relu(o), dirac_weight(w, alpha, beta), padding=1), base + 'bn.')
    o = F.relu(o).mean((2, 3))
    return F.linear(o, params['fc.weight'], params['fc.bias'])


def fold_functional(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """ The authors' folded state dict (features.* / fc.* keys) of functional params: the Dirac term and BN folded
    into each conv. """
    def fold(w, base):
        s = params[base + 'weight'] / torch.sqrt(params[base + 'running_var'] + EPS)
        return w * s.view(-1, 1, 1, 1), params[base + 'bias'] - params[base + 'running_mean'] * s

    out = {}
    out['features.conv.weight'], out['features.conv.bias'] = fold(params['conv'], 'bn.')
    for g, n in enumerate(_groups(params)):
        for b in range(n):
            base = f'group{g}.block{b}.'
            w = params[base + 'conv']
            w_hat = dirac_weight(w, params[base + 'alpha'].expand(w.shape[0]), params[base + 'beta'].expand(w.shape[0]))
            out[f'features.{base}conv.weight'], out[f'features.{base}conv.bias'] = fold(w_hat, base + 'bn.')
    out['fc.weight'], out['fc.bias'] = params['fc.weight'], params['fc.bias']
    return out


def folded_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor, style: str = 'imagenet') -> torch.Tensor:
    """ The folded plain chain: conv(+bias) [-> maxpool] -> [ReLU -> conv(+bias)] x L -> ReLU -> pool -> fc. """
    if style == 'imagenet':
        o = F.max_pool2d(F.conv2d(x, sd['features.conv.weight'], sd['features.conv.bias'], 2, 3), 3, 2, 1)
    else:
        o = F.conv2d(x, sd['features.conv.weight'], sd['features.conv.bias'], padding=1)
    for g, n in enumerate(_groups(sd, 'features.')):
        if g > 0:
            o = F.max_pool2d(o, 2)
        for b in range(n):
            base = f'features.group{g}.block{b}.conv.'
            o = F.conv2d(F.relu(o), sd[base + 'weight'], sd[base + 'bias'], padding=1)
    return F.linear(F.relu(o).mean((2, 3)), sd['fc.weight'], sd['fc.bias'])


def params_stats_layout(params: Dict[str, torch.Tensor]) -> dict:
    """ The older training-script layout: learnable tensors in `params`, BN statistics and identities in `stats`. """
    is_stat = lambda k: k.startswith('eye') or k.endswith(('running_mean', 'running_var'))
    return {'params': {k: v for k, v in params.items() if not is_stat(k)},
            'stats': {k: v for k, v in params.items() if is_stat(k)},
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'params': [0]}]}}


def params_epoch_optimizer_layout(params: Dict[str, torch.Tensor]) -> dict:
    """ The later training-script layout: everything in `params` (leaf tensors that require grad), plus the epoch
    and optimizer state. """
    return {'params': {k: v.clone().requires_grad_(not k.startswith('eye')) for k, v in params.items()},
            'epoch': 100,
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0001, 'momentum': 0.9, 'params': [0, 1]}]}}


IMAGENET = {'diracnet18': (4, 4, 4, 4), 'diracnet34': (6, 8, 12, 6)}


def write_authors_folded_file(path, model_name: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """ Write a synthetic stand-in for the authors' folded ImageNet file of `model_name` (same keys and shapes,
    random weights) and return its state dict. """
    params = make_functional_params(IMAGENET[model_name], (64, 128, 256, 512), seed=seed)
    folded = fold_functional(params)
    torch.save(folded, path)
    return folded


@functools.cache
def make_hub_cache():
    """ .ci/make_hub_cache.py as a module (the test is skipped where the checkout has no .ci/). """
    path = Path(__file__).resolve().parents[1] / '.ci' / 'make_hub_cache.py'
    if not path.is_file():
        pytest.skip(f'{path} is not in this checkout')
    spec = importlib.util.spec_from_file_location('make_hub_cache', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_to_hf_cache(folder, repo_id: str, cache_dir):
    """ The files of `folder` in a Hugging Face cache in the Hub's layout, by .ci/make_hub_cache.py. """
    return make_hub_cache().add_to_hf_cache(folder, repo_id, cache_dir)


# (model name, model kwargs, style, authors' layers, widths, classes, input size)
NETS = {
    'imagenet': ('diracnet18', dict(layers=(1, 2, 1, 1)), 'imagenet', (1, 2, 1, 1), (64, 128, 256, 512), 1000, 64),
    'cifar': ('diracnet34_1_cifar', {}, 'cifar', (10, 10, 10), (16, 32, 64), 10, 32),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """ Largest error relative to the reference's largest magnitude. """
    return ((out - ref).abs().max() / ref.abs().max()).item()


def authors_checkpoint(net: str, layout: str, seed: int = 0):
    """ (checkpoint object, reference output fn) for one of the authors' formats. """
    _, _, style, layers, widths, classes, _ = NETS[net]
    params = make_functional_params(layers, widths, style, classes, per_channel=layout != 'params_stats', seed=seed)
    if layout == 'folded':
        folded = fold_functional(params)
        return folded, lambda x: folded_forward(folded, x, style)
    ckpt = params_stats_layout(params) if layout == 'params_stats' else params_epoch_optimizer_layout(params)
    return ckpt, lambda x: functional_forward(params, x, style)
