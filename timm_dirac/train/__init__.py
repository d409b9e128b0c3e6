""" Train DiracNets (or any timm model) with accelerate, from one CPU to many GPU nodes

    python train.py --config train_configs/quick_cifar10.yaml [--resume output/train/<run>]
    accelerate launch --multi_gpu --num_processes 8 train.py --config train_configs/diracnet28_10_cifar10.yaml

Four stages, as accelerate's `complete_cv_example.py`: `build`, `start_or_resume`, `fit` (train, evaluate, checkpoint
each epoch), `export` (the best checkpoint scored once in fp32, written as Hub folders). The engine is accelerate's,
the pieces timm's; ours is what neither gives: checkpoints that are verified and survive a kill (`checkpoints`), a
choice of `best` that never sees the test split, and one-line refusals.
"""
import argparse
import contextlib
import copy
import math
import shutil
import sys
import time
from dataclasses import dataclass
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

from ..data import hub_dataset_id, is_test_split
from ..errors import run_refusing
from ..loading import check_weights, load_checkpoint_file
from ..deploy.qat import merge_qat, prepare_qat
from .data import TrainData, create_loaders
from .args import ConfigError, build_parser, check_args, parse_args
from .checkpoints import (
    CheckpointError, complete_checkpoints, checkpoint_epoch, create_run_folder, find_resume_checkpoint,
    load_checkpoint, lock_run_folder, publish, rank_best, save_checkpoint, to_csv, verify_checkpoint, write_atomic)
from .loop import build_optimizer, evaluate, make_accelerator, pick_precision, train_one_epoch, young_batchnorm

__all__ = ['main', 'parse_args', 'build_parser', 'train', 'build', 'run_folder', 'start_or_resume', 'fit', 'export',
           'evaluate', 'train_one_epoch', 'build_optimizer', 'pick_precision', 'young_batchnorm', 'save_checkpoint',
           'ConfigError', 'CheckpointError', 'TrainingError', 'Interrupted']

METRICS = ('loss', 'top1', 'top5')  # the evaluation's numbers, in summary.csv's column order
# flags that define what a run trains on: a resume with other values would silently train another run
RUN_FLAGS = ('model', 'model_kwargs', 'num_classes', 'img_size', 'input_size', 'diracify', 'diracify_layers', 'qat',
             'dataset', 'data_dir', 'train_split', 'val_split', 'holdout', 'train_num_samples', 'val_num_samples',
             'seed', 'model_ema', 'eval_metric')


class TrainingError(RuntimeError):
    """ Training cannot go on (e.g. the loss became NaN); the run folder keeps its last good checkpoint. """


class Interrupted(KeyboardInterrupt):
    """ Ctrl-C during a run; the message names the run to resume. """


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


def build(args: argparse.Namespace) -> Setup:
    """ Accelerator, model, data, optimizer, schedule, loss and EMA, seeded as a run (and its resume) needs them. """
    from accelerate.utils import set_seed

    check_args(args)
    accelerator = make_accelerator(args)
    world = accelerator.num_processes
    set_seed(args.seed)  # the model first, the same on every rank; its cfg gives the data transforms
    model = create_model(args, args.num_classes, verbose=accelerator.is_main_process)
    data_config = resolve_data_config(dict(img_size=args.img_size, input_size=args.input_size), model=model)
    data = create_loaders(args, data_config, accelerator)  # prepared loaders, the data checks made
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
                 updates_per_epoch, description)


# -------------------------------------------------------------------------------------------- start or resume
def _check_same_run(run_dir: Path, args: argparse.Namespace) -> None:
    """ Refuse a resume whose flags would train another run than the one in `run_dir` (its args.yaml). """
    try:
        saved = yaml.safe_load((run_dir / 'args.yaml').read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f'cannot read {run_dir / "args.yaml"} ({type(e).__name__}); restore it from a copy, '
                              f'or delete it to resume with the flags given.') from e
    now = yaml.safe_load(yaml.safe_dump(vars(args)))  # tuples as lists, as in the file
    changed = [k for k in RUN_FLAGS if isinstance(saved, dict) and k in saved and saved[k] != now[k]]
    if changed:
        flags = ', '.join(f'--{k.replace("_", "-")} {saved[k]!r} (now {now[k]!r})' for k in changed)
        raise ConfigError(f'--resume {run_dir}: the run was started with {flags}; resume with the values of the run '
                          f'(see its args.yaml), or start a new run for the new ones.')


