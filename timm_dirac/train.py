""" Train DiracNets (or any timm model) with Hugging Face accelerate: one script from a CPU to many GPU nodes

    python train.py --config train_configs/quick_cifar10.yaml                     # one process
    accelerate launch --multi_gpu --num_processes 8 train.py --config train_configs/diracnet28_10_cifar10.yaml
    python train.py --config train_configs/quick_cifar10.yaml --resume output/train/<run>

Flags are named like timm's train.py; `--config FILE.yaml` sets them too (defaults < YAML < command line). The
engine is `accelerate.Accelerator` (device placement, DDP, bf16/fp16 autocast, gradient accumulation, state
save/load); the pieces are timm's (create_optimizer_v2, create_scheduler_v2, ModelEmaV3, Mixup, losses, accuracy).

A run folder holds `args.yaml`, `summary.csv`, `checkpoint-<epoch>/` folders (the last one and the best
`--checkpoint-hist`, each written to a temp folder and renamed into place), the links `last` and `best`, and at the
end the best weights as Hub folders `hub-train/` and `hub-folded/` (reparameterized). The newest complete checkpoint
is the folder's one source of truth: `--resume` continues from it and repairs the rest from it, so a run killed at any
moment resumes exactly.
"""
import argparse
import ast
import copy
import csv
import errno
import io
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tqdm import tqdm

import timm
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, distribute_bn

from .checkpoint_io import file_sha256
from .data import create_loaders, is_test_split
from .errors import first_sentence, run_refusing
from .finite import check_weights
from .precision import auto_precision
from .qat import merge_qat, prepare_qat

__all__ = ['main', 'parse_args', 'train', 'build', 'start_or_resume', 'fit', 'ConfigError', 'CheckpointError',
           'TrainingError']


class ConfigError(ValueError):
    """ Bad flags or config file; the message names the fix. """


# --------------------------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def _kwarg(text: str) -> Tuple[str, Any]:
    key, sep, value = text.partition('=')
    if not sep:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog='timm-dirac-train', description=__doc__.split('\n')[0])
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of flag values (keys: flag names '
                   'with _ for -); the command line overrides it')
    g = p.add_argument_group('Data')
    g.add_argument('--data-dir', default=None, metavar='DIR', help='image folders DIR/<split>/<class>/<image>')
    g.add_argument('--dataset', '-d', default='', metavar='NAME', help='hfds/<Hub id or local folder> (datasets)')
    g.add_argument('--train-split', default='train', metavar='NAME')
    g.add_argument('--val-split', default='validation', metavar='NAME',
                   help='split evaluated every epoch to choose `best`; a test split is only shown, and `best` is then '
                   'the last epoch (choose on held-out images with --holdout)')
    g.add_argument('--holdout', type=int, default=0, metavar='N',
                   help='validate on N fixed random images held out of the train split instead of --val-split')
    g.add_argument('--test-split', default=None, metavar='NAME',
                   help='split scored once, at the end, with the weights that are exported (e.g. test)')
    g.add_argument('--train-num-samples', type=int, default=None, metavar='N', help='train on a fixed random N')
    g.add_argument('--val-num-samples', type=int, default=None, metavar='N', help='evaluate on a fixed random N')
    g.add_argument('-j', '--workers', type=int, default=None, metavar='N',
                   help='data loading worker processes (default: up to 4, no more than the CPUs per process)')
    g.add_argument('--dataset-download', action='store_true', help='download the dataset (hfids/, tfds/) first')
    g = p.add_argument_group('Model')
    g.add_argument('--model', default=None, metavar='NAME', help='timm model name, e.g. diracnet34')
    g.add_argument('--model-kwargs', nargs='*', default={}, type=_kwarg, metavar='K=V',
                   help='extra model arguments, e.g. depth=16 width=2')
    g.add_argument('--pretrained', action='store_true', help='start from the pretrained weights')
    g.add_argument('--initial-checkpoint', default=None, metavar='PATH',
                   help='start from these weights (e.g. <run>/last/model.safetensors; train or folded form)')
    g.add_argument('--qat', action='store_true', help='quantization-aware fine-tuning for `timm-dirac quantize --flow '
                   'split`: fold, split the Dirac taps, train through the 7-bit int8 weight grid (start from trained '
                   'weights); exports the folded model')
    g.add_argument('--diracify', action=argparse.BooleanOptionalAction, default=False,
                   help='Dirac-parameterize the plain convs of any model (timm_dirac.diracify): alpha=1, beta=0.1, or '
                   'with --pretrained/--initial-checkpoint (plain weights) alpha=0, beta=||W|| (same function); fold '
                   'back with timm.utils.reparameterize_model')
    g.add_argument('--diracify-layers', nargs='+', default=None, metavar='GLOB',
                   help="with --diracify: only the convs whose module names match, e.g. 'features.*'")
    g.add_argument('--num-classes', type=int, default=None, metavar='N', help='default: the dataset\'s class count')
    g.add_argument('--img-size', type=int, default=None, metavar='N', help='input size (default: the model cfg)')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    g.add_argument('--drop', type=float, default=0., metavar='PCT', help='dropout before the classifier')
    g.add_argument('--channels-last', action='store_true', help='channels_last memory layout')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', metavar='NAME', help="timm optimizer ('sgd' is Nesterov SGD, "
                   "'momentum' plain SGD with momentum)")
    g.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate (default: lr-base scaled)')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR', help='lr at the global batch lr-base-size')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='N', help='global batch of lr-base')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--weight-decay-1d', action=argparse.BooleanOptionalAction, default=False,
                   help="decay 1-d parameters too (biases, BatchNorm, Dirac alpha/beta), as the authors' train.py does; "
                   "default: timm's grouping, which exempts them")
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip the gradient norm')
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N', help='batches per optimizer step')
    g = p.add_argument_group('Schedule')
    g.add_argument('--sched', default='cosine', metavar='NAME', help='timm scheduler: cosine, step, multistep, ...')
    g.add_argument('--epochs', type=int, default=300, metavar='N')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], metavar='E',
                   help='multistep: epochs where the lr is multiplied by decay-rate')
    g.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='step: epochs between decays')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    g.add_argument('--min-lr', type=float, default=0., metavar='LR')
    g = p.add_argument_group('Augmentation and regularization')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], metavar=('MIN', 'MAX'),
                   help='random-resized crop area range (inputs > 64 px)')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], metavar=('MIN', 'MAX'))
    g.add_argument('--color-jitter', type=float, default=0., metavar='PCT')
    g.add_argument('--aa', default=None, metavar='NAME', help='timm Auto/RandAugment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erasing probability')
    g.add_argument('--train-interpolation', default='random', metavar='NAME')
    g.add_argument('--mixup', type=float, default=0., help='mixup alpha (on if > 0)')
    g.add_argument('--cutmix', type=float, default=0., help='cutmix alpha (on if > 0)')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g = p.add_argument_group('EMA, precision, output')
    g.add_argument('--model-ema', action='store_true', help='keep and evaluate an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true', help='EMA decay warm-up')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='mixed precision (--no-amp overrides a config: fp32 unless the accelerate launch sets one)')
    g.add_argument('--amp-dtype', default='auto', choices=['auto', 'float16', 'bfloat16'],
                   help='auto: bf16 where the hardware computes it (CUDA GPUs with bf16, CPUs with AMX or '
                   'AVX512-BF16), fp16 on other CUDA GPUs, fp32 on other CPUs')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50, metavar='N', help='progress bar update every N steps')
    g.add_argument('--output', default='./output/train', metavar='DIR', help='parent of the run folders')
    g.add_argument('--experiment', default='', metavar='NAME', help='run folder name (default: time-model-size)')
    g.add_argument('--resume', default='', metavar='DIR', help='checkpoint folder to continue, e.g. <run>/last')
    g.add_argument('--checkpoint-hist', type=int, default=3, metavar='N', help='best checkpoints to keep')
    g.add_argument('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'])
    g.add_argument('--debug', action='store_true', help='show the Python traceback of an error (default: one line '
                   'naming the problem, exit code 2)')
    return p


