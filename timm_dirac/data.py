""" Datasets, transforms and loaders: the one reader of training, `validate` and the deploy commands

Two sources: `hfds/<Hub id or local folder>` through Hugging Face `datasets` (an Image column and a ClassLabel
column; the split may be a slice such as `test[:500]`), and image folders (`<data_dir>/<split>/<class>/<image>`).
Images are decoded in the DataLoader workers. Training (`load_split`) and evaluation (`load_eval_split`: validate,
export, quantize, benchmark) read through the same datasets; evaluation also takes a local `datasets` folder
without the prefix and, without a named split, the first of validation, test that the data has.

Transforms: 32 px nets (input <= 64 px) get the CIFAR recipe timm lacks (pad 4 reflect, random crop, flip);
larger nets get timm's `create_transform` (random-resized crop, flip, colour jitter, Auto/RandAugment). Mean, std,
size and crop come from the model's pretrained_cfg via `resolve_data_config`.

Model selection never sees the test split: `holdout_indices` sets aside a fixed random part of the train split for
validation (the same on every rank, seed and resume), and the test split is scored once, at the end.

Evaluation is sharded without padding (rank r takes samples r, r + world, ...), so summed metrics count every
sample exactly once, whatever the batch size and the number of ranks.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from timm.data import create_transform
from timm.data.random_erasing import RandomErasing

__all__ = [
    'CLASS_LABEL_FIX', 'DataError', 'MissingSplitError', 'to_rgb', 'load_split', 'load_eval_split', 'is_datasets_folder',
    'fixed_subset', 'holdout_indices', 'is_test_split', 'label_names', 'hub_dataset_id', 'train_transform',
    'eval_transform', 'eval_loader', 'eval_indices', 'TrainData', 'create_loaders']

SPLIT_ALIASES = {
    'train': ('train', 'training'),
    'validation': ('validation', 'val', 'valid', 'eval', 'evaluation'),
    'test': ('test', 'testing'),
}

EVAL_SPLITS = ('validation', 'test')  # an evaluation without a named split reads the first of these the data has


class DataError(ValueError):
    """ Bad data input (missing path, unknown split, unreadable image, ...); the message names the fix. """


class MissingSplitError(DataError):
    """ The data has no split of the asked name (the evaluation split fallback tries the next one). """


def to_rgb(image: Image.Image) -> Image.Image:
    """ `image` as 8-bit RGB. 16-bit and 32-bit integer images (16-bit PNGs open as mode I;16 or I) are scaled to
    8 bits: PIL's own convert('RGB') clips them, which turns most of a 16-bit image white. """
    if image.mode.startswith('I'):
        import numpy as np
        pixels = np.asarray(image).astype(np.float64)
        top = 65535. if image.mode.startswith('I;16') or pixels.max() > 255 else 255.
        image = Image.fromarray(np.clip(np.rint(pixels * (255. / top)), 0, 255).astype(np.uint8), mode='L')
    return image.convert('RGB')


class HFImageDataset(Dataset):
    """ A `datasets` split as (image, label) pairs; the image is decoded on access, i.e. in the loader worker. """

    def __init__(self, hf_dataset, name: str, transform: Optional[Callable] = None):
        from datasets import ClassLabel, Image as ImageFeature, Value

        features = hf_dataset.features
        images = [k for k, f in features.items() if isinstance(f, ImageFeature)]
        labels = [k for k, f in features.items() if isinstance(f, ClassLabel)]
        plain = features.get('label')
        if not labels and isinstance(plain, Value) and plain.dtype.startswith(('int', 'uint')):
            labels = ['label']  # integer labels without class names (timm's reader takes them too): evaluation only
        if len(images) != 1 or len(labels) != 1:
            raise DataError(
                f'dataset {name!r} needs exactly one Image column and one ClassLabel column (or an integer `label` '
                f'column, to evaluate on) for classification; it has columns {dict(features)}.')
        self.data = hf_dataset
        self.image_key, self.label_key = images[0], labels[0]
        label = features[self.label_key]
        self.num_classes = label.num_classes if isinstance(label, ClassLabel) else None  # None: not known
        self.label_names = list(label.names) if isinstance(label, ClassLabel) else None
        self.name = name
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        try:
            row = self.data[index]
            image = to_rgb(row[self.image_key])
        except Exception as e:  # PIL and datasets raise many types for a bad image
            raise DataError(f'cannot read image {index} of dataset {self.name!r} ({e}); fix or drop that row.') from e
        return (self.transform(image) if self.transform else image), row[self.label_key]