def _scored_metric(row: Dict[str, Any], args: argparse.Namespace) -> float:
    return row[f'{"ema_" if args.model_ema else ""}val_{args.eval_metric}']


def run_folder(setup: Setup, args: argparse.Namespace) -> Tuple[Path, Optional[Path]]:
    """ The run folder and the checkpoint to continue from: `--resume`'s (its flags checked against args.yaml), or
    a new folder, made whole with its args.yaml now, so that an unwritable --output fails before any training. """
    from accelerate.utils import broadcast_object_list

    if args.resume:
        run_dir, checkpoint = find_resume_checkpoint(args.resume)
        if (run_dir / 'args.yaml').is_file():
            _check_same_run(run_dir, args)
        return run_dir, checkpoint
    name = [args.experiment or f'{datetime.now():%Y%m%d-%H%M%S}-{args.model.replace("/", "_")}-'
            f'{setup.data_config["input_size"][-1]}']
    broadcast_object_list(name)  # every rank writes its RNG state into the same folder
    run_dir = Path(args.output) / name[0]
    setup.accelerator.wait_for_everyone()  # every rank has looked for the folder before rank 0 creates it
    if setup.accelerator.is_main_process:
        create_run_folder(run_dir, yaml.safe_dump(vars(args), sort_keys=False))
    setup.accelerator.wait_for_everyone()
    return run_dir, None


def start_or_resume(setup: Setup, args: argparse.Namespace, run_dir: Path, checkpoint: Optional[Path]
                    ) -> Dict[str, Any]:
    """ The training state to go on from: epoch 0, or `checkpoint`'s, every kept checkpoint of the run verified
    (the export reads the best), and the folder's `last`, `best` and summary.csv repaired from it. """
    accelerator = setup.accelerator
    if accelerator.is_main_process and not (run_dir / 'args.yaml').is_file():  # left empty by a kill, or copied
        write_atomic(run_dir / 'args.yaml', yaml.safe_dump(vars(args), sort_keys=False))
    if checkpoint is None:
        if args.resume:
            accelerator.print(f'resume: {run_dir} has no checkpoint yet; the run starts from epoch 1.')
        return dict(epoch=0, num_updates=0, best=[], summary=[])
    if accelerator.is_main_process:
        for kept in complete_checkpoints(run_dir)[:-1]:
            verify_checkpoint(kept)
    state = load_checkpoint(accelerator, checkpoint)
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
    accelerator.wait_for_everyone()  # every rank has read the checkpoint before rank 0 repairs the folder
    if accelerator.is_main_process:
        publish(run_dir, state)
    setup.scheduler.step(state['epoch'])
    return state


def _schedule_flags(args: argparse.Namespace, lr: float, updates_per_epoch: int) -> Dict[str, Any]:
    """ What defines the lr schedule; a resumed run restores the scheduler state only if these are unchanged. """
    keys = ('sched', 'epochs', 'decay_milestones', 'decay_epochs', 'decay_rate', 'warmup_epochs', 'warmup_lr',
            'min_lr')
    return dict(lr=lr, updates_per_epoch=updates_per_epoch, **{k: getattr(args, k) for k in keys})


