""" Datasets, transforms and loaders: every source is read through timm's `create_dataset`

Sources, with timm's names: image folders (`--data-dir <root>/<split>/<class>/<image>`, timm's split synonyms),
`hfds/<Hub id or local folder>` (Hugging Face `datasets`, random access; the split may be a slice such as
`test[:500]`), and the streams `wds/<name>` (webdataset tar shards in `--data-dir`, with `_info.json`),
`hfids/<Hub id or local folder>` (`datasets` streaming) and `tfds/<name>` (where tensorflow-datasets is installed).
Training (`create_loaders`) and evaluation (`load_eval_split`: validate, export, quantize, benchmark) read the
same datasets.

What we add to timm's readers, in a thin layer: an unreadable image stops the run naming it (timm's readers skip it
with a warning and count another image twice), 16-bit images are scaled to 8 bits (PIL's convert clips them), and
training refuses splits whose class names differ (not only their counts) or are unknown (integer labels).

Transforms: 32 px nets (input <= 64 px) get the CIFAR recipe timm lacks (pad 4 reflect, random crop, flip);
larger nets get timm's `create_transform`. Mean, std, size and crop come from the model's pretrained_cfg.

Model selection never sees the test split: `--holdout N` sets aside fixed random images of the train split (for a
webdataset stream: fixed random whole shards of at least N samples) for validation, the same on every rank, seed
and resume, and the test split is scored once, at the end.
"""
import io
import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torchvision import transforms

from timm.data import create_dataset, create_transform
from timm.data.random_erasing import RandomErasing

__all__ = [
    'CLASS_LABEL_FIX', 'DataError', 'MissingSplitError', 'Images', 'TrainData', 'create_loaders', 'default_workers',
    'to_rgb', 'load_split', 'load_eval_split', 'is_datasets_folder', 'fixed_subset', 'holdout_indices',
    'is_test_split', 'label_names', 'hub_dataset_id', 'train_transform', 'eval_transform']

EVAL_SPLITS = ('validation', 'test')  # an evaluation without a named split reads the first of these the data has
STREAMS = ('wds', 'hfids', 'tfds')  # timm's iterable readers: shards read in order, no random access


class DataError(ValueError):
    """ Bad data input (missing path, unknown split, unreadable image, ...); the message names the fix. """


class MissingSplitError(DataError):
    """ The data has no split of the asked name (the evaluation split fallback tries the next one). """


CLASS_LABEL_FIX = ("Give the label column its class names, e.g. dataset.cast_column('label', "
                   "datasets.ClassLabel(names=[...])).save_to_disk(folder), and use hfds/<folder>.")


def to_rgb(image: Image.Image) -> Image.Image:
    """ `image` as 8-bit RGB. 16-bit and 32-bit integer images (16-bit PNGs open as mode I;16 or I) are scaled to
    8 bits: PIL's own convert('RGB') clips them, which turns most of a 16-bit image white. """
    if image.mode.startswith('I'):
        import numpy as np
        pixels = np.asarray(image).astype(np.float64)
        top = 65535. if image.mode.startswith('I;16') or pixels.max() > 255 else 255.
        image = Image.fromarray(np.clip(np.rint(pixels * (255. / top)), 0, 255).astype(np.uint8), mode='L')
    return image.convert('RGB')


# ------------------------------------------------------------------------------------------------- one split
def _prefix(dataset: str) -> str:
    prefix, sep, _ = (dataset or '').partition('/')
    return prefix.lower() if sep else ''


