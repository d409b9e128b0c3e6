""" `timm-dirac benchmark`: inference speed of DiracNets, train form and folded, against timm's ResNets and RepVGGs.

Every variant (model x form x backend x precision x batch size) runs once per round, in turn (`timing`), with square
GEMMs of each precision among them, so load from other processes hits all alike. The report gives medians over
rounds, ratios against the ResNet of the same depth, the train form and fp32, and each row's GFLOP/s as a fraction
of the peak of its precision (the best round of the GEMMs or of a model that outran them, so no median reads above
it). It writes benchmark.json and benchmark.md; `benchmarks/plot_benchmark.py` (source tree) plots the JSON.
"""
import argparse
import copy
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm.utils import reparameterize_model

from .backends import Setup, backend_names, get_backends
from .backends.torch_eager import PRECISIONS
from ..loading import default_data, load_images
from ..machine import machine_info
from .timing import time_interleaved

DEFAULT_MODELS = ('diracnet18', 'diracnet34', 'resnet18', 'resnet34', 'repvgg_a1')


@dataclass
class Case:
    """ One timed variant: `run()` does one forward (or one GEMM); `times` holds seconds per call per repeat. """
    model: str
    form: str
    backend: str
    precision: str
    batch_size: int
    flops: float  # per call
    run: Callable[[], Any] = field(repr=False)
    iters: int = 1
    times: List[float] = field(default_factory=list)


def has_reparameterization(model: nn.Module) -> bool:
    """ True if `timm.utils.reparameterize_model` (or DiracNet's own method) changes something in `model`. """
    return any(
        hasattr(m, attr) for m in model.modules() if m is not model
        for attr in ('reparameterize', 'fuse', 'switch_to_deploy'))


def build_forms(name: str, forms: Sequence[str]) -> Dict[str, nn.Module]:
    """ The requested forms of one model, in eval mode: 'train' as built, 'folded' reparameterized for inference
    (DiracNet's own `reparameterize()`, timm's `reparameterize_model` for the others). A model without any
    reparameterization (e.g. ResNet) only has its 'train' form. """
    model = timm.create_model(name).eval()
    out = {}
    if 'train' in forms or not has_reparameterization(model):
        out['train'] = model
    if 'folded' in forms and has_reparameterization(model):
        folded = copy.deepcopy(model)
        if hasattr(folded, 'reparameterize'):
            folded.reparameterize()
        else:
            folded = reparameterize_model(folded, inplace=True)
        out['folded'] = folded.eval()
    return out


def count_flops(model: nn.Module, input_size: Sequence[int]) -> float:
    """ FLOPs of one forward of one image (conv and matmul FLOPs, 2 per multiply-add, FlopCounterMode). """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *input_size))
    return float(counter.get_total_flops())


def calibration_images(model: nn.Module, input_size: Sequence[int], num: int = 32) -> torch.Tensor:
    """ Real images for int8 calibration (the CIFAR-10 sample the export check uses) in the model's eval transform,
    resized to the benchmark's `input_size`. Only the int8 speed is measured here (`timm-dirac quantize` measures
    the accuracy), so one batch of 32 does: ONNX Runtime's calibrator holds every activation of every calibration
    image at once (about 1 GB per 32 images at 224 px). """
    images = load_images(default_data(), model, num)[0]
    if tuple(images.shape[1:]) != tuple(input_size):
        images = torch.nn.functional.interpolate(images, size=tuple(input_size[1:]), mode='bilinear', antialias=True)
    return images


def _gemm_case(n: int, precision: str) -> Case:
    a = torch.randn(n, n, dtype=PRECISIONS[precision])
    b = torch.randn(n, n, dtype=PRECISIONS[precision])
    return Case(f'gemm{n}', 'gemm', 'eager', precision, 1, 2. * n ** 3, lambda: torch.mm(a, b))


