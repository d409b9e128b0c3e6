""" `timm-dirac convert`: any DiracNet checkpoint (ours in either form, the authors' folded or functional v2
releases) into a Hub folder that `timm.create_model('local-dir:<folder>', pretrained=True)` and the Hub load.

The model's `checkpoint_filter_fn` does the conversion as timm loads the file; this command reads the file safely,
names the classes, and gives the authors' release file (checked by its hash) its registered tag and credit.
"""
import argparse
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..diracnet import CIFAR10_LABELS, checkpoint_format, convert_authors_checkpoint
from ..loading import check_weights, is_release, load_checkpoint_file, local_file

__all__ = ['add_arguments', 'run']

# the class names of the authors' CIFAR-100 checkpoints, in label order (torchvision's CIFAR-100 classes)
CIFAR100_LABELS = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl', 'boy',
    'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock',
    'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish', 'forest',
    'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion', 'lizard',
    'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom', 'oak_tree', 'orange', 'orchid',
    'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree', 'plain', 'plate', 'poppy', 'porcupine', 'possum',
    'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper',
    'snail', 'snake', 'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone',
    'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf',
    'woman', 'worm')
_LAYER_RE = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.conv\.weight$')


def authors_dataset(model: nn.Module) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """ (dataset, label names) of a model shaped like one the authors' scripts train (ImageNet style with 1000
    classes, CIFAR style with 10 or 100), else None. """
    from timm.data import ImageNetInfo
    imagenet = len(model.stages) == 4
    if imagenet and model.num_classes == 1000:
        return 'imagenet-1k', tuple(ImageNetInfo('imagenet-1k').label_names())
    if not imagenet and model.num_classes in (10, 100):
        return ('cifar10', CIFAR10_LABELS) if model.num_classes == 10 else ('cifar100', CIFAR100_LABELS)
    return None


def _classifier_size(state_dict: Mapping[str, Any]) -> Optional[int]:
    weight = state_dict.get('head.fc.weight')
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def stage_shape(state_dict: Mapping[str, Any]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """ (Dirac layers per stage, stage widths) of a state dict in our keys. """
    layers: Dict[int, int] = {}
    widths: Dict[int, int] = {}
    for key, value in state_dict.items():
        if m := _LAYER_RE.match(key):
            stage, block = int(m[1]), int(m[2])
            layers[stage] = max(layers.get(stage, 0), block + 1)
            widths[stage] = value.shape[0]
    return tuple(layers[s] for s in sorted(layers)), tuple(widths[s] for s in sorted(widths))


def _check_shape(state_dict: Mapping[str, Any], source: str, model_name: str, model_kwargs: Dict[str, Any]) -> None:
    """ Refuse a checkpoint of another DiracNet shape than `--model` builds, giving the `--model-kwargs` that build
    its shape (a strict load would only list the mismatched tensors). """
    import timm

    got = stage_shape(state_dict)
    model = timm.create_model(model_name, device='meta', **model_kwargs)
    want = stage_shape(model.state_dict())
    if got == want:
        return
    shape = dict(layers=got[0], channels=got[1])
    if len(got[0]) != len(want[0]):
        shape['stem_type'] = 'imagenet' if len(got[0]) == 4 else 'cifar'
    kwargs = ' '.join(f"'{k}={str(v).replace(' ', '')}'" for k, v in shape.items())  # quoted for the shell
    raise ValueError(f'{source} holds another DiracNet than {model_name}: Dirac layers per stage {got[0]} and stage '
                     f'widths {got[1]}, not {want[0]} and {want[1]}. Convert it with --model {model_name} '
                     f'--model-kwargs {kwargs}.')


def add_arguments(parser: argparse.ArgumentParser):
    from timm.utils import ParseKwargs

    from ..errors import number

    parser.add_argument('source', help='checkpoint path or URL: ours (train or folded) or the authors\' (folded or '
                                       'functional v2), read with weights_only=True')
    parser.add_argument('--model', required=True, help='architecture (optionally .tag), e.g. diracnet18')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                        help="model shape, e.g. 'layers=(4,4,4)' 'channels=(32,64,128)' (DiracNet-16-2)")
    parser.add_argument('--num-classes', type=number(int, 1), default=None,
                        help="classifier size (default: the checkpoint's, e.g. 100 for a CIFAR-100 file)")
    parser.add_argument('--out', required=True, help='output Hub folder (must not exist unless --overwrite)')
    parser.add_argument('--form', choices=('auto', 'train', 'folded'), default='auto',
                        help='form of the written weights; auto keeps the source\'s form (default)')
    parser.add_argument('--dataset', default=None,
                        help='hfds/<Hub id or local folder> the weights were trained on: its class names go into '
                             "config.json (default for the authors' layouts: ImageNet-1k, CIFAR-10 or CIFAR-100 by "
                             'model style and classifier size)')
    parser.add_argument('--license', default=None, help='licence of weights that are not a registered release '
                                                        '(an SPDX-style Hub id, e.g. apache-2.0; default unknown)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output folder')


