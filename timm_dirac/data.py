""" Reading datasets, for evaluation and training alike: every source through timm's `create_dataset`

Sources, with timm's names: image folders (`<root>/<split>/<class>/<image>`, timm's split synonyms), `hfds/<Hub id or
local folder>` (`datasets`, random access; a split may be a slice such as `test[:500]`) and the streams `wds/`,
`hfids/`, `tfds/`. What we add to timm's readers, and why: an unreadable image stops the run naming it (timm skips
it and counts another image twice), 16-bit images are scaled to 8 bits (PIL's convert clips them), missing splits and
unnamed labels are refused naming the fix, a shard folder's `_info.json` whose counts disagree with each other is
refused, evaluation data of other classes than the model's is refused, and a relative local path that does not exist
from the working directory is looked up beside the installed package (so `timm_dirac/assets/...` works anywhere). The
training-only part (loaders, hold-outs, augmentation, the per-shard counts of a stream) is `timm_dirac.train.data`.
"""
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, random_split

from timm.data import create_dataset, create_transform

from ._timm_compat import search_split

__all__ = [
    'CLASS_LABEL_FIX', 'DataError', 'MissingSplitError', 'Images', 'to_rgb', 'load_split', 'load_eval_split',
    'is_datasets_folder', 'fixed_generator', 'fixed_subset', 'is_test_split', 'label_names', 'hub_dataset_id',
    'eval_transform', 'open_split', 'source_prefix', 'class_names_of', 'unnamed_labels', 'local_path',
    'describe_classes', 'check_model_classes', 'stream_index_size', 'name_classes_fix']

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
def local_path(path: str) -> str:
    """ `path` with `~` expanded, as given where it exists from the working directory (or is absolute); a relative
    path that does not is looked up in the folder the installed `timm_dirac` package lives in, so that
    `timm_dirac/assets/cifar10_sample` names the shipped sample from any folder, a wheel's install included. A path
    found in neither place comes back as given (a Hub id, or a path the caller refuses naming it). """
    path = os.path.expanduser(path)
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    beside = Path(__file__).resolve().parent.parent / path
    return str(beside) if beside.exists() else path


def source_prefix(dataset: str) -> str:
    """ The reader prefix of a timm dataset name ('hfds', 'wds', ...; '' for image folders). """
    prefix, sep, _ = (dataset or '').partition('/')
    return prefix.lower() if sep else ''


class Images(Dataset):
    """ A map-style timm dataset (`ImageDataset` of an image folder or `hfds/`) whose images are decoded here, from
    its reader's files, instead of by timm's `__getitem__`: an unreadable image raises DataError naming it (timm
    skips it and returns the next image in its place), a label outside the class list raises too. `class_names`
    is None for integer labels without names. """

    def __init__(self, dataset, source: str, split: str, class_names: Optional[List[str]],
                 transform: Optional[Callable] = None):
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
            stream, label, *_ = self.dataset.reader[index]  # timm's Reader: (open image file, label)
            with stream:
                image = to_rgb(Image.open(stream))
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


