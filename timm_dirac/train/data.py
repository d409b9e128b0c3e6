""" Training's data: the train / validation / test loaders prepared for accelerate, and the training transform

On top of the shared reading (`timm_dirac.data`), what training alone needs: streams sharded per rank and loader
worker and resumed at epoch boundaries, a hold-out of the train split that is the same on every rank, seed and resume
(fixed random images, or whole shards of a stream), splits that must share one label set, integer labels without
names trained under their indices, and the CIFAR recipe for 32 px nets, which timm's `create_transform` lacks.

A stream is checked against its index as it is read, where timm's reader reads around what disagrees (repeating or
skipping samples to fill the epoch it was told): each webdataset shard's samples are counted as its rank and loader
worker read it and compared with `_info.json` at the end of the epoch (a gather), before the epoch's checkpoint; an
evaluation stream scores exactly the samples it announced; a label outside the classes stops the run naming the
shard and key; a batch the stream cannot fill and a `--train-num-samples` above its index are refused up front.
"""
import functools
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info, random_split
from torchvision import transforms

from timm.data import create_transform
from timm.data.random_erasing import RandomErasing

from .._timm_compat import wds_pipeline, wds_split_info
from ..data import (
    EVAL_SPLITS, STREAMS, DataError, MissingSplitError, class_names_of, describe_classes, eval_transform,
    fixed_generator, fixed_subset, is_test_split, name_classes_fix, open_split, source_prefix, stream_index_size)

__all__ = ['TrainData', 'create_loaders', 'holdout_indices', 'default_workers', 'train_transform', 'is_small_input']


def holdout_indices(num_samples: int, holdout: int) -> Tuple[List[int], List[int]]:
    """ (train, held out) indices of a split of `num_samples`: `holdout` fixed random samples are set aside for
    validation, disjoint from the rest, both in dataset order and the same on every rank, seed and resume. """
    if not 0 < holdout < num_samples:
        raise DataError(f'--holdout {holdout} must be between 1 and the train split\'s {num_samples - 1} samples; '
                        f'hold out e.g. a tenth of it.')
    kept, held = random_split(range(num_samples), [num_samples - holdout, holdout], generator=fixed_generator())
    return sorted(kept), sorted(held)