def _typed(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """ Convert a YAML value as the command line would (YAML reads `1e-4` as a string, for one). """
    if value is None or action.type is None or isinstance(value, bool):
        return value
    def convert(v: Any) -> Any:
        if action.type is int and isinstance(v, float):  # the command line refuses `--epochs 2.7`; so does YAML
            raise ValueError(f'{v!r} is not a whole number')
        return action.type(v)
    try:
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return convert(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f'{path}: key {key!r} has a bad value {value!r} ({e}).') from e


def _resolve_paths(values: Dict[str, Any], config_dir: Path) -> Dict[str, Any]:
    """ A config's relative data and weights paths as a user expects: from the working directory if they exist
    there, else from the config file's folder (so a config runs from anywhere); other values unchanged. """
    def resolve(path: str) -> str:
        if os.path.isabs(os.path.expanduser(path)) or os.path.exists(path):
            return path
        beside = config_dir / path
        return str(beside.resolve()) if beside.exists() else path

    out = dict(values)
    for key in ('data_dir', 'initial_checkpoint'):
        if out.get(key):
            out[key] = resolve(out[key])
    if str(out.get('dataset', '')).startswith('hfds/'):
        out['dataset'] = 'hfds/' + resolve(out['dataset'][len('hfds/'):])
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """ Flags from the defaults, then the `--config` YAML, then the command line. Unknown YAML keys are errors. """
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = known.config
        try:
            with open(path, encoding='utf-8') as f:
                cfg = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f'cannot read config file {path}: {e.strerror}.') from e
        except yaml.YAMLError as e:  # also python/object tags, which safe_load never constructs
            where = getattr(e, 'problem_mark', None)
            line = f' line {where.line + 1}' if where else ''
            problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
            raise ConfigError(f'{path}{line} is not plain YAML ({problem}); write flag: value lines only.') from e
        if not isinstance(cfg, dict):
            raise ConfigError(f'{path} must be a YAML mapping of flag names to values.')
        actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
        values = {}
        for key, value in cfg.items():
            dest = str(key).replace('-', '_')
            if dest not in actions:
                raise ConfigError(f'{path}: unknown key {key!r}; keys are the long flag names with _ for - '
                                  f'(see timm-dirac-train --help).')
            if dest == 'model_kwargs' and not isinstance(value, dict):
                raise ConfigError(f'{path}: model_kwargs must be a mapping, e.g. {{depth: 16}}.')
            values[dest] = value if dest == 'model_kwargs' else _typed(actions[dest], key, value, path)
        parser.set_defaults(**_resolve_paths(values, Path(path).parent))
    args = parser.parse_args(argv)
    if isinstance(args.model_kwargs, list):  # from the command line: [(key, value), ...] over the YAML mapping
        args.model_kwargs = {**parser.get_default('model_kwargs'), **dict(args.model_kwargs)}
    return args


