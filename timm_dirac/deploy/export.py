""" `timm-dirac export-onnx`: the folded model as ONNX, checked against PyTorch on real images before success.

The export, the graph check (only a plain conv-ReLU chain's ops) and the comparison with ONNX Runtime are the ONNX
Runtime backend's (`backends/onnxruntime.py`). Untrained weights get their BatchNorm statistics from the check
images before folding (torch's `update_bn`): with the initial statistics a random DiracNet-34's logits are about
1e-9, and a comparison of such logits checks almost nothing of the network.
"""
import argparse
import importlib.util
import os
import sys
from pathlib import Path

from torch.optim.swa_utils import update_bn

from .backends.onnxruntime import DEFAULT_TOLERANCE, REQUIRES, check_graph_ops, check_opset, export_onnx, verify_onnx
from ..loading import MODEL_SOURCES, default_data, fold, load_images, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..errors import number

    parser.add_argument('--model', default=None, help='timm model name (optional with a --checkpoint folder)')
    parser.add_argument('--pretrained', action='store_true', help="the model's pretrained weights")
    parser.add_argument('--checkpoint', default=None, metavar='DIR',
                        help='checkpoint folder (config.json + model.safetensors) or weights file')
    parser.add_argument('--out', required=True, metavar='FILE.onnx')
    parser.add_argument('--data', default=None,
                        help='real images for the check: hfds/<Hub id or local folder> or an image folder (default: '
                             'the CIFAR-10 sample shipped in timm_dirac/assets/cifar10_sample)')
    parser.add_argument('--split', default='test')
    parser.add_argument('--num-images', type=number(int, 1), default=32)
    parser.add_argument('--tolerance', type=number(float, 0, above=True), default=DEFAULT_TOLERANCE,
                        help='max |ONNX - PyTorch| as a fraction of the largest |logit| (above 0)')
    parser.add_argument('--opset', type=number(int), default=18,
                        help="ONNX opset: the exporter's (18) up to the installed onnx's newest")


def check_packages(data: str) -> None:
    """ Refuse in one line, naming the extra, when the exporter, ONNX Runtime or (for `hfds/` data) datasets is
    missing. """
    missing = [p for p in REQUIRES + (('datasets',) if data.startswith('hfds/') else ())
               if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(f'export-onnx needs {", ".join(missing)}, not installed: pip install "timm-dirac[export]".')


def run(args: argparse.Namespace) -> int:
    data = args.data or default_data()
    check_packages(data)
    check_opset(args.opset)
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f'{out} already exists: pass a new --out file (nothing is overwritten).')
    model = load_model(args.model, args.checkpoint, args.pretrained)
    images, _ = load_images(data, model, args.num_images, args.split)
    untrained = not (args.checkpoint or args.pretrained or (args.model or '').startswith(MODEL_SOURCES))
    if untrained:
        update_bn([images], model)  # BatchNorm statistics of the check images (one pass, cumulative average)
    model = fold(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f'.{out.name}.partial')  # renamed to `out` once checked
    try:
        export_onnx(model, str(partial), tuple(images.shape[1:]), args.opset)
        ops = check_graph_ops(str(partial))
        report = verify_onnx(str(partial), model, images, args.tolerance)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    print(f'Wrote {out}: folded {model.pretrained_cfg.get("architecture", args.model)}, dynamic batch, nodes '
          f'{sorted(ops)}; ONNX Runtime vs PyTorch on {report["images"]} real images from {data}: max abs diff '
          f'{report["max_abs_diff"]:.2e} ({report["relative_diff"]:.2e} of the logit scale '
          f'{report["logit_scale"]:.3g}, tolerance {args.tolerance:g}).')
    if untrained:
        print(f'The weights are untrained (random, BatchNorm statistics from the {report["images"]} check images): '
              f'the file tests the export only; pass --pretrained or --checkpoint DIR for a usable model.',
              file=sys.stderr)
    return 0