# ---------------------------------------------------------------------------------------------------- streams
class _ShardCounts:
    """ The samples each shard of a webdataset split holds, counted as the loader workers read it, in shared memory
    (the workers are other processes), beside what the index says (`_info.json`'s shard_lengths, found by file name,
    so a split of some shards, e.g. a hold-out, is checked too). A shard read to its end sets its count; one that
    an epoch leaves half read (timm ends a worker's epoch at its sample count) keeps -1. """

    def __init__(self, reader, source: str, num_classes: int, unnamed: bool):
        self.root, self.source = reader.root, source
        self.files = list(reader.split_info.filenames)
        lengths = {}
        for split in (reader.info.get('splits') or {}).values():
            lengths.update(zip(split.get('filenames', ()), split.get('shard_lengths', ())))
        lengths.update(zip(reader.split_info.filenames, reader.split_info.shard_lengths or ()))
        self.expected = [lengths.get(f) for f in self.files]
        self.index = {os.path.join(self.root, f): i for i, f in enumerate(self.files)}
        self.num_classes, self.unnamed = num_classes, unnamed
        self.read = torch.full((len(self.files),), -1, dtype=torch.int64).share_memory_()

    def reset(self) -> None:
        self.read.fill_(-1)

    def install(self, pipeline) -> None:
        """ Put the counting tar stage in place of webdataset's `tarfile_to_samples` in timm's pipeline. """
        from webdataset.tariterators import tarfile_samples

        for i, stage in enumerate(pipeline.pipeline):
            if getattr(stage, 'counts', None) is self:
                return
            if getattr(stage, 'f', None) is tarfile_samples:
                counting = functools.partial(self._read_shards, handler=stage.kw.get('handler'))
                counting.counts = self
                pipeline.pipeline[i] = counting
                return
        raise RuntimeError('timm\'s webdataset pipeline has no tarfile_to_samples stage to count the shards of: '
                           'this timm version reads shards otherwise; pin the timm version of pyproject.toml.')

    def _read_shards(self, shards, handler):
        """ webdataset's `tarfile_samples`, one shard at a time, counting each and checking each label. """
        from webdataset.tariterators import tarfile_samples

        total, names = 0, []
        for shard in shards:
            count, url = 0, shard['url']
            names.append(os.path.basename(url))
            for sample in tarfile_samples(iter([shard]), handler=handler):
                self._check_label(sample, url)
                count += 1
                yield sample
            if url in self.index:
                self.read[self.index[url]] = count
            total += count
        if names and not total:  # timm's reader would end this worker's epoch early, the ranks out of step
            raise DataError(f'the shard(s) {", ".join(names)} of {self.root} hold no readable sample: replace them '
                            f'or drop them from _info.json.')

    def _check_label(self, sample: Dict[str, Any], url: str) -> None:
        """ A `.cls` label outside 0 .. classes - 1 (negative ones included, which the loss would ignore). """
        try:
            label = int(sample['cls'])
        except (KeyError, ValueError):  # timm's decoder refuses the sample, naming it
            return
        if not 0 <= label < self.num_classes:
            raise DataError(f'sample {sample.get("__key__")!r} of shard {url} has label {label}, outside the '
                            f'{self.num_classes} classes (0 to {self.num_classes - 1}) of {self.source}; fix its '
                            f'.cls{" or pass --num-classes" if self.unnamed and label > 0 else ""}.')

    def disagreements(self, read: torch.Tensor, whole: bool) -> List[str]:
        """ The shards whose count in `read` is not the index's (with `whole`, those never read to the end too). """
        wrong = []
        for file, got, want in zip(self.files, read.tolist(), self.expected):
            if want is None or got == want or (got < 0 and not whole):
                continue
            wrong.append(f'{file} {"was not read to its end" if got < 0 else f"holds {got} samples"} where the '
                         f'index says {want}')
        return wrong


class _Stream(IterableDataset):
    """ A timm stream as training reads it. Its reader's pipeline is rebuilt each epoch (without loader workers
    timm's reader keeps its sample-shuffle RNG from epoch to epoch, so a resumed epoch would be read in another
    order); the samples each loader worker yields are counted, and for a webdataset each shard's (`_ShardCounts`);
    a label outside the classes stops the run (naming the shard and key where the source has them). """

    def __init__(self, dataset, prefix: str, source: str, split: str, names: List[str], unnamed: bool,
                 workers: int):
        self.dataset, self.source, self.split = dataset, source, split
        self.num_classes, self.unnamed = len(names), unnamed
        self.shards = _ShardCounts(dataset.reader, source, len(names), unnamed) if prefix == 'wds' else None
        self.yielded = torch.zeros(max(1, workers), dtype=torch.int64).share_memory_()

    def __iter__(self):
        worker = get_worker_info()
        slot = worker.id if worker is not None else 0
        if self.shards is not None:
            self.shards.install(wds_pipeline(self.dataset.reader))
        for image, label in self.dataset:
            if self.shards is None and not 0 <= label < self.num_classes:
                raise DataError(f'a sample of split {self.split!r} of {self.source} has label {label}, outside its '
                                f'{self.num_classes} classes (0 to {self.num_classes - 1}); fix its label'
                                f'{" or pass --num-classes" if self.unnamed and label > 0 else ""}.')
            self.yielded[slot] += 1
            yield image, label

    def __len__(self) -> int:
        return len(self.dataset)

    def reset(self) -> None:
        self.yielded.zero_()
        if self.shards is not None:
            self.shards.reset()

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.dataset.reader.ds = None  # built again, from the seeds and the epoch, at the next iteration

    def check(self, accelerator, training: bool) -> None:
        """ After a pass over the stream, on every rank: each shard read to its end holds what the index says (and
        in an evaluation every shard is read whole), and an evaluation yielded the samples it announced. Training
        shards are read by every rank, an evaluation by rank 0 (accelerate deals its batches), so the counts of
        every rank are gathered. """
        shards = self.shards.read if self.shards is not None else torch.zeros(0, dtype=torch.int64)
        mine = torch.cat([shards, self.yielded.sum().view(1)]).to(accelerator.device)
        every = accelerator.gather(mine.view(1, -1)).view(accelerator.num_processes, -1).cpu()
        read = every[:, :-1].max(0).values if training else every[0, :-1]
        wrong = self.shards.disagreements(read, whole=not training) if self.shards is not None else []
        scored = int(every[0, -1])
        if (wrong or (not training and scored != len(self))) and not accelerator.is_main_process:
            raise SystemExit(2)  # every rank stops here; rank 0 names the problem, once
        if wrong:
            more = f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''
            raise DataError(f'the shards of split {self.split!r} of {self.source} are not what _info.json says: '
                            f'{"; ".join(wrong[:3])}{more}. Replace the damaged shards, or count the samples of '
                            f'each shard and fix shard_lengths and num_samples; the run stops before this epoch\'s '
                            f'checkpoint.')
        if not training and scored != len(self):
            raise DataError(f'split {self.split!r} of {self.source} gave {scored} samples where {len(self)} were '
                            f'announced: pass --val-num-samples {scored} (or the test split\'s size), or fix the '
                            f'stream\'s stated size.')