def check_args(args: argparse.Namespace) -> None:
    """ Refuse impossible settings before anything is built or written. """
    if not args.model:
        raise ConfigError('no model: pass --model NAME (e.g. diracnet34_1_cifar) or set model: in the config.')
    if not args.model.startswith(('hf-hub:', 'local-dir:')) and not timm.is_model(args.model):
        dirac = ', '.join(timm.list_models('diracnet*'))
        raise ConfigError(f'unknown model {args.model!r}; DiracNets are {dirac} (any timm model name works too).')
    for name in ('batch_size', 'epochs', 'grad_accum_steps', 'log_interval', 'checkpoint_hist'):
        if getattr(args, name) < 1:
            raise ConfigError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}.')
    if args.validation_batch_size is not None and args.validation_batch_size < 1:
        raise ConfigError(f'--validation-batch-size must be at least 1, got {args.validation_batch_size}.')
    for name in ('lr', 'lr_base', 'momentum', 'weight_decay', 'warmup_lr', 'min_lr', 'decay_rate', 'decay_epochs',
                 'clip_grad', 'drop', 'smoothing', 'mixup', 'cutmix', 'mixup_prob', 'model_ema_decay', 'reprob',
                 'color_jitter', 'hflip'):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f'--{name.replace("_", "-")} must be a finite number >= 0, got {value}.')
    for name in ('drop', 'smoothing', 'mixup_prob', 'model_ema_decay', 'reprob', 'hflip'):
        if getattr(args, name) > 1:
            raise ConfigError(f'--{name.replace("_", "-")} is a fraction between 0 and 1, got {getattr(args, name)}.')
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f'--workers must be 0 or more, got {args.workers}.')
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        raise ConfigError(f'mixup/cutmix pair samples within a batch: --batch-size must be even, '
                          f'got {args.batch_size}.')
    if args.initial_checkpoint and not Path(args.initial_checkpoint).is_file():
        raise ConfigError(f'--initial-checkpoint {args.initial_checkpoint} is not a file; pass a weights file such as '
                          f'<run folder>/last/model.safetensors.')
    if args.initial_checkpoint and args.pretrained:
        raise ConfigError('--pretrained and --initial-checkpoint both choose the starting weights: pass one.')
    if args.qat and not (args.initial_checkpoint or args.pretrained):
        raise ConfigError('--qat fine-tunes trained weights for int8: pass --initial-checkpoint FILE or --pretrained.')
    if args.qat and args.diracify:
        raise ConfigError('--qat and --diracify exclude each other: --qat fine-tunes a DiracNet for int8, --diracify '
                          'makes a plain net Dirac-parameterized; pass one.')
    if args.diracify_layers and not args.diracify:
        raise ConfigError('--diracify-layers selects the convs of --diracify: add --diracify or drop it.')
    if args.qat and args.model_ema:
        raise ConfigError('--qat does not keep an EMA (its fake-quantized weights cannot be copied): drop --model-ema.')
    if args.holdout < 0:
        raise ConfigError(f'--holdout must be 0 (validate on --val-split) or more, got {args.holdout}.')
    if args.resume:
        find_resume_checkpoint(args.resume)  # refuses a folder that is no run or checkpoint now, not later


# ------------------------------------------------------------------------------------------------ accelerator
def _has_accelerator() -> bool:
    accel = getattr(torch, 'accelerator', None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()


def pick_precision(args: argparse.Namespace) -> Tuple[Optional[str], str]:
    """ accelerate's mixed_precision for `args` ('bf16', 'fp16', 'no'; None: the launch setting) and why. """
    if not args.amp:
        return None, 'no --amp: the accelerate launch setting'
    if args.amp_dtype != 'auto':
        return ('bf16' if args.amp_dtype == 'bfloat16' else 'fp16'), f'--amp-dtype {args.amp_dtype}'
    device = 'cuda' if torch.cuda.is_available() else 'cpu' if not _has_accelerator() else 'other'
    precision, why = auto_precision(device)
    return {'fp32': 'no'}.get(precision, precision), f'--amp auto: {why}'


def make_accelerator(args: argparse.Namespace):
    """ Accelerator on the GPU(s) if any, else on CPU (so `accelerate launch --multi_gpu` gives gloo ranks), in the
    precision `pick_precision` chooses, named with its reason in the run's first line. """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    precision, why = pick_precision(args)
    accelerator = Accelerator(
        cpu=not _has_accelerator(),
        mixed_precision=precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        step_scheduler_with_optimizer=False,
    )
    names = {'bf16': 'bf16 autocast', 'fp16': 'fp16 autocast with a loss scaler', 'no': 'fp32'}
    accelerator.print(f'precision: {names.get(accelerator.mixed_precision, accelerator.mixed_precision)} ({why})')
    return accelerator


# ------------------------------------------------------------------------------------------------ train / eval
def train_one_epoch(
        model: nn.Module, loader, optimizer, scheduler, loss_fn: nn.Module, accelerator, args: argparse.Namespace,
        epoch: int, num_updates: int, mixup: Optional[Mixup] = None, ema: Optional[ModelEmaV3] = None,
) -> Tuple[Dict[str, float], int]:
    """ One pass over this rank's shard; returns global train loss/top-1/images-per-second and the update count. """
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, samples
    bar = tqdm(loader, desc=f'train {epoch + 1}', disable=not accelerator.is_main_process, dynamic_ncols=True,
               leave=False)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(bar):
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if mixup is not None:
            images, targets = mixup(images, labels)
        with accelerator.accumulate(model):
            logits = model(images)
            loss = loss_fn(logits, targets)
            accelerator.backward(loss)
            if args.clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=num_updates)
        n = labels.shape[0]
        top1 = accuracy(logits.detach(), labels, topk=(1,))[0]
        totals += torch.stack([loss.detach() * n, top1 * n / 100, torch.full_like(top1, n)]).double()
        if accelerator.is_main_process and (step + 1) % args.log_interval == 0:
            seen = (step + 1) * n * accelerator.num_processes
            bar.set_postfix(loss=f'{totals[0].item() / totals[2].item():.3f}',
                            img_s=f'{seen / (time.perf_counter() - start):.0f}')
    elapsed = time.perf_counter() - start
    totals = accelerator.reduce(totals, reduction='sum')
    loss_sum, correct, count = totals.tolist()
    return dict(loss=loss_sum / count, top1=100 * correct / count, img_s=count / elapsed), num_updates


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, channels_last: bool = False, desc: str = 'eval'
             ) -> Dict[str, float]:
    """ Loss, top-1 and top-5 over all ranks' batches of a loader prepared by accelerate: each rank's per-sample
    results are gathered with `gather_for_metrics`, which drops the samples padded into the last batches, so every
    sample counts once. """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss sum, top1, top5, samples
    for images, labels in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False):
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        per_sample = torch.stack([F.cross_entropy(logits.float(), labels, reduction='none'), hits[:, 0].float(),
                                  hits.any(1).float()], 1)
        per_sample = accelerator.gather_for_metrics(per_sample)
        totals += torch.cat([per_sample.sum(0), per_sample.new_tensor([len(per_sample)])]).double()
    loss_sum, top1, top5, count = totals.tolist()
    return dict(loss=loss_sum / count, top1=100 * round(top1) / count, top5=100 * round(top5) / count,
                count=int(count))


