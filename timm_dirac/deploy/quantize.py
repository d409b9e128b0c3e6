""" `timm-dirac quantize`: post-training static int8 of the folded model, calibrated on real images.

Each flow (`--flow`: the int8 backends of `deploy.backends`) is scored on the evaluation images (`metrics.evaluate`)
and timed against ONNX Runtime fp32 of the same model; the fastest within `--max-drop` is chosen. The default,
`chain`, takes the Dirac taps out of the int8 weights (`dirac_tap`), which a folded DiracNet needs to keep its
accuracy in int8; `split`, `plain`, `onnxruntime-int8` and `pt2e` are the others (`backends/onnxruntime.py`,
`backends/pt2e.py`). Activations are uint8 per tensor, calibrated with `--method` (`pt2e` keeps torchao's).
What is scored is checked before any work: evaluation data whose class names are not the model's and a model
without a classifier (nothing to score) are refused.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .backends import BACKENDS, Backend, Runner, Setup, backend_names, get_backends
from .backends import onnxruntime as ort_backend
from ..data import check_model_classes, class_names_of, load_eval_split
from ..diracify import is_folded
from ..loading import default_data, fold, load_images, load_model
from ..machine import machine_info
from ..metrics import check_classifier, evaluate
from .timing import time_interleaved

METHODS = ('minmax', 'percentile', 'entropy')


def top1(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
         batch_size: int = 32) -> float:
    """ Top-1 accuracy (%) of `predict` (a batch of images -> logits) by `metrics.evaluate`, fed fixed-size batches
    (the last one padded with zeros and the padding's logits dropped) since a lowered int8 graph has a static batch
    size. """
    def padded(batch: torch.Tensor) -> torch.Tensor:
        count = len(batch)
        if count < batch_size:
            batch = torch.cat([batch, batch.new_zeros((batch_size - count,) + batch.shape[1:])])
        return predict(batch)[:count]
    return evaluate(padded, zip(images.split(batch_size), labels.split(batch_size)))['top1']


def measure_speed(runners: Dict[str, Callable[[], Any]], batch_size: int, repeats: int = 5,
                  min_time: float = 0.5) -> Dict[str, float]:
    """ Images/s of each runner: median over `repeats` interleaved rounds (`timing.time_interleaved`). """
    times, _ = time_interleaved(runners, repeats, min_time=min_time)
    return {name: batch_size / statistics.median(t) for name, t in times.items()}


def run_quantize(
        model_name: Optional[str],
        checkpoint: Optional[str],
        calib_data: str,
        out: str,
        eval_data: Optional[str] = None,
        flows: Sequence[str] = ('chain',),
        num_calib: int = 512,
        num_eval: Optional[int] = None,
        calib_split: str = 'train',
        eval_split: str = 'test',
        method: str = 'minmax',
        max_drop: float = 0.5,
        bench_batches: Sequence[int] = (1, 32),
        repeats: int = 5,
        log=print,
) -> Dict[str, Any]:
    """ Fold, calibrate, quantize with each flow, measure top-1 on `eval_data` and int8 against ONNX Runtime fp32
    speed of the same model at each of `bench_batches`. Everything is written to a temporary folder beside `out`
    and renamed to `out` at the end (int8 models, the fp32 ONNX baseline, quantize.json), so a failed run leaves
    nothing behind. `out` must not exist. Returns the report (with the chosen flow). """
    backends = get_backends(flows, int8=True, what='flow')
    if method not in METHODS:
        raise ValueError(f'unknown calibration method {method!r}: choose from {", ".join(METHODS)}.')
    _check_counts(num_calib=num_calib, num_eval=num_eval, repeats=repeats, bench_batch=min(bench_batches, default=0))
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and 0 <= max_drop <= 100):
        raise ValueError(f'max_drop {max_drop}: the top-1 points an int8 flow may lose are a number from 0 to 100.')
    out_dir = Path(out)
    if out_dir.exists():
        raise FileExistsError(f'{out_dir} already exists: pass a new --out folder (nothing is overwritten).')

    model = load_model(model_name, checkpoint)
    check_classifier(model)  # int8 is chosen on its top-1 against fp32's
    eval_source = eval_data or calib_data
    check_model_classes(model.pretrained_cfg.get('label_names'),
                        class_names_of(load_eval_split(eval_source, eval_split)[0]), eval_source, eval_split)
    if not is_folded(model):
        log('the checkpoint is in the train form: folded it (BatchNorm and Dirac terms into plain convs) first')
    model = fold(model)
    calib, _ = load_images(calib_data, model, num_calib, calib_split)
    if len(calib) < num_calib:
        raise ValueError(f'the calibration set {calib_data} (split {calib_split}) has {len(calib)} images, '
                         f'{num_calib} were asked for: pass --num-calib {len(calib)} or a larger --calib dataset.')
    images, labels = load_images(eval_data or calib_data, model, num_eval, eval_split)
    log(f'calibration: {len(calib)} images ({calib_data} {calib_split}); evaluation: {len(images)} images '
        f'({eval_data or calib_data} {eval_split})')
    input_size = tuple(images.shape[1:])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        report = _quantize_flows(model, model_name, checkpoint, calib, images, labels, input_size, work, backends,
                                 method, max_drop, bench_batches, repeats, log)
        report.update(calib_data=calib_data, calib_split=calib_split, num_calib=len(calib),
                      eval_data=eval_data or calib_data, eval_split=eval_split, num_eval=len(images))
        for info in report['flows'].values():
            info['file'] = info['file'] and str(out_dir / Path(info['file']).name)
        (work / 'quantize.json').write_text(json.dumps(report, indent=2))
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _check_counts(**counts: Optional[int]) -> None:
    """ Refuse a count below 1 (None: not given) before any work. """
    for name, value in counts.items():
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise ValueError(f'{name} {value}: pass a whole number of at least 1.')


def _quantize_flows(model, model_name, checkpoint, calib, images, labels, input_size, work: Path,
                    backends: Sequence[Backend], method: str, max_drop: float, bench_batches: Sequence[int],
                    repeats: int, log) -> Dict[str, Any]:
    fp32_top1 = top1(model, images, labels)
    report: Dict[str, Any] = dict(
        model=model.pretrained_cfg.get('architecture', model_name), checkpoint=checkpoint, method=method,
        max_drop=max_drop, fp32_top1=fp32_top1, machine=machine_info(), flows={})
    setup = Setup(input_size, str(work), calib=calib, method=method, batch_size=max(bench_batches))
    baseline = BACKENDS['onnxruntime'].prepare(model, setup)
    ort_backend.check_graph_ops(baseline.file)
    ort_backend.verify_onnx(baseline.file, model, images[:32])
    report['onnxruntime_fp32_top1'] = top1(baseline.predict, images, labels)
    runners: Dict[str, Runner] = {'onnxruntime-fp32': baseline}
    for backend in backends:
        runner = backend.prepare(model, setup)
        int8_top1 = top1(runner.predict, images, labels, runner.static_batch or 32)
        runners[f'{backend.name}-int8'] = runner
        report['flows'][backend.name] = dict(weight_bits=runner.weight_bits, int8_top1=int8_top1,
                                             drop=fp32_top1 - int8_top1, file=runner.file)
        log(f'{backend.name}: int8 top-1 {int8_top1:.2f} (fp32 {fp32_top1:.2f})')

    report['img_per_s'] = {}
    for batch_size in bench_batches:
        x = images[:batch_size]
        calls = {name: r.bind(x) for name, r in runners.items() if r.static_batch in (None, len(x))}
        report['img_per_s'][str(batch_size)] = measure_speed(calls, len(x), repeats)
    for flow, info in report['flows'].items():
        name = f'{flow}-int8'
        info['speedup_vs_onnxruntime_fp32'] = {
            batch: speed[name] / speed['onnxruntime-fp32'] for batch, speed in report['img_per_s'].items()
            if name in speed}

    within = [f for f, info in report['flows'].items() if info['drop'] <= max_drop]
    largest = str(max(bench_batches))
    report['chosen'] = max(within, key=lambda f: report['img_per_s'][largest][f'{f}-int8']) if within else \
        min(report['flows'], key=lambda f: report['flows'][f]['drop'])
    report['goal_met'] = bool(within)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..errors import number

    parser.add_argument('--model', default=None, help='timm model name (optional with a --checkpoint folder)')
    parser.add_argument('--checkpoint', default=None, metavar='DIR',
                        help='checkpoint folder (config.json + model.safetensors) or weights file, train form or '
                             'folded')
    parser.add_argument('--calib', default=None,
                        help='calibration images: hfds/<Hub id or local folder> or an image folder (default: the '
                             'CIFAR-10 sample shipped in timm_dirac/assets/cifar10_sample)')
    parser.add_argument('--calib-split', default='train')
    parser.add_argument('--num-calib', type=number(int, 1), default=512)
    parser.add_argument('--eval-data', default=None, help='dataset for the accuracy check (default: --calib)')
    parser.add_argument('--eval-split', default='test')
    parser.add_argument('--num-eval', type=number(int, 1), default=None,
                        help='evaluation images (default: the whole split)')
    parser.add_argument('--flow', nargs='+', default=['chain'], metavar='FLOW',
                        help=f'one or more int8 backends: {", ".join(backend_names(int8=True))} (default: chain)')
    parser.add_argument('--method', default='minmax', metavar='METHOD',
                        help=f'activation calibration: {", ".join(METHODS)} (default: minmax)')
    parser.add_argument('--max-drop', type=number(float, 0, 100), default=0.5,
                        help='top-1 points an int8 flow may lose (0 to 100)')
    parser.add_argument('--bench-batch', type=number(int, 1), nargs='+', default=[1, 32],
                        help='batch sizes of the speed comparison with ONNX Runtime fp32')
    parser.add_argument('--repeats', type=number(int, 1), default=5)
    parser.add_argument('--out', required=True, metavar='DIR', help='a new folder for the int8 models and report')


def run(args: argparse.Namespace) -> int:
    calib = args.calib or default_data()
    try:
        report = run_quantize(
            args.model, args.checkpoint, calib, args.out, args.eval_data, args.flow, args.num_calib, args.num_eval,
            args.calib_split, args.eval_split, args.method, args.max_drop, args.bench_batch, args.repeats,
            log=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f"fp32 top-1 {report['fp32_top1']:.2f} on {report['num_eval']} images")
    for batch, speed in report['img_per_s'].items():
        print(f'images/s at batch {batch}: ' + ', '.join(f'{k} {v:.1f}' for k, v in speed.items()))
    for flow, info in report['flows'].items():
        ratios = ', '.join(f'{r:.2f}x at batch {b}' for b, r in info['speedup_vs_onnxruntime_fp32'].items())
        print(f"{flow}: int8 top-1 {info['int8_top1']:.2f} (drop {info['drop']:+.2f} points), {ratios} ONNX "
              f"Runtime fp32 -> {info['file']}")
    verdict = 'within' if report['goal_met'] else 'NOT within'
    print(f"chosen: {report['chosen']} ({verdict} the {report['max_drop']} point budget); report "
          f"{Path(args.out) / 'quantize.json'}")
    return 0
