""" Hugging Face Hub folders for DiracNets: save (weights, timm config, generated model card) and push

`save_hub_folder` writes a folder that both the Hub and `timm.create_model('local-dir:<folder>')` accept:
`model.safetensors`, timm's `config.json` (via `timm.models.save_for_hf`) and a `README.md` model card generated
from the model and its pretrained cfg. The folder appears atomically (written to a temp dir, then renamed) and an
existing folder is never replaced unless asked.

Only weights that are verifiably a pretrained tag's own (`release=True`, e.g. the authors' file checked by its hash)
carry that tag's name, source, licence and reported accuracy; anything else is described as what it is.

`push_hub_folder` (CLI: `timm-dirac push`) uploads such a folder with huggingface_hub's `create_repo` +
`create_commit`, using the user's usual token (`hf auth login` or `HF_TOKEN`), with the repository id filled in
the card's usage examples.
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .checkpoint_io import check_safetensors, read_config
from .diracnet import AUTHORS_REPO, HUB_NAMESPACE, REPORTED_RESULTS
from .layers import is_folded

__all__ = [
    'HUB_NAMESPACE', 'REPORTED_RESULTS', 'REPO_ID_PLACEHOLDER', 'save_hub_folder', 'push_hub_folder',
    'check_hub_folder', 'generate_model_card', 'count_params_macs', 'published_cfg',
]

HUB_FILES = ('model.safetensors', 'config.json', 'README.md')

# what a card says where the Hub repository id belongs until `push` fills in the real one
REPO_ID_PLACEHOLDER = '<namespace>/<repository>'

# dataset names as written in configs and training runs -> (Hub dataset id, readable name)
_DATASETS = {
    'imagenet-1k': ('ILSVRC/imagenet-1k', 'ImageNet-1k'),
    'cifar10': ('uoft-cs/cifar10', 'CIFAR-10'),
    'cifar100': ('uoft-cs/cifar100', 'CIFAR-100'),
}
_DATASETS.update({hub_id: (hub_id, name) for hub_id, name in list(_DATASETS.values())})

# pretrained cfg keys that say where weights come from and what is known about them: true only of the tag's own
_PROVENANCE_KEYS = ('tag', 'url', 'file', 'hf_hub_id', 'hf_hub_filename', 'source', 'origin_url', 'license', 'notes',
                    'label_names', 'label_descriptions')

_CITATIONS = (
    """@article{zagoruyko2017diracnets,
  title={DiracNets: Training Very Deep Neural Networks Without Skip-Connections},
  author={Zagoruyko, Sergey and Komodakis, Nikos},
  journal={arXiv preprint arXiv:1706.00388},
  year={2017}
}""",
    r"""@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\url{https://github.com/huggingface/pytorch-image-models}}
}""",
)


def _num(value: float) -> str:
    return f'{value:.2f}' if value >= 1 else f'{value:.4f}'


def published_cfg(model: nn.Module, release: bool = False) -> Dict[str, Any]:
    """ The pretrained cfg that describes `model`'s weights: its own for the weights of its tag (`release`), else
    without what is only true of the tag's weights (tag, source, licence, notes). `timm.create_model` gives every
    model its default tag's cfg, weights loaded or not, so only the caller can say the weights are the tag's. """
    cfg = dict(model.pretrained_cfg)
    if not release:
        for key in _PROVENANCE_KEYS:
            cfg.pop(key, None)
    return cfg


def _model_name(cfg: Dict[str, Any]) -> str:
    return f"{cfg['architecture']}.{cfg['tag']}" if cfg.get('tag') else cfg['architecture']


def _dataset(name: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """ (Hub dataset id, readable name) of a dataset name from a config or a training run. """
    if not name:
        return None, None
    return _DATASETS.get(name, (name, name))


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


def _fact(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)


def generate_model_card(
        model: nn.Module,
        train_info: Optional[Dict[str, Any]] = None,
        release: bool = False,
        repo_id: Optional[str] = None,
) -> str:
    """ README.md for a DiracNet Hub folder: Hub metadata (YAML) and a body generated from the model and its cfg.

    `release`: the weights are those of the model's pretrained tag (e.g. the authors' file, checked by its hash);
    only then does the card show the tag's name, source, licence and reported accuracy. `repo_id` fills in the
    usage examples (`push` does it on upload; until then they read REPO_ID_PLACEHOLDER).

    `train_info` may hold `dataset` (a name like 'cifar10' or a Hub dataset id), `metrics` (e.g. {'top1': 94.1,
    'top5': 99.8, 'loss': 0.2}, percent), `eval_split`, `metrics_source`, `license`, `source` (what the weights were
    converted from), `int8` (measured by `timm-dirac quantize`: `rows` of flow, fp32_top1, int8_top1, speedup;
    `command`; `measured`, the data and machine), and any other facts (epochs, recipe, command, ...), listed under
    "Training".
    """
    from huggingface_hub import EvalResult, ModelCardData

    train_info = dict(train_info or {})
    cfg = published_cfg(model, release)
    arch = cfg['architecture']
    name = _model_name(cfg)
    repo_id = repo_id or REPO_ID_PLACEHOLDER
    folded = is_folded(model)
    reported = REPORTED_RESULTS.get(name) if release else None
    url = cfg.get('url') or ''
    authors_release = release and (reported is not None or 'modelzoo-networks' in url)
    dataset_id, dataset_name = _dataset(train_info.pop('dataset', None) or (reported or {}).get('dataset'))
    license_id = train_info.pop('license', None) or cfg.get('license') or 'unknown'

    # metrics: measured ones from train_info, else those the weights' authors report
    results, metrics_source, source_url = {}, None, None
    split = train_info.pop('eval_split', None)
    if train_info.get('metrics'):
        results = dict(train_info.pop('metrics'))
        metrics_source = train_info.pop('metrics_source', 'measured by this project (timm-dirac)')
    elif reported:
        results = {k: reported[k] for k in ('top1', 'top5') if k in reported}
        metrics_source, source_url, split = reported['source'], reported['source_url'], reported['split']
    source = train_info.pop('source', None)
    int8 = train_info.pop('int8', None)
    metric_ids = {'top1': ('accuracy', 'Top-1 Accuracy'), 'top5': ('top-5-accuracy', 'Top-5 Accuracy')}
    eval_results = [
        EvalResult(task_type='image-classification', task_name='Image Classification', dataset_type=dataset_id,
                   dataset_name=dataset_name, dataset_split=split, metric_type=metric_ids[k][0],
                   metric_name=metric_ids[k][1], metric_value=float(v),
                   source_name=metrics_source if source_url else None, source_url=source_url)
        for k, v in results.items() if k in metric_ids
    ] if dataset_id else None
    card_data = ModelCardData(
        library_name='timm', license=license_id, pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'timm-dirac', 'diracnet', 'reparameterized'],
        datasets=[dataset_id] if dataset_id else None, model_name=name, eval_results=eval_results or None,
    )

    stats = count_params_macs(model)
    in_size = tuple(cfg.get('input_size', (3, 224, 224)))
    layers = sum(len(s.blocks) for s in model.stages) if hasattr(model, 'stages') else None
    licence_note = ''
    if authors_release:
        origin = f"converted from the authors' released weights ({url or AUTHORS_REPO})"
        licence_note = (" (the authors' repository has no licence file; timm-dirac does not re-host these weights: "
                        "its pretrained tag downloads them from the authors' address and converts them on the user's "
                        "machine)")
    elif source:
        origin = f'converted from {source}'
    elif results:
        origin = 'trained with timm-dirac (see Training)'
    else:
        origin = 'of unknown origin'
    preprocessing = (f'input {in_size[1]} x {in_size[2]}, crop_pct {cfg.get("crop_pct")}, {cfg.get("interpolation")} '
                     f'interpolation, mean {tuple(cfg.get("mean", ()))}, std {tuple(cfg.get("std", ()))}')
    hub_name = f'hf-hub:{repo_id}'
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
        f'- **Dataset:** {dataset_name or "not stated"}',
        '- **Papers:**',
        '  - DiracNets: Training Very Deep Neural Networks Without Skip-Connections: https://arxiv.org/abs/1706.00388',
        f'- **Original:** {cfg.get("origin_url") or AUTHORS_REPO}',
        f'- **Weights:** {origin}',
        f'- **License:** {license_id}{licence_note}',
        f'- **Preprocessing:** {preprocessing}',
        '',
        '## Model Usage',
        '```bash',
        'pip install timm-dirac  # or, in a clone of the timm-dirac repository: pip install -e .',
        '```',
        '### Image Classification',
        '```python',
        'from urllib.request import urlopen',
        'from PIL import Image',
        'import timm',
        'import torch',
        'import timm_dirac  # registers the DiracNet models with timm: import it before create_model',
        '',
        "img = Image.open(urlopen('https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/"
        "beignets-task-guide.png')).convert('RGB')",
        '',
        f"model = timm.create_model('{hub_name}', pretrained=True)",
        'model = model.eval()',
        'data_config = timm.data.resolve_model_data_config(model)',
        'transforms = timm.data.create_transform(**data_config, is_training=False)',
        'output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1',
        'top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)',
        "labels = model.pretrained_cfg['label_names']  # class names, in classifier order",
        '```',
        '### Feature Map Extraction',
        '```python',
        f"model = timm.create_model('{hub_name}', pretrained=True, features_only=True).eval()",
        'for fmap in model(transforms(img).unsqueeze(0)):',
        '    print(fmap.shape)',
        '```',
        '### Image Embeddings',
        '```python',
        f"model = timm.create_model('{hub_name}', pretrained=True, num_classes=0).eval()  # no classifier",
        'output = model(transforms(img).unsqueeze(0))  # (batch_size, num_features) tensor',
        '# or equivalently, without setting num_classes=0',
        'output = model.forward_features(transforms(img).unsqueeze(0))  # unpooled, (batch_size, num_features, H, W)',
        'output = model.forward_head(output, pre_logits=True)  # (batch_size, num_features)',
        '```',
        '### Folding for deployment',
        '```python',
        'from timm.utils import reparameterize_model',
        'model = reparameterize_model(model)  # plain conv + ReLU chain, same outputs (eval mode)',
        f"folded = timm.create_model('{hub_name}', pretrained=True, inference_mode=True)  # or build it folded",
        '```',
        '### int8 (ONNX Runtime)',
        'The `split` flow keeps each folded Dirac tap out of the int8 weights (an exact int8 1x1 conv carries it), so '
        'the learned weights keep their precision; its 7-bit weights cannot saturate the 16-bit pair sums of x86 '
        'CPUs without VNNI, so one file serves every CPU.',
        '```bash',
        'timm-dirac quantize --checkpoint <this folder> --calib hfds/<training images> --out int8/  # int8/model_int8_split.onnx',
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
        lines += [f'- **{k}:** {_fact(v)}' for k, v in train_info.items()]
    lines += ['', '## Citation']
    for citation in _CITATIONS:
        lines += ['```bibtex', citation, '```']
    return f'---\n{card_data.to_yaml()}\n---\n' + '\n'.join(lines) + '\n'


def save_hub_folder(
        model: nn.Module,
        out_dir: os.PathLike,
        train_info: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
        release: bool = False,
        label_names: Optional[Sequence[str]] = None,
) -> Path:
    """ Write `model` as a Hub folder (model.safetensors, timm config.json, README.md), atomically.

    `release`: the weights are verifiably those of the model's pretrained tag (see `published_cfg`); otherwise the
    folder carries no tag, source, licence or notes of the tag. `label_names`: the class names in classifier order,
    written to config.json as timm's `label_names` (default: the model's pretrained cfg's, if it has them).
    A folded model (however it was folded) is recorded as `inference_mode=True`, so the config rebuilds the folded
    form. An existing `out_dir` is refused unless `overwrite`, and even then replaced only once the new folder is
    complete.
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f'{out_dir} already exists; nothing was written. Choose another output folder, or pass overwrite=True '
            f'(CLI: --overwrite) to replace it.')
    if not getattr(model, 'pretrained_cfg', None) or not model.pretrained_cfg.get('architecture'):
        raise ValueError('save_hub_folder needs a model made by timm.create_model (it reads model.pretrained_cfg).')
    cfg = published_cfg(model, release)
    label_names = list(label_names or cfg.get('label_names') or [])
    if label_names and len(label_names) != model.num_classes:
        raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes: give one name '
                         f'per classifier output, in label order.')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
    model_cfg = model.pretrained_cfg
    try:
        model.pretrained_cfg = cfg  # what save_for_hf writes as the folder's pretrained cfg
        save_for_hf(model, tmp, model_config=dict(label_names=label_names) if label_names else None,
                    model_args=dict(inference_mode=True) if is_folded(model) else None, safe_serialization=True)
        (tmp / 'README.md').write_text(generate_model_card(model, train_info, release), encoding='utf-8')
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
        model.pretrained_cfg = model_cfg
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
    folder = Path(folder)
    missing = [f for f in HUB_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f'{folder} is not a Hub folder: {", ".join(missing)} missing. Write one with '
                                f'`timm-dirac convert` or timm_dirac.hub.save_hub_folder().')
    config = read_config(folder)
    arch = config.get('architecture', '')
    if not arch.startswith('diracnet'):
        raise ValueError(f'{folder / "config.json"} names architecture {arch!r}, not a DiracNet; this is not a '
                         f'timm-dirac folder.')
    keys = check_safetensors(folder / 'model.safetensors')
    if not any(k.startswith('stem.conv.') for k in keys):
        raise ValueError(f'{folder / "model.safetensors"} holds no DiracNet weights (no stem.conv.*).')
    return config


