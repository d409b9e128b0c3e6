""" Training's data: the train / validation / test loaders prepared for accelerate, and the training transform

On top of the shared reading (`timm_dirac.data`), what training alone needs: streams sharded per rank and loader
worker and resumed at epoch boundaries, a hold-out of the train split that is the same on every rank, seed and resume
(fixed random images, or whole shards of a stream), splits that must share one label set, and the CIFAR recipe for
32 px nets, which timm's `create_transform` lacks.
"""
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, random_split
from torchvision import transforms

from timm.data import create_transform
from timm.data.random_erasing import RandomErasing

from .._timm_compat import wds_split_info
from ..data import (
    EVAL_SPLITS, STREAMS, DataError, MissingSplitError, class_names_of, eval_transform, fixed_generator, fixed_subset,
    is_test_split, open_split, source_prefix, unnamed_labels)

__all__ = ['TrainData', 'create_loaders', 'holdout_indices', 'default_workers', 'train_transform', 'is_small_input']


def holdout_indices(num_samples: int, holdout: int) -> Tuple[List[int], List[int]]:
    """ (train, held out) indices of a split of `num_samples`: `holdout` fixed random samples are set aside for
    validation, disjoint from the rest, both in dataset order and the same on every rank, seed and resume. """
    if not 0 < holdout < num_samples:
        raise DataError(f'--holdout {holdout} must be between 1 and the train split\'s {num_samples - 1} samples; '
                        f'hold out e.g. a tenth of it.')
    kept, held = random_split(range(num_samples), [num_samples - holdout, holdout], generator=fixed_generator())
    return sorted(kept), sorted(held)


# ------------------------------------------------------------------------------------------------- training
class _EpochStream(IterableDataset):
    """ timm's training stream, its reader's pipeline rebuilt each epoch: without loader workers timm's reader
    keeps its sample-shuffle RNG from epoch to epoch, so a resumed epoch would be read in another order. """

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.dataset.reader.ds = None  # built again, from the seeds and the epoch, at the next iteration


@dataclass
class TrainData:
    """ What training reads: loaders already prepared for `accelerator` (batches on its device; the validation and
    test loaders are sharded over the ranks with padding, so evaluate with `accelerator.gather_for_metrics`), the
    label set, and the epoch's size. Call `set_epoch(epoch)` before each epoch (a stream reshuffles its shards from
    it, so a resumed run continues at an epoch boundary with the same order). """
    train_loader: Any
    val_loader: Optional[Any]
    test_loader: Optional[Any]
    num_classes: int
    class_names: List[str]
    train_samples: int  # per epoch, all ranks together
    batches_per_epoch: int  # per rank
    val_split: Optional[str]  # the split validation reads (None: images held out of the train split)
    description: str  # one line for the run header

    def set_epoch(self, epoch: int) -> None:
        self.train_loader.set_epoch(epoch)