def open_split(dataset: str, data_dir: Optional[str], split: str, **stream_kwargs) -> Dataset:
    """ timm's `create_dataset` for one split, its failures as DataError naming the fix (MissingSplitError for a
    split the data does not have). Map-style sources come back as `Images`, streams as timm's IterableImageDataset
    with `class_names` set (None where unknown). """
    prefix, name = source_prefix(dataset), (dataset or '').partition('/')[2] if source_prefix(dataset) else ''
    if dataset and not prefix and dataset != 'folder':
        raise DataError(f'unknown --dataset {dataset!r}: use hfds/<Hub id or local folder>, hfids/..., wds/<name> '
                        f'with --data-dir <shard folder>, or leave it empty and pass --data-dir with image folders.')
    if prefix and prefix not in ('hfds', 'hfids', 'wds', 'tfds'):
        raise DataError(f'unknown --dataset prefix {prefix!r} in {dataset!r}: use hfds/, hfids/, wds/ or tfds/.')
    if prefix in ('hfds', 'hfids'):
        if not name:
            raise DataError(f'--dataset {dataset} names no dataset: pass {prefix}/<Hub id or local folder>.')
        path = local_path(name)
        if path.startswith(('/', '.', '~')) and not os.path.isdir(path):
            raise DataError(f'dataset folder {path} does not exist; check --dataset {prefix}/<Hub id or local folder>.')
        dataset = f'{prefix}/{path}'
    elif prefix == 'wds':
        data_dir = local_path(data_dir or '')
        if not os.path.isdir(data_dir):
            raise DataError(f'--dataset {dataset} reads the webdataset shards in --data-dir: pass the shard folder '
                            f'(with _info.json), got {data_dir!r}.')
        _check_wds_index(data_dir, split)
    elif not prefix:
        data_dir = local_path(data_dir) if data_dir else data_dir
        if not data_dir:
            raise DataError('no data given: pass --dataset hfds/<Hub id or local folder> or --data-dir <folder '
                            'with train/ and val/ image folders>.')
        if not os.path.isdir(data_dir):
            raise DataError(f'--data-dir {data_dir} does not exist.')
        if os.path.normpath(search_split(data_dir, split)) == os.path.normpath(data_dir):
            raise MissingSplitError(f'no folder for split {split!r} in {data_dir}; pass the folder name as the split '
                                    f'({_split_flags(prefix)}).')
    try:
        ds = create_dataset(dataset or '', root=data_dir, split=split, **stream_kwargs)
    except ImportError as e:
        raise DataError(f'--dataset {dataset} needs a package that is not installed ({e}); '
                        f'pip install "timm-dirac[train]".') from e
    except (ValueError, RuntimeError, KeyError, AssertionError, FileNotFoundError, ConnectionError, OSError) as e:
        text = str(e)
        if 'split' in text.lower() and ('unknown' in text.lower() or 'not found' in text.lower()):
            raise MissingSplitError(f'dataset {dataset or data_dir} has no split {split!r} ({text}); pass one it has '
                                    f'({_split_flags(prefix)}).') from e
        if 'num_samples' in text or 'length is unknown' in text.lower():
            raise DataError(f'the stream {dataset} does not state the size of split {split!r}: pass its sample '
                            f'count (--train-num-samples / --val-num-samples N).') from e
        if 'Found 0 images' in text:
            raise DataError(f'no images in the {split!r} folder of {data_dir}: {text}') from e
        raise DataError(f'cannot load dataset {dataset or data_dir!r} split {split!r}: {type(e).__name__}: {text} '
                        f'(a local folder? relative paths count from the working directory, or in a config from '
                        f'the config file\'s folder).') from e
    if prefix == 'wds':
        _check_wds_counts(ds.reader.split_info, data_dir, split)
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


def _split_flags(prefix: str) -> str:
    """ The flags that name a split: training's alone for a stream (the commands read no streams). """
    training = '--train-split/--val-split/--test-split'
    return f'{training} of timm-dirac-train' if prefix in STREAMS else f'--split, or {training} in training'


def _check_wds_index(data_dir: str, split: str) -> None:
    """ Refuse a shard folder without timm's index (`_info.json` or `info.json`) unless the split names its shards
    and sample count itself: timm's reader would go on with an empty index and report a missing split. """
    if '.tar' in split or any(os.path.isfile(os.path.join(data_dir, n)) for n in ('_info.json', 'info.json')):
        return
    raise DataError(f'{data_dir} has no _info.json (timm\'s index of the shards: per split its filenames, '
                    f'shard_lengths and num_samples, and the label_names): write one, or name the shards and their '
                    f'sample count in the split, e.g. --train-split "{split}-{{000000..000003}}.tar|64" (and '
                    f'--val-split likewise).')


def _check_wds_counts(info, data_dir: str, split: str) -> None:
    """ Refuse an index whose counts disagree with each other (a shard list and lengths of other sizes, lengths
    that do not add up to num_samples): timm's reader would take num_samples and repeat or skip samples to fit. What
    each shard really holds is counted as it is read (`timm_dirac.train.data`). """
    lengths, files = list(info.shard_lengths or ()), list(info.filenames)
    where = f'split {info.name or split!r} of {os.path.join(data_dir, "_info.json")}'
    if lengths and len(lengths) != len(files):
        raise DataError(f'{where} lists {len(files)} shard files but {len(lengths)} shard_lengths; give one length per '
                        f'shard.')
    if lengths and sum(lengths) != info.num_samples:
        raise DataError(f'{where} says num_samples {info.num_samples} but its shard_lengths add up to {sum(lengths)}: '
                        f'count the samples of each shard and fix the index.')


def stream_index_size(ds, prefix: str) -> Optional[int]:
    """ The samples a stream's split holds by its index: a webdataset's `_info.json` (or `|N` in the split), the
    split info of `hfids/` and `tfds/`; None where the source does not say. """
    reader = ds.reader
    if prefix == 'wds':
        return reader.split_info.num_samples or None
    if prefix == 'hfids':
        splits = reader.builder.info.splits or {}
        return getattr(splits.get(reader.split), 'num_examples', None) or None
    return getattr(getattr(reader, 'split_info', None), 'num_examples', None) or None


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


def class_names_of(ds: Dataset) -> Optional[List[str]]:
    """ The class names of a split opened by `open_split`, through any subsets of it. """
    while isinstance(ds, Subset):
        ds = ds.dataset
    return getattr(ds, 'class_names', None)


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
    if source_prefix(dataset) in STREAMS:
        raise DataError(f'{dataset} is a stream (no random access): evaluate it with timm-dirac-train, or read the '
                        f'same data with hfds/ or an image folder.')
    ds = open_split(dataset, data_dir, split)
    ds.transform = transform
    num_classes = len(ds.class_names) if ds.class_names is not None else None
    if num_samples is not None:
        ds = fixed_subset(ds, num_samples, split)
    return ds, num_classes


