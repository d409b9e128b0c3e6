""" Train DiracNets (or any timm model) with accelerate, from one CPU to many GPU nodes

    python train.py --config train_configs/quick_cifar10.yaml [--resume output/train/<run>]
    accelerate launch --multi_gpu --num_processes 8 train.py --config train_configs/diracnet28_10_cifar10.yaml

Four stages, as accelerate's `complete_cv_example.py`: `build`, `start_or_resume`, `fit` (train, evaluate, checkpoint
each epoch), `export` (the best checkpoint scored once in fp32, written as Hub folders). The engine is accelerate's,
the pieces timm's; ours is what neither gives: checkpoints that are verified and survive a kill (`checkpoints`), a
choice of `best` that never sees the test split, a way back from SIGTERM and from a process that ended, resumes that
say what they change, and one-line refusals.
"""
import argparse
import contextlib
import copy
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

import timm
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn

from ..data import DataError, Images, hub_dataset_id, is_test_split
from ..errors import run_refusing
from ..loading import check_weights, load_checkpoint_file
from ..deploy.qat import merge_qat, prepare_qat
from .data import TrainData, create_loaders
from .args import ConfigError, args_yaml, build_parser, check_args, parse_args, read_config
from .checkpoints import (
    CheckpointError, checkpoint_name, checkpoint_position, complete_checkpoints, create_run_folder, describe_checkpoint,
    find_resume_checkpoint, load_checkpoint, lock_run_folder, publish, rank_best, save_checkpoint, saved_processes,
    to_csv, verify_checkpoint, write_atomic)
from .loop import (
    SIGTERM_EXIT_CODE, Preempted, RankWatch, StopSignal, build_optimizer, evaluate, make_accelerator, pick_precision,
    train_one_epoch, workers_leave_sigterm, young_batchnorm)

__all__ = ['main', 'parse_args', 'build_parser', 'train', 'build', 'run_folder', 'start_or_resume', 'fit', 'export',
           'evaluate', 'train_one_epoch', 'build_optimizer', 'pick_precision', 'young_batchnorm', 'save_checkpoint',
           'ConfigError', 'CheckpointError', 'TrainingError', 'Interrupted', 'ProcessLost', 'Resume']

METRICS = ('loss', 'top1', 'top5')  # the evaluation's numbers, in summary.csv's column order
# flags that define what a run trains on: a resume with other values would silently train another run
RUN_FLAGS = ('model', 'model_kwargs', 'num_classes', 'img_size', 'input_size', 'diracify', 'diracify_layers', 'qat',
             'dataset', 'data_dir', 'train_split', 'val_split', 'holdout', 'train_num_samples', 'val_num_samples',
             'seed', 'model_ema', 'eval_metric')
DATA_PATHS = ('dataset', 'data_dir')  # may change where the data is recognised as the same (`_data_identity`)
NOT_COMPARED = ('config', 'resume', 'debug', 'output', 'experiment')  # how and where, not what a run trains
GRACE_SAVE_S = 20  # a checkpoint at SIGTERM when the last save took at most this: schedulers give about 30 s
SIZE_NOTE_FACTOR = 3  # a note when the model's input and the data's images differ in size by this factor or more


class TrainingError(RuntimeError):
    """ Training cannot go on (e.g. the loss became NaN); the run folder keeps its last good checkpoint. """


class ProcessLost(ConnectionError):
    """ Another process of the run ended or stopped answering; the message names it and the run to resume. """


class Interrupted(KeyboardInterrupt):
    """ Ctrl-C (exit code 130) or SIGTERM (143) during a run; the message names the run to resume. `quiet`: another
    process of the machine says it. """

    def __init__(self, message: str = '', code: int = 130, quiet: bool = False):
        super().__init__(message)
        self.code, self.quiet = code, quiet


@dataclass
class Resume:
    """ What `--resume` continues, read before anything is built: the run folder, its newest checkpoint (None: it
    has none yet), its args.yaml (empty if missing) and the number of processes that wrote the checkpoint. """
    run_dir: Path
    checkpoint: Optional[Path]
    saved: Dict[str, Any]
    processes: int
    notes: List[str] = field(default_factory=list)  # what the resume changes, said once and recorded in args.yaml
    adjusted: Tuple[str, ...] = ()  # flags set to keep the global batch on another process count (said in a note)


@dataclass
class Setup:
    """ Everything `train` builds before the first epoch. """
    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_epochs: int
    data: TrainData
    loss_fn: nn.Module
    mixup: Optional[Mixup]
    ema: Optional[ModelEmaV3]
    data_config: Dict[str, Any]
    lr: float
    updates_per_epoch: int
    description: str
    watch: Optional[RankWatch] = None  # with several processes: which of them still answer


# ------------------------------------------------------------------------------------------------------ build
def create_model(args: argparse.Namespace, num_classes: Optional[int], verbose: bool = False,
                 start: bool = True) -> nn.Module:
    """ The model of `args` (from its starting weights with `start`), diracified if asked. """
    # an initial checkpoint goes through timm's pretrained loader: our checkpoint filter, classifier/in_chans adaption
    weights = dict(pretrained=args.pretrained and start)
    if args.initial_checkpoint and start:
        weights = dict(pretrained=True, pretrained_cfg_overlay=_initial_checkpoint_cfg(args.model,
                                                                                       args.initial_checkpoint))
    model = timm.create_model(args.model, num_classes=num_classes, drop_rate=args.drop, **weights,
                              **args.model_kwargs)
    model.pretrained_cfg.pop('state_dict', None)
    if args.diracify:
        from ..diracify import diracify
        try:
            model = diracify(model, args.diracify_layers, verbose=verbose,
                             from_pretrained=bool(args.pretrained or args.initial_checkpoint))
        except ValueError as e:
            raise ConfigError(f'--diracify: {e}') from e
    return model