class FolderDataset(Dataset):
    """ `<root>/<class>/<image>` files as (image, label) pairs, classes sorted by folder name. """

    def __init__(self, root: str, transform: Optional[Callable] = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        classes, class_to_idx = find_classes(root)
        self.samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
        self.num_classes = len(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, label = self.samples[index]
        try:
            with open(path, 'rb') as f:
                image = to_rgb(Image.open(f))
        except Exception as e:
            raise DataError(f'cannot read image file {path} ({e}); replace or delete it.') from e
        return (self.transform(image) if self.transform else image), label


def _split_folder(data_dir: str, split: str) -> str:
    for name in SPLIT_ALIASES.get(split, (split,)):
        path = os.path.join(data_dir, name)
        if os.path.isdir(path):
            return path
    raise MissingSplitError(
        f'no folder for split {split!r} in {data_dir} (looked for {", ".join(SPLIT_ALIASES.get(split, (split,)))}); '
        f'pass the folder name as the split (--split, or --train-split/--val-split in training).')


def _has_split_folders(data_dir: str) -> bool:
    """ Whether `data_dir` holds split sub-folders (train/, val/, test/, ...) rather than only class folders. """
    return any(os.path.isdir(os.path.join(data_dir, name)) for names in SPLIT_ALIASES.values() for name in names)


def _folder_dataset(root: str, transform: Optional[Callable]) -> 'FolderDataset':
    try:
        return FolderDataset(root, transform)
    except FileNotFoundError as e:
        raise DataError(f'no images in {root}: {e}') from e


def _load_hfds(name: str, split: str):
    import datasets

    path = os.path.expanduser(name)
    if path.startswith(('/', '.', '~')) and not os.path.isdir(path):
        raise DataError(f'dataset folder {path} does not exist; check --dataset hfds/<Hub id or local folder>.')
    try:
        return datasets.load_dataset(path, split=split)
    except ValueError as e:
        if 'split' in str(e).lower():
            raise MissingSplitError(f'dataset {name!r} has no split {split!r} ({e}); pass one it has (--split, or '
                                    f'--train-split/--val-split in training).') from e
        raise DataError(f'cannot load dataset {name!r}: {e}') from e
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise DataError(
            f'cannot load dataset {name!r}: it is not a local folder (relative paths count from the working directory, '
            f'or in a config from the config file\'s folder) and not reachable on the Hub ({e}).') from e


CLASS_LABEL_FIX = ("Give the label column its class names, e.g. dataset.cast_column('label', "
                    "datasets.ClassLabel(names=[...])).save_to_disk(folder), and use hfds/<folder>.")


def load_split(
        dataset: str,
        data_dir: Optional[str],
        split: str,
        num_samples: Optional[int] = None,
        transform: Optional[Callable] = None,
) -> Tuple[Dataset, Optional[int]]:
    """ One split as a torch Dataset of (transformed image, label), and its number of classes.

    `dataset` 'hfds/<id or folder>' loads through `datasets`; '' (or 'folder') reads image folders under
    `data_dir`. `num_samples` keeps a fixed random subset (the same for every seed and rank) of that many samples.
    The number of classes is None for integer labels without a ClassLabel (enough to evaluate, not to train).
    """
    if dataset.startswith('hfds/'):
        ds = HFImageDataset(_load_hfds(dataset[len('hfds/'):], split), dataset, transform)
    elif dataset in ('', 'folder'):
        if not data_dir:
            raise DataError('no data given: pass --dataset hfds/<Hub id or local folder> or --data-dir <folder '
                            'with train/ and val/ image folders>.')
        if not os.path.isdir(data_dir):
            raise DataError(f'--data-dir {data_dir} does not exist.')
        ds = _folder_dataset(_split_folder(data_dir, split), transform)
    else:
        raise DataError(f'unknown --dataset {dataset!r}: use hfds/<Hub id or local folder>, or leave it empty and '
                        f'pass --data-dir with image folders.')
    if len(ds) == 0:
        raise DataError(f'split {split!r} of {dataset or data_dir} is empty.')
    num_classes = ds.num_classes
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
    with split sub-folders (`<source>/<split>/<class>/<image>`, the split aliases of training) or, without any,
    with the class folders themselves (e.g. ImageNet's `val/`, named after the folder). Without `split`, the first
    of EVAL_SPLITS that the data has.
    """
    if not source.startswith('hfds/') and is_datasets_folder(source):
        source = f'hfds/{source}'
    if source.startswith('hfds/'):
        dataset, data_dir = source, None
    elif os.path.isdir(source):
        dataset, data_dir = '', source
        if not _has_split_folders(source):
            if split and '[' in split:
                raise DataError(f'split {split!r}: slices apply to hfds/ datasets; an image folder is read whole.')
            return _folder_dataset(source, transform), split or os.path.basename(os.path.normpath(source))
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
    return split.split('[')[0].strip().lower() in SPLIT_ALIASES['test']


def label_names(dataset: str, data_dir: Optional[str] = None, split: str = 'train') -> List[str]:
    """ The class names of a dataset in label order: the ClassLabel names of `hfds/<id or folder>`, else the
    class folders of `data_dir`'s `split` folder (sorted, as FolderDataset numbers them). """
    if dataset.startswith('hfds/'):
        names = HFImageDataset(_load_hfds(dataset[len('hfds/'):], split), dataset).label_names
        if names is None:
            raise DataError(f'{dataset} has integer labels without class names (no ClassLabel column). '
                            f'{CLASS_LABEL_FIX}')
        return names
    if dataset not in ('', 'folder') or not data_dir:
        raise DataError(f'cannot read class names from {dataset or data_dir!r}: give hfds/<Hub id or local folder> '
                        f'or an image folder (--data-dir) with one sub-folder per class.')
    from torchvision.datasets.folder import find_classes
    return find_classes(_split_folder(data_dir, split))[0]


def hub_dataset_id(dataset: str) -> Optional[str]:
    """ The Hub id of `hfds/<id>` for model cards; None for a local folder (its path names nothing public). """
    if not dataset.startswith('hfds/'):
        return None
    name = dataset[len('hfds/'):]
    return None if os.path.exists(os.path.expanduser(name)) else name


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


def eval_indices(num_samples: int, rank: int, world_size: int) -> range:
    """ The samples rank `rank` evaluates: a stride-`world_size` shard, no padding, so the shards partition the set. """
    return range(rank, num_samples, world_size)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, rank: int, world_size: int,
                pin_memory: bool = False) -> DataLoader:
    """ This rank's evaluation loader: its shard of `dataset` in order, the last batch kept even if partial. """
    shard = Subset(dataset, eval_indices(len(dataset), rank, world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=workers,
                      pin_memory=pin_memory)


@dataclass
class TrainData:
    """ What a training run reads: its loaders (prepared by the accelerator), classes and epoch size. """
    train_loader: Any
    val_loader: Optional[Any]
    test_loader: Optional[Any]
    num_classes: int
    class_names: List[str]
    train_samples: int  # per epoch, all ranks
    batches_per_epoch: int  # per rank
    description: str

    def set_epoch(self, epoch: int) -> None:
        self.train_loader.set_epoch(epoch)


def _ignore_sigint(worker_id: int) -> None:
    """ Ctrl-C stops the main process, which ends its workers: a worker stopped by it first breaks the transfer of
    a batch and prints a multiprocessing traceback. """
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def create_loaders(args, data_config: Dict[str, Any], accelerator) -> TrainData:
    """ The train, validation and test loaders of a run: validation is `--holdout` images of the train split
    (removed from training) or `--val-split`; `--train/val-num-samples` then take fixed subsets. """
    train_tf = train_transform(
        data_config, hflip=args.hflip, scale=args.scale, ratio=args.ratio, color_jitter=args.color_jitter,
        auto_augment=args.aa, interpolation=args.train_interpolation, re_prob=args.reprob)
    with accelerator.main_process_first():  # `datasets` builds its cache once
        train_set, num_classes = load_split(args.dataset, args.data_dir, args.train_split, None, train_tf)
        if num_classes is None:
            raise DataError(f'split {args.train_split!r} of {args.dataset} has integer labels without class names (no '
                            f'ClassLabel column): training needs them for the classifier and the exported config. '
                            f'{CLASS_LABEL_FIX}')
        if args.holdout:
            kept, held = holdout_indices(len(train_set), args.holdout)
            same_split = load_split(args.dataset, args.data_dir, args.train_split, None, eval_transform(data_config))[0]
            train_set, val_set = Subset(train_set, kept), Subset(same_split, held)
            val_name = f'{min(args.holdout, args.val_num_samples or args.holdout)} images held out of {args.train_split}'
        else:
            val_set, val_classes = load_split(args.dataset, args.data_dir, args.val_split, None,
                                              eval_transform(data_config))
            if val_classes != num_classes:
                raise DataError(f'split {args.train_split!r} has {num_classes} classes but {args.val_split!r} has '
                                f'{val_classes}; the splits must share one label set.')
            val_name = None
        test_set = load_split(args.dataset, args.data_dir, args.test_split, None, eval_transform(data_config))[0] \
            if args.test_split else None
    if num_classes < 2:
        raise DataError(f'split {args.train_split!r} has {num_classes} class: a classifier needs at least 2 (every '
                        f'prediction would be right); check the dataset\'s label column or class folders.')
    if args.train_num_samples is not None:
        train_set = fixed_subset(train_set, args.train_num_samples, args.train_split)
    if args.val_num_samples is not None:
        val_set = fixed_subset(val_set, args.val_num_samples, val_name or args.val_split)
    global_batch = args.batch_size * accelerator.num_processes * args.grad_accum_steps
    if len(train_set) < global_batch:
        raise DataError(f'{len(train_set)} training samples do not fill one global batch of {global_batch} '
                        f'(batch size {args.batch_size} x {accelerator.num_processes} processes x '
                        f'{args.grad_accum_steps} accumulation).')
    workers = args.workers if args.workers is not None else min(4, len(os.sched_getaffinity(0)))
    pin = accelerator.device.type == 'cuda'
    loader = lambda ds, train: DataLoader(  # noqa: E731
        ds, batch_size=args.batch_size if train else args.validation_batch_size or args.batch_size, shuffle=train,
        drop_last=train, num_workers=workers, pin_memory=pin, worker_init_fn=_ignore_sigint)
    train_loader = accelerator.prepare(loader(train_set, True))
    shown = '' if val_name or not is_test_split(args.val_split) else \
        ' (shown only: best = the last epoch; choose on held-out images with --holdout)'
    description = (f'{len(train_set)} train images, validation on {val_name or f"{len(val_set)} images of {args.val_split}"}'
                   f'{shown}{f", {args.test_split} scored at the end" if test_set is not None else ""}')
    names = label_names(args.dataset, args.data_dir, args.train_split)
    return TrainData(train_loader, accelerator.prepare(loader(val_set, False)),
                     None if test_set is None else accelerator.prepare(loader(test_set, False)), num_classes, names,
                     len(train_set), len(train_loader), description)