def run(args: argparse.Namespace) -> int:
    import timm
    from timm.models import get_pretrained_cfg

    from .folder import save_hub_folder

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f'{args.out} already exists; nothing was written. Choose another --out, or pass '
                              f'--overwrite to replace it.')
    path = local_file(args.source)
    checkpoint = load_checkpoint_file(path)
    fmt = checkpoint_format(checkpoint)
    state_dict = convert_authors_checkpoint(checkpoint) if fmt.startswith('authors') else checkpoint
    if 'stem.conv.weight' not in state_dict:
        keys = ', '.join(list(checkpoint)[:8]) or 'no keys'
        raise ValueError(f'{path.name} is not a DiracNet checkpoint: found {keys}. Expected a timm-dirac state dict '
                         f'(stem.conv.weight, stages.*), an authors\' folded one (features.conv.weight, '
                         f'features.group*, fc.*) or an authors\' functional checkpoint (a dict with params).')
    check_weights(state_dict, str(path))  # bad numbers are refused, never converted
    _check_shape(state_dict, path.name, args.model, args.model_kwargs)
    folded = fmt.endswith('folded') if args.form == 'auto' else args.form == 'folded'
    file_classes = _classifier_size(state_dict)
    num_classes = args.num_classes or file_classes
    cfg = get_pretrained_cfg(args.model)
    release = (cfg is not None and not args.model_kwargs and num_classes in (None, cfg.num_classes)
               and is_release(path, cfg.url))
    overlay = dict(state_dict=state_dict)
    if file_classes is not None:  # the cfg says what the file holds: timm keeps a classifier of the model's size
        overlay['num_classes'] = file_classes
    try:
        model = timm.create_model(
            args.model, pretrained=True, inference_mode=folded, pretrained_cfg_overlay=overlay,
            **({} if num_classes is None else dict(num_classes=num_classes)), **args.model_kwargs)
    except RuntimeError as e:  # the strict load: tensors the architecture does not have, or of other shapes
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # the first kind of mismatch, after timm's heading
        raise ValueError(f'{path.name} does not fit {args.model}: {detail.rstrip(". ")}. Nothing was written.') from e
    model.pretrained_cfg.pop('state_dict', None)

    authors = authors_dataset(model) if fmt.startswith('authors') else None
    if args.dataset:
        from ..data import hub_dataset_id, label_names
        dataset, labels = hub_dataset_id(args.dataset), label_names(args.dataset)
    elif authors:
        dataset, labels = authors
    else:
        raise ValueError(f'{path.name} is not in the authors\' layout, so its classes are unknown: pass --dataset '
                         f'hfds/<Hub id or local folder> (the data it was trained on) to name them.')
    source = args.source if '://' in args.source else path.name  # a file name, never a local absolute path
    info = {} if release else dict(source=f'{source} ({fmt} format)', dataset=dataset,
                                   license=args.license or 'unknown')
    out = save_hub_folder(model.eval(), args.out, train_info=info, overwrite=args.overwrite, release=release,
                          label_names=labels)
    cfg = model.pretrained_cfg
    what = f"the release {cfg['architecture']}.{cfg['tag']}" if release else 'not a registered release: no tag'
    print(f'wrote {out}: {", ".join(sorted(p.name for p in out.iterdir()))} '
          f'({"folded" if folded else "train"} form, from a checkpoint in the {fmt} format; {what})')
    return 0