def build_cases(
        models: Sequence[str],
        forms: Sequence[str] = ('train', 'folded'),
        backends: Sequence[str] = ('eager',),
        precisions: Sequence[str] = ('fp32', 'bf16'),
        batch_sizes: Sequence[int] = (1, 32),
        img_size: Optional[int] = None,
        channels_last: bool = True,
        gemm_sizes: Sequence[int] = (1024, 2048),
        threads: int = 1,
        workdir: Optional[str] = None,
) -> List[Case]:
    """ Build every variant to time, GEMM peak cases first. Each backend runs at each of `precisions` it runs, else
    at its own one (ONNX Runtime fp32, int8); int8 backends calibrate on real images and run the deploy form only,
    a lowered static graph only at the batch size it was lowered for (the largest). """
    backends = get_backends(backends)
    cases = [_gemm_case(n, p) for p in precisions for n in gemm_sizes]
    for name in models:
        model_forms = build_forms(name, forms)
        for form, model in model_forms.items():
            size = img_size or model.pretrained_cfg['input_size'][-1]
            input_size = (model.pretrained_cfg['input_size'][0], size, size)
            flops = count_flops(model, input_size)
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=memory_format)
            calib = calibration_images(model, input_size) if any(b.int8 for b in backends) else None
            setup = Setup(input_size, workdir, tag=f'{name}-{form}', calib=calib, batch_size=max(batch_sizes),
                          threads=threads)
            for backend in backends:
                if backend.int8 and form == 'train' and 'folded' in model_forms:
                    continue  # int8 is for the deployed (folded) graph only
                runners = [backend.prepare(model, replace(setup, precision=p))
                           for p in backend.run_precisions(precisions)]
                for batch_size in batch_sizes:
                    x = torch.randn(batch_size, *input_size).contiguous(memory_format=memory_format)
                    cases += [Case(name, form, backend.name, runner.precision, batch_size, flops * batch_size,
                                   runner.bind(x)) for runner in runners if runner.static_batch in (None, batch_size)]
        del model_forms, model, calib
        gc.collect()  # what exporting and calibrating left behind, before the next model is built
    return cases


def measure(cases: List[Case], repeats: int = 5, warmup: int = 2, min_time: float = 0.5, log=print) -> None:
    """ Time all cases in turn `repeats` times (`timing.time_interleaved`), filling `iters` and `times`. """
    times, iters = time_interleaved({i: case.run for i, case in enumerate(cases)}, repeats, warmup, min_time, log)
    for i, case in enumerate(cases):
        case.times, case.iters = times[i], iters[i]


def depth_baseline(model: str) -> Optional[str]:
    """ The ResNet a DiracNet is compared with: same depth ('diracnet18' -> 'resnet18'). """
    match = re.fullmatch(r'diracnet(\d+)', model)
    return f'resnet{match.group(1)}' if match else None


def _label(case: Case) -> str:
    return case.model if case.form == 'gemm' else f'{case.model} {case.form} {case.backend} batch {case.batch_size}'


def peaks(cases: Sequence[Case]) -> Dict[str, Dict[str, Any]]:
    """ The GFLOP/s peak of each precision that has GEMM cases: the best round of any case of that precision (the
    GEMMs, or a model that outran them), with the best GEMM round beside it and the case that set the peak. """
    best = {}
    for case in cases:
        if case.precision not in {c.precision for c in cases if c.form == 'gemm'}:
            continue
        gflops = case.flops / min(case.times) / 1e9
        entry = best.setdefault(case.precision, dict(gflop_per_s=0., set_by=None, gemm_gflop_per_s=0.))
        if case.form == 'gemm':
            entry['gemm_gflop_per_s'] = max(entry['gemm_gflop_per_s'], gflops)
        if gflops > entry['gflop_per_s']:
            entry.update(gflop_per_s=gflops, set_by=_label(case))
    return best