def fixed_generator() -> torch.Generator:
    """ The generator of every fixed random choice of data (subsets, hold-outs): independent of --seed, rank and
    resume. """
    return torch.Generator().manual_seed(0)


def fixed_subset(dataset: Dataset, num_samples: int, split: str) -> Dataset:
    """ A fixed random subset of `num_samples` samples (the same for every seed and rank), in dataset order. """
    if num_samples < 1:
        raise DataError(f'the sample limit for split {split!r} must be positive, got {num_samples}.')
    if num_samples >= len(dataset):
        return dataset
    subset, _ = random_split(dataset, [num_samples, len(dataset) - num_samples], generator=fixed_generator())
    return Subset(dataset, sorted(subset.indices))


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
    source = f'hfds/{local_path(source[5:])}' if source.startswith('hfds/') else local_path(source)
    if not source.startswith('hfds/') and is_datasets_folder(source):
        source = f'hfds/{source}'
    if source.startswith('hfds/'):
        dataset, data_dir = source, None
    elif os.path.isdir(source):
        dataset, data_dir = '', source
        if all(os.path.normpath(search_split(source, s)) == os.path.normpath(source) for s in ('train', *EVAL_SPLITS)):
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


def is_test_split(split: str) -> bool:
    """ Whether `split` names a test split (choosing checkpoints on it would leak the test set into the result). """
    return split.split('[')[0].strip().lower() in ('test', 'testing')


def label_names(dataset: str, data_dir: Optional[str] = None, split: str = 'train') -> List[str]:
    """ The class names of a dataset in label order: the ClassLabel names of `hfds/`/`hfids/`, the class folders
    of `data_dir`'s `split` folder (as timm numbers them), a webdataset's `_info.json` `label_names`. """
    # a stream's reader wants its epoch length even when only its class names are read
    ds = open_split(dataset, data_dir, split, **(dict(num_samples=1) if source_prefix(dataset) in STREAMS else {}))
    names = class_names_of(ds)
    if names is None:
        raise DataError(unnamed_labels(dataset or data_dir, split))
    return names


def unnamed_labels(source: str, split: str) -> str:
    """ The refusal of a split with integer labels and no class names where names are needed, naming the fix. """
    return (f'split {split!r} of {source} has integer labels without class names (no ClassLabel column): the '
            f'exported config needs them. {name_classes_fix(source)}')


def name_classes_fix(source: str) -> str:
    """ How to give the classes of `source` their names. """
    if source_prefix(source) == 'wds':
        return ('Add "label_names": [...] (in label order) to the shard folder\'s _info.json (for ImageNet shards: '
                '--dataset wds/imagenet-1k names them by timm\'s synsets).')
    return CLASS_LABEL_FIX


def describe_classes(names: Optional[Sequence[str]]) -> str:
    """ e.g. "10 classes ['airplane', 'automobile', 'bird', 'cat', 'deer'] ..." for messages. """
    if names is None:
        return 'integer labels without class names'
    names = list(names)
    return f'{len(names)} class{"" if len(names) == 1 else "es"} {names[:5]}{" ..." if len(names) > 5 else ""}'


def check_model_classes(model_names: Optional[Sequence[str]], data_names: Optional[Sequence[str]], source: str,
                        split: str) -> None:
    """ Refuse evaluation data whose class names are not the model's (its `pretrained_cfg['label_names']`), as
    training refuses splits of other classes: a folder of other (or fewer) classes numbers them otherwise, and the
    score would count one class as another. Either side without names is not compared (the evaluation still
    refuses labels the classifier does not have). """
    if model_names is None or data_names is None or list(model_names) == list(data_names):
        return
    raise DataError(f'split {split!r} of {source} has {describe_classes(data_names)} but the model was trained on '
                    f'{describe_classes(model_names)}: evaluate on data of the model\'s classes (the same names in '
                    f'the same order), or a model trained on these.')


def hub_dataset_id(dataset: str) -> Optional[str]:
    """ The Hub id of `hfds/<id>` (or `hfids/<id>`) for model cards; None for a local folder or other sources. """
    if source_prefix(dataset) not in ('hfds', 'hfids'):
        return None
    name = dataset.partition('/')[2]
    return None if os.path.exists(os.path.expanduser(name)) else name


def eval_transform(data_config: Dict[str, Any]) -> Callable:
    """ Evaluation transform: resize, centre crop at the cfg's crop_pct, normalise (timm's eval transform). """
    return create_transform(**data_config, is_training=False)
