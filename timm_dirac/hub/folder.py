""" Hugging Face Hub folders for DiracNets: save (weights, timm config, model card), check and upload

`save_hub_folder` writes a folder that both the Hub and `timm.create_model('local-dir:<folder>')` accept:
`model.safetensors`, timm's `config.json` (via `timm.models.save_for_hf`) and a `README.md` model card laid out by
timm's own card writer (`generate_readme`), with the Hub metadata (licence, datasets, model-index) from
huggingface_hub's `ModelCardData`. The folder appears atomically (written to a temp dir, then renamed) and an
existing folder is never replaced unless asked.

Only weights that are verifiably a pretrained tag's own (`release=True`, e.g. the authors' file checked by its hash)
carry that tag's name, source, licence and reported accuracy; anything else is described as what it is.

`push_hub_folder` (command: `timm-dirac push`, in `push.py`) uploads such a folder with huggingface_hub's
`create_repo` + `upload_folder`, with the repository id filled in the card's usage examples.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..loading import check_safetensors, read_config
from ..diracify import is_folded

__all__ = [
    'HUB_NAMESPACE', 'REPORTED_RESULTS', 'REPO_ID_PLACEHOLDER', 'save_hub_folder', 'push_hub_folder',
    'check_hub_folder', 'generate_model_card', 'count_params_macs', 'published_cfg', 'upload_file_list',
]

# Hub namespace (user or organisation) of the weights this project trains itself, e.g. `<ns>/diracnet34_1_cifar.<tag>`
HUB_NAMESPACE = 'timm-dirac'

AUTHORS_REPO = 'https://github.com/szagoruyko/diracnets'

_AUTHORS_IMAGENET_EVAL = (
    "The authors trained and evaluated these weights with OpenCV: resize to 256 with cv2.INTER_CUBIC (bicubic, no "
    "antialiasing), centre crop 224, ImageNet mean / std. This config uses timm's closest setting (bicubic, crop_pct "
    "0.875); timm resizes with PIL, which antialiases, so its accuracy can differ from the reported one by about a "
    "point (pytorchcv, https://github.com/osmr/imgclsmob, reports {pytorchcv} for its {name}).")

# Accuracy the weights' authors report, per `<architecture>.<tag>`, for the model cards of exactly those weights.
REPORTED_RESULTS: Dict[str, Dict[str, Any]] = {
    'diracnet18.v2_in1k': dict(
        dataset='imagenet-1k', split='validation', top1=69.63, top5=89.12,
        source="the authors' export notebook (top-1 / top-5 error 30.37 / 10.88)", source_url=AUTHORS_REPO,
        note=_AUTHORS_IMAGENET_EVAL.format(pytorchcv='68.53 top-1 (31.47% error)', name='DiracNetV2-18')),
    'diracnet34.v2_in1k': dict(
        dataset='imagenet-1k', split='validation', top1=72.21,
        source='the DiracNets paper (top-1 error 27.79), also cited by the RepVGG paper',
        source_url='https://arxiv.org/abs/1706.00388',
        note=_AUTHORS_IMAGENET_EVAL.format(pytorchcv='71.25 top-1 (28.75% error)', name='DiracNetV2-34')),
}

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


def _usage(repo_id: str) -> str:
    """ The card's usage section: timm's examples, with the plugin import, folding and the int8 command. """
    hub_name = f'hf-hub:{repo_id}'
    return '\n'.join([
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
        'timm-dirac quantize --checkpoint <this folder> --calib hfds/<training images> --out int8/  '
        '# int8/model_int8_split.onnx',
        '```',
    ])


def _comparison(results: Dict[str, Any], split: Optional[str], source: Optional[str], note: Optional[str],
                int8: Optional[Dict[str, Any]]) -> str:
    """ The card's comparison section: accuracy with its source, and measured int8 rows. """
    lines = []
    if results:
        lines += ['| metric | value | split | source |', '|---|---|---|---|']
        lines += [f'| {k} | {v} | {split or "-"} | {source} |' for k, v in results.items()]
        lines += ['', note] if note else []
    if int8:
        lines += ['', '### int8 deployment', '', '| flow | fp32 top-1 | int8 top-1 | drop | int8 / ONNX Runtime fp32 |',
                  '|---|---|---|---|---|']
        lines += [f"| {r['flow']} | {r['fp32_top1']:.2f} | {r['int8_top1']:.2f} | "
                  f"{r['fp32_top1'] - r['int8_top1']:.2f} | {r['speedup']} |" for r in int8['rows']]
        lines += ['', f"Measured with `{int8['command']}` ({int8['measured']})."]
    return '\n'.join(lines).strip('\n')