def _initial_checkpoint_cfg(model_name: str, path: str) -> Dict[str, Any]:
    """ The pretrained cfg overlay that loads the weights file `path` (read safely, finite): with the size of the
    file's own classifier, since timm's loader keeps a classifier only where the model's class count is the cfg's
    (it would drop a 10-class file's head from a model whose registered weights have 1000). """
    state_dict = load_checkpoint_file(path)
    check_weights(state_dict, path, floating=False)
    overlay = dict(file=path, state_dict=state_dict)
    classifiers = getattr(timm.models.get_pretrained_cfg(model_name), 'classifier', None) or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    sizes = {state_dict[f'{name}.weight'].shape[0] for name in classifiers if f'{name}.weight' in state_dict}
    if len(sizes) == 1:
        overlay['num_classes'] = sizes.pop()
    return overlay


def read_resume(args: argparse.Namespace) -> Resume:
    """ The run `--resume` names, its newest checkpoint, args.yaml and process count; refuses `--epochs` below the
    epochs the run has done before anything is built. """
    run_dir, checkpoint = find_resume_checkpoint(args.resume)
    saved: Dict[str, Any] = {}
    if (run_dir / 'args.yaml').is_file():
        try:  # bounded as a config is: its values are compared and printed
            saved = read_config(str(run_dir / 'args.yaml'))[1]
        except ConfigError as e:
            raise CheckpointError(f'cannot read {run_dir / "args.yaml"} ({e}); restore it from a copy, or delete it to '
                                  f'resume with the flags given.') from e
    done = checkpoint_position(checkpoint)[0] if checkpoint is not None else 0
    if done > args.epochs:
        raise ConfigError(f'--epochs {args.epochs}: {run_dir} has done {done} epochs ({checkpoint.name}); pass '
                          f'--epochs {done} or more to resume it (its args.yaml says {saved.get("epochs", "?")}).')
    return Resume(run_dir, checkpoint, saved, saved_processes(checkpoint) if checkpoint else 0)


