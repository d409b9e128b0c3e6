""" `timm-dirac validate`: top-1 / top-5 accuracy and cross-entropy of a model on an image folder or a dataset

The model's own preprocessing (timm `resolve_data_config` + `create_transform`, overridable) is used. Datasets:
an image folder (one sub-folder per class), or `hfds/<Hub id or local path>` for a Hugging Face `datasets`
dataset (a Hub id or a local folder, which is also recognised without the prefix), through timm's `create_dataset`.
`--split test[:500]` picks a slice; without `--split` the first of validation, test that the dataset has.
Weights: `--pretrained` (the model's tag), `--checkpoint` (a Hub folder or a checkpoint file), or a model name
`local-dir:<folder>` / `hf-hub:<repo id>`.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['create_validation_model', 'create_validation_dataset', 'validate']


def create_validation_model(
        model_name: str,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        **kwargs,
) -> nn.Module:
    """ A model for validation: `model_name` with its pretrained weights, a Hub folder or a checkpoint file.

    A Hub folder's config.json must name `model_name`'s architecture (when a registry name is given).
    """
    import timm
    from .finite import check_weights
    from .hub import check_hub_folder

    if checkpoint is None:
        return timm.create_model(model_name, pretrained=pretrained or model_name.startswith(('local-dir:', 'hf-hub:')),
                                 **kwargs)
    path = Path(checkpoint)
    if path.is_dir():
        config = check_hub_folder(path)
        arch = model_name.split('.')[0] if model_name else None
        if arch and not arch.startswith(('local-dir:', 'hf-hub:')) and config['architecture'] != arch:
            raise ValueError(f'{path / "config.json"} names architecture {config["architecture"]!r}, not {arch!r}: '
                             f'the folder holds another model. Pass --model {config["architecture"]} or omit --model.')
        model = timm.create_model(f'local-dir:{path}', pretrained=True, **kwargs)
        check_weights(model.state_dict(), str(path), floating=False)
        return model
    if not model_name:
        raise ValueError(f'--checkpoint {checkpoint} is a file: name its architecture with --model.')
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    check_weights(model.state_dict(), str(path), floating=False)
    return model


SPLITS = ('validation', 'test')  # tried in this order when no --split is given


def is_datasets_folder(path: str) -> bool:
    """ A local Hugging Face `datasets` folder (Parquet/Arrow files or a saved dataset), not an image folder. """
    folder = Path(path)
    return folder.is_dir() and ((folder / 'dataset_dict.json').is_file() or any(
        f.suffix in ('.parquet', '.arrow') for pattern in ('*', '*/*') for f in folder.glob(pattern)))


def create_validation_dataset(dataset: str, split: Optional[str] = 'validation', transform=None
                              ) -> Tuple[torch.utils.data.Dataset, str]:
    """ The dataset and the split used: `hfds/<id or path>` (or a local `datasets` folder given without the
    prefix) -> timm's Hugging Face datasets reader; otherwise an image folder (timm ImageDataset, looking for a
    `split` sub-folder first). Without `split`, the first of SPLITS the dataset has. """
    from timm.data import create_dataset
    from torchvision.transforms import Compose

    from .data import to_rgb

    # timm's reader would convert('RGB') itself, which clips 16-bit images to white: hand over the decoded image
    transform = Compose([to_rgb, transform]) if transform is not None else to_rgb
    if not dataset.lower().startswith('hfds/') and is_datasets_folder(dataset):
        dataset = f'hfds/{dataset}'
    if not dataset.lower().startswith('hfds/') and not Path(dataset).is_dir():
        raise FileNotFoundError(f'Dataset {dataset} is not a folder. Give an image folder (one sub-folder per class) '
                                f'or hfds/<Hub id or local path> for a Hugging Face datasets dataset.')
    for candidate in ([split] if split else SPLITS):
        try:
            if dataset.lower().startswith('hfds/'):
                return create_dataset(dataset, root=None, split=candidate, transform=transform,
                                      input_img_mode=None), candidate
            return create_dataset('', root=dataset, split=candidate, search_split=True, transform=transform,
                                  input_img_mode=None), candidate
        except ValueError as e:  # datasets: Unknown split
            if split or 'split' not in str(e).lower():
                raise
    raise ValueError(f'{dataset} has none of the splits {", ".join(SPLITS)}: pass --split NAME.')


@torch.no_grad()
def validate(
        model: nn.Module,
        dataset: torch.utils.data.Dataset,
        batch_size: int = 128,
        workers: int = 0,
        device: str = 'cpu',
        progress: bool = True,
) -> Dict[str, Any]:
    """ Top-1 / top-5 accuracy (%) and mean cross-entropy of `model` (eval mode) over `dataset`. """
    from timm.utils import accuracy
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    model = model.eval().to(device)
    count, correct1, correct5, loss_sum = 0, 0, 0, 0.
    start = time.perf_counter()
    for images, targets in tqdm(loader, desc='validate', unit='batch', disable=not progress, file=sys.stderr):
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        if int(targets.max()) >= logits.shape[1]:
            raise ValueError(f'The dataset has label {int(targets.max())} but the model has {logits.shape[1]} '
                             f'classes: validate a model trained on this label set (or pass --num-classes).')
        loss_sum += F.cross_entropy(logits.float(), targets, reduction='sum').item()
        n = targets.shape[0]
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))  # percent of this batch
        correct1 += round(top1.item() * n / 100)
        correct5 += round(top5.item() * n / 100)
        count += n
    if count == 0:
        raise ValueError('The dataset is empty: check the path and --split.')
    if not math.isfinite(loss_sum):
        raise ValueError(f'The model gave non-finite logits (loss {loss_sum}): its weights or inputs are broken; '
                         f'no result is reported. Check the checkpoint (or use an earlier one).')
    return dict(
        samples=count,
        top1=round(100. * correct1 / count, 3),
        top5=round(100. * correct5 / count, 3),
        loss=round(loss_sum / count, 5),
        seconds=round(time.perf_counter() - start, 2),
    )


def _weights_source(args: argparse.Namespace, model: nn.Module) -> str:
    """ Where the weights came from: the checkpoint, the `local-dir:`/`hf-hub:` source, the pretrained tag's
    file, Hub id or URL, or nowhere (random init). """
    if args.checkpoint:
        return args.checkpoint
    if args.model.startswith(('local-dir:', 'hf-hub:')):
        return args.model
    if args.pretrained:
        cfg = model.pretrained_cfg
        source = cfg.get('file') or (f"hf-hub:{cfg['hf_hub_id']}" if cfg.get('hf_hub_id') else cfg.get('url'))
        return f'pretrained ({source})'
    return 'random init'


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument('--model', default='', help='model name (name.tag, local-dir:<folder>, hf-hub:<repo id>)')
    src = parser.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help="load the model's pretrained weights")
    src.add_argument('--checkpoint', default=None, help='Hub folder (config.json + model.safetensors) or a '
                                                          'checkpoint file (ours or the authors\')')
    parser.add_argument('--dataset', required=True, help='image folder, or hfds/<Hub id or local path>')
    parser.add_argument('--split', default=None, help='split, e.g. validation, test, test[:1000] (default: validation, '
                                                      'else test, whichever the dataset has)')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--num-classes', type=int, default=None, help='override the classifier size')
    parser.add_argument('--img-size', type=int, default=None, help='override the input size')
    parser.add_argument('--crop-pct', type=float, default=None, help='override the crop fraction')
    parser.add_argument('--interpolation', default=None, help='override the resize interpolation')
    parser.add_argument('--reparam', action='store_true', help='fold the model (timm reparameterize_model) first')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', default=None, metavar='PATH', help="write the results as JSON ('-' for stdout)")
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from timm.data import create_transform, resolve_data_config
    from timm.utils import reparameterize_model

    if not args.model and not args.checkpoint:
        raise SystemExit('validate: give --model NAME (with --pretrained or --checkpoint) or --checkpoint FOLDER.')
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    model = create_validation_model(args.model, args.pretrained, args.checkpoint, **kwargs)
    if args.reparam:
        model = reparameterize_model(model)
    overrides = {k: v for k, v in dict(
        img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation).items() if v is not None}
    data_config = resolve_data_config(overrides, model=model)
    dataset, split = create_validation_dataset(args.dataset, args.split,
                                               create_transform(**data_config, is_training=False))
    if args.split is None:
        print(f'validate: no --split given, using {split!r}', file=sys.stderr)
    results = dict(
        model=args.model or model.pretrained_cfg.get('architecture'),
        weights=_weights_source(args, model),
        dataset=args.dataset, split=split, reparam=args.reparam,
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 4),
        input_size=list(data_config['input_size']), crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'],
        **validate(model, dataset, args.batch_size, args.workers, args.device, progress=not args.no_progress),
    )
    width = max(len(k) for k in results)
    table = '\n'.join(f'{k:<{width}}  {v}' for k, v in results.items())
    print(table, file=sys.stderr if args.json == '-' else sys.stdout)
    if args.json == '-':
        print(json.dumps(results))
    elif args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + '\n')
    return 0