def generate_model_card(
        model: nn.Module,
        train_info: Optional[Dict[str, Any]] = None,
        release: bool = False,
        repo_id: Optional[str] = None,
) -> str:
    """ README.md for a DiracNet Hub folder: timm's card layout (`timm.models._hub.generate_readme`, our sections
    passed to it as data) under Hub metadata written by huggingface_hub's `ModelCardData` (with model-index).

    `release`: the weights are those of the model's pretrained tag (e.g. the authors' file, checked by its hash);
    only then does the card show the tag's name, source, licence and reported accuracy. `repo_id` fills in the
    usage examples (`push` does it on upload; until then they read REPO_ID_PLACEHOLDER).

    `train_info` may hold `dataset` (a name like 'cifar10' or a Hub dataset id), `metrics` (e.g. {'top1': 94.1,
    'top5': 99.8, 'loss': 0.2}, percent), `eval_split`, `metrics_source`, `license`, `source` (what the weights were
    converted from), `int8` (measured by `timm-dirac quantize`: `rows` of flow, fp32_top1, int8_top1, speedup;
    `command`; `measured`, the data and machine), and any other facts (epochs, recipe, command, ...), listed under
    "Training".
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    from timm.models._hub import generate_readme

    train_info = dict(train_info or {})
    cfg = published_cfg(model, release)
    arch = cfg['architecture']
    name = _model_name(cfg)
    folded = is_folded(model)
    reported = REPORTED_RESULTS.get(name) if release else None
    url = cfg.get('url') or ''
    authors_release = release and (reported is not None or 'modelzoo-networks' in url)
    dataset_id, dataset_name = _dataset(train_info.pop('dataset', None) or (reported or {}).get('dataset'))
    license_id = train_info.pop('license', None) or cfg.get('license') or 'unknown'

    # metrics: measured ones from train_info, else those the weights' authors report
    results, metrics_source, source_url, note = {}, None, None, None
    split = train_info.pop('eval_split', None)
    if train_info.get('metrics'):
        results = dict(train_info.pop('metrics'))
        metrics_source = train_info.pop('metrics_source', 'measured by this project (timm-dirac)')
    elif reported:
        results = {k: reported[k] for k in ('top1', 'top5') if k in reported}
        metrics_source, source_url, split = reported['source'], reported['source_url'], reported['split']
        note = reported.get('note')
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
    stats = count_params_macs(model)
    in_size = tuple(cfg.get('input_size', (3, 224, 224)))
    layers = sum(len(s.blocks) for s in model.stages) if hasattr(model, 'stages') else None
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {
            'Params (M)': f'{_num(stats["train"][0])} train form, {_num(stats["folded"][0])} folded',
            'GMACs': f'{_num(stats["train"][1])} train form, {_num(stats["folded"][1])} folded (convs and linear '
                     f'layers, torch.utils.flop_counter)',
            'Image size': f'{in_size[1]} x {in_size[2]}',
        },
        'Dataset': dataset_name or 'not stated',
        'Papers': {'DiracNets: Training Very Deep Neural Networks Without Skip-Connections':
                   'https://arxiv.org/abs/1706.00388'},
        'Original': cfg.get('origin_url') or AUTHORS_REPO,
        'Weights': origin,
        'License': f'{license_id}{licence_note}',
        'Preprocessing': f'input {in_size[1]} x {in_size[2]}, crop_pct {cfg.get("crop_pct")}, '
                         f'{cfg.get("interpolation")} interpolation, mean {tuple(cfg.get("mean", ()))}, '
                         f'std {tuple(cfg.get("std", ()))}',
    }
    if train_info:
        details['Training'] = {k: _fact(v) for k, v in train_info.items()}
    sections = dict(
        description=(
            f'A DiracNet image classification model ({arch}: {layers} Dirac layers, no skip connections), weights '
            f'{origin}. Each layer is ReLU -> Dirac-parameterized 3x3 conv (`alpha * identity + beta * '
            f'normalize(W)`) -> BatchNorm; `reparameterize()` folds every layer into one plain conv with bias, '
            f'leaving a VGG-like chain. These weights are stored in the '
            f'{"folded (inference_mode=True)" if folded else "train"} form.'),
        details=details,
        usage=_usage(repo_id or REPO_ID_PLACEHOLDER),
        citation=_CITATIONS,
    )
    comparison = _comparison(results, split, metrics_source, note, int8)
    if comparison:
        sections['comparison'] = comparison
    card = ModelCard(generate_readme(sections, name))
    card.data = ModelCardData(
        library_name='timm', license=license_id, pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'timm-dirac', 'diracnet', 'reparameterized'],
        datasets=[dataset_id] if dataset_id else None, model_name=name, eval_results=eval_results or None,
    )
    return str(card)


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
    """ Upload a Hub folder to `repo_id` (created if missing) with `HfApi.upload_folder`, in one commit; returns the
    uploaded repo paths (`upload_file_list`).

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
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as staging:  # the files to upload, the card with the repository id in it
        for f in files:
            target = Path(staging) / f
            target.parent.mkdir(parents=True, exist_ok=True)
            if f == 'README.md':
                card = (folder / f).read_text(encoding='utf-8').replace(REPO_ID_PLACEHOLDER, repo_id)
                target.write_text(card, encoding='utf-8')
            else:
                target.symlink_to((folder / f).resolve())
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type='model', folder_path=staging,
                          commit_message=commit_message or f'Upload {folder.name} with timm-dirac')
    return files
