""" int8 ONNX files on CPUs with and without VNNI: top-1 of ONNX Runtime here, of the NumPy reference, and of the
reference with the int16 pair saturation of pre-VNNI x86 kernels (`int8_reference.py`, beside this script).

The reference without saturation must agree with ONNX Runtime on a VNNI/AMX machine (that is what checks it); the
saturating run then tells what the same file scores on an AVX2 / AVX-512 CPU without VNNI.

    python benchmarks/int8_saturation.py int8/model_int8_split.onnx int8/model_int8_plain.onnx \\
        --checkpoint timm_dirac/assets/weights/diracnet16_4_cifar.td_cifar10 --data hfds/<CIFAR-10 folder> \\
        --num 3000 --out docs/reports/int8_saturation.json
"""
import argparse
import json
from pathlib import Path

import numpy as np

from int8_reference import QdqReference  # benchmarks/int8_reference.py, beside this script
from timm_dirac.deploy.backends.onnxruntime import ort_session
from timm_dirac.loading import load_images, load_model
from timm_dirac.machine import machine_info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('onnx', nargs='+', help='int8 QDQ ONNX files written by timm-dirac quantize')
    parser.add_argument('--checkpoint', required=True, help='the weights, for their preprocessing (data config)')
    parser.add_argument('--data', required=True, help='hfds/<Hub id or local folder> or an image folder')
    parser.add_argument('--split', default='test')
    parser.add_argument('--num', type=int, default=3000, help='first N images')
    parser.add_argument('--out', default=None, help='JSON report')
    args = parser.parse_args()

    images, labels = load_images(args.data, load_model(None, args.checkpoint), args.num, args.split)
    x, y = images.numpy(), labels.numpy()
    report = dict(machine=machine_info(), data=args.data, split=args.split, num=len(y), files={})
    for path in args.onnx:
        ort_logits = ort_session(path).run(None, {'input': x})[0]
        row = dict(onnxruntime_top1=100. * float((ort_logits.argmax(1) == y).mean()))
        for saturate in (False, True):
            reference = QdqReference(path, saturate_pairs=saturate)
            logits = np.concatenate([reference(batch) for batch in np.array_split(x, max(1, len(x) // 50))])
            key = 'reference_saturating' if saturate else 'reference'
            row[key] = dict(top1=100. * float((logits.argmax(1) == y).mean()),
                            saturated_pair_sums=reference.saturated_pairs)
            if not saturate:
                row['reference_vs_onnxruntime'] = dict(
                    argmax_agreement=float((logits.argmax(1) == ort_logits.argmax(1)).mean()),
                    max_abs_logit_diff=float(np.abs(logits - ort_logits).max()),
                    logit_scale=float(np.abs(ort_logits).max()))
        report['files'][Path(path).name] = row
        print(f"{path}: onnxruntime {row['onnxruntime_top1']:.2f} | reference {row['reference']['top1']:.2f} "
              f"(argmax agreement {row['reference_vs_onnxruntime']['argmax_agreement']:.4f}) | pre-VNNI "
              f"{row['reference_saturating']['top1']:.2f} ({row['reference_saturating']['saturated_pair_sums']} "
              f"saturated pair sums)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == '__main__':
    main()