# ------------------------------------------------------------------------------------------------ checkpoints
# A run folder's one source of truth is its newest complete checkpoint: `checkpoint-<epoch>` appears only by the
# rename of a fully written temp folder, and `last`, `best`, the pruning and summary.csv all follow from its
# train_state.pt. `publish` derives them (after each save, and again on resume, which repairs a run killed
# between any two steps of a save).
class CheckpointError(ConfigError):
    """ A checkpoint or run folder that cannot be written or resumed; the message names the fix. """


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


def _link_atomic(run_dir: Path, name: str, target: str) -> None:
    tmp = run_dir / f'.{name}.tmp'
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, run_dir / name)


def checkpoint_epoch(path: Path) -> Optional[int]:
    """ N for a folder named `checkpoint-N`, else None. """
    number = path.name[len('checkpoint-'):]
    return int(number) if path.name.startswith('checkpoint-') and number.isdigit() else None


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """ The run's complete checkpoint folders, oldest first. """
    found = [p for p in run_dir.glob('checkpoint-*') if checkpoint_epoch(p) is not None and not p.is_symlink()
             and (p / 'train_state.pt').is_file()]
    return sorted(found, key=checkpoint_epoch)


def save_checkpoint(accelerator, run_dir: Path, state: Dict[str, Any]) -> None:
    """ Write `checkpoint-<epoch>` (accelerate state: model, optimizer, scaler, RNG per rank; plus train_state.pt:
    epoch, scheduler, EMA, best list, summary and the SHA-256 of every other file) into a temp folder, rename it
    into place, then `publish` the run folder from it. A failed write names the cause and leaves the last
    checkpoint as it was. """
    name = f'checkpoint-{state["epoch"]}'
    tmp = run_dir / f'.{name}.tmp'
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash during an earlier save
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            torch.save(dict(state, files=files), tmp / 'train_state.pt')
            os.replace(tmp, run_dir / name)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as "unexpected pos ..."
        raise _write_error(run_dir, name, e) from e
    if accelerator.is_main_process:
        publish(run_dir, state)
    accelerator.wait_for_everyone()


def _write_error(run_dir: Path, name: str, error: Exception) -> CheckpointError:
    free = shutil.disk_usage(run_dir).free
    last = complete_checkpoints(run_dir)
    needed = sum(f.stat().st_size for f in last[-1].iterdir()) if last else 0
    full = getattr(error, 'errno', None) == errno.ENOSPC or free < max(needed, 1 << 20)
    cause = 'no space left on the device' if full else f'{type(error).__name__}: {str(error).strip().splitlines()[-1]}'
    then = f'the run is intact up to {last[-1].name}: free space, then --resume {run_dir}' if last else \
        'free space, then run the command again'
    return CheckpointError(f'cannot write {name} in {run_dir} ({cause}; {free / 2**20:.0f} MiB free, a checkpoint '
                           f'takes about {needed / 2**20:.0f} MiB); {then}.')


def publish(run_dir: Path, state: Dict[str, Any]) -> None:
    """ Point `last` at the checkpoint of `state` and `best` at its best epoch, remove checkpoints that are neither
    (and temp leftovers of a killed save), write summary.csv. Idempotent: every step can be redone after a kill. """
    name = f'checkpoint-{state["epoch"]}'
    _link_atomic(run_dir, 'last', name)
    best = state['best']
    if best:
        _link_atomic(run_dir, 'best', f'checkpoint-{best[0][1]}')
    keep = {name} | {f'checkpoint-{epoch}' for _, epoch in best}
    for old in run_dir.glob('checkpoint-*'):
        if old.name not in keep and checkpoint_epoch(old) is not None and not old.is_symlink():
            doomed = run_dir / f'.{old.name}.del'  # renamed first, so a half-deleted folder is never a checkpoint
            os.replace(old, doomed)
            shutil.rmtree(doomed)
    for leftover in run_dir.glob('.checkpoint-*'):
        shutil.rmtree(leftover, ignore_errors=True)
    _write_atomic(run_dir / 'summary.csv', _csv(state['summary']))


