""" Fold a `train.py --diracify` run back into its original timm architecture and check that nothing moved.

Rebuilds the run's model from its args.yaml (diracified as in training), loads the run's `last` (or `best`)
weights, folds it with `timm.utils.reparameterize_model`, and evaluates both forms in fp32 over a whole split in one
pass: top-1 of each, how many predictions differ, and the largest relative output difference
(max |folded - diracified| / max |diracified| per batch). The folded state dict is loaded strictly into a fresh
`timm.create_model(<model>)` first, so the check is on the untouched original class. A plain run (no --diracify)
gets its fp32 top-1 only. `--hub-out` writes the folded model as a timm Hub folder (timm's save_for_hf), which
loads with timm alone.

    python benchmarks/diracify_fold.py output/diracify/vgg11_bn-dirac   # the shipped sample's 1,000 test images
    python benchmarks/diracify_fold.py output/diracify/vgg11_bn-dirac --dataset hfds/uoft-cs/cifar10 --split test
    python benchmarks/diracify_fold.py --plot docs/reports RUN_DIR [RUN_DIR ...]   # table + plot of several runs
"""
import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import yaml
from safetensors.torch import load_file

import timm
from timm.data import resolve_data_config
from timm.utils import reparameterize_model

import timm_dirac
from timm_dirac.data import load_split, eval_transform
from timm_dirac.errors import run_refusing
from timm_dirac.loading import default_data


def _create(run: Dict[str, Any], num_classes: int) -> torch.nn.Module:
    return timm.create_model(run['model'], num_classes=num_classes, **(run.get('model_kwargs') or {}))


@torch.no_grad()
def fold_and_evaluate(run_dir: Path, dataset: str, split: str, batch_size: int, checkpoint: str = 'last'
                      ) -> Tuple[Dict[str, Any], torch.nn.Module]:
    """ The evaluation of the run's `checkpoint` weights (see the module docstring) and its folded (or plain) model. """
    run = yaml.safe_load((run_dir / 'args.yaml').read_text())
    state = load_file(run_dir / checkpoint / 'model.safetensors')
    classifier = timm.get_pretrained_cfg(run['model'].split('.')[0]).classifier  # e.g. 'head.fc'
    num_classes = state[f'{classifier}.weight'].shape[0]
    model = _create(run, num_classes)
    if run.get('diracify'):
        model = timm_dirac.diracify(model, run.get('diracify_layers'))
    model.load_state_dict(state, strict=True)
    model.eval()
    forms = {'trained': model}
    if run.get('diracify'):
        folded = reparameterize_model(model)
        original = _create(run, num_classes)
        original.load_state_dict(folded.state_dict(), strict=True)  # the untouched architecture takes the weights
        forms['folded'] = original.eval()
    data_config = resolve_data_config(dict(img_size=run.get('img_size'), input_size=run.get('input_size')),
                                      model=model)
    data, _ = load_split(dataset, None, split, None, eval_transform(data_config))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    correct = {k: 0 for k in forms}
    count, disagree, max_rel = 0, 0, 0.
    start = time.perf_counter()
    for images, labels in loader:
        logits = {k: m(images) for k, m in forms.items()}
        for k, out in logits.items():
            correct[k] += (out.argmax(1) == labels).sum().item()
        if 'folded' in logits:
            ref, out = logits['trained'], logits['folded']
            max_rel = max(max_rel, ((out - ref).abs().max() / ref.abs().max()).item())
            disagree += (out.argmax(1) != ref.argmax(1)).sum().item()
        count += labels.shape[0]
    result = dict(run=run_dir.name, checkpoint=checkpoint, model=run['model'], diracify=bool(run.get('diracify')),
                  split=split,
                  samples=count, top1=round(100. * correct['trained'] / count, 2),
                  seconds=round(time.perf_counter() - start, 1), torch=torch.__version__, timm=timm.__version__)
    if 'folded' in forms:
        result.update(folded_top1=round(100. * correct['folded'] / count, 2), max_rel_error=max_rel,
                      predictions_changed=disagree)
    return result, forms.get('folded', model)


def _summary(run_dir: Path) -> List[Dict[str, float]]:
    with open(run_dir / 'summary.csv') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot(out_dir: Path, run_dirs: List[Path]) -> None:
    """ Markdown table (stdout) and PNG of train loss and val top-1 per epoch for each run. """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(10, 4))
    print('| run | epochs | final train loss | test top-1 (fp32) | folded top-1 | max rel. error '
          '| predictions changed |')
    print('|---|---|---|---|---|---|---|')
    for run_dir in run_dirs:
        rows = _summary(run_dir)
        fold = json.loads((run_dir / 'fold_eval.json').read_text())
        epochs = [r['epoch'] for r in rows]
        style = '-' if fold['diracify'] else '--'
        ax_loss.plot(epochs, [r['train_loss'] for r in rows], style, marker='o', label=run_dir.name)
        ax_top1.plot(epochs, [r['val_top1'] for r in rows], style, marker='o', label=run_dir.name)
        folded = (f"{fold['folded_top1']:.2f} | {fold['max_rel_error']:.1e} | {fold['predictions_changed']}"
                  if fold['diracify'] else '- | - | -')
        print(f"| {run_dir.name} | {len(rows)} | {rows[-1]['train_loss']:.4f} | {fold['top1']:.2f} | {folded} |")
    ax_loss.set(xlabel='epoch', ylabel='train loss', title='train loss')
    ax_top1.set(xlabel='epoch', ylabel='top-1 (%)', title='val top-1 during training')
    ax_top1.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / 'diracify_cifar10.png', dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('runs', nargs='+', type=Path, help='train.py run folders')
    p.add_argument('--dataset', default=default_data(),
                   help='hfds/<Hub id or local folder> (default: the CIFAR-10 sample shipped in the package; '
                        'hfds/uoft-cs/cifar10 for the full test split)')
    p.add_argument('--split', default='test')
    p.add_argument('-b', '--batch-size', type=int, default=250)
    p.add_argument('--checkpoint', default='last', choices=['last', 'best'], help='which weights of the run')
    p.add_argument('--hub-out', type=Path, default=None, help='write the folded model here (one run only)')
    p.add_argument('--plot', type=Path, default=None, metavar='DIR', help='table and PNG from the runs\' '
                   'summary.csv and fold_eval.json instead of evaluating')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error (default: one line)')
    args = p.parse_args()
    return run_refusing('diracify_fold.py', lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    if args.plot:
        return plot(args.plot, args.runs)
    if args.hub_out and len(args.runs) != 1:
        raise ValueError('--hub-out writes one run: pass one run folder.')
    if args.hub_out and args.hub_out.exists():
        raise FileExistsError(f'{args.hub_out} exists; nothing was written. Pass a new folder.')
    for run_dir in args.runs:
        result, folded = fold_and_evaluate(run_dir, args.dataset, args.split, args.batch_size, args.checkpoint)
        (run_dir / 'fold_eval.json').write_text(json.dumps(result, indent=1) + '\n')
        print(json.dumps(result))
        if args.hub_out:
            from timm.models import save_for_hf
            model_args = yaml.safe_load((run_dir / 'args.yaml').read_text()).get('model_kwargs') or None
            save_for_hf(folded, args.hub_out, model_args=model_args, safe_serialization=True)
            print(f'Hub folder (timm only): {args.hub_out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
