""" Independent top-1 of an ONNX classifier on a `datasets` split: plain onnxruntime, Pillow and NumPy only.

Nothing from timm or timm_dirac is imported: the preprocessing is read from the weights' timm `config.json`
(input size, crop_pct, interpolation, mean, std) and written out here, so the score checks the exported file the
way a deployment would run it, not through the code that wrote it.

    python benchmarks/eval_onnx.py int8/model_int8_split.onnx \\
        --config timm_dirac/assets/weights/diracnet16_4_cifar.td_cifar10/config.json \\
        --data <CIFAR-10 datasets folder or Hub id> --split test
"""
import argparse
import json
import math

import numpy as np
import onnxruntime as ort
from datasets import load_dataset
from PIL import Image


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
    correct = 0
    for start in range(0, count, args.batch_size):
        rows = dataset[start:min(start + args.batch_size, count)]
        x = np.stack([preprocess(image, cfg) for image in rows[image_key]])
        logits = session.run(None, {name: x})[0]
        correct += int((logits.argmax(1) == np.asarray(rows[label_key])).sum())
    print(f'{args.onnx}: top-1 {100. * correct / count:.2f} on {count} images ({args.data} {args.split})')


if __name__ == '__main__':
    main()