def find_resume_checkpoint(resume: str) -> Tuple[Path, Optional[Path]]:
    """ (run folder, checkpoint to continue from) for `--resume`: a run folder or its `last` link means its newest
    complete checkpoint (None if it has none yet: the run restarts from epoch 1); `best` or `checkpoint-N` means
    that one, which must be the newest (continuing an older one would overwrite the later ones). """
    path = Path(resume)
    run_dir = path if path.is_dir() and not path.is_symlink() and checkpoint_epoch(path) is None else path.parent
    if not run_dir.is_dir():
        raise CheckpointError(f'--resume {resume}: {run_dir} does not exist; pass a run folder or one of its '
                              f'checkpoint folders.')
    done = complete_checkpoints(run_dir)
    if run_dir == path or path.name == 'last':
        if not done and not (run_dir / 'args.yaml').is_file():
            raise CheckpointError(f'--resume {resume}: {run_dir} is not a run folder (no args.yaml, no '
                                  f'checkpoint-N folder with train_state.pt); pass <output>/<run> or <run>/last.')
        return run_dir, (done[-1] if done else None)
    chosen = path.resolve()
    if checkpoint_epoch(chosen) is None or not (chosen / 'train_state.pt').is_file():
        raise CheckpointError(f'--resume {resume} is not a complete checkpoint folder (checkpoint-N with '
                              f'train_state.pt); pass its run folder to continue from the newest checkpoint.')
    if done and checkpoint_epoch(chosen) < checkpoint_epoch(done[-1]):
        raise CheckpointError(f'{run_dir} has checkpoints after {chosen.name} (up to {done[-1].name}), which '
                              f'continuing it would overwrite: --resume {run_dir} continues from {done[-1].name}; '
                              f'to branch off {chosen.name}, copy it into a new folder and resume that copy.')
    return run_dir, chosen


def load_checkpoint(accelerator, checkpoint: Path) -> Dict[str, Any]:
    """ Restore model, optimizer, scaler and RNG states from `checkpoint`; returns its train_state. Every file is
    checked against the SHA-256 the save recorded, and the RNG state against the one restored, so a resume either
    restores everything or says what it could not (accelerate skips unreadable RNG states silently). """
    from accelerate.utils import load as accelerate_load

    try:
        state = torch.load(checkpoint / 'train_state.pt', map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'cannot read {checkpoint / "train_state.pt"} ({type(e).__name__}); the checkpoint '
                              f'is damaged: move it out of the run folder to resume from the one before.') from e
    files = state.pop('files', {})
    for name, digest in files.items():
        path = checkpoint / name
        if not path.is_file() or file_sha256(path) != digest:
            what = 'missing' if not path.is_file() else 'not the file this checkpoint saved (changed or corrupt)'
            raise CheckpointError(f'{path} is {what}: the checkpoint is damaged; move it out of the run folder to '
                                  f'resume from the one before.')
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:
        raise CheckpointError(f'cannot restore {checkpoint} ({first_sentence(e)}): a checkpoint of another model or '
                              f'other flags? Resume with the flags of that run.') from e
    rng_file = checkpoint / f'random_states_{accelerator.process_index}.pkl'
    try:
        restored = torch.equal(accelerate_load(rng_file)['torch_manual_seed'], torch.get_rng_state())
    except Exception:
        restored = False
    if not restored:
        raise CheckpointError(f'cannot restore the random number state from {rng_file}: the resumed run would not '
                              f'continue the interrupted one exactly; move the checkpoint out of the run folder to '
                              f'resume from the one before.')
    return state