# -------------------------------------------------------------------------------------------------------- fit
def fit(setup: Setup, args: argparse.Namespace, run_dir: Path, state: Dict[str, Any]) -> None:
    """ Train from `state['epoch']` to the last epoch: train, evaluate, checkpoint each epoch. A non-finite loss
    or weight stops the run before its checkpoint, so the last one stays good. """
    accelerator, ema, data = setup.accelerator, setup.ema, setup.data
    world = accelerator.num_processes
    for epoch in range(state['epoch'], setup.num_epochs):
        data.set_epoch(epoch)
        start = time.perf_counter()
        train_metrics, state['num_updates'] = train_one_epoch(
            setup.model, data.train_loader, setup.optimizer, setup.scheduler, setup.loss_fn, accelerator, args,
            epoch, state['num_updates'], setup.mixup, ema)
        if world > 1:  # each rank's BatchNorm saw other batches: average the running stats (timm's --dist-bn reduce)
            distribute_bn(accelerator.unwrap_model(setup.model), world, reduce=True)
            if ema is not None:
                distribute_bn(ema.module, world, reduce=True)
        _check_finite_epoch(setup, train_metrics['loss'], epoch + 1, run_dir)  # a diverged model is not evaluated
        val = evaluate(accelerator.unwrap_model(setup.model), data.val_loader, accelerator, args.channels_last)
        row = dict(epoch=epoch + 1, lr=setup.optimizer.param_groups[0]['lr'],
                   **{f'train_{k}': v for k, v in train_metrics.items()},
                   **{f'val_{k}': val[k] for k in METRICS})
        line = (f'epoch {epoch + 1}/{setup.num_epochs} lr {row["lr"]:.4g} | train loss {train_metrics["loss"]:.4f} '
                f'top1 {train_metrics["top1"]:.2f} {train_metrics["img_s"]:.0f} img/s | val ({val["count"]} images) '
                f'loss {val["loss"]:.4f} top1 {val["top1"]:.2f} top5 {val["top5"]:.2f}')
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
            schedule=_schedule_flags(args, setup.lr, setup.updates_per_epoch),
            best=rank_best(state['best'] if _selects(args) else [], metric, epoch + 1, args.checkpoint_hist,
                           args.eval_metric == 'loss'),
            summary=state['summary'] + [row])
        save_checkpoint(accelerator, run_dir, state)


def _check_finite_epoch(setup: Setup, train_loss: float, epoch: int, run_dir: Path) -> None:
    """ Stop before a diverged epoch is evaluated and checkpointed: its training loss and every weight (and EMA
    weight) must be finite. """
    def kept() -> str:  # looked up only when the run stops
        last = complete_checkpoints(run_dir)
        return f'{run_dir / "last"} (epoch {checkpoint_epoch(last[-1])}) is the last good checkpoint' if last else \
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
            dataset=hub_dataset_id(args.dataset), license='apache-2.0',
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
def train(args: argparse.Namespace) -> nn.Module:
    """ Run training as `args` say; returns the trained model (unwrapped; identical on every rank). """
    setup = build(args)
    accelerator = setup.accelerator
    run_dir, checkpoint = run_folder(setup, args)
    with lock_run_folder(run_dir) if accelerator.is_main_process else contextlib.nullcontext():  # rank 0 holds it
        state = start_or_resume(setup, args, run_dir, checkpoint)
        accelerator.print(f'{setup.description} | run folder {run_dir}')
        trained = state['epoch'] < setup.num_epochs
        try:
            fit(setup, args, run_dir, state)
            metric, best_epoch = state['best'][0]
            accelerator.print(f'best {args.eval_metric} {metric:.4f} at epoch {best_epoch}: {run_dir / "best"}'
                              if _selects(args) else
                              f'best = the last epoch (not chosen on {args.val_split}): {run_dir / "best"}')
            export(setup, args, run_dir, state, trained)
        except KeyboardInterrupt:
            kept = f'keeps its checkpoints up to epoch {state["epoch"]}' if state['epoch'] else 'has no checkpoint yet'
            raise Interrupted(f'interrupted; {run_dir} {kept}: continue with --resume {run_dir} and the same '
                              f'flags.') from None
        except Exception:
            if not args.resume and accelerator.is_main_process and not complete_checkpoints(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)  # a new run that failed before its first checkpoint
            raise
    return accelerator.unwrap_model(setup.model)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """ Console entry point (`timm-dirac-train`, `train.py`): an error gives one line and exit code 2 (`--debug`,
    on the command line or in the config: the traceback); Ctrl-C one line naming the run to resume (exit 130). """
    import timm_dirac  # noqa: F401  registers the DiracNets with timm

    argv = list(sys.argv[1:] if argv is None else argv)
    parsed: List[argparse.Namespace] = []
    code = run_refusing('timm-dirac-train', lambda: parsed.append(parse_args(argv)), '--debug' in argv)
    if not code:
        try:
            code = run_refusing('timm-dirac-train', lambda: train(parsed[0]) is None, parsed[0].debug)
        except KeyboardInterrupt as e:
            print(f'timm-dirac-train: {e or "interrupted before the run folder was made; nothing to resume."}',
                  file=sys.stderr)
            code = 130
    if code:
        sys.exit(code)


if __name__ == '__main__':
    main()