def summarize(cases: List[Case]) -> Dict[str, Any]:
    """ Medians, GFLOP/s and their fraction of the peak of the same precision (`peaks`), and ratios of measured
    cases: against the ResNet of the same depth, the train form, and fp32 (in the same backend, or for any int8
    backend ONNX Runtime fp32, as `quantize` compares). """
    peak = peaks(cases)
    rows = []
    for case in cases:
        if case.form == 'gemm':
            continue
        median = statistics.median(case.times)
        rows.append(dict(
            model=case.model, form=case.form, backend=case.backend, precision=case.precision,
            batch_size=case.batch_size, img_per_s=case.batch_size / median, latency_ms=median * 1e3,
            latency_ms_min=min(case.times) * 1e3, latency_ms_max=max(case.times) * 1e3, iters=case.iters,
            repeats=len(case.times), gflop_per_img=case.flops / case.batch_size / 1e9,
            gflop_per_s=case.flops / median / 1e9))
    index = {(r['model'], r['form'], r['backend'], r['precision'], r['batch_size']): r for r in rows}
    for r in rows:
        r['peak_fraction'] = r['gflop_per_s'] / peak[r['precision']]['gflop_per_s'] if r['precision'] in peak \
            else None
        key = (r['backend'], r['precision'], r['batch_size'])
        resnet = index.get((depth_baseline(r['model']), 'train') + key)
        r['vs_resnet'] = r['img_per_s'] / resnet['img_per_s'] if resnet else None
        train = index.get((r['model'], 'train') + key)
        r['vs_train'] = r['img_per_s'] / train['img_per_s'] if r['form'] == 'folded' and train else None
        fp32_backend = 'onnxruntime' if r['precision'] == 'int8' else r['backend']  # quantize's fp32 baseline
        fp32 = index.get((r['model'], r['form'], fp32_backend, 'fp32', r['batch_size']))
        r['vs_fp32'] = r['img_per_s'] / fp32['img_per_s'] if r['precision'] != 'fp32' and fp32 else None
    return dict(peak=peak, rows=rows)


def run_benchmark(
        models: Sequence[str] = DEFAULT_MODELS,
        forms: Sequence[str] = ('train', 'folded'),
        backends: Sequence[str] = ('eager',),
        precisions: Sequence[str] = ('fp32', 'bf16'),
        batch_sizes: Sequence[int] = (1, 32),
        img_size: Optional[int] = None,
        channels_last: bool = True,
        repeats: int = 5,
        warmup: int = 2,
        min_time: float = 0.5,
        gemm_sizes: Sequence[int] = (1024, 2048),
        threads: Optional[int] = None,
        log=print,
) -> Dict[str, Any]:
    """ Build, time and summarize; returns the JSON-ready result (settings, machine, load, peaks, rows). """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f'Unknown precision {unknown}: precisions are {tuple(PRECISIONS)}.')
    counts = dict(repeats=[repeats], batch_sizes=batch_sizes, gemm_sizes=gemm_sizes,
                  img_size=[img_size] if img_size is not None else [], threads=[threads] if threads else [])
    for name, values in counts.items():
        if (name in ('repeats', 'batch_sizes') and not values) or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f'{name} {values}: pass whole numbers of at least 1.')
    if not (isinstance(warmup, int) and warmup >= 0 and math.isfinite(min_time) and min_time >= 0):
        raise ValueError(f'warmup {warmup}, min_time {min_time}: pass a warmup count and seconds of at least 0.')
    get_backends(backends)  # refuse an unknown name or a missing package before any work
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    settings = dict(models=list(models), forms=list(forms), backends=list(backends), precisions=list(precisions),
                    batch_sizes=list(batch_sizes), img_size=img_size, channels_last=channels_last,
                    repeats=repeats, warmup=warmup, min_time=min_time, gemm_sizes=list(gemm_sizes),
                    threads=threads)
    load_before = os.getloadavg()
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        log('building models')
        cases = build_cases(models, forms, backends, precisions, batch_sizes, img_size, channels_last,
                            gemm_sizes, threads, workdir)
        log(f'timing {len(cases)} cases x {repeats} repeats, interleaved')
        measure(cases, repeats, warmup, min_time, log)
    result = dict(settings=settings, machine=machine_info(), load_average_before=load_before,
                  load_average_after=os.getloadavg(), started=time.strftime('%Y-%m-%d %H:%M:%S %z',
                  time.localtime(start)), seconds=time.time() - start)
    result.update(summarize(cases))
    return result