class Images(Dataset):
    """ A map-style timm dataset (`ImageDataset` of an image folder or `hfds/`), decoded here instead of by timm:
    an unreadable image raises DataError naming it (timm skips it and returns the next image in its place), a
    label outside the class list raises too. `class_names` is None for integer labels without names. """

    def __init__(self, dataset, source: str, split: str, class_names: Optional[List[str]],
                 transform: Optional[Callable] = None):
        dataset.load_bytes = True  # timm hands over the file's bytes, we decode them (to_rgb) and name failures
        dataset._max_retries = 1  # a file that cannot be read at all fails here too, not as the next one
        self.dataset, self.source, self.split = dataset, source, split
        self.class_names = class_names
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, index: int) -> str:
        """ The image file of sample `index`, or its row for a `datasets` split whose images are embedded. """
        try:
            name = self.dataset.filename(index, absolute=True)
        except Exception:  # noqa: BLE001  readers without file names
            name = None
        return f'image file {name}' if name else f'image {index} of split {self.split!r} of {self.source}'

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        try:
            data, label = self.dataset[index]
            image = to_rgb(Image.open(io.BytesIO(data)))
        except Exception as e:  # PIL, datasets and the OS raise many types for a bad image
            raise DataError(f'cannot read {self.where(index)} ({e}); replace or delete it.') from e
        if self.class_names is not None and not 0 <= label < len(self.class_names):
            raise DataError(f'{self.where(index)} has label {label}, outside the {len(self.class_names)} classes of '
                            f'{self.source}; fix its label.')
        return (self.transform(image) if self.transform else image), label


def _raise_on_skipped_sample(record: logging.LogRecord) -> bool:
    """ A logging filter on timm's webdataset reader, which skips an undecodable sample with a warning: stop
    instead, naming the shard folder (webdataset reports the error, not the sample). """
    if record.getMessage().startswith('Handling webdataset error'):
        raise DataError(f'cannot read a sample of a webdataset shard ({record.getMessage()}); replace or drop it.')
    return True


logging.getLogger('timm.data.readers.reader_wds').addFilter(_raise_on_skipped_sample)


def _open(dataset: str, data_dir: Optional[str], split: str, **stream_kwargs) -> Dataset:
    """ timm's `create_dataset` for one split, its failures as DataError naming the fix (MissingSplitError for a
    split the data does not have). Map-style sources come back as `Images`, streams as timm's IterableImageDataset
    with `class_names` set (None where unknown). """
    prefix, name = _prefix(dataset), (dataset or '').partition('/')[2] if _prefix(dataset) else ''
    if dataset and not prefix and dataset != 'folder':
        raise DataError(f'unknown --dataset {dataset!r}: use hfds/<Hub id or local folder>, hfids/..., wds/<name> '
                        f'with --data-dir <shard folder>, or leave it empty and pass --data-dir with image folders.')
    if prefix and prefix not in ('hfds', 'hfids', 'wds', 'tfds'):
        raise DataError(f'unknown --dataset prefix {prefix!r} in {dataset!r}: use hfds/, hfids/, wds/ or tfds/.')
    if prefix in ('hfds', 'hfids'):
        if not name:
            raise DataError(f'--dataset {dataset} names no dataset: pass {prefix}/<Hub id or local folder>.')
        path = os.path.expanduser(name)
        if path.startswith(('/', '.', '~')) and not os.path.isdir(path):
            raise DataError(f'dataset folder {path} does not exist; check --dataset {prefix}/<Hub id or local folder>.')
        dataset = f'{prefix}/{path}'
    elif prefix == 'wds' and not (data_dir and os.path.isdir(data_dir)):
        raise DataError(f'--dataset {dataset} reads the webdataset shards in --data-dir: pass the shard folder '
                        f'(with _info.json), got {data_dir!r}.')
    elif not prefix:
        if not data_dir:
            raise DataError('no data given: pass --dataset hfds/<Hub id or local folder> or --data-dir <folder '
                            'with train/ and val/ image folders>.')
        if not os.path.isdir(data_dir):
            raise DataError(f'--data-dir {data_dir} does not exist.')
        from timm.data.dataset_factory import _search_split  # timm's split synonyms (val, valid, eval, ...)
        if os.path.normpath(_search_split(data_dir, split)) == os.path.normpath(data_dir):
            raise MissingSplitError(f'no folder for split {split!r} in {data_dir}; pass the folder name as the split '
                                    f'(--split, or --train-split/--val-split in training).')
    try:
        ds = create_dataset(dataset or '', root=data_dir, split=split, **stream_kwargs)
    except ImportError as e:
        raise DataError(f'--dataset {dataset} needs a package that is not installed ({e}); '
                        f'pip install "timm-dirac[train]".') from e
    except (ValueError, RuntimeError, KeyError, AssertionError, FileNotFoundError, ConnectionError, OSError) as e:
        text = str(e)
        if 'split' in text.lower() and ('unknown' in text.lower() or 'not found' in text.lower()):
            raise MissingSplitError(f'dataset {dataset or data_dir} has no split {split!r} ({text}); pass one it has '
                                    f'(--split, or --train-split/--val-split in training).') from e
        if 'num_samples' in text or 'length is unknown' in text.lower():
            raise DataError(f'the stream {dataset} does not state the size of split {split!r}: pass its sample '
                            f'count (--train-num-samples / --val-num-samples N).') from e
        if 'Found 0 images' in text:
            raise DataError(f'no images in the {split!r} folder of {data_dir}: {text}') from e
        raise DataError(f'cannot load dataset {dataset or data_dir!r} split {split!r}: {type(e).__name__}: {text} '
                        f'(a local folder? relative paths count from the working directory, or in a config from '
                        f'the config file\'s folder).') from e
    if prefix in STREAMS:
        splits = ds.reader.builder.info.splits if prefix == 'hfids' else None
        try:
            if splits and split not in splits:
                raise ValueError(f'it has {", ".join(splits)}')
            ds.class_names = _stream_class_names(ds.reader, prefix, name)  # hfids: opens the split
        except ValueError as e:  # datasets: "Bad split: ..."
            raise MissingSplitError(f'dataset {dataset} has no split {split!r} ({e}); pass one it has '
                                    f'(--train-split/--val-split/--test-split).') from e
        return ds
    mapping = ds.reader.class_to_idx
    names = sorted(mapping, key=mapping.get) if mapping else None
    out = Images(ds, dataset or data_dir, split, names)
    if len(out) == 0:
        raise DataError(f'split {split!r} of {dataset or data_dir} is empty.')
    return out


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


