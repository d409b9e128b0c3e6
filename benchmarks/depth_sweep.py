""" Depth sweep on real CIFAR-10: DiracNet vs the same plain net without the Dirac term vs a ResNet of equal shape.

Tests the paper's claims at small scale: (a) plain nets degrade as they get deeper while DiracNets keep training,
close to ResNets of the same shape; (b) the Dirac parameterization is robust to the conv weight initialisation.
Every run trains on the same class-balanced subset with the same seed, schedule (SGD + one-cycle) and
augmentation (pad-4 reflect, random crop, flip). Results go to a JSON file run by run, so an interrupted sweep
resumes where it stopped; `--plot` turns the JSON into a table and PNG plots.

    python benchmarks/depth_sweep.py --data <CIFAR-10 folder> --out docs/reports/depth_sweep.json   # depth sweep
    python benchmarks/depth_sweep.py --data <CIFAR-10 folder> --sweep init --out docs/reports/init_sweep.json
    python benchmarks/depth_sweep.py --plot docs/reports/depth_sweep.json
"""
import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_dirac
from timm.optim import param_groups_weight_decay
from timm_dirac.deploy.dirac_tap import centre_tap_ratio
from timm_dirac.diracnet import CIFAR_MEAN, CIFAR_STD
from timm_dirac.metrics import evaluate

NETWORKS = ('dirac', 'plain', 'resnet')
# settings a resumed sweep must share with its file (torch version and thread count only move the times)
COMPARABLE = ('sweep', 'width', 'epochs', 'batch_size', 'lr', 'train_samples', 'test_samples', 'seed', 'bf16',
              'weight_decay_1d')
LEGACY = dict(weight_decay_1d=True)  # what sweeps written before a setting existed used
INITS = {
    'kaiming': nn.init.kaiming_normal_,
    'xavier': nn.init.xavier_normal_,
    'normal0.1': lambda w: nn.init.normal_(w, std=0.1),
    'orthogonal': nn.init.orthogonal_,
}


class ResidualPair(nn.Module):
    """ Two DiracNet-shaped layers (ReLU -> conv -> BN) with an identity skip around them; a width change is
    bridged by zero-padding the skip (ResNet option A), which is the identity on the shared channels. """

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.second(self.first(x))
        return out + F.pad(x, (0, 0, 0, 0, 0, out.shape[1] - x.shape[1]))


def build(network: str, depth: int, width: int, init: str) -> nn.Module:
    """ DiracNet-D-W (`dirac`: three stages of (D - 4) / 3 layers, 16W, 32W and 64W channels wide), the same without
    the Dirac term (`plain`) or with skips around layer pairs (`resnet`). """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f'depth {depth}: a DiracNet-D-W has D = 6n + 4 (10, 16, 22, 28, ...), an even number of '
                         f'layers in each of its three stages.')
    model = timm.create_model('diracnet34_1_cifar', layers=((depth - 4) // 3,) * 3,
                              channels=tuple(int(c * width) for c in (16, 32, 64)), dirac=network == 'dirac')
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, timm_dirac.DiracConv2d)):
            INITS[init](m.weight)
    if network == 'resnet':
        for stage in model.stages:
            blocks = list(stage.blocks)
            for block in blocks:
                block.act.inplace = False  # the skip keeps the block input
            stage.blocks = nn.Sequential(*[ResidualPair(a, b) for a, b in zip(blocks[::2], blocks[1::2])])
    return model


