""" `timm-dirac convert`: any DiracNet checkpoint (ours in either form, the authors' folded or functional v2
releases) into a Hub folder that `timm.create_model('local-dir:<folder>', pretrained=True)` and the Hub load.

The model's `checkpoint_filter_fn` does the conversion as timm loads the file; this command reads the file safely,
names the classes, and gives the authors' release file (checked by its hash) its registered tag and credit.
"""
import argparse
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint_io import is_release, load_checkpoint_file, local_file
from .finite import check_weights
from .labels import CIFAR10_LABELS, CIFAR100_LABELS
from .state_dict import detect_format, to_timm_state_dict

__all__ = ['add_arguments', 'run']


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


def _check_shape(state_dict: Mapping[str, Any], source: str, model_name: str, model_kwargs: Dict[str, Any]) -> None:
    """ Refuse a checkpoint of another DiracNet shape than `--model` builds, giving the exact `--model-kwargs` that
    build its shape (the model's own error names the two shapes only). """
    import timm
    from .diracnet import STYLES
    from .state_dict import stage_structure

    got = stage_structure(state_dict)
    want = stage_structure(timm.create_model(model_name, device='meta', **model_kwargs).state_dict())
    style_name, style = next(((n, s) for n, s in STYLES.items() if len(s.widths) == len(got[0])), (None, None))
    if got == want or style is None:
        return  # it fits, or no style has its stage count: the model's own error names the shapes
    depth = style.depth(got[0])
    try:
        shape = f'depth={depth}' if style.layers(depth, style_name) == got[0] else None
    except ValueError:
        shape = None
    kwargs = f"{shape or 'layers=' + str(got[0]).replace(' ', '')} width={got[1][0] / style.widths[0]:g}"
    kwargs += f' style={style_name}' if len(got[0]) != len(want[0]) else ''
    raise ValueError(f'{source} holds another DiracNet than {model_name}: Dirac layers per stage {got[0]} and stage '
                     f'widths {got[1]}, not {want[0]} and {want[1]}. Convert it with --model {model_name} '
                     f'--model-kwargs {kwargs}.')


def add_arguments(parser: argparse.ArgumentParser):
    from timm.utils import ParseKwargs

    parser.add_argument('source', help='checkpoint path or URL: ours (train or folded) or the authors\' (folded or '
                                       'functional v2), read with weights_only=True')
    parser.add_argument('--model', required=True, help='architecture (optionally .tag), e.g. diracnet18')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                        help='model shape, e.g. depth=28 width=2 (any CIFAR DiracNet-D-W) or layers=(2,2,2,2)')
    parser.add_argument('--num-classes', type=int, default=None,
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

    from .hub import save_hub_folder

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f'{args.out} already exists; nothing was written. Choose another --out, or pass '
                              f'--overwrite to replace it.')
    path = local_file(args.source)
    checkpoint = load_checkpoint_file(path)
    fmt = detect_format(checkpoint)
    state_dict = to_timm_state_dict(checkpoint)
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
    model = timm.create_model(
        args.model, pretrained=True, inference_mode=folded, pretrained_cfg_overlay=overlay,
        **({} if num_classes is None else dict(num_classes=num_classes)), **args.model_kwargs)
    model.pretrained_cfg.pop('state_dict', None)

    authors = authors_dataset(model) if fmt.startswith('authors') else None
    if args.dataset:
        from .data import hub_dataset_id, label_names
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