class _CheckedLoader:
    """ A prepared loader of a `_Stream` whose every pass starts with fresh counts and ends, on every rank, with
    the stream's check (`_Stream.check`), so a stream that is not what its index says stops the run at the end of
    the pass that read it: before the epoch's evaluation and checkpoint, or before a score is reported. """

    def __init__(self, loader, stream: _Stream, accelerator, training: bool):
        self.loader, self.stream, self.accelerator, self.training = loader, stream, accelerator, training

    def __iter__(self):
        self.stream.reset()
        yield from self.loader
        self.stream.check(self.accelerator, self.training)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == 'loader':  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


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
    raise DataError(f'split {split!r} of {source} has {describe_classes(other)} but {train_split!r} has '
                    f'{describe_classes(names)}: the splits must share one label set (the same class names in the '
                    f'same order); fix the class folders or labels, or pass another --val-split/--test-split.')


def _index_names(args, source: str, split: str, accelerator) -> List[str]:
    """ The classes of integer labels without names, as timm trains them: `--num-classes`, else the model's own
    class count, named by their indices (what the model card lists), said once with how to name them. """
    import timm

    count = getattr(args, 'num_classes', None) or (getattr(args, 'model_kwargs', None) or {}).get('num_classes')
    why = '--num-classes'
    if not count:  # a registered model's own classifier size (local-dir:/hf-hub: models carry theirs elsewhere)
        cfg = None if ':' in args.model else timm.models.get_pretrained_cfg(args.model)
        count, why = getattr(cfg, 'num_classes', None), f'the default of {args.model}; --num-classes N sets it'
    if not count:
        raise DataError(f'split {split!r} of {source} has integer labels without class names, and {args.model} '
                        f'has no default class count: pass --num-classes N (labels 0 to N-1). '
                        f'{name_classes_fix(source)}')
    accelerator.print(f'note: split {split!r} of {source} has integer labels without class names: training a '
                      f'{count}-class classifier ({why}); the model card lists the classes as indices 0 to '
                      f'{count - 1}. To name them: {name_classes_fix(source)}')
    return [str(i) for i in range(count)]


def _name_unnamed(names: List[str], *splits: Optional[Dataset]) -> None:
    """ Give splits with unnamed integer labels the train split's index names (they are checked against them). """
    for ds in splits:
        while isinstance(ds, Subset):
            ds = ds.dataset
        if ds is not None and ds.class_names is None:
            ds.class_names = names


