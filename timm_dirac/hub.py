""" Hugging Face Hub folders for DiracNets: save (weights, timm config, generated model card) and push

`save_hub_folder` writes a folder that both the Hub and `timm.create_model('local-dir:<folder>')` accept:
`model.safetensors`, timm's `config.json` (via `timm.models.save_for_hf`) and a `README.md` model card generated
from the model and its pretrained cfg. The folder appears atomically (written to a temp dir, then renamed) and an
existing folder is never replaced unless asked.

`push_hub_folder` (CLI: `timm-dirac push`) uploads such a folder with huggingface_hub's `create_repo` +
`upload_folder`, using the user's usual token (`hf auth login` or `HF_TOKEN`).
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    'HUB_NAMESPACE', 'REPORTED_RESULTS', 'save_hub_folder', 'push_hub_folder', 'check_hub_folder',
    'generate_model_card', 'count_params_macs',
]

# Hub namespace (user or organisation) of the weights this project trains itself, e.g. `<ns>/diracnet34_1_cifar.<tag>`
HUB_NAMESPACE = os.environ.get('TIMM_DIRAC_HUB_NAMESPACE', 'timm-dirac')

HUB_FILES = ('model.safetensors', 'config.json', 'README.md')

AUTHORS_REPO = 'https://github.com/szagoruyko/diracnets'

# Accuracy the weights' authors report, per `<architecture>.<tag>` (REFERENCE.md section 5), for model cards.
REPORTED_RESULTS: Dict[str, Dict[str, Any]] = {
    'diracnet18.v2_in1k': dict(
        dataset='imagenet-1k', split='validation', top1=69.63, top5=89.12,
        source="the authors' export notebook (top-1 / top-5 error 30.37 / 10.88)", source_url=AUTHORS_REPO,
        note='A third-party re-evaluation with PIL resizing measured 68.53 / 88.30; the authors trained with '
             'OpenCV resizing.'),
    'diracnet34.v2_in1k': dict(
        dataset='imagenet-1k', split='validation', top1=72.21,
        source='the DiracNets paper (top-1 error 27.79), also cited by the RepVGG paper',
        source_url='https://arxiv.org/abs/1706.00388',
        note='A third-party re-evaluation with PIL resizing measured 71.25 / 90.07 top-1 / top-5; the authors '
             'trained with OpenCV resizing.'),
}

# pretrained tag fragments -> Hub dataset ids
_TAG_DATASETS = (('in1k', 'imagenet-1k'), ('in22k', 'imagenet-21k'), ('c100', 'cifar100'), ('cifar100', 'cifar100'),
                 ('c10', 'cifar10'), ('cifar10', 'cifar10'))

_CITATION = """@article{zagoruyko2017diracnets,
  title={DiracNets: Training Very Deep Neural Networks Without Skip-Connections},
  author={Zagoruyko, Sergey and Komodakis, Nikos},
  journal={arXiv preprint arXiv:1706.00388},
  year={2017}
}"""


def _is_folded(model: nn.Module) -> bool:
    return bool(getattr(model, 'inference_mode', False))


def _num(value: float) -> str:
    return f'{value:.2f}' if value >= 1 else f'{value:.4f}'


def _model_name(model: nn.Module) -> str:
    cfg = model.pretrained_cfg
    return f"{cfg['architecture']}.{cfg['tag']}" if cfg.get('tag') else cfg['architecture']


def _dataset(model: nn.Module, train_info: Dict[str, Any]) -> Optional[str]:
    if train_info.get('dataset'):
        return train_info['dataset']
    reported = REPORTED_RESULTS.get(_model_name(model))
    if reported:
        return reported['dataset']
    tag = model.pretrained_cfg.get('tag') or ''
    return next((ds for frag, ds in _TAG_DATASETS if frag in tag.split('_')), None)


def count_params_macs(model: nn.Module) -> Dict[str, Tuple[float, float]]:
    """ Trainable parameters (M) and GMACs (convs + linear, one image at the cfg input size) of the train and the
    folded form of `model`'s architecture, measured with `torch.utils.flop_counter` on meta tensors. """
    import timm
    from torch.utils.flop_counter import FlopCounterMode
    from timm.models import get_model_args, get_model_input_config

    args = {k: v for k, v in get_model_args(model).items() if k != 'inference_mode'}
    input_size = get_model_input_config(model)['input_size']
    out = {}
    for form, folded in (('train', False), ('folded', True)):
        net = timm.create_model(model.pretrained_cfg['architecture'], inference_mode=folded, device='meta', **args)
        params = sum(p.numel() for p in net.parameters())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net.eval()(torch.empty((1,) + tuple(input_size), device='meta'))
        out[form] = (params / 1e6, counter.get_total_flops() / 2 / 1e9)
    return out


