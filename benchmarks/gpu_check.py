""" GPU check: DiracNets on one NVIDIA GPU in one run of at most about 8 minutes, tables into docs/reports/.

1. Inference: images/s, latency and peak memory of the folded DiracNet-18/34 against ResNet-18/34 and the folded
   RepVGG-A1/A2, with fp16 and bf16 weights and inputs, batch 1/64/256, channels_last, eager PyTorch; a GEMM of
   each precision gives the GPU's peak in the same run.
2. Training: images/s and peak memory of one optimizer step of each paper recipe (`diracnet34_in1k.yaml` at 224 px,
   `diracnet28_10_cifar10.yaml` at 32 px): its model, global batch, optimizer, channels_last and the precision
   `--amp` picks, on a synthetic batch already on the GPU (compute only: no data loading, no evaluation), and the
   recipe's wall time on this one GPU projected from it.
3. Real epochs: `train.py --config train_configs/diracnet28_10_cifar10.yaml --epochs N` on a CIFAR-10 folder
   (epoch time, images/s and top-1 on the held-out validation images from its summary.csv, the test split's top-1
   from its test.csv), and the recipe's wall time projected from the last epoch.
4. torch.compile (inductor, frozen weights) of the inference cases, largest batches first, while time is left.

Each section and each compile case starts only if the time left allows it; what is skipped or fails is listed as
such, never estimated. gpu_check.md (tables) and gpu_check.json (everything) are rewritten after every section.

    benchmarks/gpu_check.sh [CIFAR-10 datasets folder]                  # the GPU run, at most 8 minutes
    python benchmarks/gpu_check.py --device cpu --models ... --out DIR  # tiny settings on a CPU (tests)
"""
import argparse
import copy
import csv
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

import timm
import timm_dirac  # noqa: F401  registers the DiracNets
from timm_dirac.deploy.benchmark import Case, build_forms, count_flops, machine_info, measure, summarize
from timm_dirac.machine import auto_precision
from timm_dirac.deploy.timing import time_interleaved
from timm_dirac.train import build_optimizer, parse_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'train_configs'
# recipe config -> images in its dataset's train split (ImageNet-1k, CIFAR-10), for the wall-time projections; an
# epoch trains on them less the config's --holdout (its validation images)
RECIPES = {'diracnet34_in1k.yaml': 1_281_167, 'diracnet28_10_cifar10.yaml': 50_000}
EPOCH_RECIPE = 'diracnet28_10_cifar10.yaml'
DEFAULT_MODELS = ('diracnet18', 'diracnet34', 'resnet18', 'resnet34', 'repvgg_a1', 'repvgg_a2')
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


class Clock:
    """ The run's time budget. """

    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.deadline = self.start + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[-1] if lines else ""}'