def _stream_class_names(reader, prefix: str, name: str) -> Optional[List[str]]:
    """ A stream's class names in label order: the ClassLabel of `hfids/`; for a webdataset (whose `.cls` files
    hold only indices) the `label_names` list of its `_info.json`, else, for `wds/imagenet-1k` (timm's shards,
    e.g. the Hub's timm/imagenet-1k-wds) and the other ImageNet subsets timm knows, timm's synsets. """
    if prefix == 'wds':
        names = reader.info.get('label_names')
        if not names:
            from timm.data import ImageNetInfo
            try:
                names = ImageNetInfo(re.sub(r'[-_\s]|wds$', '', name.lower())).label_names()
            except AssertionError:  # not an ImageNet subset
                return None
        return list(names)
    mapping = getattr(reader, 'class_to_idx', None)
    if not mapping and prefix == 'hfids':  # a folder without a dataset card: the features come with the stream
        features = reader.builder.as_streaming_dataset(split=reader.split).features or {}
        names = getattr(features.get(reader.target_key), 'names', None)
        return list(names) if names else None
    return sorted(mapping, key=mapping.get) if mapping else None


def _class_names(ds: Dataset) -> Optional[List[str]]:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds.class_names


def load_split(
        dataset: str,
        data_dir: Optional[str],
        split: str,
        num_samples: Optional[int] = None,
        transform: Optional[Callable] = None,
) -> Tuple[Dataset, Optional[int]]:
    """ One map-style split as a torch Dataset of (transformed image, label), and its number of classes (None for
    integer labels without class names: enough to evaluate, not to train). `num_samples` keeps a fixed random
    subset (the same for every seed and rank) of that many samples. """
    if _prefix(dataset) in STREAMS:
        raise DataError(f'{dataset} is a stream (no random access): evaluate it with timm-dirac-train, or read the '
                        f'same data with hfds/ or an image folder.')
    ds = _open(dataset, data_dir, split)
    ds.transform = transform
    num_classes = len(ds.class_names) if ds.class_names is not None else None
    if num_samples is not None:
        ds = fixed_subset(ds, num_samples, split)
    return ds, num_classes


