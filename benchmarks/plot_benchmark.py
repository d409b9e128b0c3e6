""" Plot a `timm-dirac benchmark` result: throughput (largest batch, eager) against reported ImageNet-1k top-1, one
panel per precision.

The accuracies are published ones (the DiracNets' from the model cards' facts, `timm_dirac.hub.card`; the others
from timm's results table), so they live here with matplotlib, outside the wheel; the command writes only the JSON.

    timm-dirac benchmark --out bench/ && python benchmarks/plot_benchmark.py bench/benchmark.json   # bench/benchmark.png
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from timm_dirac.hub.card import REPORTED_RESULTS

TIMM_RESULTS = ('timm ImageNet-1k validation results, huggingface/pytorch-image-models '
                'results/results-imagenet.csv at commit aa4b5850c154, 224 px rows')

# Reported ImageNet-1k top-1 (%) by model: (weights tag, top-1, source). Used only to place models on the plot.
REPORTED_TOP1: Dict[str, List[tuple]] = {
    **{name.split('.')[0]: [(name.split('.')[1].split('_')[0], r['top1'], r['source'])]
       for name, r in REPORTED_RESULTS.items()},
    'resnet18': [('tv_in1k', 69.752, TIMM_RESULTS), ('a1_in1k', 71.504, TIMM_RESULTS)],
    'resnet34': [('tv_in1k', 73.298, TIMM_RESULTS), ('a1_in1k', 76.420, TIMM_RESULTS)],
    'repvgg_a0': [('rvgg_in1k', 72.426, TIMM_RESULTS)],
    'repvgg_a1': [('rvgg_in1k', 74.474, TIMM_RESULTS)],
    'repvgg_a2': [('rvgg_in1k', 76.488, TIMM_RESULTS)],
    'repvgg_b0': [('rvgg_in1k', 75.158, TIMM_RESULTS)],
}


def save_plot(result: Dict[str, Any], path: str) -> bool:
    """ Throughput (largest batch, eager) vs reported ImageNet top-1, one panel per precision, as a PNG at `path`.
    Returns False where no row has a reported accuracy (e.g. only CIFAR models were timed). """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = [r for r in result['rows'] if r['backend'] == 'eager' and r['model'] in REPORTED_TOP1]
    if not rows:
        return False
    batch = max(r['batch_size'] for r in rows)
    precisions = [p for p in result['settings']['precisions'] if any(r['precision'] == p for r in rows)]
    two_forms = {r['model'] for r in rows if r['form'] == 'folded'}
    fig, axes = plt.subplots(1, len(precisions), figsize=(6 * len(precisions), 4.5), squeeze=False)
    for ax, precision in zip(axes[0], precisions):
        for r in rows:
            if r['precision'] != precision or r['batch_size'] != batch:
                continue
            for tag, top1, _ in REPORTED_TOP1[r['model']]:
                folded = r['form'] == 'folded' or r['model'] not in two_forms
                color = 'tab:red' if r['model'].startswith('diracnet') else (
                    'tab:blue' if r['model'].startswith('resnet') else 'tab:green')
                ax.scatter(r['img_per_s'], top1, color=color, facecolors=color if folded else 'none', s=50)
                label = f"{r['model']} {r['form']}" if r['model'] in two_forms else r['model']
                ax.annotate(f'{label} ({tag})', (r['img_per_s'], top1), fontsize=7,
                            xytext=(4, 3), textcoords='offset points')
        ax.set_xlabel(f'images/s (batch {batch}, {precision}, eager, {result["settings"]["threads"]} threads)')
        ax.set_ylabel('reported ImageNet-1k top-1 (%)')
        ax.grid(alpha=0.3)
    fig.suptitle(f"Inference throughput vs accuracy: {result['machine']['cpu']} (filled: deploy form)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('json', type=Path, help='benchmark.json written by timm-dirac benchmark')
    parser.add_argument('--out', type=Path, default=None, help='PNG (default: beside the JSON, benchmark.png)')
    args = parser.parse_args(argv)
    out = args.out or args.json.with_suffix('.png')
    if not save_plot(json.loads(args.json.read_text()), str(out)):
        raise SystemExit(f'{args.json}: no eager row of a model with a reported ImageNet top-1 '
                         f'({", ".join(REPORTED_TOP1)}): nothing to plot.')
    print(f'Wrote {out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