def _csv(rows: List[Dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _schedule_flags(args: argparse.Namespace, lr: float, updates_per_epoch: int) -> Dict[str, Any]:
    """ What defines the lr schedule; a resumed run restores the scheduler state only if these are unchanged. """
    keys = ('sched', 'epochs', 'decay_milestones', 'decay_epochs', 'decay_rate', 'warmup_epochs', 'warmup_lr',
            'min_lr')
    return dict(lr=lr, updates_per_epoch=updates_per_epoch, **{k: getattr(args, k) for k in keys})


def _rank_best(best: List[Tuple[float, int]], metric: float, epoch: int, keep: int, lower_is_better: bool
               ) -> List[Tuple[float, int]]:
    best = best + [(metric, epoch)]
    best.sort(key=lambda x: (x[0] if lower_is_better else -x[0], x[1]))
    return best[:keep]


def young_batchnorm(model: nn.Module, batches: int, tolerance: float = 0.01) -> str:
    """ A note when BatchNorm running statistics still hold more than `tolerance` of their initial values after
    `batches` training batches (momentum m keeps (1 - m)^batches of them): evaluation then understates the model. """
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum]
    if not momenta:
        return ''
    momentum = min(momenta)
    left = (1 - momentum) ** batches
    if left <= tolerance:
        return ''
    needed = math.ceil(math.log(tolerance) / math.log(1 - momentum))
    return (f'note: after {batches} batches the BatchNorm running statistics still hold {100 * left:.0f}% of their '
            f'initial values, so the validation numbers understate the model; they settle after about {needed} '
            f'batches (train more epochs).')


def _best_weights(run_dir: Path, args: argparse.Namespace, state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """ The best checkpoint's weights: its EMA weights with --model-ema. """
    from safetensors.torch import load_file

    best_dir = run_dir / f'checkpoint-{state["best"][0][1]}'
    if args.model_ema:
        return torch.load(best_dir / 'train_state.pt', map_location='cpu', weights_only=True)['ema']
    return load_file(best_dir / 'model.safetensors')


def export_hub_folders(run_dir: Path, args: argparse.Namespace, num_classes: int, state: Dict[str, Any],
                       test_metrics: Optional[Dict[str, float]] = None) -> List[Path]:
    """ The best checkpoint's weights (EMA weights with --model-ema) of a DiracNet as Hub folders, in train form
    and folded (deep copy, eval, reparameterize), with the test split's metrics if it was scored, else the
    validation metrics; an earlier export is kept, the new one gets a suffix. """
    from .data import hub_dataset_id, label_names
    from .diracnet import DiracNet
    from .hub import save_hub_folder

    model = timm.create_model(args.model, num_classes=num_classes, drop_rate=args.drop, **args.model_kwargs)
    if not isinstance(model, DiracNet):  # the model card and the folding are DiracNet's
        return []
    if args.qat:
        model = _prepare_qat(model)
    epoch = state['best'][0][1]
    model.load_state_dict(_best_weights(run_dir, args, state))
    row = next(r for r in state['summary'] if r['epoch'] == epoch)
    prefix = 'ema_' if args.model_ema else ''
    chosen = (f'timm-dirac-train, epoch {epoch} of {args.epochs}{" (EMA weights)" if args.model_ema else ""}, '
              f'{f"chosen on {_val_name(args)}" if _selects(args) else "the last epoch"}')
    if test_metrics is not None:
        metrics, split, source = test_metrics, args.test_split, f'{chosen}, scored once on {args.test_split}'
    else:
        metrics, split, source = {k: row[prefix + 'val_' + k] for k in ('top1', 'top5', 'loss')}, _val_name(args), chosen
    info = dict(  # this run's own facts: the model's default tag describes other weights (see hub.published_cfg)
        dataset=hub_dataset_id(args.dataset), license='apache-2.0',
        metrics={k: round(metrics[k], 4) for k in ('top1', 'top5', 'loss')},
        eval_split=split, metrics_source=source, epochs=args.epochs, recipe=args.config or None)
    labels = label_names(args.dataset, args.data_dir, args.train_split)
    if args.qat:  # the fake-quantized split model merges into the folded model int8 will store
        forms = (('folded', merge_qat(model)),)
    else:
        folded = copy.deepcopy(model).eval()
        folded.reparameterize()
        forms = (('train', model), ('folded', folded))
    written = []
    for form, net in forms:
        out = run_dir / f'hub-{form}'
        suffix = 1
        while out.exists():  # a resumed run that finished before: keep the earlier export
            out, suffix = run_dir / f'hub-{form}-{suffix}', suffix + 1
        written.append(save_hub_folder(net, out, train_info=info, label_names=labels))
    return written


def _val_name(args: argparse.Namespace) -> str:
    """ What the per-epoch validation runs on, e.g. '1000 images held out of train' or 'validation'. """
    if not args.holdout:
        return args.val_split
    return f'{min(args.holdout, args.val_num_samples or args.holdout)} images held out of {args.train_split}'


def _selects(args: argparse.Namespace) -> bool:
    """ Whether `best` is chosen on the validation metric; never on a test split, where `best` is the last epoch. """
    return bool(args.holdout) or not is_test_split(args.val_split)


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """ timm's optimizer for `args`; `--weight-decay-1d` decays the 1-d parameters too (the authors' grouping). """
    return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                               filter_bias_and_bn=not args.weight_decay_1d)


def _prepare_qat(model: nn.Module) -> nn.Module:
    try:
        return prepare_qat(model)
    except ValueError as e:
        raise ConfigError(f'--qat: {e}') from e


def _diracify(model: nn.Module, args: argparse.Namespace, verbose: bool) -> nn.Module:
    """ `--diracify`: Dirac-parameterize the model's plain convs; trained starting weights keep their function. """
    from .diracify import diracify

    try:
        return diracify(model, args.diracify_layers, from_pretrained=bool(args.pretrained or args.initial_checkpoint),
                        verbose=verbose)
    except ValueError as e:
        raise ConfigError(f'--diracify: {e}') from e


# ------------------------------------------------------------------------------------------------------ main
class TrainingError(RuntimeError):
    """ Training cannot go on (e.g. the loss became NaN); the run folder keeps its last good checkpoint. """


@dataclass
class Setup:
    """ Everything `train` builds before the first epoch. """
    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_epochs: int
    train_loader: Any
    val_loader: Any
    test_loader: Any
    loss_fn: nn.Module
    mixup: Optional[Mixup]
    ema: Optional[ModelEmaV3]
    data_config: Dict[str, Any]
    num_classes: int
    lr: float
    updates_per_epoch: int
    description: str


def build(args: argparse.Namespace) -> Setup:
    """ Accelerator, model, data, optimizer, schedule, loss and EMA, seeded as a run (and its resume) needs them. """
    from accelerate.utils import set_seed

    check_args(args)
    accelerator = make_accelerator(args)
    world = accelerator.num_processes

    # model first (same seed on every rank), so that its cfg gives the data transforms
    set_seed(args.seed)
    # an initial checkpoint goes through timm's pretrained loader: our checkpoint filter, classifier/in_chans adaption
    start = dict(pretrained=args.pretrained)
    if args.initial_checkpoint:
        start = dict(pretrained=True, pretrained_cfg_overlay=dict(file=args.initial_checkpoint))
    model = timm.create_model(args.model, num_classes=args.num_classes, drop_rate=args.drop, **start,
                              **args.model_kwargs)
    if args.diracify:
        model = _diracify(model, args, verbose=accelerator.is_main_process)
    data_config = resolve_data_config(dict(img_size=args.img_size, input_size=args.input_size), model=model)

    data = create_loaders(args, data_config, accelerator)  # prepared loaders, class names checked
    args.val_split = data.val_split or args.val_split  # the split validation reads when the data lacks --val-split
    num_classes, train_loader, val_loader = data.num_classes, data.train_loader, data.val_loader
    if args.num_classes is None and model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    if args.qat:
        model = _prepare_qat(model)
    global_batch = args.batch_size * world * args.grad_accum_steps

    # optimizer, schedule, loss, EMA (from the same initial weights on every rank)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    optimizer = build_optimizer(model, args, lr)
    mixup = None
    if args.mixup or args.cutmix:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    if ema is not None:
        ema.to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, cooldown_epochs=0,
        updates_per_epoch=updates_per_epoch)
    set_seed(args.seed, device_specific=True)  # different augmentation per rank
    description = (
        f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {num_classes} classes, '
        f'input {tuple(data_config["input_size"])} | {data.description}'
        f'{"" if _selects(args) else " (shown only: best = the last epoch; choose on held-out images with --holdout)"} | '
        f'{world} process(es) on {accelerator.device}, precision {accelerator.mixed_precision} | global batch '
        f'{args.batch_size} x {world} x {args.grad_accum_steps} = {global_batch}, lr {lr:g}')
    return Setup(accelerator, model, optimizer, scheduler, num_epochs, train_loader, val_loader, data.test_loader,
                 loss_fn, mixup, ema, data_config, num_classes, lr, updates_per_epoch, description)