def is_datasets_folder(path: str) -> bool:
    """ A local Hugging Face `datasets` folder (Parquet/Arrow files or a saved dataset), not an image folder. """
    folder = Path(os.path.expanduser(path))
    return folder.is_dir() and ((folder / 'dataset_dict.json').is_file() or any(
        f.suffix in ('.parquet', '.arrow') for pattern in ('*', '*/*') for f in folder.glob(pattern)))


def load_eval_split(
        source: str,
        split: Optional[str] = None,
        transform: Optional[Callable] = None,
) -> Tuple[Dataset, str]:
    """ The split of `source` an evaluation reads (in dataset order), and the split's name.

    `source`: `hfds/<Hub id or folder>`, a local `datasets` folder (the prefix may be left out), or an image folder
    with split sub-folders (`<source>/<split>/<class>/<image>`, timm's split synonyms) or, without any, with the
    class folders themselves (e.g. ImageNet's `val/`, named after the folder). Without `split`, the first of
    EVAL_SPLITS that the data has.
    """
    if not source.startswith('hfds/') and is_datasets_folder(source):
        source = f'hfds/{source}'
    if source.startswith('hfds/'):
        dataset, data_dir = source, None
    elif os.path.isdir(source):
        dataset, data_dir = '', source
        from timm.data.dataset_factory import _search_split
        if all(os.path.normpath(_search_split(source, s)) == os.path.normpath(source) for s in ('train', *EVAL_SPLITS)):
            if split and '[' in split:
                raise DataError(f'split {split!r}: slices apply to hfds/ datasets; an image folder is read whole.')
            try:
                folder = create_dataset('', root=source, search_split=False)
            except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
                raise DataError(f'no images in {source}: {e}') from e
            mapping = folder.reader.class_to_idx
            ds = Images(folder, source, split or '', sorted(mapping, key=mapping.get), transform)
            return ds, split or os.path.basename(os.path.normpath(source))
    else:
        raise DataError(f'dataset {source} is not a folder: give an image folder (one sub-folder per class, or per '
                        f'split) or hfds/<Hub id or local folder> for a Hugging Face datasets dataset.')
    for candidate in ([split] if split else EVAL_SPLITS):
        try:
            return load_split(dataset, data_dir, candidate, transform=transform)[0], candidate
        except MissingSplitError:
            if split:
                raise
    raise DataError(f'{source} has none of the splits {", ".join(EVAL_SPLITS)}: pass --split NAME.')


def _fixed_permutation(num_samples: int) -> List[int]:
    """ One permutation of range(num_samples), independent of --seed, rank and resume. """
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(0)).tolist()


def fixed_subset(dataset: Dataset, num_samples: int, split: str) -> Dataset:
    """ A fixed random subset of `num_samples` samples (the same for every seed and rank), in dataset order. """
    if num_samples < 1:
        raise DataError(f'the sample limit for split {split!r} must be positive, got {num_samples}.')
    if num_samples >= len(dataset):
        return dataset
    return Subset(dataset, sorted(_fixed_permutation(len(dataset))[:num_samples]))


def holdout_indices(num_samples: int, holdout: int) -> Tuple[List[int], List[int]]:
    """ (train, held out) indices of a split of `num_samples`: `holdout` fixed random samples are set aside for
    validation, disjoint from the rest, both in dataset order and the same on every rank, seed and resume. """
    if not 0 < holdout < num_samples:
        raise DataError(f'--holdout {holdout} must be between 1 and the train split\'s {num_samples - 1} samples; '
                        f'hold out e.g. a tenth of it.')
    order = _fixed_permutation(num_samples)
    return sorted(order[holdout:]), sorted(order[:holdout])


def is_test_split(split: str) -> bool:
    """ Whether `split` names a test split (choosing checkpoints on it would leak the test set into the result). """
    return split.split('[')[0].strip().lower() in ('test', 'testing')


def label_names(dataset: str, data_dir: Optional[str] = None, split: str = 'train') -> List[str]:
    """ The class names of a dataset in label order: the ClassLabel names of `hfds/`/`hfids/`, the class folders
    of `data_dir`'s `split` folder (as timm numbers them), a webdataset's `_info.json` `label_names`. """
    # a stream's reader wants its epoch length even when only its class names are read
    ds = _open(dataset, data_dir, split, **(dict(num_samples=1) if _prefix(dataset) in STREAMS else {}))
    names = _class_names(ds)
    if names is None:
        raise DataError(_unnamed(dataset or data_dir, split))
    return names