def load_cifar(root: Path, split: str, limit: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Decode a class-balanced prefix of a CIFAR-10 split (the Parquet rows cycle through the classes). """
    import datasets
    ds = datasets.load_dataset(str(root), split=f'{split}[:{limit}]')
    images = torch.from_numpy(np.stack([np.asarray(img.convert('RGB')) for img in ds['image']]))
    return images.permute(0, 3, 1, 2).contiguous(), torch.tensor(ds['label'])


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """ Pad 4 (reflect), random 32x32 crop, random horizontal flip: the authors' CIFAR augmentation. """
    padded = F.pad(images, (4, 4, 4, 4), mode='reflect')
    n = images.shape[0]
    dx, dy = torch.randint(0, 9, (2, n), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def train_and_test(model: nn.Module, data: Dict[str, Tuple[torch.Tensor, torch.Tensor]], args) -> dict:
    train_x, train_y = data['train']
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(train_y) / args.batch_size)
    # the authors' grouping decays every parameter; timm's exempts the 1-d ones (biases, BatchNorm, alpha, beta)
    params = model.parameters() if args.weight_decay_1d else param_groups_weight_decay(model, 5e-4)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.perf_counter()
    losses = []
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(train_y), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = normalize(augment(train_x[idx], gen))
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    train_seconds = time.perf_counter() - start
    model.eval()
    test_x, test_y = data['test']

    def predict(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16):
            return model(normalize(images))
    try:
        test_top1 = evaluate(predict, zip(test_x.split(500), test_y.split(500)))['top1']
    except ValueError as e:  # evaluate refuses non-finite logits: a diverged run has no accuracy
        if 'non-finite' not in str(e):
            raise
        test_top1 = None
    final_loss = float(np.mean(losses[-steps_per_epoch:]))
    return dict(test_top1=test_top1, final_train_loss=final_loss if math.isfinite(final_loss)
                else None, train_seconds=round(train_seconds, 1), **dirac_stats(model))


def dirac_stats(model: nn.Module) -> dict:
    """ The trained alpha and beta (mean, std, min, max over every channel of every layer) and the folded
    centre-tap ratio (median over layers of `dirac_tap.centre_tap_ratio`, what per-channel int8 suffers from). """
    stats = {}
    for name in ('alpha', 'beta'):
        found = [p.detach().flatten() for n, p in model.named_parameters() if n.endswith('.' + name)]
        if found:
            values = torch.cat(found)
            stats[name] = dict(mean=values.mean().item(), std=values.std().item(), min=values.min().item(),
                               max=values.max().item())
    if not any(isinstance(m, ResidualPair) for m in model.modules()):
        folded = copy.deepcopy(model).eval()
        folded.reparameterize()
        stats['centre_tap_ratio_median'] = float(np.median(centre_tap_ratio(folded)))
    return stats


def runs(args) -> List[dict]:
    if args.sweep == 'depth':
        return [dict(network=n, depth=d, width=args.width, init='kaiming') for d in args.depths for n in args.networks]
    return [dict(network=n, depth=args.init_depth, width=args.width, init=i) for i in INITS for n in ('dirac', 'plain')
            if n in args.networks]


def sweep(args):
    out = Path(args.out)
    now = settings(args)
    report = json.loads(out.read_text()) if out.exists() else dict(settings=now, runs=[])
    recorded = {**LEGACY, **report['settings']}
    changed = [f'{k}: {recorded[k]} there, {now[k]} now' for k in COMPARABLE if recorded[k] != now[k]]
    if changed:
        raise SystemExit(f'{out} holds runs with other settings ({"; ".join(changed)}): pass the same settings to '
                         f'resume it, or another --out for a new sweep.')
    results = report['runs']
    done = {tuple(sorted((k, r[k]) for k in ('network', 'depth', 'width', 'init'))) for r in results}
    data = {'train': load_cifar(args.data, 'train', args.train_samples),
            'test': load_cifar(args.data, 'test', args.test_samples)}
    for run in runs(args):
        if tuple(sorted(run.items())) in done:
            continue
        torch.manual_seed(args.seed)
        model = build(**run)
        result = dict(run, params=sum(p.numel() for p in model.parameters()), **train_and_test(model, data, args))
        results.append(result)
        print(json.dumps(result), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix('.tmp')
        tmp.write_text(json.dumps(dict(settings=settings(args), runs=results), indent=1))
        os.replace(tmp, out)  # atomic: an interrupted sweep keeps every finished run


def settings(args) -> dict:
    """ The settings recorded with a sweep's runs. """
    return {k: getattr(args, k) for k in COMPARABLE} | dict(torch=torch.__version__, threads=torch.get_num_threads())


def plot(path: Path):
    """ Print a markdown table of the results and save a PNG plot next to the JSON. """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    report = json.loads(path.read_text())
    results, sweep_kind = report['runs'], report['settings']['sweep']
    x_key = 'depth' if sweep_kind == 'depth' else 'init'
    print(f'| network | {x_key} | test top-1 (%) | final train loss | train time (s) |\n|---|---|---|---|---|')
    for r in sorted(results, key=lambda r: (r['network'], r[x_key])):
        loss = f"{r['final_train_loss']:.3f}" if r['final_train_loss'] is not None else 'diverged'
        top1 = f"{r['test_top1']:.2f}" if r['test_top1'] is not None else 'diverged'
        print(f"| {r['network']} | {r[x_key]} | {top1} | {loss} | {r['train_seconds']:.0f} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for network in NETWORKS:
        rows = [r for r in results if r['network'] == network and r['test_top1'] is not None]
        if rows:
            xs = [r[x_key] for r in rows]
            ax.plot(xs, [r['test_top1'] for r in rows], 'o-' if x_key == 'depth' else 'o', label=network)
    ax.set_xlabel(x_key)
    ax.set_ylabel('CIFAR-10 test top-1 (%)')
    s = report['settings']
    depths = sorted({r['depth'] for r in results})
    depth = f'depth {depths[0]}, ' if len(depths) == 1 else ''
    ax.set_title(f"{depth}width {s['width']}, {s['train_samples']} train images, {s['epochs']} epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix('.png'), dpi=120)
    print(f'plot: {path.with_suffix(".png")}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sweep', choices=('depth', 'init'), default='depth')
    parser.add_argument('--out', default='docs/reports/depth_sweep.json', help='results JSON (resumed if present)')
    parser.add_argument('--plot', type=Path, help='only print the table and draw the plot of this results JSON')
    parser.add_argument('--data', type=Path, default=None,
                        help='local CIFAR-10 datasets folder (the Parquet files of uoft-cs/cifar10)')
    parser.add_argument('--depths', type=int, nargs='+', default=[10, 28, 52, 100])
    parser.add_argument('--init-depth', type=int, default=52)
    parser.add_argument('--width', type=int, default=1)
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--train-samples', type=int, default=10000)
    parser.add_argument('--test-samples', type=int, default=10000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-bf16', dest='bf16', action='store_false', help='train in fp32 (default: bf16 autocast)')
    parser.add_argument('--weight-decay-1d', action=argparse.BooleanOptionalAction, default=True,
                        help="decay every parameter, as the authors' train.py does (--no-weight-decay-1d: timm's "
                             "grouping, which exempts biases, BatchNorm, alpha and beta)")
    parser.add_argument('--networks', nargs='+', choices=NETWORKS, default=list(NETWORKS))
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    if args.data is None or not args.data.exists():
        raise SystemExit(f'CIFAR-10 not found at {args.data}: pass --data <folder with the Parquet CIFAR-10>.')
    sweep(args)


if __name__ == '__main__':
    main()