def _train_transform_of(args, data_config: Dict[str, Any]) -> Callable:
    """ `train_transform` with training's augmentation flags. """
    return train_transform(
        data_config, hflip=args.hflip, scale=args.scale, ratio=args.ratio, color_jitter=args.color_jitter,
        auto_augment=args.aa, interpolation=args.train_interpolation, re_prob=args.reprob)


def _map_loaders(args, data_config, accelerator):
    """ Image folders and `hfds/`: (train, validation, test) datasets, the split validation reads, the names. """
    source = args.dataset or args.data_dir
    train_set = open_split(args.dataset, args.data_dir, args.train_split)
    names, unnamed = train_set.class_names, train_set.class_names is None
    if unnamed:
        names = _index_names(args, source, args.train_split, accelerator)
        train_set.class_names = names  # labels outside them are refused, naming the image
    train_set.transform = _train_transform_of(args, data_config)
    val_split = None
    if args.holdout:
        kept, held = holdout_indices(len(train_set), args.holdout)
        same = open_split(args.dataset, args.data_dir, args.train_split)
        same.transform = eval_transform(data_config)
        train_set, val_set = Subset(train_set, kept), Subset(same, held)
        _name_unnamed(names, val_set)
    else:
        val_set, val_split = _val_split(args, lambda split: open_split(args.dataset, args.data_dir, split), accelerator)
        val_set.transform = eval_transform(data_config)
        if unnamed:
            _name_unnamed(names, val_set)
        _check_classes(names, val_set, val_split, args.train_split, source)
    test_set = None
    if args.test_split:
        test_set = open_split(args.dataset, args.data_dir, args.test_split)
        test_set.transform = eval_transform(data_config)
        if unnamed:
            _name_unnamed(names, test_set)
        _check_classes(names, test_set, args.test_split, args.train_split, source)
    if args.train_num_samples is not None:
        if args.train_num_samples > len(train_set):
            raise DataError(f'--train-num-samples {args.train_num_samples} is more than the {len(train_set)} train '
                            f'samples of {source}: pass at most {len(train_set)}, or leave it out to train on all.')
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