def _unnamed(source: str, split: str) -> str:
    fix = ('Add "label_names": [...] (in label order) to the shard folder\'s _info.json (for ImageNet shards: '
           '--dataset wds/imagenet-1k names them by timm\'s synsets).' if _prefix(source) == 'wds' else CLASS_LABEL_FIX)
    return (f'split {split!r} of {source} has integer labels without class names (no ClassLabel column): training '
            f'needs them for the classifier and the exported config. {fix}')


def hub_dataset_id(dataset: str) -> Optional[str]:
    """ The Hub id of `hfds/<id>` (or `hfids/<id>`) for model cards; None for a local folder or other sources. """
    if _prefix(dataset) not in ('hfds', 'hfids'):
        return None
    name = dataset.partition('/')[2]
    return None if os.path.exists(os.path.expanduser(name)) else name


# ------------------------------------------------------------------------------------------------- training
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
    other = _class_names(ds)
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
    train_set = _open(args.dataset, args.data_dir, args.train_split)
    names = train_set.class_names
    if names is None:
        raise DataError(_unnamed(source, args.train_split))
    train_set.transform = _train_transform_of(args, data_config)
    val_split = None
    if args.holdout:
        kept, held = holdout_indices(len(train_set), args.holdout)
        same = _open(args.dataset, args.data_dir, args.train_split)
        same.transform = eval_transform(data_config)
        train_set, val_set = Subset(train_set, kept), Subset(same, held)
    else:
        val_set, val_split = _val_split(args, lambda split: _open(args.dataset, args.data_dir, split), accelerator)
        val_set.transform = eval_transform(data_config)
        _check_classes(names, val_set, val_split, args.train_split, source)
    test_set = None
    if args.test_split:
        test_set = _open(args.dataset, args.data_dir, args.test_split)
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
    from timm.data.readers.reader_wds import _load_info, _parse_split_info
    split = _parse_split_info(args.train_split, _load_info(args.data_dir))
    files, lengths = list(split.filenames), list(split.shard_lengths)
    if not lengths:
        raise DataError(f'--holdout on wds/ holds out whole shards and needs their lengths: give split '
                        f'{args.train_split!r} shard_lengths in _info.json, or validate on a split (--val-split).')
    held, count = [], 0
    for i in _fixed_permutation(len(files)):
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
    prefix, world = _prefix(args.dataset), accelerator.num_processes
    kwargs = dict(seed=args.seed, download=getattr(args, 'dataset_download', False))
    train_split, val_split = args.train_split, None
    if args.holdout:
        if prefix != 'wds':
            raise DataError(f'--holdout on a {prefix}/ stream: it has no shards to hold out here; validate on a '
                            f'split (--holdout 0 --val-split NAME), or read the data with hfds/ to hold out images.')
        train_split, held_split = _wds_holdout(args)
    train_set = _open(args.dataset, args.data_dir, train_split, is_training=True, batch_size=args.batch_size,
                      num_samples=args.train_num_samples, **kwargs)
    names = train_set.class_names
    if names is None:
        raise DataError(_unnamed(args.dataset, args.train_split))
    workers = _stream_workers(train_set.reader, prefix, world, args.workers, default_workers, accelerator)
    train_set.set_loader_cfg(num_workers=workers)
    train_set.transform = _train_transform_of(args, data_config)

    def open_eval(split: str, num_samples: Optional[int] = None) -> Dataset:
        ds = _open(args.dataset, args.data_dir, split, is_training=False, num_samples=num_samples, **kwargs)
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
    stream = _prefix(args.dataset) in STREAMS
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
    random erasing) for inputs <= 64 px, else timm's `create_transform` (random-resized crop, flip, colour jitter,
    optional Auto/RandAugment, random erasing). """
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


def eval_transform(data_config: Dict[str, Any]) -> Callable:
    """ Evaluation transform: resize, centre crop at the cfg's crop_pct, normalise (timm's eval transform). """
    return create_transform(**data_config, is_training=False)