def synced(run: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """ `run` as a call that returns when the device has finished its work (GPU kernels run asynchronously). """
    if device.type != 'cuda':
        return run

    def call():
        out = run()
        torch.cuda.synchronize(device)
        return out
    return call


def allocated_bytes(device: torch.device) -> int:
    """ Bytes the CUDA allocator holds in tensors now (0 off CUDA). """
    return torch.cuda.memory_allocated(device) if device.type == 'cuda' else 0


def peak_memory_mib(run: Callable[[], Any], device: torch.device, baseline: int) -> Optional[float]:
    """ Peak allocated memory (MiB) during one call of `run`, counted from `baseline` bytes (what was allocated
    before the model and its inputs came: other models may share the GPU). None off CUDA, where PyTorch does not
    track it. """
    if device.type != 'cuda':
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2 ** 20


def tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def device_info(device: torch.device) -> Dict[str, Any]:
    """ The machine (CPU, library versions) and, on CUDA, the GPU. """
    info = machine_info()
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    compute_capability=f'{props.major}.{props.minor}', cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


# ------------------------------------------------------------------------------------------------- inference
@dataclass
class DeviceCase(Case):
    """ A timed variant whose weights and input (`resident_bytes`) stay allocated between calls. """
    resident_bytes: int = 0


class Inference:
    """ The inference cases: every model in every precision on the device, channels_last, eager or compiled. """

    def __init__(self, names: List[str], img_size: Optional[int], device: torch.device):
        self.device = device
        self.models = []  # (name, form, model in fp32 on the CPU, input size, FLOPs per image)
        for name in names:
            for form, model in build_forms(name, ('folded',)).items():
                size = img_size or model.pretrained_cfg['input_size'][-1]
                input_size = (model.pretrained_cfg['input_size'][0], size, size)
                self.models.append((name, form, model, input_size, count_flops(model, input_size)))
        self._placed = {}

    def placed(self, name: str, precision: str) -> nn.Module:
        """ `name` in `precision` (weights and inputs), channels_last, on the device; built once. """
        if (name, precision) not in self._placed:
            model = next(m for n, _, m, _, _ in self.models if n == name)
            self._placed[name, precision] = copy.deepcopy(model).to(
                self.device, DTYPES[precision], memory_format=torch.channels_last).eval()
        return self._placed[name, precision]

    def case(self, name: str, precision: str, batch_size: int, backend: str,
             forward: Optional[Callable] = None) -> DeviceCase:
        _, form, _, input_size, flops = next(m for m in self.models if m[0] == name)
        forward = forward if forward is not None else self.placed(name, precision)
        x = torch.randn(batch_size, *input_size, device=self.device, dtype=DTYPES[precision]).contiguous(
            memory_format=torch.channels_last)

        def run():
            with torch.no_grad():
                return forward(x)
        resident = tensor_bytes(self.placed(name, precision)) + x.numel() * x.element_size()
        return DeviceCase(name, form, backend, precision, batch_size, flops * batch_size, synced(run, self.device),
                          resident_bytes=resident)

    def gemm(self, n: int, precision: str) -> DeviceCase:
        a, b = (torch.randn(n, n, device=self.device, dtype=DTYPES[precision]) for _ in range(2))
        return DeviceCase(f'gemm{n}', 'gemm', 'eager', precision, 1, 2. * n ** 3, synced(lambda: a @ b, self.device),
                          resident_bytes=2 * a.numel() * a.element_size())


def run_case(case: DeviceCase, cases: List[Case], memory: Dict, failed: List, device: torch.device
             ) -> Optional[float]:
    """ One call of `case` (a warm-up, or the compile of a compiled model): on success it joins `cases` with its
    peak memory recorded (its weights, input and activations), else its error goes to `failed`. Returns the
    seconds of that first call, or None. """
    try:
        start = time.perf_counter()
        case.run()
        first_call_s = time.perf_counter() - start
        memory[_key(case)] = peak_memory_mib(case.run, device, allocated_bytes(device) - case.resident_bytes)
    except Exception as e:  # an unsupported kernel or an out-of-memory stays one failed case
        failed.append(dict(what=_describe(case), error=_one_line(e)))
        return None
    cases.append(case)
    return first_call_s


def _key(case: Case) -> tuple:
    return case.model, case.form, case.backend, case.precision, case.batch_size


def _describe(case: Case) -> str:
    return f'{case.model} {case.form} {case.backend} {case.precision} batch {case.batch_size}'


def inference_rows(cases: List[Case], memory: Dict, compile_s: Dict) -> Dict[str, Any]:
    """ benchmark.summarize's rows (img/s, latency, GFLOP/s, share of the peak, x the ResNet of the same
    depth) with the peak memory and, for compiled cases, the seconds of the first call (compiling). """
    summary = summarize(cases) if cases else dict(peak={}, rows=[])
    keep = ('model', 'form', 'backend', 'precision', 'batch_size', 'img_per_s', 'latency_ms', 'latency_ms_min',
            'latency_ms_max', 'repeats', 'gflop_per_img', 'gflop_per_s', 'peak_fraction', 'vs_resnet')
    rows = []
    for r in summary['rows']:
        key = (r['model'], r['form'], r['backend'], r['precision'], r['batch_size'])
        rows.append(dict({k: r[k] for k in keep}, peak_memory_mib=memory.get(key), first_call_s=compile_s.get(key)))
    return dict(gemm_peak_gflop_per_s={p: v['gflop_per_s'] for p, v in summary['peak'].items()}, rows=rows)


# -------------------------------------------------------------------------------------------------- training
def recipe_precision(args: argparse.Namespace, device_type: str) -> str:
    """ The precision `train.py` runs a config in: `--amp-dtype`, or with `auto` what the hardware computes. """
    if not args.amp:
        return 'fp32'
    if args.amp_dtype != 'auto':
        return {'bfloat16': 'bf16', 'float16': 'fp16'}[args.amp_dtype]
    return auto_precision(device_type)[0]


def training_step(config: Path, device: torch.device, batch_size: Optional[int], img_size: Optional[int],
                  repeats: int, warmup: int, min_time: float) -> Dict[str, Any]:
    """ Images/s and peak memory of one optimizer step of a recipe on a synthetic batch on the device, and the
    recipe's wall time projected from it (compute only). The batch is the recipe's global batch (lr-base-size). """
    args = parse_args(['--config', str(config)])
    baseline = allocated_bytes(device)
    batch = batch_size or args.lr_base_size
    model = timm.create_model(args.model, drop_rate=args.drop, **args.model_kwargs)
    size = img_size or args.img_size or model.pretrained_cfg['input_size'][-1]
    precision = recipe_precision(args, device.type)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    optimizer = build_optimizer(model, args, args.lr or args.lr_base * batch / args.lr_base_size)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != 'fp32'):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    step = synced(step, device)
    step()
    memory = peak_memory_mib(step, device, baseline)  # weights, gradients, optimizer state, batch, activations
    times, iters = time_interleaved({0: step}, repeats, warmup, min_time)
    img_s = batch / statistics.median(times[0])
    images = RECIPES[config.name] - args.holdout if config.name in RECIPES else None
    return dict(recipe=config.name, model=args.model, input_size=size, batch_size=batch, precision=precision,
                channels_last=args.channels_last, img_per_s=img_s, step_ms=1e3 * statistics.median(times[0]),
                steps_timed=iters[0] * len(times[0]), peak_memory_mib=memory, recipe_epochs=args.epochs,
                train_images=images, projected_hours=args.epochs * images / img_s / 3600 if images else None)


