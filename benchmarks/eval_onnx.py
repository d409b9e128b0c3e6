""" Independent top-1 of an ONNX classifier on a `datasets` split: plain onnxruntime, Pillow and NumPy.

The preprocessing is read from the weights' timm `config.json` (input size, crop_pct, interpolation, mean, std) and
written out here, and ONNX Runtime runs the file, so the score checks the exported file the way a deployment would
run it, not through the code that wrote it (no timm transform, no export or quantize code); only the counting is the
package's one evaluation (`timm_dirac.metrics.evaluate`).

    python benchmarks/eval_onnx.py int8/model_int8_split.onnx \\
        --config timm_dirac/assets/weights/diracnet16_4_cifar.td_cifar10/config.json \\
        --data <CIFAR-10 datasets folder or Hub id> --split test
"""
import argparse
import json
import math

import numpy as np
import onnxruntime as ort
import torch
from datasets import load_dataset
from PIL import Image

from timm_dirac.metrics import evaluate


def preprocess(image: Image.Image, cfg: dict) -> np.ndarray:
    """ timm's eval transform for a square input: resize the short side to size / crop_pct, centre crop, scale
    to [0, 1], normalise. """
    size = cfg['input_size'][-1]
    scaled = math.floor(size / cfg.get('crop_pct', 1.0))
    resample = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC, 'nearest': Image.NEAREST}[
        cfg.get('interpolation', 'bilinear')]
    image = image.convert('RGB')
    w, h = image.size
    if (w, h) != (scaled, scaled) and min(w, h) != scaled:
        ratio = scaled / min(w, h)
        image = image.resize((round(w * ratio), round(h * ratio)), resample)
    w, h = image.size
    left, top = int(round((w - size) / 2.)), int(round((h - size) / 2.))
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32) / 255.
    x = (x - np.array(cfg['mean'], np.float32)) / np.array(cfg['std'], np.float32)
    return x.transpose(2, 0, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('onnx')
    parser.add_argument('--config', required=True, help="the weights' timm config.json")
    parser.add_argument('--data', required=True, help='datasets folder or Hub id')
    parser.add_argument('--split', default='test')
    parser.add_argument('--batch-size', type=int, default=100)
    parser.add_argument('--num', type=int, default=None, help='first N images (default: all)')
    args = parser.parse_args()

    cfg = json.load(open(args.config))['pretrained_cfg']
    dataset = load_dataset(args.data, split=args.split)
    image_key = next(k for k in ('img', 'image') if k in dataset.column_names)
    label_key = next(k for k in ('label', 'labels') if k in dataset.column_names)
    count = len(dataset) if args.num is None else min(args.num, len(dataset))
    session = ort.InferenceSession(args.onnx, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name

    def batches():
        for start in range(0, count, args.batch_size):
            rows = dataset[start:min(start + args.batch_size, count)]
            x = np.stack([preprocess(image, cfg) for image in rows[image_key]])
            yield torch.from_numpy(x), torch.as_tensor(rows[label_key])
    result = evaluate(lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]), batches())
    print(f'{args.onnx}: top-1 {result["top1"]:.2f} on {result["count"]} images ({args.data} {args.split})')


if __name__ == '__main__':
    main()