def generate_model_card(model: nn.Module, train_info: Optional[Dict[str, Any]] = None) -> str:
    """ README.md for a DiracNet Hub folder: Hub metadata (YAML) and a body generated from the model and its cfg.

    `train_info` (for weights trained by this project) may hold `dataset` (Hub dataset id), `metrics`
    (e.g. {'top1': 94.1, 'top5': 99.8, 'loss': 0.2}, percent), `eval_split`, `metrics_source`, `license`, `int8`
    (measured by `timm-dirac quantize`: `rows` of flow, fp32_top1, int8_top1, speedup; `command`; `measured`, the
    data and machine), and any
    other facts (epochs, recipe, command, ...), listed under "Training".
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    train_info = dict(train_info or {})
    cfg = model.pretrained_cfg
    arch = cfg['architecture']
    name = _model_name(model)
    folded = _is_folded(model)
    dataset = _dataset(model, train_info)
    reported = REPORTED_RESULTS.get(name)
    url = cfg.get('url') or ''
    from_authors = name in REPORTED_RESULTS or 'modelzoo-networks' in url
    license_id = train_info.pop('license', None) or cfg.get('license') or ('unknown' if from_authors else 'apache-2.0')

    # metrics: measured ones from train_info, else those the weights' authors report
    results, metrics_source, source_url = {}, None, None
    split = train_info.pop('eval_split', None)
    if train_info.get('metrics'):
        results = dict(train_info.pop('metrics'))
        metrics_source = train_info.pop('metrics_source', 'measured by this project (timm-dirac)')
    elif reported:
        results = {k: reported[k] for k in ('top1', 'top5') if k in reported}
        metrics_source, source_url, split = reported['source'], reported['source_url'], reported['split']
    train_info.pop('dataset', None)
    int8 = train_info.pop('int8', None)
    eval_results = [
        EvalResult(task_type='image-classification', dataset_type=dataset, dataset_name=dataset, dataset_split=split,
                   metric_type='accuracy', metric_name=f'{k} accuracy', metric_value=float(v),
                   source_name=metrics_source if source_url else None, source_url=source_url)
        for k, v in results.items() if k in ('top1', 'top5')
    ] if dataset else None
    card_data = ModelCardData(
        library_name='timm', license=license_id, pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'timm-dirac', 'diracnet', 'reparameterized'],
        datasets=[dataset] if dataset else None, model_name=name, eval_results=eval_results or None,
    )

    stats = count_params_macs(model)
    in_size = tuple(cfg.get('input_size', (3, 224, 224)))
    layers = sum(len(s.blocks) for s in model.stages) if hasattr(model, 'stages') else None
    if from_authors:
        origin = (f"converted from the authors' released weights ({url or AUTHORS_REPO}). The authors' repository has "
                  f"no licence file, so the licence of these weights is unknown; timm-dirac does not re-host them: its "
                  f"pretrained tag downloads them from the authors' address and converts them on the user's machine")
    else:
        origin = 'trained by the timm-dirac project'
    lines = [
        f'# Model card for {name}',
        '',
        f'A DiracNet image classification model ({arch}: {layers} Dirac layers, no skip connections), weights '
        f'{origin}. Each layer is ReLU -> Dirac-parameterized 3x3 conv (`alpha * identity + beta * normalize(W)`) -> '
        f'BatchNorm; `reparameterize()` folds every layer into one plain conv with bias, leaving a VGG-like chain. '
        f'These weights are stored in the {"folded (inference_mode=True)" if folded else "train"} form.',
        '',
        '## Model Details',
        '- **Model Type:** Image classification / feature backbone',
        '- **Model Stats:**',
        f'  - Params (M): {_num(stats["train"][0])} train form, {_num(stats["folded"][0])} folded',
        f'  - GMACs: {_num(stats["train"][1])} train form, {_num(stats["folded"][1])} folded '
        f'(convs and linear layers, torch.utils.flop_counter)',
        f'  - Image size: {in_size[1]} x {in_size[2]}',
        f'- **Dataset:** {dataset or "unknown"}',
        f'- **Papers:** DiracNets: Training Very Deep Neural Networks Without Skip-Connections: '
        f'https://arxiv.org/abs/1706.00388',
        f'- **Original:** {cfg.get("origin_url") or AUTHORS_REPO}',
        f'- **Weights:** {origin}',
        f'- **License:** {license_id}',
        f'- **Preprocessing:** input {in_size[1]} x {in_size[2]}, crop_pct {cfg.get("crop_pct")}, '
        f'{cfg.get("interpolation")} interpolation, mean {tuple(cfg.get("mean", ()))}, std {tuple(cfg.get("std", ()))}',
        '',
        '## Model Usage',
        '### Image Classification',
        '```python',
        'import timm',
        'import timm_dirac  # registers the DiracNet models with timm',
        'from PIL import Image',
        '',
        f"model = timm.create_model('hf-hub:<repo id>', pretrained=True)  # or '{name}'",
        'model = model.eval()',
        'data_config = timm.data.resolve_model_data_config(model)',
        'transforms = timm.data.create_transform(**data_config, is_training=False)',
        "img = Image.open('image.jpg').convert('RGB')",
        'top5_prob, top5_idx = model(transforms(img).unsqueeze(0)).softmax(dim=1).topk(5)',
        '```',
        '### Folding for deployment',
        '```python',
        'from timm.utils import reparameterize_model',
        'model = reparameterize_model(model)  # plain conv + ReLU chain, same outputs (eval mode)',
        f"folded = timm.create_model('{name}', pretrained=True, inference_mode=True)  # or build it folded",
        '```',
        '### int8 (ONNX Runtime)',
        'The `split` flow keeps each folded Dirac tap out of the int8 weights (an exact int8 1x1 conv carries it), so '
        'the learned weights keep their precision; its 7-bit weights cannot saturate the 16-bit pair sums of x86 '
        'CPUs without VNNI, so one file serves every CPU.',
        '```bash',
        'timm-dirac quantize --checkpoint <this folder> --calib hfds/<training images> --out int8/  # int8/model_int8_split.onnx',
        '```',
        '### Feature Map Extraction',
        '```python',
        f"model = timm.create_model('{name}', pretrained=True, features_only=True)",
        'for fmap in model(transforms(img).unsqueeze(0)):',
        '    print(fmap.shape)',
        '```',
    ]
    if results:
        lines += ['', '## Model Comparison', '', '| metric | value | split | source |', '|---|---|---|---|']
        lines += [f'| {k} | {v} | {split or "-"} | {metrics_source} |' for k, v in results.items()]
        if reported and reported.get('note') and metrics_source == reported['source']:
            lines += ['', reported['note']]
    if int8:
        lines += ['', '## int8 deployment', '', '| flow | fp32 top-1 | int8 top-1 | drop | int8 / ONNX Runtime fp32 |',
                  '|---|---|---|---|---|']
        lines += [f"| {r['flow']} | {r['fp32_top1']:.2f} | {r['int8_top1']:.2f} | {r['fp32_top1'] - r['int8_top1']:.2f} "
                  f"| {r['speedup']} |" for r in int8['rows']]
        lines += ['', f"Measured with `{int8['command']}` ({int8['measured']})."]
    if train_info:
        lines += ['', '## Training', '']
        lines += [f'- **{k}:** {json.dumps(v) if isinstance(v, (dict, list, tuple)) else v}'
                  for k, v in train_info.items()]
    lines += ['', '## Citation', '```bibtex', _CITATION, '```', '']
    return str(ModelCard.from_template(card_data, template_str='---\n{{ card_data }}\n---\n' + '\n'.join(lines)))


def save_hub_folder(
        model: nn.Module,
        out_dir: os.PathLike,
        train_info: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
) -> Path:
    """ Write `model` as a Hub folder (model.safetensors, timm config.json, README.md), atomically.

    A folded model is recorded as `inference_mode=True`, so the config rebuilds the folded form. An existing
    `out_dir` is refused unless `overwrite`, and even then replaced only once the new folder is complete.
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f'{out_dir} already exists; nothing was written. Choose another output folder, or pass overwrite=True '
            f'(CLI: --overwrite) to replace it.')
    if not getattr(model, 'pretrained_cfg', None) or not model.pretrained_cfg.get('architecture'):
        raise ValueError('save_hub_folder needs a model made by timm.create_model (it reads model.pretrained_cfg).')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
    try:
        model_args = dict(inference_mode=True) if _is_folded(model) else None
        save_for_hf(model, tmp, model_args=model_args, safe_serialization=True)
        (tmp / 'README.md').write_text(generate_model_card(model, train_info), encoding='utf-8')
        check_hub_folder(tmp)
        _set_default_permissions(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.old-', dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _set_default_permissions(folder: Path):
    """ mkdtemp and atomic file writers create owner-only entries: give them the usual umask permissions. """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def check_hub_folder(folder: os.PathLike) -> Dict[str, Any]:
    """ Check that `folder` is a complete DiracNet Hub folder; returns its config. Raises with what is wrong. """
    from safetensors import safe_open

    folder = Path(folder)
    missing = [f for f in HUB_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f'{folder} is not a Hub folder: {", ".join(missing)} missing. Write one with '
                                f'`timm-dirac convert` or timm_dirac.hub.save_hub_folder().')
    try:
        config = json.loads((folder / 'config.json').read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{folder / "config.json"} is not valid JSON ({e}); rewrite the folder.') from e
    arch = config.get('architecture', '')
    if not arch.startswith('diracnet'):
        raise ValueError(f'{folder / "config.json"} names architecture {arch!r}, not a DiracNet; this is not a '
                         f'timm-dirac folder.')
    try:
        with safe_open(folder / 'model.safetensors', framework='pt') as f:
            keys = list(f.keys())
    except Exception as e:
        raise ValueError(f'{folder / "model.safetensors"} is not a readable safetensors file ({e}); it may be '
                         f'truncated or corrupt. Rewrite the folder.') from e
    if not any(k.startswith('stem.conv.') for k in keys):
        raise ValueError(f'{folder / "model.safetensors"} holds no DiracNet weights (no stem.conv.*).')
    return config


def upload_file_list(folder: os.PathLike) -> List[str]:
    """ The files `push` uploads: every regular file in `folder`, hidden ones excepted, as repo paths. """
    folder = Path(folder)
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob('*')
        if p.is_file() and not any(part.startswith('.') for part in p.relative_to(folder).parts))


def push_hub_folder(
        folder: os.PathLike,
        repo_id: str,
        private: bool = False,
        dry_run: bool = False,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
) -> List[str]:
    """ Upload a Hub folder to `repo_id` (created if missing); returns the uploaded repo paths.

    With `dry_run`, checks the folder and returns the files without contacting the Hub.
    """
    check_hub_folder(folder)
    if repo_id.count('/') != 1:
        raise ValueError(f'--repo-id {repo_id!r} must be <namespace>/<name>, e.g. {HUB_NAMESPACE}/diracnet18.in1k.')
    files = upload_file_list(folder)
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type='model', allow_patterns=files,
        commit_message=commit_message or f'Upload {Path(folder).name} with timm-dirac')
    return files


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument('folder', help='Hub folder written by `timm-dirac convert` (or save_hub_folder)')
    parser.add_argument('--repo-id', required=True, help=f'Hub repository, e.g. {HUB_NAMESPACE}/diracnet18.in1k')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--dry-run', action='store_true', help='show the files that would be uploaded, upload nothing')
    parser.add_argument('--commit-message', default=None)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    files = push_hub_folder(folder, args.repo_id, private=args.private, dry_run=args.dry_run,
                            commit_message=args.commit_message)
    verb = 'would upload' if args.dry_run else 'uploaded'
    print(f'{verb} to https://huggingface.co/{args.repo_id}{" (private)" if args.private else ""}:')
    for f in files:
        print(f'  {f}  ({(folder / f).stat().st_size:,} bytes)')
    return 0