# ------------------------------------------------------------------------------------------------ real epochs
def real_epochs(dataset: str, epochs: int, train_args: List[str], device: torch.device, timeout_s: float
                ) -> Dict[str, Any]:
    """ `train.py` with the CIFAR-10 recipe for `epochs` epochs on `dataset`, in a temporary folder: the rows of
    its summary.csv (complete epochs only, also when the time runs out), its test.csv (the test split scored once at
    the end) and the recipe's projected wall time. """
    config = CONFIGS / EPOCH_RECIPE
    recipe = parse_args(['--config', str(config)])
    recipe_images = RECIPES[EPOCH_RECIPE] - recipe.holdout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    if device.type == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / 'train.py'), '--config', str(config), '--dataset', f'hfds/{dataset}',
               '--epochs', str(epochs), '--output', out, '--experiment', 'gpu-check', *train_args]
        shown = ' '.join(shlex.quote(c) for c in ['python', 'train.py', *cmd[2:]])
        shown = shown.replace(out, '<tmp>').replace(f'{ROOT}{os.sep}', '')
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout_s)
            log, status = proc.stdout + proc.stderr, 'finished' if proc.returncode == 0 else 'failed'
        except subprocess.TimeoutExpired as e:  # subprocess.run has killed it; its complete epochs still count
            log = b''.join(o if isinstance(o, bytes) else o.encode() for o in (e.stdout, e.stderr) if o).decode()
            status = f'stopped after {timeout_s:.0f} s (time budget)'
        seconds = time.monotonic() - start
        summary, test = (_csv_rows(Path(out) / 'gpu-check' / name) for name in ('summary.csv', 'test.csv'))
    rows = [dict(epoch=int(r['epoch']), epoch_s=float(r['epoch_s']), train_img_per_s=float(r['train_img_s']),
                 train_loss=float(r['train_loss']), val_top1=float(r['val_top1'])) for r in summary]
    found = re.search(r'\| (\d+) train images, validation on (.*?)[,|]', log)
    precision = re.search(r'^precision: (.*)$', log, re.M)
    result = dict(
        command=shown, status=status, seconds=seconds, precision=precision.group(1) if precision else None,
        train_images=int(found.group(1)) if found else None, validation=found.group(2).strip() if found else None,
        rows=rows, test=dict(split=test[0]['split'], epoch=int(test[0]['epoch']), top1=float(test[0]['top1']),
                             count=int(test[0]['count'])) if test else None,
        recipe_epochs=recipe.epochs, recipe_train_images=recipe_images, projected_hours=None)
    if status == 'failed':
        result['error'] = log.strip().splitlines()[-1] if log.strip() else 'no output'
    if rows and result['train_images']:  # the last epoch (the first also pays for warm-up), scaled to the recipe's
        result['projected_hours'] = (recipe.epochs * rows[-1]['epoch_s'] * recipe_images / result['train_images']
                                     / 3600)
    return result


