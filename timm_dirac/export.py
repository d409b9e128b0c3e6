""" `timm-dirac export-onnx`: the folded model as ONNX, checked against PyTorch on real images before success.

The export, the graph check (only a plain conv-ReLU chain's ops) and the comparison with ONNX Runtime are the ONNX
Runtime backend's (`backends/onnxruntime.py`).
"""
import argparse
from pathlib import Path

from .backends.onnxruntime import DEFAULT_TOLERANCE, check_graph_ops, export_onnx, verify_onnx
from .loading import default_data, fold, load_images, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default=None, help='timm model name (optional with a --checkpoint folder)')
    parser.add_argument('--checkpoint', default=None, metavar='DIR',
                        help='checkpoint folder (config.json + model.safetensors) or weights file')
    parser.add_argument('--out', required=True, metavar='FILE.onnx')
    parser.add_argument('--data', default=None,
                        help='real images for the check: hfds/<Hub id or local folder> or an image folder (default: '
                             'the CIFAR-10 sample shipped in timm_dirac/assets/cifar10_sample)')
    parser.add_argument('--split', default='test')
    parser.add_argument('--num-images', type=int, default=32)
    parser.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                        help='max |ONNX - PyTorch| as a fraction of the largest |logit|')
    parser.add_argument('--opset', type=int, default=18)


def run(args: argparse.Namespace) -> int:
    data = args.data or default_data()
    model = fold(load_model(args.model, args.checkpoint))
    images, _ = load_images(data, model, args.num_images, args.split)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, str(out), tuple(images.shape[1:]), args.opset)
    ops = check_graph_ops(str(out))
    report = verify_onnx(str(out), model, images, args.tolerance)
    print(f'Wrote {out}: folded {model.pretrained_cfg.get("architecture", args.model)}, dynamic batch, nodes '
          f'{sorted(ops)}; ONNX Runtime vs PyTorch on {report["images"]} real images from {data}: max abs diff '
          f'{report["max_abs_diff"]:.2e} ({report["relative_diff"]:.2e} of the logit scale '
          f'{report["logit_scale"]:.3g}, tolerance {args.tolerance:g}).')
    return 0