def upload_file_list(folder: os.PathLike) -> List[str]:
    """ The files `push` uploads: every regular file in `folder`, hidden ones excepted, as repo paths. """
    folder = Path(folder)
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob('*')
        if p.is_file() and not any(part.startswith('.') for part in p.relative_to(folder).parts))


def _card_license(folder: Path) -> Optional[str]:
    from huggingface_hub import ModelCard
    return ModelCard.load(folder / 'README.md').data.license


def push_hub_folder(
        folder: os.PathLike,
        repo_id: str,
        private: bool = False,
        dry_run: bool = False,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        allow_unknown_license: bool = False,
) -> List[str]:
    """ Upload a Hub folder to `repo_id` (created if missing) in one commit; returns the uploaded repo paths.

    The uploaded README.md names `repo_id` in its usage examples (the local folder is left as it is). A folder whose
    card says `license: unknown` (e.g. the authors' weights, which timm-dirac does not re-host) is refused unless
    `allow_unknown_license`. With `dry_run`, checks the folder and returns the files without contacting the Hub.
    """
    folder = Path(folder)
    check_hub_folder(folder)
    if repo_id.count('/') != 1:
        raise ValueError(f'--repo-id {repo_id!r} must be <namespace>/<name>, e.g. {HUB_NAMESPACE}/diracnet18.in1k.')
    license_id = _card_license(folder)
    if license_id in (None, 'unknown') and not allow_unknown_license:
        raise ValueError(
            f'{folder / "README.md"} gives the licence of these weights as {license_id or "nothing"}: nothing was '
            f'uploaded. Publish only weights you may re-host: set the licence in the card (convert --license ID), or '
            f'pass --allow-unknown-license if you have the right to publish them anyway.')
    files = upload_file_list(folder)
    if dry_run:
        return files
    from huggingface_hub import CommitOperationAdd, HfApi

    card = (folder / 'README.md').read_text(encoding='utf-8').replace(REPO_ID_PLACEHOLDER, repo_id)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=card.encode('utf-8') if f == 'README.md'
                                     else str(folder / f)) for f in files]
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    api.create_commit(repo_id=repo_id, repo_type='model', operations=operations,
                      commit_message=commit_message or f'Upload {folder.name} with timm-dirac')
    return files


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument('folder', help='Hub folder written by `timm-dirac convert` (or save_hub_folder)')
    parser.add_argument('--repo-id', required=True, help=f'Hub repository, e.g. {HUB_NAMESPACE}/diracnet18.in1k')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--dry-run', action='store_true', help='show the files that would be uploaded, upload nothing')
    parser.add_argument('--allow-unknown-license', action='store_true',
                        help="upload even though the card's licence is unknown (you have the right to publish them)")
    parser.add_argument('--commit-message', default=None)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    files = push_hub_folder(folder, args.repo_id, private=args.private, dry_run=args.dry_run,
                            commit_message=args.commit_message, allow_unknown_license=args.allow_unknown_license)
    verb = 'would upload' if args.dry_run else 'uploaded'
    print(f'{verb} to https://huggingface.co/{args.repo_id}{" (private)" if args.private else ""}:')
    for f in files:
        print(f'  {f}  ({(folder / f).stat().st_size:,} bytes)')
    return 0