def _ignore_sigint(worker_id: int) -> None:
    """ Loader workers leave Ctrl-C to the training process, which ends them: a worker stopped by it first breaks
    a batch in transfer and prints a multiprocessing traceback after the run's one line. """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers(processes_per_machine: int = 1) -> int:
    """ Loader workers per process when --workers is not given: up to 4, never more than this machine's CPUs
    shared by its processes (0, i.e. loading in the training process, where they are fewer than the processes). """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return min(4, cpus // max(1, processes_per_machine))


def _check_classes(names: List[str], ds: Dataset, split: str, train_split: str, source: str) -> None:
    """ Refuse a validation or test split whose class names are not the train split's (same count, other names
    would score one class as another). """
    other = class_names_of(ds)
    if other == names:
        return
    def show(n: Optional[List[str]]) -> str:
        if n is None:
            return 'integer labels without class names'
        return f'{len(n)} classes {n[:5]}{" ..." if len(n) > 5 else ""}'
    raise DataError(f'split {split!r} of {source} has {show(other)} but {train_split!r} has {show(names)}: the '
                    f'splits must share one label set (the same class names in the same order); fix the class '
                    f'folders or labels, or pass another --val-split/--test-split.')


def _train_transform_of(args, data_config: Dict[str, Any]) -> Callable:
    """ `train_transform` with training's augmentation flags. """
    return train_transform(
        data_config, hflip=args.hflip, scale=args.scale, ratio=args.ratio, color_jitter=args.color_jitter,
        auto_augment=args.aa, interpolation=args.train_interpolation, re_prob=args.reprob)


def _map_loaders(args, data_config, accelerator):
    """ Image folders and `hfds/`: (train, validation, test) datasets, the split validation reads, the names. """
    source = args.dataset or args.data_dir
    train_set = open_split(args.dataset, args.data_dir, args.train_split)
    names = train_set.class_names
    if names is None:
        raise DataError(unnamed_labels(source, args.train_split))
    train_set.transform = _train_transform_of(args, data_config)
    val_split = None
    if args.holdout:
        kept, held = holdout_indices(len(train_set), args.holdout)
        same = open_split(args.dataset, args.data_dir, args.train_split)
        same.transform = eval_transform(data_config)
        train_set, val_set = Subset(train_set, kept), Subset(same, held)
    else:
        val_set, val_split = _val_split(args, lambda split: open_split(args.dataset, args.data_dir, split), accelerator)
        val_set.transform = eval_transform(data_config)
        _check_classes(names, val_set, val_split, args.train_split, source)
    test_set = None
    if args.test_split:
        test_set = open_split(args.dataset, args.data_dir, args.test_split)
        test_set.transform = eval_transform(data_config)
        _check_classes(names, test_set, args.test_split, args.train_split, source)
    if args.train_num_samples is not None:
        train_set = fixed_subset(train_set, args.train_num_samples, args.train_split)
    if args.val_num_samples is not None:
        val_set = fixed_subset(val_set, args.val_num_samples, val_split or args.train_split)
    return train_set, val_set, test_set, val_split, names


def _val_split(args, open_split: Callable[[str], Dataset], accelerator) -> Tuple[Dataset, str]:
    """ --val-split, or where the data lacks it, the first of EVAL_SPLITS it has other than the train split (as
    validate does), said once. """
    try:
        return open_split(args.val_split), args.val_split
    except MissingSplitError:
        for other in EVAL_SPLITS:
            if other not in (args.val_split, args.train_split):
                try:
                    ds = open_split(other)
                except MissingSplitError:
                    continue
                accelerator.print(f'note: {args.dataset or args.data_dir} has no split {args.val_split!r}: validating '
                                  f'on {other!r} (--val-split NAME, or --holdout N to choose on held-out images).')
                return ds, other
        raise


def _num_shards(reader, prefix: str) -> Optional[int]:
    if prefix == 'wds':
        return len(reader.split_info.filenames)
    if prefix == 'hfids':
        stream = reader.builder.as_streaming_dataset(split=reader.split)
        return getattr(stream, 'num_shards', None) or getattr(stream, 'n_shards', None)
    return None


def _stream_workers(reader, prefix: str, world: int, requested: Optional[int], default: int,
                    accelerator) -> int:
    """ Loader workers per rank for a training stream, so that each rank and worker reads its own shards: the
    default is lowered until every reader gets a shard (and, if it can, until the shards split evenly); a
    requested count that leaves readers without shards is refused. """
    shards = _num_shards(reader, prefix)
    if shards is None:
        return default if requested is None else requested
    if prefix == 'wds' and shards < world:
        raise DataError(f'{shards} shard(s) cannot give each of the {world} processes its own: write the split in at '
                        f'least {world} shards (a multiple of the processes x workers).')
    per_rank = shards // world if (prefix == 'wds' or shards % world == 0) else shards
    if requested is not None:
        if max(1, requested) > per_rank:
            raise DataError(f'--workers {requested}: {shards} shards over {world} process(es) leave some of the '
                            f'{requested} workers per process without a shard; pass --workers {per_rank} or fewer.')
        workers = requested
    else:
        workers = min(default, per_rank)
        even = [w for w in range(workers, 0, -1) if shards % (world * w) == 0]
        if prefix == 'wds' and even:
            workers = even[0]
    readers = world * max(1, workers)
    lengths = set(getattr(reader.split_info, 'shard_lengths', ()) or ()) if prefix == 'wds' else set()
    if prefix == 'wds' and (shards % readers or len(lengths) > 1):
        uneven = ' and differ in length' if len(lengths) > 1 else ''
        accelerator.print(f'note: the {shards} shards of {reader.split_info.name or "the split"} do not split evenly '
                          f'over {readers} readers (processes x workers){uneven}: each epoch has '
                          f'{reader.num_samples} samples, some read twice and others not at all.')
    return workers


def _wds_holdout(args) -> Tuple[str, str]:
    """ --holdout for a webdataset: fixed random whole shards of at least `holdout` samples become the validation
    split (the same on every rank, seed and resume), the others the train split, as timm's split strings. """
    split = wds_split_info(args.data_dir, args.train_split)
    files, lengths = list(split.filenames), list(split.shard_lengths)
    if not lengths:
        raise DataError(f'--holdout on wds/ holds out whole shards and needs their lengths: give split '
                        f'{args.train_split!r} shard_lengths in _info.json, or validate on a split (--val-split).')
    held, count = [], 0
    for i in torch.randperm(len(files), generator=fixed_generator()).tolist():
        if count >= args.holdout:
            break
        held.append(i)
        count += lengths[i]
    kept = sorted(set(range(len(files))) - set(held))
    if not kept:
        raise DataError(f'--holdout {args.holdout} takes every shard of {args.train_split!r} '
                        f'({sum(lengths)} samples): hold out fewer.')
    spec = lambda idx: '::'.join(files[i] for i in sorted(idx)) + f'|{sum(lengths[i] for i in idx)}'
    return spec(kept), spec(held)


def _stream_sets(args, data_config, accelerator, default_workers: int):
    """ `wds/`, `hfids/`, `tfds/`: the training stream (each rank and worker reads its own shards; the epoch has
    the split's stated size or --train-num-samples), the evaluation streams (read by rank 0's workers and dealt
    to the ranks by accelerate), the split validation reads, the names and the loader workers. """
    prefix, world = source_prefix(args.dataset), accelerator.num_processes
    kwargs = dict(seed=args.seed, download=getattr(args, 'dataset_download', False))
    train_split, val_split = args.train_split, None
    if args.holdout:
        if prefix != 'wds':
            raise DataError(f'--holdout on a {prefix}/ stream: it has no shards to hold out here; validate on a '
                            f'split (--holdout 0 --val-split NAME), or read the data with hfds/ to hold out images.')
        train_split, held_split = _wds_holdout(args)
    train_set = open_split(args.dataset, args.data_dir, train_split, is_training=True, batch_size=args.batch_size,
                      num_samples=args.train_num_samples, **kwargs)
    names = train_set.class_names
    if names is None:
        raise DataError(unnamed_labels(args.dataset, args.train_split))
    workers = _stream_workers(train_set.reader, prefix, world, args.workers, default_workers, accelerator)
    train_set.set_loader_cfg(num_workers=workers)
    train_set.transform = _train_transform_of(args, data_config)

    def open_eval(split: str, num_samples: Optional[int] = None) -> Dataset:
        ds = open_split(args.dataset, args.data_dir, split, is_training=False, num_samples=num_samples, **kwargs)
        # rank 0 reads the whole split once (timm's reader would split it over the ranks and pad unevenly), and
        # accelerate deals its batches to the ranks, so gather_for_metrics counts each sample once
        ds.reader.dist_rank, ds.reader.dist_num_replicas = 0, 1
        ds.transform = eval_transform(data_config)
        return ds

    if args.holdout:
        val_set = open_eval(held_split)
    else:
        val_set, val_split = _val_split(args, lambda split: open_eval(split, args.val_num_samples), accelerator)
        _check_classes(names, val_set, val_split, args.train_split, args.dataset)
    test_set = None
    if args.test_split:
        test_set = open_eval(args.test_split)
        _check_classes(names, test_set, args.test_split, args.train_split, args.dataset)
    return train_set, val_set, test_set, val_split, names, workers


def _main_first(accelerator, build: Callable[[], Any]) -> Any:
    """ `build()` on rank 0, then on the other ranks (so that `datasets` caches once). A refusal on rank 0 stops
    every rank, said once: the others exit with its code 2 quietly instead of failing at a barrier rank 0 never
    reaches (accelerate's main_process_first would leave them there). """
    from accelerate.utils import broadcast_object_list

    result, failed, error = None, [False], None
    if accelerator.is_main_process:
        try:
            result = build()
        except Exception as e:  # noqa: BLE001  re-raised below, after the other ranks know
            failed, error = [True], e
    if accelerator.num_processes > 1:
        broadcast_object_list(failed)  # every rank waits here for rank 0's verdict
    if failed[0]:
        if error is not None:
            raise error
        raise SystemExit(2)  # rank 0 names the problem
    return result if accelerator.is_main_process else build()


def create_loaders(args, data_config: Dict[str, Any], accelerator) -> TrainData:
    """ The training, validation and test loaders of `args` (timm's data flags: dataset, data_dir, train/val/test
    split, holdout, train/val_num_samples, dataset_download, workers, batch sizes, augmentation), prepared for
    `accelerator`: do not pass them to `accelerator.prepare` again.

    Map-style data (image folders, `hfds/`) goes through `accelerator.prepare` (a seeded shuffle sharded over the
    ranks; evaluation padded to whole batches, which `gather_for_metrics` drops). A training stream is not: timm's
    reader already gives each rank and loader worker its own shards (accelerate would read it on every rank or
    on rank 0 alone), so its loader is accelerate's device-placing `DataLoaderShard` around it, and
    `TrainData.set_epoch` sets the reader's epoch. Built on rank 0 first (`_main_first`).
    """
    from accelerate.data_loader import DataLoaderShard

    world = accelerator.num_processes
    local = int(os.environ.get('LOCAL_WORLD_SIZE', world))
    workers = args.workers if args.workers is not None else default_workers(local)
    stream = source_prefix(args.dataset) in STREAMS
    if stream:  # the stream's shards may call for fewer workers
        train_set, val_set, test_set, val_split, names, workers = _main_first(
            accelerator, lambda: _stream_sets(args, data_config, accelerator, default_workers(local)))
    else:
        train_set, val_set, test_set, val_split, names = _main_first(
            accelerator, lambda: _map_loaders(args, data_config, accelerator))
    if len(names) < 2:
        raise DataError(f'split {args.train_split!r} has {len(names)} class: a classifier needs at least 2 (every '
                        f'prediction would be right); check the dataset\'s label column or class folders.')
    if getattr(args, 'num_classes', None) is not None and args.num_classes != len(names):
        raise DataError(f'--num-classes {args.num_classes} disagrees with the dataset, which has {len(names)} '
                        f'classes; drop --num-classes or fix it.')
    global_batch = args.batch_size * world * args.grad_accum_steps
    epoch_samples = len(train_set) * (world if stream else 1)
    if epoch_samples < global_batch:
        raise DataError(f'{epoch_samples} training samples do not fill one global batch of {global_batch} '
                        f'(batch size {args.batch_size} x {world} processes x {args.grad_accum_steps} accumulation).')
    common = dict(num_workers=workers, pin_memory=accelerator.device.type == 'cuda', worker_init_fn=_ignore_sigint)
    if stream:
        train_loader = DataLoaderShard(_EpochStream(train_set), device=accelerator.device, batch_size=args.batch_size,
                                       **common)
    else:
        train_loader = accelerator.prepare(DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                                      drop_last=True, **common))
    eval_loader = lambda ds: None if ds is None else accelerator.prepare(DataLoader(  # noqa: E731
        ds, batch_size=args.validation_batch_size or args.batch_size, shuffle=False, drop_last=False, **common))
    batches = len(train_loader)
    train_samples = batches * args.batch_size * world
    val_what = (f'{len(val_set)} images held out of {args.train_split}' if val_split is None else
                f'{len(val_set)} images of {val_split}')
    if val_split is not None and is_test_split(val_split):
        val_what += ' (shown only: best = the last epoch; choose on held-out images with --holdout)'
    description = (f'{train_samples} train images, validation on {val_what}'
                   f'{f", {args.test_split} scored at the end" if test_set is not None else ""} | {args.train_split} '
                   f'of {args.dataset or args.data_dir}{", streamed" if stream else ""}, {workers} loader workers per '
                   f'process')
    return TrainData(train_loader, eval_loader(val_set), eval_loader(test_set), len(names), names,
                     train_samples, batches, val_split, description)