def start_or_resume(setup: Setup, args: argparse.Namespace) -> Tuple[Path, Dict[str, Any]]:
    """ The run folder and the training state to go on from: a new folder (created now, with args.yaml, so an
    unwritable --output fails before any training), or `--resume`'s run restored from its newest complete
    checkpoint, its `last`, `best` and summary.csv repaired from that checkpoint. """
    from accelerate.utils import broadcast_object_list

    accelerator = setup.accelerator
    state: Dict[str, Any] = dict(epoch=0, num_updates=0, best=[], summary=[])
    if args.resume:
        run_dir, checkpoint = find_resume_checkpoint(args.resume)
        if checkpoint is None:
            accelerator.print(f'resume: {run_dir} has no complete checkpoint yet; the run starts from epoch 1.')
        else:
            state = load_checkpoint(accelerator, checkpoint)
            schedule = _schedule_flags(args, setup.lr, setup.updates_per_epoch)
            if state['schedule'] == schedule:
                setup.scheduler.load_state_dict(state['scheduler'])
            else:  # e.g. more --epochs: the new flags define the schedule from here on
                changed = ', '.join(k for k in schedule if schedule[k] != state['schedule'].get(k))
                accelerator.print(f'resume: schedule flags changed ({changed}); the lr follows the new schedule.')
            if setup.ema is not None:
                if state['ema'] is None:
                    raise ConfigError(f'{checkpoint} was trained without --model-ema; resume without it.')
                setup.ema.module.load_state_dict(state['ema'])
            accelerator.wait_for_everyone()  # every rank has found and read the checkpoint before rank 0 repairs
            if accelerator.is_main_process:
                publish(run_dir, state)
            setup.scheduler.step(state['epoch'])
    else:
        name = [args.experiment or f'{datetime.now():%Y%m%d-%H%M%S}-{args.model.replace("/", "_")}-'
                f'{setup.data_config["input_size"][-1]}']
        broadcast_object_list(name)  # every rank writes its RNG state into the same folder
        run_dir = Path(args.output) / name[0]
        if run_dir.exists():
            raise ConfigError(f'run folder {run_dir} exists; nothing was overwritten. Pass another --experiment, or '
                              f'--resume {run_dir} to continue it.')
    accelerator.wait_for_everyone()  # every rank has looked at the folder before rank 0 creates it
    if accelerator.is_main_process and not (run_dir / 'args.yaml').exists():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(run_dir / 'args.yaml', yaml.safe_dump(vars(args), sort_keys=False))
        except OSError as e:
            raise ConfigError(f'cannot write the run folder {run_dir} ({e.strerror}); pass an --output folder you '
                              f'can write to.') from e
    accelerator.wait_for_everyone()
    return run_dir, state