def _stream_workers(reader, prefix: str, world: int, requested: Optional[int], default: int, accelerator,
                    samples: Optional[int] = None, batch_size: int = 1) -> int:
    """ Loader workers per rank for a training stream, so that each rank and worker reads its own shards and fills
    its own batches from them: the default is lowered until every reader gets a shard and its batches (and, if it
    can, until the shards split evenly); a requested count that leaves readers without shards, and a batch size
    that `samples` (the epoch) cannot fill for every reader, are refused (timm's reader would repeat samples until
    each reader's batches are full: a batch of 100,000 over 64 samples ran a machine out of memory). """
    shards = _num_shards(reader, prefix)
    fill = None if samples is None else max(1, samples // (world * batch_size))  # workers per rank the data fills
    if shards is None:
        workers = default if requested is None else requested
        if requested is None and fill is not None:
            workers = min(workers, fill)
    else:
        if prefix == 'wds' and shards < world:
            raise DataError(f'{shards} shard(s) cannot give each of the {world} processes its own: write the split in '
                            f'at least {world} shards (a multiple of the processes x workers).')
        per_rank = shards // world if (prefix == 'wds' or shards % world == 0) else shards
        if requested is not None:
            if max(1, requested) > per_rank:
                raise DataError(f'--workers {requested}: {shards} shards over {world} process(es) leave some of the '
                                f'{requested} workers per process without a shard; pass --workers {per_rank} or '
                                f'fewer.')
            workers = requested
        else:
            workers = min(default, per_rank, fill or per_rank)
            even = [w for w in range(workers, 0, -1) if shards % (world * w) == 0]
            if prefix == 'wds' and even:
                workers = even[0]
    readers = world * max(1, workers)
    if samples is not None and samples < readers * batch_size:
        fix = f'pass -b {samples // readers} or less' if samples >= readers else 'use fewer processes'
        raise DataError(f'{samples} training samples per epoch cannot fill batches of {batch_size} for each of the '
                        f'{readers} readers ({world} process(es) x {max(1, workers)} loader worker(s), each reading '
                        f'its own shards into its own batches): {fix}'
                        f'{", or fewer --workers" if workers > 1 else ""}.')
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
    the split's stated size or --train-num-samples, checked against the index and the batch before anything is
    read), the evaluation streams (read by rank 0's workers and dealt to the ranks by accelerate, each announcing
    what it scores), all as `_Stream`s; the split validation reads, the names and the loader workers. """
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
    index = stream_index_size(train_set, prefix)
    if args.train_num_samples and index and args.train_num_samples > index:
        raise DataError(f'--train-num-samples {args.train_num_samples} is more than the {index} samples of split '
                        f'{args.train_split!r} of {args.dataset} (its index): pass at most {index}, or leave it out.')
    names, unnamed = train_set.class_names, train_set.class_names is None
    if unnamed:
        names = _index_names(args, args.dataset, args.train_split, accelerator)
    epoch = train_set.reader.num_samples
    global_batch = args.batch_size * world * args.grad_accum_steps
    if epoch < global_batch:
        raise DataError(f'{epoch} training samples per epoch do not fill one global batch of {global_batch} (batch '
                        f'size {args.batch_size} x {world} processes x {args.grad_accum_steps} accumulation): lower -b.')
    workers = _stream_workers(train_set.reader, prefix, world, args.workers, default_workers, accelerator,
                              samples=epoch, batch_size=args.batch_size)
    train_set.set_loader_cfg(num_workers=workers)
    train_set.transform = _train_transform_of(args, data_config)
    stream = functools.partial(_Stream, prefix=prefix, source=args.dataset, names=names, unnamed=unnamed,
                               workers=workers)

    def open_eval(split: str, num_samples: Optional[int] = None) -> Dataset:
        ds = open_split(args.dataset, args.data_dir, split, is_training=False, num_samples=num_samples, **kwargs)
        whole = stream_index_size(ds, prefix)
        if num_samples and whole and num_samples != whole:
            raise DataError(f'--val-num-samples {num_samples}: a streamed evaluation split is read whole, and split '
                            f'{split!r} of {args.dataset} holds {whole} samples; leave --val-num-samples out.')
        # rank 0 reads the whole split once (timm's reader would split it over the ranks and pad unevenly), and
        # accelerate deals its batches to the ranks, so gather_for_metrics counts each sample once
        ds.reader.dist_rank, ds.reader.dist_num_replicas = 0, 1
        ds.transform = eval_transform(data_config)
        if unnamed and ds.class_names is None:
            ds.class_names = names
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
    return (stream(train_set, split=args.train_split), stream(val_set, split=val_split or f'{args.train_split} '
                                                                                        f'(held out)'),
            None if test_set is None else stream(test_set, split=args.test_split), val_split, names, workers)


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
    if not stream and len(train_set) < global_batch:  # a stream's epoch is checked against its index, up front
        raise DataError(f'{len(train_set)} training samples do not fill one global batch of {global_batch} (batch '
                        f'size {args.batch_size} x {world} processes x {args.grad_accum_steps} accumulation).')
    common = dict(num_workers=workers, pin_memory=accelerator.device.type == 'cuda', worker_init_fn=_ignore_sigint)
    if stream:
        train_loader = _CheckedLoader(DataLoaderShard(train_set, device=accelerator.device,
                                                      batch_size=args.batch_size, **common),
                                      train_set, accelerator, training=True)
    else:
        train_loader = accelerator.prepare(DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                                      drop_last=True, **common))

    def eval_loader(ds: Optional[Dataset]):
        if ds is None:
            return None
        loader = accelerator.prepare(DataLoader(ds, batch_size=args.validation_batch_size or args.batch_size,
                                                shuffle=False, drop_last=False, **common))
        return _CheckedLoader(loader, ds, accelerator, training=False) if stream else loader
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