def _csv_rows(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------- report
def _f(value: Optional[float], spec: str) -> str:
    return '' if value is None else format(value, spec)


def format_report(result: Dict[str, Any]) -> str:
    """ The markdown tables of `result`; empty cells where nothing was measured. """
    m = result['machine']
    where = m.get('gpu', 'no GPU')
    lines = [
        '# GPU check', '',
        f"{result['status']}. {where}; CPU {m['cpu']}; torch {m['versions']['torch']}, timm "
        f"{m['versions']['timm']}" + (f", CUDA {m['cuda']}, cuDNN {m['cudnn']}" if 'cuda' in m else '') +
        f"; started {result['started']}, {result['seconds']:.0f} s of a {result['settings']['budget_s']:.0f} s "
        f"budget. Written by `benchmarks/gpu_check.py`.", '']
    inference = result['inference']
    lines += ['## Inference', '',
              'Weights and inputs in the precision named, channels_last, `torch.no_grad()`, cuDNN benchmark mode; '
              'medians over interleaved repeats. Peak memory: allocator peak of one call (weights + activations). '
              'x ResNet: against the ResNet of the same depth, same backend, precision and batch. compile s: the '
              'first call of a compiled case (compiling for that batch size).', '',
              '| model | form | backend | precision | batch | img/s | latency ms (min-max) | peak MiB | GFLOP/img '
              '| TFLOP/s | % peak | x ResNet | compile s |',
              '|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in sorted(inference['rows'], key=lambda r: (r['backend'], r['precision'], r['batch_size'])):
        lines.append(
            f"| {r['model']} | {r['form']} | {r['backend']} | {r['precision']} | {r['batch_size']} "
            f"| {r['img_per_s']:.1f} | {r['latency_ms']:.2f} ({r['latency_ms_min']:.2f}-{r['latency_ms_max']:.2f}) "
            f"| {_f(r['peak_memory_mib'], '.0f')} | {r['gflop_per_img']:.2f} | {r['gflop_per_s'] / 1e3:.1f} "
            f"| {_f(r['peak_fraction'] and 100 * r['peak_fraction'], '.0f')} | {_f(r['vs_resnet'], '.2f')} "
            f"| {_f(r['first_call_s'], '.1f')} |")
    peaks = ', '.join(f'{p} {v / 1e3:.1f} TFLOP/s' for p, v in inference['gemm_peak_gflop_per_s'].items())
    lines += ['', f"Peak: the best round in this run of a {result['settings']['gemm_size']}^3 GEMM or of a model that "
              f"outran it: {peaks or 'none'}.",
              '', '## Training step (synthetic batch: compute only)', '',
              "One optimizer step of the recipe's model, global batch (on this one device), optimizer, channels_last "
              "and `--amp` precision on a batch already on the device (cuDNN benchmark mode off, as in train.py): no "
              "data loading, no evaluation. Projected: "
              "recipe epochs x train images / img/s on this one device.", '',
              '| recipe | model | input | batch | precision | img/s | step ms | peak MiB | epochs x images '
              '| projected h |', '|---|---|---:|---:|---|---:|---:|---:|---:|---:|']
    for r in result['training']:
        lines.append(
            f"| {r['recipe']} | {r['model']} | {r['input_size']} | {r['batch_size']} | {r['precision']} "
            f"| {r['img_per_s']:.1f} | {r['step_ms']:.1f} | {_f(r['peak_memory_mib'], '.0f')} "
            f"| {r['recipe_epochs']} x {r['train_images'] or '?'} | {_f(r['projected_hours'], '.2f')} |")
    epochs = result['epochs']
    lines += ['', '## Real epochs with train.py', '']
    if epochs:
        lines += [f"`{epochs['command']}`: {epochs['status']} in {epochs['seconds']:.0f} s, "
                  f"{epochs['train_images'] or '?'} train images, validation on {epochs['validation'] or '?'}, "
                  f"precision {epochs['precision'] or '?'}."
                  + (f" Error: {epochs['error']}" if 'error' in epochs else ''),
                  '', '| epoch | epoch s (train + validation) | train img/s | train loss | validation top-1 |',
                  '|---:|---:|---:|---:|---:|']
        lines += [f"| {r['epoch']} | {r['epoch_s']:.1f} | {r['train_img_per_s']:.0f} | {r['train_loss']:.4f} "
                  f"| {r['val_top1']:.2f} |" for r in epochs['rows']]
        test = epochs['test']
        if test:
            lines += ['', f"Test top-1 ({test['split']} split, {test['count']} images, weights of epoch "
                          f"{test['epoch']}): {test['top1']:.2f}."]
        if epochs['projected_hours'] is not None:
            lines += ['', f"Projected wall time of the {epochs['recipe_epochs']}-epoch recipe on this device: "
                          f"{epochs['projected_hours']:.2f} h ({epochs['recipe_epochs']} x the last epoch's time, "
                          f"scaled from {epochs['train_images']} to the recipe's {epochs['recipe_train_images']} "
                          f"train images)."]
    else:
        lines.append('Not run.')
    if result['skipped'] or result['failed']:
        lines += ['', '## Not measured', '']
        lines += [f'- skipped: {s}' for s in result['skipped']]
        lines += [f"- failed: {f['what']}: {f['error']}" for f in result['failed']]
    return '\n'.join(lines) + '\n'


def write_report(result: Dict[str, Any], out: Path, clock: Clock) -> None:
    """ gpu_check.json and gpu_check.md, each written to a temp file and renamed into place. """
    result['seconds'] = clock.elapsed()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (('gpu_check.json', json.dumps(result, indent=2)), ('gpu_check.md', format_report(result))):
        tmp = out / f'.{name}.tmp'
        tmp.write_text(text, encoding='utf-8')
        os.replace(tmp, out / name)


# ------------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'], help='cpu: a smoke run with tiny settings')
    p.add_argument('--out', default=str(ROOT / 'docs' / 'reports'), help='folder for gpu_check.md and gpu_check.json')
    p.add_argument('--budget-s', type=float, default=450., help='no section or compile case starts after this')
    p.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), metavar='NAME', help='inference models')
    p.add_argument('--precisions', nargs='+', default=['fp16', 'bf16'], choices=list(DTYPES))
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 64, 256])
    p.add_argument('--img-size', type=int, default=None, help="inference input size (default: each model's own)")
    p.add_argument('--backends', nargs='+', default=['eager', 'compile'], choices=['eager', 'compile'])
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--min-time', type=float, default=0.25, help='seconds per case per repeat (about)')
    p.add_argument('--gemm-size', type=int, default=8192)
    p.add_argument('--compile-reserve-s', type=float, default=40., help='start a compile case only with this left')
    p.add_argument('--train-batch', type=int, default=None, help="training step batch (default: the recipe's)")
    p.add_argument('--train-img-size', type=int, default=None, help="training step input (default: the recipe's)")
    p.add_argument('--dataset', default=str(ROOT / 'timm_dirac' / 'assets' / 'cifar10_sample'),
                   help='CIFAR-10 as a datasets folder (train and test splits) for the real epochs; default: the '
                        'shipped 10,000-image sample')
    p.add_argument('--epochs', type=int, default=2, help='real epochs (0: none)')
    p.add_argument('--epochs-budget-s', type=float, default=150., help='time limit of the real epochs')
    p.add_argument('--train-args', default='', metavar='"FLAGS"', help='extra train.py flags for the real epochs')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    clock = Clock(args.budget_s)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('gpu_check: error: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a machine '
              'with an NVIDIA GPU, or pass --device cpu for a smoke run.', file=sys.stderr)
        return 2
    if args.epochs and not Path(args.dataset).is_dir():
        print(f'gpu_check: error: --dataset {args.dataset} is not a folder; pass a CIFAR-10 datasets folder '
              f'(train and test splits) or --epochs 0.', file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    result = dict(status='Running', started=time.strftime('%Y-%m-%d %H:%M:%S %z'), settings=vars(args),
                  machine=device_info(device), inference=inference_rows([], {}, {}), training=[], epochs=None,
                  skipped=[], failed=[])
    cases, memory, first_call = [], {}, {}

    def log(message: str) -> None:
        print(f'[{clock.elapsed():5.0f} s] {message}', file=sys.stderr, flush=True)

    def attempt(what: str, work: Callable[[], Any]) -> None:
        """ Run one piece of work if time is left; a failure becomes a line of the report, then the report is
        rewritten and the device memory released either way. """
        if clock.left() <= 0:
            result['skipped'].append(f'{what} (time budget)')
            return
        log(what)
        try:
            work()
        except Exception as e:
            result['failed'].append(dict(what=what, error=_one_line(e)))
        free_memory(device)
        result['inference'] = inference_rows(cases, memory, first_call)
        write_report(result, out, clock)

    def eager() -> None:
        """ Every case warmed up once (a failing one is dropped), then all timed in turn. """
        inference = Inference(args.models, args.img_size, device)
        candidates = [inference.gemm(args.gemm_size, p) for p in args.precisions]
        candidates += [inference.case(name, p, b, 'eager') for p in args.precisions for b in args.batch_sizes
                       for name, *_ in inference.models]
        warm = []
        for case in candidates:
            run_case(case, warm, memory, result['failed'], device)
        measure(warm, args.repeats, args.warmup, args.min_time, log=log)
        cases.extend(warm)

    def compiled() -> None:
        """ torch.compile cases, the largest batches first, each started only with `--compile-reserve-s` left. """
        inference = Inference(args.models, args.img_size, device)
        models = {}
        for batch in sorted(args.batch_sizes, reverse=True):
            for precision in args.precisions:
                for name, *_ in inference.models:
                    what = f'{name} compile {precision} batch {batch}'
                    if clock.left() < args.compile_reserve_s:
                        result['skipped'].append(f'{what} (time budget)')
                        continue
                    log(what)
                    if (name, precision) not in models:
                        models[name, precision] = torch.compile(
                            inference.placed(name, precision), dynamic=False, options={'freezing': True})
                    case = inference.case(name, precision, batch, 'compile', models[name, precision])
                    measured = []
                    first = run_case(case, measured, memory, result['failed'], device)
                    if measured:
                        measure(measured, args.repeats, args.warmup, args.min_time)
                        first_call[_key(case)] = first
                        cases.extend(measured)
                    result['inference'] = inference_rows(cases, memory, first_call)
                    write_report(result, out, clock)

    def epochs() -> None:
        result['epochs'] = real_epochs(str(Path(args.dataset).resolve()), args.epochs, shlex.split(args.train_args),
                                       device, min(args.epochs_budget_s, clock.left()))

    try:
        if 'eager' in args.backends:
            attempt('eager inference', eager)
        torch.backends.cudnn.benchmark = False  # the training steps as train.py runs them (PyTorch's default)
        for name in RECIPES:
            attempt(f'training step of {name}', lambda: result['training'].append(training_step(
                CONFIGS / name, device, args.train_batch, args.train_img_size, args.repeats, args.warmup,
                args.min_time)))
        if args.epochs:
            attempt(f'{args.epochs} real epoch(s) with train.py', epochs)
        torch.backends.cudnn.benchmark = True
        if 'compile' in args.backends:
            attempt('torch.compile inference', compiled)
        result['status'] = 'Finished'
    except KeyboardInterrupt:  # gpu_check.sh's hard time limit: keep what was measured
        result['status'] = 'Stopped by the time limit (what is listed was measured)'
    result['inference'] = inference_rows(cases, memory, first_call)
    write_report(result, out, clock)
    log(f'wrote {out / "gpu_check.md"} and {out / "gpu_check.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