def _keep_global_batch(args: argparse.Namespace, resume: Resume, world: int) -> None:
    """ A resume on another number of processes than its checkpoint's keeps the run's global batch, and with it the
    lr, the schedule and the position inside an epoch: -b (never above the run's) and --grad-accum-steps are set so
    that batch x processes x accumulation is as before; refused, naming both counts, where the new count cannot
    split it. A -b or --grad-accum-steps given anew sets a new global batch instead (a change like any other). A
    checkpoint inside an epoch continues only where the new global batch divides the samples it has done. """
    was, saved = resume.processes, resume.saved
    b0, a0 = saved.get('batch_size'), saved.get('grad_accum_steps', 1)
    if not was or not isinstance(b0, int) or not isinstance(a0, int):
        return
    if was != world and (args.batch_size, args.grad_accum_steps) == (b0, a0):
        global_batch = b0 * a0 * was
        if global_batch % world:
            raise ConfigError(f'--resume {resume.run_dir}: the run trained on {was} process(es) with a global batch '
                              f'of {global_batch} (-b {b0} x {was} x {a0} accumulation), which {world} processes '
                              f'cannot share evenly: resume on a number of processes that divides {global_batch} (it '
                              f'was {was}), or pass -b N for a new global batch.')
        share = global_batch // world
        accum = max(1, -(-share // b0))
        while share % accum:
            accum += 1
        args.batch_size, args.grad_accum_steps = share // accum, accum
        resume.adjusted = ('batch_size', 'grad_accum_steps')
        resume.notes.append(
            f'{world} process(es) instead of {was}: the global batch stays {global_batch} (-b {args.batch_size} x '
            f'{world} x {accum} accumulation, was -b {b0} x {was} x {a0}); the data and augmentation are dealt to the '
            f'processes otherwise than in an uninterrupted run')
    epochs, batches = checkpoint_position(resume.checkpoint)
    step = args.batch_size * world
    if batches and (batches * b0 * was) % step:
        raise ConfigError(f'--resume {resume.run_dir}: {resume.checkpoint.name} stopped {batches * b0 * was} samples '
                          f'into epoch {epochs + 1} (-b {b0} x {was} process(es)), which steps of -b {args.batch_size} '
                          f'x {world} do not reach: resume it with -b {b0} on {was} process(es) (or another count '
                          f'that keeps the global batch).')


def _image_size_note(data: TrainData, data_config: Dict[str, Any]) -> str:
    """ A note when the model's input size is SIZE_NOTE_FACTOR or more from the size of the data's first image (e.g.
    224 px on 32 px images: every image upscaled 7x, about 49x the compute), else ''. Map-style data only. """
    ds = data.train_loader.dataset
    while hasattr(ds, 'indices') and hasattr(ds, 'dataset'):  # Subsets (hold-out, --train-num-samples)
        ds = ds.dataset
    if not isinstance(ds, Images) or not len(ds):
        return ''
    transform, ds.transform = ds.transform, None
    try:
        image, _ = ds[0]
    finally:
        ds.transform = transform
    model_px, data_px = max(data_config['input_size'][-2:]), max(image.size)
    if max(model_px / data_px, data_px / model_px) < SIZE_NOTE_FACTOR:
        return ''
    how = 'upscaled' if model_px > data_px else 'downscaled'
    return (f'note: the model takes {model_px} px inputs and the data\'s images are {data_px} px: each is {how} '
            f'{max(model_px, data_px) / min(model_px, data_px):.0f}x (pass --img-size {data_px}, or a model made for '
            f'{data_px} px such as the diracnet*_cifar ones, if that is not meant).')


def build(args: argparse.Namespace, resume: Optional[Resume] = None) -> Setup:
    """ Accelerator, model, data, optimizer, schedule, loss and EMA, seeded as a run (and its resume) needs them. """
    from accelerate.utils import set_seed

    check_args(args)
    accelerator = make_accelerator(args)
    world = accelerator.num_processes
    watch = RankWatch(accelerator.process_index, world) if world > 1 else None
    if resume is not None and resume.checkpoint is not None:
        _keep_global_batch(args, resume, world)
        accelerator.gradient_accumulation_steps = args.grad_accum_steps
    set_seed(args.seed)  # the model first, the same on every rank; its cfg gives the data transforms
    model = create_model(args, args.num_classes, verbose=accelerator.is_main_process)
    data_config = resolve_data_config(dict(img_size=args.img_size, input_size=args.input_size), model=model)
    data = create_loaders(args, data_config, accelerator)  # prepared loaders, the data checks made
    workers_leave_sigterm(data.train_loader, data.val_loader, data.test_loader)  # SIGTERM stops at a step instead
    size_note = _image_size_note(data, data_config) if accelerator.is_local_main_process else ''
    if size_note:
        accelerator.print(size_note)
    args.val_split = data.val_split or args.val_split  # the split validation reads when the data lacks --val-split
    if model.num_classes != data.num_classes:
        model.reset_classifier(data.num_classes)
    if args.qat:
        try:
            model = prepare_qat(model)
        except ValueError as e:
            raise ConfigError(f'--qat: {e}') from e
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    global_batch = args.batch_size * world * args.grad_accum_steps
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    optimizer = build_optimizer(model, args, lr)
    mixup = None
    if args.mixup or args.cutmix:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=data.num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    if ema is not None:
        ema.to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    updates_per_epoch = math.ceil(data.batches_per_epoch / args.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, cooldown_epochs=0,
        updates_per_epoch=updates_per_epoch)
    set_seed(args.seed, device_specific=True)  # different augmentation per rank
    description = (
        f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {data.num_classes} classes, '
        f'input {tuple(data_config["input_size"])} | {data.description} | {world} process(es) on '
        f'{accelerator.device} | global batch {args.batch_size} x {world} x {args.grad_accum_steps} = {global_batch}, '
        f'lr {lr:g}')
    return Setup(accelerator, model, optimizer, scheduler, num_epochs, data, loss_fn, mixup, ema, data_config, lr,
                 updates_per_epoch, description, watch)


# -------------------------------------------------------------------------------------------- start or resume
def _recorded(args: argparse.Namespace) -> Dict[str, Any]:
    """ `args` as the run's args.yaml records them (tuples as lists). """
    return yaml.safe_load(args_yaml(args))


def _check_same_run(resume: Resume, args: argparse.Namespace) -> Tuple[List[str], bool]:
    """ A resume's flags against the run's args.yaml: the flags that define what the run trains (RUN_FLAGS) must be
    the run's, but for the data's paths where the data is the same (returned True: `_check_same_data` decides once
    the checkpoint is read); every other change is accepted and returned, as 'flag old -> new'. """
    saved, now = resume.saved, _recorded(args)
    changed = [k for k in now if k in saved and k not in NOT_COMPARED and saved[k] != now[k]]
    fixed = [k for k in changed if k in RUN_FLAGS and k not in DATA_PATHS]
    if fixed:
        flags = ', '.join(f'--{k.replace("_", "-")} {saved[k]!r} (now {now[k]!r})' for k in fixed)
        raise ConfigError(f'--resume {resume.run_dir}: the run was started with {flags}; resume with the values of '
                          f'the run (see its args.yaml), or start a new run for the new ones.')
    changes = [f'--{k.replace("_", "-")} {saved[k]!r} -> {now[k]!r}' for k in changed if k not in resume.adjusted]
    return changes, any(k in DATA_PATHS for k in changed)


def _data_identity(data: TrainData, world: int) -> Dict[str, Any]:
    """ What the run's data is, wherever it lies: its class names and the sample counts of the splits it reads
    (whole, before a hold-out or --train-num-samples takes its part). """
    from torch.utils.data import IterableDataset

    def count(loader) -> Optional[int]:
        if loader is None:
            return None
        ds = loader.dataset
        while hasattr(ds, 'indices') and hasattr(ds, 'dataset'):  # Subsets
            ds = ds.dataset
        try:  # a training stream's length is one process's share
            return len(ds) * (world if loader is data.train_loader and isinstance(ds, IterableDataset) else 1)
        except TypeError:
            return None
    return dict(class_names=list(data.class_names), train=count(data.train_loader),
                validation=count(data.val_loader), test=count(data.test_loader))


def _check_same_data(setup: Setup, resume: Resume, args: argparse.Namespace, state: Dict[str, Any]) -> None:
    """ The data at a new --dataset / --data-dir is taken for the run's own (staged to local disk, say) where it is
    recognised by what it is (`_data_identity`, which the checkpoint records); refused otherwise. """
    now = _recorded(args)
    paths = ', '.join(f'--{k.replace("_", "-")} {resume.saved.get(k)!r} (now {now[k]!r})' for k in DATA_PATHS
                      if resume.saved.get(k) != now[k])
    recorded, found = state.get('data'), _data_identity(setup.data, setup.accelerator.num_processes)
    if recorded is None:
        raise ConfigError(f'--resume {resume.run_dir}: the run read {paths}, and {resume.checkpoint.name} does not '
                          f'record what that data was (an earlier timm-dirac wrote it): put the data back at the '
                          f'run\'s path (a symlink will do) to resume, or start a new run.')
    if recorded != found:
        differ = '; '.join(f'{k}: {_short(recorded.get(k))} in the run, {_short(found[k])} now' for k in found
                           if recorded.get(k) != found[k])
        raise ConfigError(f'--resume {resume.run_dir}: the run read {paths}, which holds other data ({differ}); resume '
                          f'with the run\'s data, or start a new run.')
    resume.notes.append(f'the data is read from another place ({paths}), recognised as the run\'s by its class names '
                        f'and sample counts')


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f'{len(value)} classes {value[:3]} ...'
    return f'{len(value)} classes {value}' if isinstance(value, list) else repr(value)


def _scored_metric(row: Dict[str, Any], args: argparse.Namespace) -> float:
    return row[f'{"ema_" if args.model_ema else ""}val_{args.eval_metric}']


def run_folder(setup: Setup, args: argparse.Namespace, resume: Optional[Resume] = None
               ) -> Tuple[Path, Optional[Path]]:
    """ The run folder and the checkpoint to continue from: `--resume`'s (its flags checked against args.yaml), or
    a new folder, made whole with its args.yaml now, so that an unwritable --output fails before any training. """
    from accelerate.utils import broadcast_object_list

    if args.resume:
        resume = resume or read_resume(args)
        return resume.run_dir, resume.checkpoint
    name = [args.experiment or f'{datetime.now():%Y%m%d-%H%M%S}-{args.model.replace("/", "_")}-'
            f'{setup.data_config["input_size"][-1]}']
    broadcast_object_list(name)  # every rank writes its RNG state into the same folder
    run_dir = Path(args.output) / name[0]
    setup.accelerator.wait_for_everyone()  # every rank has looked for the folder before rank 0 creates it
    if setup.accelerator.is_main_process:
        create_run_folder(run_dir, args_yaml(args))
    setup.accelerator.wait_for_everyone()
    return run_dir, None


def start_or_resume(setup: Setup, args: argparse.Namespace, run_dir: Path, checkpoint: Optional[Path],
                    resume: Optional[Resume] = None) -> Dict[str, Any]:
    """ The training state to go on from: epoch 0, or `checkpoint`'s, every kept checkpoint of the run verified
    (the export reads the best), and the folder's `last`, `best` and summary.csv repaired from it. What the resume
    changes (flags, process count, the data's place) is said once and recorded in args.yaml. """
    accelerator = setup.accelerator
    if args.resume and resume is None:
        resume = read_resume(args)
    changes, data_moved = _check_same_run(resume, args) if resume is not None and resume.saved else ([], False)
    if accelerator.is_main_process and not (run_dir / 'args.yaml').is_file():  # left empty by a kill, or copied
        write_atomic(run_dir / 'args.yaml', args_yaml(args))
    if checkpoint is None:
        if args.resume:
            accelerator.print(f'resume: {run_dir} has no checkpoint yet; the run starts from epoch 1.')
            _record_changes(accelerator, args, run_dir, resume, changes)
        return dict(epoch=0, num_updates=0, best=[], summary=[])
    if accelerator.is_main_process:
        for kept in complete_checkpoints(run_dir)[:-1]:
            verify_checkpoint(kept)
    state = load_checkpoint(accelerator, checkpoint)
    accelerator.step = 0  # a checkpoint is written after an optimizer update: no accumulation is under way
    if data_moved:
        _check_same_data(setup, resume, args, state)
    best = [b for b in state['best'] if (run_dir / f'checkpoint-{b[1]}').is_dir()]
    if best != state['best']:  # a damaged best checkpoint was moved out: choose among those left
        state['best'] = best or [(_scored_metric(state['summary'][-1], args), state['epoch'])]
        accelerator.print(f'resume: best checkpoint(s) gone; best is now checkpoint-{state["best"][0][1]}.')
    schedule = _schedule_flags(args, setup.lr, setup.updates_per_epoch)
    if state['schedule'] == schedule:
        setup.scheduler.load_state_dict(state['scheduler'])
    else:  # e.g. more --epochs: the new flags define the schedule from here on
        changed = ', '.join(k for k in schedule if schedule[k] != state['schedule'].get(k))
        accelerator.print(f'resume: schedule flags changed ({changed}); the lr follows the new schedule.')
    if setup.ema is not None:
        setup.ema.module.load_state_dict(state['ema'])
    if state.get('partial'):
        accelerator.print(f'resume: {describe_checkpoint(checkpoint)} continues at the sample after the '
                          f'{state["partial"]["samples"]} its epoch has trained on.')
    accelerator.wait_for_everyone()  # every rank has read the checkpoint before rank 0 repairs the folder
    if accelerator.is_main_process:
        publish(run_dir, state)
    _record_changes(accelerator, args, run_dir, resume, changes)
    setup.scheduler.step(state['epoch'])
    return state


def _record_changes(accelerator, args: argparse.Namespace, run_dir: Path, resume: Optional[Resume],
                    changes: List[str]) -> None:
    """ Say once what a resume changes and record it in args.yaml: the new values, and a comment line (kept with
    those of earlier resumes) naming the change. """
    said = (resume.notes if resume is not None else []) + ([f'flags changed: {", ".join(changes)}'] if changes else [])
    if not said:
        return
    accelerator.print(f'resume: {"; ".join(said)} (recorded in {run_dir / "args.yaml"}).')
    if accelerator.is_main_process:
        try:
            earlier = [line[2:] for line in (run_dir / 'args.yaml').read_text(encoding='utf-8').splitlines()
                       if line.startswith('# ')]
        except (OSError, UnicodeDecodeError):
            earlier = []
        where = resume.checkpoint.name if resume.checkpoint is not None else 'no checkpoint'
        note = f'resumed {datetime.now():%Y-%m-%d %H:%M} from {where}: {"; ".join(said)}'
        write_atomic(run_dir / 'args.yaml', args_yaml(args, earlier + [note]))


def _schedule_flags(args: argparse.Namespace, lr: float, updates_per_epoch: int) -> Dict[str, Any]:
    """ What defines the lr schedule; a resumed run restores the scheduler state only if these are unchanged. """
    keys = ('sched', 'epochs', 'decay_milestones', 'decay_epochs', 'decay_rate', 'warmup_epochs', 'warmup_lr',
            'min_lr')
    return dict(lr=lr, updates_per_epoch=updates_per_epoch, **{k: getattr(args, k) for k in keys})


# -------------------------------------------------------------------------------------------------------- fit
def fit(setup: Setup, args: argparse.Namespace, run_dir: Path, state: Dict[str, Any],
        stop: Optional[StopSignal] = None) -> None:
    """ Train from `state['epoch']` (and inside it from `state['partial']`: a checkpoint written at SIGTERM) to the
    last epoch: train, evaluate, checkpoint each epoch. A non-finite loss or weight stops the run before its
    checkpoint, so the last one stays good. With `stop`, SIGTERM stops the run at the next step (`_save_at_signal`)
    or, arriving during evaluation or a save, after that epoch's checkpoint; `Preempted` is raised then. """
    accelerator, ema, data = setup.accelerator, setup.ema, setup.data
    world = accelerator.num_processes
    save_s: Optional[float] = None  # how long this session's last checkpoint save took
    with stop.deferred() if stop is not None else contextlib.nullcontext():
        for epoch in range(state['epoch'], setup.num_epochs):
            data.set_epoch(epoch)
            partial = state.pop('partial', None)
            loader, skipped, totals, before_s = data.train_loader, 0, None, 0.
            if partial:  # a resume at the sample SIGTERM stopped at: skip the batches this epoch has trained on
                skipped = partial['samples'] // (args.batch_size * world)
                loader, totals, before_s = accelerator.skip_first_batches(loader, skipped), partial['totals'], \
                    partial['seconds']
            start = time.perf_counter() - before_s
            try:
                train_metrics, state['num_updates'] = train_one_epoch(
                    setup.model, loader, setup.optimizer, setup.scheduler, setup.loss_fn, accelerator, args,
                    epoch, state['num_updates'], setup.mixup, ema, stop=stop, skipped=skipped, totals=totals)
            except Preempted as stopped:
                _save_at_signal(setup, args, run_dir, state, stopped, save_s, time.perf_counter() - start)
                raise
            if world > 1:  # each rank's BatchNorm saw other batches: average the running stats (timm's --dist-bn)
                distribute_bn(accelerator.unwrap_model(setup.model), world, reduce=True)
                if ema is not None:
                    distribute_bn(ema.module, world, reduce=True)
            _check_finite_epoch(setup, train_metrics['loss'], epoch + 1, run_dir)  # a diverged model is not evaluated
            val = evaluate(accelerator.unwrap_model(setup.model), data.val_loader, accelerator, args.channels_last)
            row = dict(epoch=epoch + 1, lr=setup.optimizer.param_groups[0]['lr'],
                       **{f'train_{k}': v for k, v in train_metrics.items()},
                       **{f'val_{k}': val[k] for k in METRICS})
            line = (f'epoch {epoch + 1}/{setup.num_epochs} lr {row["lr"]:.4g} | train loss '
                    f'{train_metrics["loss"]:.4f} top1 {train_metrics["top1"]:.2f} {train_metrics["img_s"]:.0f} img/s '
                    f'| val ({val["count"]} images) loss {val["loss"]:.4f} top1 {val["top1"]:.2f} top5 '
                    f'{val["top5"]:.2f}')
            if ema is not None:
                ema_val = evaluate(ema.module, data.val_loader, accelerator, args.channels_last, desc='eval ema')
                row.update({f'ema_val_{k}': ema_val[k] for k in METRICS})
                line += f' | ema loss {ema_val["loss"]:.4f} top1 {ema_val["top1"]:.2f} top5 {ema_val["top5"]:.2f}'
            metric = _scored_metric(row, args)
            setup.scheduler.step(epoch + 1, metric)
            row['epoch_s'] = time.perf_counter() - start
            accelerator.print(f'{line} | {row["epoch_s"]:.1f} s', flush=True)
            young = young_batchnorm(accelerator.unwrap_model(setup.model), (epoch + 1) * data.batches_per_epoch)
            if young:
                accelerator.print(young)
            state.update(
                epoch=epoch + 1, scheduler=setup.scheduler.state_dict(), ema=ema.module.state_dict() if ema else None,
                schedule=_schedule_flags(args, setup.lr, setup.updates_per_epoch), data=_data_identity(data, world),
                best=rank_best(state['best'] if _selects(args) else [], metric, epoch + 1, args.checkpoint_hist,
                               args.eval_metric == 'loss'),
                summary=state['summary'] + [row])
            saving = time.perf_counter()
            save_checkpoint(accelerator, run_dir, state)
            save_s = time.perf_counter() - saving
            if stop is not None and epoch + 1 < setup.num_epochs and stop.requested(accelerator):
                raise Preempted()


def _save_at_signal(setup: Setup, args: argparse.Namespace, run_dir: Path, state: Dict[str, Any],
                    stopped: Preempted, save_s: Optional[float], seconds: float) -> None:
    """ SIGTERM inside an epoch of map-style data: a checkpoint at this step (`checkpoint-<epochs>-step<batches>`),
    which a resume continues at the next sample (accelerate's `skip_first_batches`), where it fits a scheduler's
    grace period (this session's last save took at most GRACE_SAVE_S; a kill during the save leaves the checkpoint
    before intact). A stream, whose readers cannot skip to a sample, continues at the epoch's start. """
    from torch.utils.data import IterableDataset

    accelerator, world = setup.accelerator, setup.accelerator.num_processes
    last = complete_checkpoints(run_dir)
    kept = f'{describe_checkpoint(last[-1])} is kept' if last else 'no checkpoint is kept'
    epoch = state['epoch'] + 1
    if isinstance(setup.data.train_loader.dataset, IterableDataset):
        accelerator.print(f'SIGTERM: stopped at batch {stopped.batches} of epoch {epoch}; {kept} (a stream resumes '
                          f'at an epoch\'s start).')
        return
    if save_s is not None and save_s > GRACE_SAVE_S:
        accelerator.print(f'SIGTERM: stopped at batch {stopped.batches} of epoch {epoch}; {kept} (the last save took '
                          f'{save_s:.0f} s, more than the {GRACE_SAVE_S} s that fit in a scheduler\'s usual grace '
                          f'period after SIGTERM).')
        return
    try:
        _check_finite_epoch(setup, stopped.totals[0] / max(stopped.totals[2], 1), epoch, run_dir)
    except TrainingError as e:
        accelerator.print(f'SIGTERM: stopped at batch {stopped.batches} of epoch {epoch}, not saved ({e})')
        return
    ema = setup.ema
    state.update(num_updates=stopped.num_updates, scheduler=setup.scheduler.state_dict(),
                 ema=ema.module.state_dict() if ema else None, data=_data_identity(setup.data, world),
                 schedule=_schedule_flags(args, setup.lr, setup.updates_per_epoch),
                 partial=dict(batches=stopped.batches, samples=stopped.batches * args.batch_size * world,
                              totals=stopped.totals, seconds=seconds))
    before = f'{describe_checkpoint(last[-1])} stays' if last else 'no checkpoint is left'
    accelerator.print(f'SIGTERM: stopped at batch {stopped.batches} of epoch {epoch}; saving '
                      f'{checkpoint_name(state)} (if the save is cut short, {before}).', flush=True)
    save_checkpoint(accelerator, run_dir, state)


def _check_finite_epoch(setup: Setup, train_loss: float, epoch: int, run_dir: Path) -> None:
    """ Stop before a diverged epoch is evaluated and checkpointed: its training loss and every weight (and EMA
    weight) must be finite. """
    def kept() -> str:  # looked up only when the run stops
        last = complete_checkpoints(run_dir)
        return f'{run_dir / "last"} ({describe_checkpoint(last[-1])}) is the last good checkpoint' if last else \
            'no checkpoint was written'

    fix = 'lower --lr, or set --clip-grad'
    if not math.isfinite(train_loss):
        raise TrainingError(f'epoch {epoch}: train_loss is {train_loss} (training diverged): {fix}; {kept()}.')
    try:
        check_weights(setup.accelerator.unwrap_model(setup.model).state_dict(), f'epoch {epoch}', floating=False)
        if setup.ema is not None:
            check_weights(setup.ema.module.state_dict(), f'epoch {epoch} (EMA)', floating=False)
    except ValueError as e:
        raise TrainingError(f'{e} Training diverged: {fix}; {kept()}.') from e


def _val_name(args: argparse.Namespace) -> str:
    """ What the per-epoch validation runs on, e.g. '1000 images held out of train' or 'validation'. """
    if not args.holdout:
        return args.val_split
    return f'{min(args.holdout, args.val_num_samples or args.holdout)} images held out of {args.train_split}'


def _selects(args: argparse.Namespace) -> bool:
    """ Whether `best` is chosen on the validation metric; never on a test split, where `best` is the last epoch. """
    return bool(args.holdout) or not is_test_split(args.val_split)


# ----------------------------------------------------------------------------------------------------- export
def _new_name(path: Path) -> Path:
    """ `path`, or with a -1, -2, ... suffix where it exists: an earlier export is never overwritten. """
    suffix, out = 1, path
    while out.exists():
        out, suffix = path.with_name(f'{path.stem}-{suffix}{path.suffix}'), suffix + 1
    return out


def export(setup: Setup, args: argparse.Namespace, run_dir: Path, state: Dict[str, Any], trained: bool
           ) -> List[Path]:
    """ The best checkpoint (verified; its EMA weights with --model-ema), scored once in fp32 on --test-split (else
    on the validation images), as `test.csv` and, for a DiracNet, Hub folders in train form and folded. A run that
    trained in this call writes them (next to an earlier export, with a suffix); a finished run resumed writes only
    those missing, and says so if none is. """
    from safetensors.torch import load_file

    from ..diracnet import DiracNet
    from ..hub.folder import save_hub_folder

    accelerator, data = setup.accelerator, setup.data
    epoch = state['best'][0][1]
    model = create_model(args, data.num_classes, start=False)
    dirac = isinstance(model, DiracNet)  # the model card and the folding are DiracNet's
    model = prepare_qat(model) if args.qat else model
    test = data.test_loader is not None
    outputs = [run_dir / 'test.csv'] if test else []
    outputs += [run_dir / f'hub-{form}' for form in (('folded',) if args.qat else ('train', 'folded'))] if dirac else []
    outputs = [_new_name(p) for p in outputs] if trained else [p for p in outputs if not p.exists()]
    if not outputs:
        if not trained:
            accelerator.print(f'{run_dir} is finished (epoch {state["epoch"]} of {setup.num_epochs}) and exported; '
                              f'nothing to do (pass more --epochs to train on).')
        return []
    best_dir = run_dir / f'checkpoint-{epoch}'
    verify_checkpoint(best_dir)
    model.load_state_dict(torch.load(best_dir / 'train_state.pt', map_location='cpu', weights_only=True)['ema']
                          if args.model_ema else load_file(best_dir / 'model.safetensors'))
    model.to(accelerator.device)
    loader, split = (data.test_loader, args.test_split) if test else (data.val_loader, _val_name(args))
    metrics = evaluate(model, loader, accelerator, args.channels_last, desc='score', fp32=True)
    accelerator.print(
        f'{"test" if test else "best"} ({split}, {metrics["count"]} images, best checkpoint'
        f'{" EMA" if setup.ema else ""}, fp32): loss {metrics["loss"]:.4f} top1 {metrics["top1"]:.2f} '
        f'top5 {metrics["top5"]:.2f}')
    written = []
    if accelerator.is_main_process:
        model.cpu()
        chosen = (f'timm-dirac-train, epoch {epoch} of {args.epochs}{" (EMA weights)" if args.model_ema else ""}, '
                  f'{f"chosen on {_val_name(args)}" if _selects(args) else "the last epoch"}, scored '
                  f'{f"once on {split}" if test else f"on {split}"} in fp32')
        info = dict(  # this run's own facts: the model's default tag describes other weights (see hub.published_cfg)
            dataset=hub_dataset_id(args.dataset), data=args.dataset or args.data_dir, license='apache-2.0',
            metrics={k: round(metrics[k], 4) for k in ('top1', 'top5', 'loss')},
            eval_split=split, metrics_source=chosen, epochs=args.epochs, recipe=args.config or None)
        for out in outputs:
            if out.name.startswith('test'):
                write_atomic(out, to_csv([dict(split=split, epoch=epoch, **metrics)]))
                continue
            net = model
            if out.name.startswith('hub-folded') and args.qat:  # the fake-quantized split model merges into int8's
                net = merge_qat(model)
            elif out.name.startswith('hub-folded'):
                net = copy.deepcopy(model).eval()
                net.reparameterize()
            written.append(save_hub_folder(net, out, train_info=info, label_names=data.class_names))
        for folder in written:
            accelerator.print(f'Hub folder: {folder}')
    accelerator.wait_for_everyone()
    return written


# ------------------------------------------------------------------------------------------------------- main
def _where_to_resume(run_dir: Optional[Path]) -> str:
    last = complete_checkpoints(run_dir) if run_dir is not None and run_dir.is_dir() else []
    if not last:
        return f'{run_dir} has no checkpoint yet: continue with --resume {run_dir} and the same flags' \
            if run_dir is not None and run_dir.is_dir() else 'no checkpoint was written: run the command again'
    return (f'{run_dir} keeps {describe_checkpoint(last[-1])}: continue with --resume {run_dir} and the same flags '
            f'(its args.yaml holds them: --config {run_dir / "args.yaml"} --resume {run_dir})')


def _interrupted(setup: Setup, run_dir: Optional[Path], error: KeyboardInterrupt) -> Interrupted:
    """ Ctrl-C or SIGTERM as one line naming the run to resume, said by each machine's first process. """
    sigterm = isinstance(error, Preempted)
    how = 'stopped by SIGTERM' if sigterm else 'interrupted'
    return Interrupted(f'{how}; {_where_to_resume(run_dir)}.', SIGTERM_EXIT_CODE if sigterm else 130,
                       quiet=not setup.accelerator.is_local_main_process)


def _process_lost(setup: Setup, args: argparse.Namespace, error: Exception, run_dir: Optional[Path]
                  ) -> Optional[str]:
    """ For an error of a collective (torch.distributed reports a peer that ended as `Connection reset by peer`, one
    that hangs as a timeout): the line that names the processes that stopped answering and the run to resume; ''
    where a lower process says it; None where every process answers and nothing timed out (another error). """
    watch, cause = setup.watch, error.__cause__
    if watch is None or isinstance(error, (TrainingError, ConfigError, DataError)) or not (
            isinstance(error, RuntimeError) or isinstance(cause, RuntimeError)):
        return None
    silent = watch.silent()
    timed_out = any('timed out' in str(e).lower() or 'timeout' in str(e).lower() for e in (error, cause) if e)
    world = setup.accelerator.num_processes
    where = _where_to_resume(run_dir)
    if silent is None:
        return (f'the processes of this run can no longer reach each other (nor their rendezvous store, which '
                f'rank 0\'s machine holds: it may have ended); {where}.')
    if not silent:
        if not timed_out:
            return None
        return (f'a collective waited more than --dist-timeout {args.dist_timeout:g} s while every process still '
                f'answers (one worked alone longer, e.g. rank 0 preparing data the others wait for): raise '
                f'--dist-timeout; {where}.')
    if watch.rank != min(r for r in range(world) if r not in silent):
        return ''
    names = ', '.join(f'rank {r}' + (f' (on {host})' if host else '') for r, host in silent.items())
    what = (f'did not answer within --dist-timeout {args.dist_timeout:g} s (its process ended or hangs; raise '
            f'--dist-timeout if it was only slow)' if timed_out else 'stopped answering (its process ended or hangs)')
    return f'{names} of the run\'s {world} processes {what}; {where}.'


def train(args: argparse.Namespace) -> nn.Module:
    """ Run training as `args` say; returns the trained model (unwrapped; identical on every rank). Ctrl-C raises
    `Interrupted` (code 130) at once; SIGTERM stops every process at its next step (code 143), with a checkpoint
    there for map-style data; a process that ends or hangs stops the others with `ProcessLost` naming it. Each says
    the run to resume. """
    with StopSignal() as stop:
        resume = read_resume(args) if args.resume else None
        setup = build(args, resume)
        accelerator = setup.accelerator
        run_dir: Optional[Path] = None
        try:
            run_dir, checkpoint = run_folder(setup, args, resume)
            with lock_run_folder(run_dir) if accelerator.is_main_process else contextlib.nullcontext():  # rank 0's
                try:
                    state = start_or_resume(setup, args, run_dir, checkpoint, resume)
                    accelerator.print(f'{setup.description} | run folder {run_dir}')
                    trained = state['epoch'] < setup.num_epochs
                    fit(setup, args, run_dir, state, stop)
                    metric, best_epoch = state['best'][0]
                    accelerator.print(f'best {args.eval_metric} {metric:.4f} at epoch {best_epoch}: {run_dir / "best"}'
                                      if _selects(args) else
                                      f'best = the last epoch (not chosen on {args.val_split}): {run_dir / "best"}')
                    export(setup, args, run_dir, state, trained)
                except Exception:
                    if not args.resume and accelerator.is_main_process and not complete_checkpoints(run_dir):
                        shutil.rmtree(run_dir, ignore_errors=True)  # a new run that failed before its first checkpoint
                    raise
        except KeyboardInterrupt as e:
            raise _interrupted(setup, run_dir, e) from None
        except Exception as e:
            with stop.deferred():  # the launcher's SIGTERM to the processes left must not cut this short
                lost = _process_lost(setup, args, e, run_dir)
            if lost is None:
                raise
            if not lost:
                raise SystemExit(2) from None  # a lower process names the one lost
            raise ProcessLost(lost) from e
    return accelerator.unwrap_model(setup.model)


TRAIN_EXTRA = ('training needs the train extra (accelerate, datasets, webdataset): pip install "timm-dirac[train]" '
               '(in a clone: pip install -e ".[train]")')


def main(argv: Optional[Sequence[str]] = None) -> None:
    """ Console entry point (`timm-dirac-train`, `train.py`): an error gives one line and exit code 2 (`--debug`,
    on the command line or in the config: the traceback); Ctrl-C one line naming the run to resume (exit 130),
    SIGTERM the same after stopping at the next step (exit 143, as `accelerate launch` exits on it). """
    import timm_dirac  # noqa: F401  registers the DiracNets with timm

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import accelerate  # noqa: F401
    except ImportError:
        print(f'timm-dirac-train: error: {TRAIN_EXTRA}.', file=sys.stderr)
        sys.exit(2)
    parsed: List[argparse.Namespace] = []
    code = run_refusing('timm-dirac-train', lambda: parsed.append(parse_args(argv)), '--debug' in argv)
    if not code:
        try:
            code = run_refusing('timm-dirac-train', lambda: train(parsed[0]) is None, parsed[0].debug)
        except KeyboardInterrupt as e:
            sigterm = isinstance(e, Preempted)
            code = getattr(e, 'code', SIGTERM_EXIT_CODE if sigterm else 130)
            if not getattr(e, 'quiet', False):
                how = 'stopped by SIGTERM' if sigterm else 'interrupted'
                print(f'timm-dirac-train: {str(e) or f"{how} before the run folder was made; nothing to resume."}',
                      file=sys.stderr)
    if code:
        sys.exit(code)


if __name__ == '__main__':
    main()
