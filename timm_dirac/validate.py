""" `timm-dirac validate`: top-1 / top-5 and cross-entropy of a model on an image folder or a `datasets` dataset

The data is read as training reads it (`timm_dirac.data.load_eval_split`), with the model's own preprocessing (timm's
data config, overridable); the weights come from `timm_dirac.loading.load_model`. What is scored is checked first:
data whose class names are not the model's (`pretrained_cfg['label_names']`) and a model without a classifier are
refused, as training refuses splits of other classes.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn as nn

from .metrics import check_classifier, evaluate

__all__ = ['validate']


def validate(
        model: nn.Module,
        dataset: torch.utils.data.Dataset,
        batch_size: int = 128,
        workers: int = 0,
        device: str = 'cpu',
        progress: bool = True,
) -> Dict[str, Any]:
    """ Top-1 / top-5 accuracy (%) and mean cross-entropy of `model` (eval mode) over `dataset`, whose class names
    (where it has them, e.g. from `load_eval_split`) must be the model's. """
    from .data import check_model_classes, class_names_of

    check_classifier(model)
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        base = base.dataset
    check_model_classes(getattr(model, 'pretrained_cfg', {}).get('label_names'), class_names_of(dataset),
                        getattr(base, 'source', 'the dataset'), getattr(base, 'split', '') or 'given')
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    model = model.eval().to(device)
    start = time.perf_counter()
    result = evaluate(lambda images: model(images.to(device)), loader, progress=progress, desc='validate')
    return dict(
        samples=result['count'],
        top1=round(result['top1'], 3),
        top5=round(result['top5'], 3),
        loss=round(result['loss'], 5),
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
    from .errors import number

    parser.add_argument('--model', default='', help='model name (name.tag, local-dir:<folder>, hf-hub:<repo id>)')
    src = parser.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help="load the model's pretrained weights")
    src.add_argument('--checkpoint', default=None, help='Hub folder (config.json + model.safetensors) or a '
                                                          'checkpoint file (ours or the authors\')')
    parser.add_argument('--dataset', required=True, help='image folder, or hfds/<Hub id or local path>')
    parser.add_argument('--split', default=None, help='split, e.g. validation, test, test[:1000] (default: validation, '
                                                      'else test, whichever the dataset has)')
    parser.add_argument('--batch-size', type=number(int, 1), default=128)
    parser.add_argument('--workers', type=number(int, 0), default=2)
    parser.add_argument('--num-classes', type=number(int, 1), default=None, help='override the classifier size')
    parser.add_argument('--img-size', type=number(int, 1), default=None, help='override the input size')
    parser.add_argument('--crop-pct', type=number(float, 0, 1, above=True), default=None,
                        help='override the crop fraction (0 to 1]')
    parser.add_argument('--interpolation', default=None, help='override the resize interpolation')
    parser.add_argument('--reparam', action='store_true', help='fold the model (timm reparameterize_model) first')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', default=None, metavar='PATH', help="write the results as JSON ('-' for stdout)")
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from timm.data import resolve_data_config
    from timm.utils import reparameterize_model

    from .data import eval_transform, load_eval_split
    from .loading import load_model

    if not args.model and not args.checkpoint:
        raise SystemExit('validate: give --model NAME (with --pretrained or --checkpoint) or --checkpoint FOLDER.')
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    model = load_model(args.model, args.checkpoint, args.pretrained, **kwargs)
    if args.reparam:
        model = reparameterize_model(model)
    overrides = {k: v for k, v in dict(
        img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation).items() if v is not None}
    data_config = resolve_data_config(overrides, model=model)
    dataset, split = load_eval_split(args.dataset, args.split, eval_transform(data_config))
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
