""" int8 speed of folded DiracNets against ResNet of the same depth, ONNX Runtime, interleaved rounds.

Writes (or reuses) each model's ONNX files in `--workdir` through the registered backends (the same export and
calibration as `timm-dirac benchmark` and `timm-dirac quantize`), times every file at each batch size in
interleaved rounds (`timing.time_interleaved`), and prints img/s medians with the ratios the int8 bar asks for:
each DiracNet int8 file against ResNet int8 (`onnxruntime-int8`, static QDQ) and against its own ONNX Runtime fp32,
as the median of the per-round ratios (a round's neighbours share its load, so the pairs are robust to the load
moving between rounds on a shared machine).

    python benchmarks/int8_speed.py --models diracnet18 diracnet34 --flows chain split plain --batch-sizes 1 32 \
        --out docs/reports/int8_speed-<cpu>.json
"""
import argparse
import json
import os
import statistics

import torch

from timm_dirac.deploy.backends import BACKENDS, Setup
from timm_dirac.deploy.benchmark import build_forms, calibration_images, depth_baseline
from timm_dirac.machine import machine_info
from timm_dirac.deploy.timing import time_interleaved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['diracnet18', 'diracnet34'])
    parser.add_argument('--flows', nargs='+', default=['onnxruntime-int8'], help='int8 backends for the DiracNets')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--min-time', type=float, default=1.0)
    parser.add_argument('--workdir', default='int8_speed')
    parser.add_argument('--out', default=None, help='JSON report')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)

    runners, sizes = {}, {}
    for name in args.models:
        for model_name, flows in ((name, args.flows), (depth_baseline(name), ['onnxruntime-int8'])):
            if (model_name, 'onnxruntime') in runners:
                continue
            forms = build_forms(model_name, ('folded',))
            form, model = next(iter(forms.items()))
            size = sizes[model_name] = tuple(model.pretrained_cfg['input_size'])
            setup = Setup(size, args.workdir, tag=f'{model_name}-{form}', threads=args.threads,
                          calib=calibration_images(model, size), batch_size=max(args.batch_sizes))
            for backend in ['onnxruntime'] + list(flows):
                runners[(model_name, backend)] = BACKENDS[backend].prepare(model, setup)

    load = [os.getloadavg()]
    report = dict(machine=machine_info(), threads=args.threads, repeats=args.repeats, img_per_s={})
    for batch_size in args.batch_sizes:
        calls = {key: runner.bind(torch.randn(batch_size, *sizes[key[0]])) for key, runner in runners.items()}
        times, _ = time_interleaved(calls, args.repeats, min_time=args.min_time)
        speed = {k: batch_size / statistics.median(t) for k, t in times.items()}
        report['img_per_s'][str(batch_size)] = {f'{m} {b}': v for (m, b), v in speed.items()}
        report.setdefault('seconds_per_round', {})[str(batch_size)] = {f'{m} {b}': t for (m, b), t in times.items()}

        def paired(key, base):  # median over rounds of the speed ratio within each round
            return statistics.median(b / t for t, b in zip(times[key], times[base]))
        print(f'batch {batch_size}:')
        for (model_name, backend), v in speed.items():
            line = f'  {model_name:12s} {backend:18s} {v:8.1f} img/s'
            peer = depth_baseline(model_name)
            if peer and backend != 'onnxruntime':
                line += f'  x ResNet int8 {paired((model_name, backend), (peer, "onnxruntime-int8")):.3f}'
            if backend != 'onnxruntime':
                line += f'  x own fp32 {paired((model_name, backend), (model_name, "onnxruntime")):.2f}'
            print(line, flush=True)
    load.append(os.getloadavg())
    report['load_before_after'] = load
    print(f"{report['machine']['cpu']}, {args.threads} threads; load average before {load[0]}, after {load[1]}")
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)


if __name__ == '__main__':
    main()