def fit(setup: Setup, args: argparse.Namespace, run_dir: Path, state: Dict[str, Any]) -> None:
    """ Train from `state['epoch']` to the last epoch: train, evaluate, checkpoint each epoch. A non-finite loss
    or weight stops the run before its checkpoint, so the last one stays good. """
    accelerator, ema = setup.accelerator, setup.ema
    world = accelerator.num_processes
    lower_is_better = args.eval_metric == 'loss'
    for epoch in range(state['epoch'], setup.num_epochs):
        setup.train_loader.set_epoch(epoch)
        start = time.perf_counter()
        train_metrics, state['num_updates'] = train_one_epoch(
            setup.model, setup.train_loader, setup.optimizer, setup.scheduler, setup.loss_fn, accelerator, args,
            epoch, state['num_updates'], setup.mixup, ema)
        if world > 1:  # each rank's BatchNorm saw other batches: average the running stats (timm's --dist-bn reduce)
            distribute_bn(accelerator.unwrap_model(setup.model), world, reduce=True)
            if ema is not None:
                distribute_bn(ema.module, world, reduce=True)
        val_metrics = evaluate(accelerator.unwrap_model(setup.model), setup.val_loader, accelerator,
                               args.channels_last)
        row = dict(epoch=epoch + 1, lr=setup.optimizer.param_groups[0]['lr'],
                   **{f'train_{k}': v for k, v in train_metrics.items()},
                   **{f'val_{k}': v for k, v in val_metrics.items() if k != 'count'})
        line = (f'epoch {epoch + 1}/{setup.num_epochs} lr {row["lr"]:.4g} | train loss {train_metrics["loss"]:.4f} '
                f'top1 {train_metrics["top1"]:.2f} {train_metrics["img_s"]:.0f} img/s | val ({val_metrics["count"]} '
                f'images) loss {val_metrics["loss"]:.4f} top1 {val_metrics["top1"]:.2f} top5 {val_metrics["top5"]:.2f}')
        ranked = val_metrics
        if ema is not None:
            ema_metrics = evaluate(ema.module, setup.val_loader, accelerator, args.channels_last, desc='eval ema')
            row.update({f'ema_val_{k}': v for k, v in ema_metrics.items() if k != 'count'})
            line += (f' | ema loss {ema_metrics["loss"]:.4f} top1 {ema_metrics["top1"]:.2f} '
                     f'top5 {ema_metrics["top5"]:.2f}')
            ranked = ema_metrics
        _check_finite_epoch(setup, row, epoch + 1, run_dir)
        setup.scheduler.step(epoch + 1, ranked[args.eval_metric])
        row['epoch_s'] = time.perf_counter() - start
        accelerator.print(f'{line} | {row["epoch_s"]:.1f} s', flush=True)
        young = young_batchnorm(accelerator.unwrap_model(setup.model), (epoch + 1) * len(setup.train_loader))
        if young:
            accelerator.print(young)

        state.update(
            epoch=epoch + 1, scheduler=setup.scheduler.state_dict(), ema=ema.module.state_dict() if ema else None,
            schedule=_schedule_flags(args, setup.lr, setup.updates_per_epoch),
            best=_rank_best(state['best'] if _selects(args) else [], ranked[args.eval_metric], epoch + 1,
                            args.checkpoint_hist, lower_is_better),
            summary=state['summary'] + [row])
        save_checkpoint(accelerator, run_dir, state)


def _check_finite_epoch(setup: Setup, row: Dict[str, Any], epoch: int, run_dir: Path) -> None:
    """ Stop before a diverged epoch is checkpointed: its losses and every weight (and EMA weight) must be finite. """
    def kept() -> str:  # looked up only when the run stops
        last = complete_checkpoints(run_dir)
        return f'{run_dir / "last"} (epoch {checkpoint_epoch(last[-1])}) is the last good checkpoint' if last else \
            'no checkpoint was written'

    fix = 'lower --lr, or set --clip-grad'
    losses = [k for k, v in row.items() if k.endswith('loss') and not math.isfinite(v)]
    if losses:
        raise TrainingError(f'epoch {epoch}: {losses[0]} is {row[losses[0]]} (training diverged): {fix}; {kept()}.')
    try:
        check_weights(setup.accelerator.unwrap_model(setup.model).state_dict(), f'epoch {epoch}', floating=False)
        if setup.ema is not None:
            check_weights(setup.ema.module.state_dict(), f'epoch {epoch} (EMA)', floating=False)
    except ValueError as e:
        raise TrainingError(f'{e} Training diverged: {fix}; {kept()}.') from e


def train(args: argparse.Namespace) -> nn.Module:
    """ Run training as `args` say; returns the trained model (unwrapped; identical on every rank). """
    setup = build(args)
    run_dir, state = start_or_resume(setup, args)
    accelerator = setup.accelerator
    accelerator.print(f'{setup.description} | run folder {run_dir}')
    try:
        fit(setup, args, run_dir, state)
    except Exception:
        if not args.resume and accelerator.is_main_process and not complete_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # a new run that failed before its first checkpoint: no trace
        raise
    metric, best_epoch = state['best'][0]
    accelerator.print(f'best {args.eval_metric} {metric:.4f} at epoch {best_epoch}: {run_dir / "best"}' if _selects(args)
                      else f'best = the last epoch (not chosen on {args.val_split}): {run_dir / "best"}')
    test_metrics = None
    if setup.test_loader is not None:  # once, with the weights that are exported
        best_model = copy.deepcopy(accelerator.unwrap_model(setup.model))
        best_model.load_state_dict(_best_weights(run_dir, args, state))
        test_metrics = evaluate(best_model, setup.test_loader, accelerator, args.channels_last, desc='test')
        accelerator.print(
            f'test ({args.test_split}, {test_metrics["count"]} images, best checkpoint{" EMA" if setup.ema else ""}): '
            f'loss {test_metrics["loss"]:.4f} top1 {test_metrics["top1"]:.2f} top5 {test_metrics["top5"]:.2f}')
        if accelerator.is_main_process:
            _write_atomic(run_dir / 'test.csv', _csv([dict(split=args.test_split, epoch=best_epoch, **test_metrics)]))
    if accelerator.is_main_process:
        for folder in export_hub_folders(run_dir, args, setup.num_classes, state, test_metrics):
            accelerator.print(f'Hub folder: {folder}')
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(setup.model)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """ Console entry point (`timm-dirac-train`, `train.py`): an error gives one line and exit code 2 (`--debug`:
    the traceback). """
    import timm_dirac  # noqa: F401  registers the DiracNets with timm

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    def run() -> int:
        train(parse_args(argv))
        return 0
    code = run_refusing('timm-dirac-train', run, debug)
    if code:
        sys.exit(code)


if __name__ == '__main__':
    main()
