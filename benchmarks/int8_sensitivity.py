""" Per-layer int8 sensitivity of folded DiracNets: which layers the int8 weights hurt, with and without the Dirac
tap split out.

Each layer's weights are quantized alone (every other layer and all activations stay float), the way ONNX Runtime
quantizes them (symmetric per output channel, round to nearest):
- `plain 8-bit`: the folded kernel as it is, +-127 (what `timm-dirac quantize --flow plain` stores);
- `split 7-bit`: the learned part (kernel minus its diagonal centre taps) at +-64, the taps exact (what
  `--flow split` stores; the stem and the classifier have no Dirac tap and are simply 7-bit).
For each, the logits' signal-to-quantization-noise ratio against the float model and the top-1 change on real
test images; beside them the layer's centre-tap ratio (median over channels of |Dirac tap| / max |other weight|).

    python benchmarks/int8_sensitivity.py --checkpoint timm_dirac/assets/weights/diracnet16_4_cifar.td_cifar10 \\
        --data hfds/<CIFAR-10 folder> --out docs/reports/int8_sensitivity.json --plot docs/reports/int8_sensitivity.png
"""
import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

import timm_dirac  # noqa: F401  registers the models
from timm_dirac.deploy.dirac_tap import centre_tap_ratio, diagonal_centre
from timm_dirac.diracnet import DiracBlock
from timm_dirac.loading import fold, load_images, load_model
from timm_dirac.machine import machine_info
from timm_dirac.metrics import evaluate

SCHEMES = {'plain 8-bit': (False, 127), 'split 7-bit': (True, 64)}


def quantize_per_channel(weight: torch.Tensor, qmax: int) -> torch.Tensor:
    """ Symmetric per-output-channel round-to-nearest, dequantized (`torch.fake_quantize_per_channel_affine`). """
    scale = weight.flatten(1).abs().amax(1).clamp_min(1e-12) / qmax
    zero_point = torch.zeros(len(scale), dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -qmax, qmax)


def quantize_layer(weight: torch.Tensor, split: bool, qmax: int) -> torch.Tensor:
    if not split:
        return quantize_per_channel(weight, qmax)
    taps = weight.new_zeros(weight.shape)
    taps[diagonal_centre(weight)] = weight[diagonal_centre(weight)]
    return quantize_per_channel(weight - taps, qmax) + taps


def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor = None) -> Dict:
    """ Top-1 (`metrics.evaluate`) and, against `reference` logits, the logits' signal-to-quantization-noise ratio;
    returns the logits too. """
    outputs = []

    def predict(batch: torch.Tensor) -> torch.Tensor:
        outputs.append(model(batch))
        return outputs[-1]
    top1 = evaluate(predict, zip(images.split(250), labels.split(250)))['top1']
    logits = torch.cat(outputs)
    result = dict(top1=top1, logits=logits)
    if reference is not None:
        noise = (logits - reference).pow(2).mean().item()
        result['sqnr_db'] = 10 * math.log10(reference.pow(2).mean().item() / noise) if noise > 0 else float('inf')
    return result


def sensitivity(checkpoint: str, data: str, num_eval: int, split: str) -> Dict:
    model = fold(load_model(None, checkpoint))
    images, labels = load_images(data, model, num_eval, split)
    fp32 = score(model, images, labels)
    reference, fp32_top1 = fp32['logits'], fp32['top1']
    dirac_convs = {id(b.conv) for b in model.modules() if isinstance(b, DiracBlock)}
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ratios = iter(centre_tap_ratio(model))
    layers: List[Dict] = []
    for name, layer in named:
        original = layer.weight.data.clone()
        has_tap = id(layer) in dirac_convs
        row = dict(layer=name, centre_tap_ratio=next(ratios) if has_tap else None)
        for scheme, (split_taps, qmax) in SCHEMES.items():
            layer.weight.data = quantize_layer(original, split_taps and has_tap, qmax)
            result = score(model, images, labels, reference)
            row[scheme] = dict(sqnr_db=result['sqnr_db'], top1_change=result['top1'] - fp32_top1)
        layer.weight.data = original
        layers.append(row)
        print(f"{name:32s} " + '  '.join(f"{s}: {row[s]['sqnr_db']:5.1f} dB {row[s]['top1_change']:+.2f}"
                                         for s in SCHEMES), flush=True)
    return dict(checkpoint=checkpoint, model=model.pretrained_cfg.get('architecture'), data=data, split=split,
                num_eval=len(images), fp32_top1=fp32_top1, layers=layers)


def plot(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = result['runs']
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        x = range(len(run['layers']))
        for offset, scheme in zip((-0.2, 0.2), SCHEMES):
            ax.bar([i + offset for i in x], [r[scheme]['sqnr_db'] for r in run['layers']], width=0.4, label=scheme)
        ax.set_ylabel('logit SQNR (dB), one layer int8')
        ax.set_xticks(list(x))
        ax.set_xticklabels([r['layer'].replace('stages.', 's').replace('.blocks.', '.').replace('.conv', '')
                            for r in run['layers']], rotation=90, fontsize=7)
        twin = ax.twinx()
        twin.plot([i for i, r in enumerate(run['layers']) if r['centre_tap_ratio']],
                  [r['centre_tap_ratio'] for r in run['layers'] if r['centre_tap_ratio']], 'k.-',
                  label='centre-tap ratio')
        twin.set_ylabel('centre-tap ratio (median)')
        ax.set_title(f"{run['model']} ({Path(run['checkpoint']).name}), fp32 top-1 {run['fp32_top1']:.2f} on "
                     f"{run['num_eval']} test images")
        lines, labels = ax.get_legend_handles_labels()
        lines2, labels2 = twin.get_legend_handles_labels()
        ax.legend(lines + lines2, labels + labels2, fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', nargs='+', required=True, help='checkpoint folders (Hub layout)')
    parser.add_argument('--data', required=True, help='test images: hfds/<Hub id or local folder> or an image folder')
    parser.add_argument('--split', default='test')
    parser.add_argument('--num-eval', type=int, default=2000)
    parser.add_argument('--out', required=True, help='JSON report')
    parser.add_argument('--plot', default=None, help='PNG of SQNR and centre-tap ratio per layer')
    args = parser.parse_args()
    result = dict(machine=machine_info(), runs=[sensitivity(c, args.data, args.num_eval, args.split)
                                                for c in args.checkpoint])
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)


if __name__ == '__main__':
    main()