def _fmt(value: Optional[float], spec: str) -> str:
    return '' if value is None else format(value, spec)


def format_table(result: Dict[str, Any]) -> str:
    """ Markdown table of the rows, then the peaks and the machine's load. """
    lines = [
        '| model | form | backend | precision | batch | img/s | latency ms (min-max) | GFLOP/img | GFLOP/s '
        '| % peak | x ResNet | x train | x fp32 |',
        '|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    rows = sorted(result['rows'], key=lambda r: (r['backend'], r['precision'], r['batch_size']))
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['form']} | {r['backend']} | {r['precision']} | {r['batch_size']} "
            f"| {r['img_per_s']:.1f} | {r['latency_ms']:.1f} ({r['latency_ms_min']:.1f}-{r['latency_ms_max']:.1f}) "
            f"| {r['gflop_per_img']:.2f} | {r['gflop_per_s']:.0f} | {_fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '.0f')} "
            f"| {_fmt(r['vs_resnet'], '.2f')} | {_fmt(r['vs_train'], '.2f')} | {_fmt(r['vs_fp32'], '.2f')} |")
    lines += ['', 'Peak of each precision (its best round in this run): ' + '; '.join(
        f"{p} {v['gflop_per_s']:.0f} GFLOP/s, set by {v['set_by']} (best GEMM {v['gemm_gflop_per_s']:.0f})"
        for p, v in result['peak'].items()) + '.']
    load = result['load_average_before'], result['load_average_after']
    lines.append(f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load[0])}, "
                 f"after {tuple(round(x, 2) for x in load[1])}; {result['machine']['cpu']}, "
                 f"{result['settings']['threads']} threads.")
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..errors import number

    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), metavar='NAME',
                        help='timm model names (DiracNets are registered by this package)')
    parser.add_argument('--forms', nargs='+', default=['train', 'folded'], choices=['train', 'folded'])
    parser.add_argument('--backends', nargs='+', default=['eager'], choices=backend_names(),
                        help='registered backends (timm_dirac.deploy.backends): eager PyTorch, torch.compile (inductor, '
                             'frozen weights), ONNX Runtime fp32, and int8 ones (static, calibrated on real CIFAR-10 '
                             'images; speed only): onnxruntime-int8 is what quantize writes by default')
    parser.add_argument('--precision', nargs='+', default=['fp32', 'bf16'], choices=list(PRECISIONS),
                        help='bf16 runs under CPU autocast')
    parser.add_argument('--batch-sizes', nargs='+', type=number(int, 1), default=[1, 32])
    parser.add_argument('--img-size', type=number(int, 1), default=None, help="input size (default: each model's own)")
    parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument('--repeats', type=number(int, 1), default=5,
                        help='interleaved timing rounds (medians are reported)')
    parser.add_argument('--warmup', type=number(int, 0), default=2)
    parser.add_argument('--min-time', type=number(float, 0), default=0.5, help='seconds per case per repeat (about)')
    parser.add_argument('--gemm-sizes', nargs='+', type=number(int, 1), default=[1024, 2048],
                        help='square GEMM sizes timed among the models for the peak of each precision')
    parser.add_argument('--threads', type=number(int, 1), default=None, help='torch (and ONNX Runtime) threads')
    parser.add_argument('--out', default='bench/', help='folder for benchmark.json and benchmark.md')


def run(args: argparse.Namespace) -> int:
    result = run_benchmark(
        args.models, args.forms, args.backends, args.precision, args.batch_sizes, args.img_size,
        args.channels_last, args.repeats, args.warmup, args.min_time, args.gemm_sizes, args.threads,
        log=lambda msg: print(msg, file=sys.stderr))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(result)
    (out / 'benchmark.json').write_text(json.dumps(result, indent=2))
    (out / 'benchmark.md').write_text(table + '\n')
    print(table)
    print(f"\nWrote {out / 'benchmark.json'}, {out / 'benchmark.md'} (plot: python benchmarks/plot_benchmark.py "
          f"{out / 'benchmark.json'}, in a source checkout)", file=sys.stderr)
    return 0