# ------------------------------------------------------------------------------------------------ transforms
def is_small_input(data_config: Dict[str, Any]) -> bool:
    """ CIFAR-sized inputs (<= 64 px) train with the CIFAR recipe instead of random-resized crops. """
    return max(data_config['input_size'][-2:]) <= 64


def train_transform(
        data_config: Dict[str, Any],
        hflip: float = 0.5,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3. / 4., 4. / 3.),
        color_jitter: float = 0.,
        auto_augment: Optional[str] = None,
        interpolation: str = 'random',
        re_prob: float = 0.,
) -> Callable:
    """ Training transform: the CIFAR recipe (pad size/8 reflect, random crop, flip, optional colour jitter and
    random erasing; ours because timm's `create_transform` has no pad-and-crop) for inputs <= 64 px, else timm's
    `create_transform` (random-resized crop, flip, colour jitter, optional Auto/RandAugment, random erasing). """
    mean, std = data_config['mean'], data_config['std']
    if is_small_input(data_config):
        if auto_augment:
            raise DataError(
                f"--aa applies to the timm transforms of inputs > 64 px; this {data_config['input_size'][-1]} px "
                f"model trains with the CIFAR recipe (pad, crop, flip, optional --reprob): leave it unset.")
        size = data_config['input_size'][-2:]
        jitter = [transforms.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
        # timm's random erasing with its defaults (one box, 2-33% of the image, filled with zeros after normalising)
        erasing = [RandomErasing(re_prob, device='cpu')] if re_prob else []
        return transforms.Compose([
            transforms.Resize(size),  # a no-op for images already at the model's size
            transforms.RandomCrop(size, padding=size[-1] // 8, padding_mode='reflect'),
            transforms.RandomHorizontalFlip(hflip),
            *jitter,
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
            *erasing,
        ])
    return create_transform(
        data_config['input_size'], is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
        color_jitter=color_jitter, auto_augment=auto_augment, interpolation=interpolation, mean=mean, std=std,
        re_prob=re_prob)


