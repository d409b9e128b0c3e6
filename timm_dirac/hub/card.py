""" The model card (README.md) of a DiracNet Hub folder: what the weights are, their stats in both forms, usage,
accuracy with its source, citations.

Laid out by timm's own card writer (`generate_readme`, given our sections as data) under Hub metadata written by
huggingface_hub's `ModelCardData`. Only weights that are verifiably a pretrained tag's own (`release=True`, e.g. the
authors' file checked by its hash) carry that tag's name, source, licence and reported accuracy (`published_cfg`);
anything else is described as what it is.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .._timm_compat import generate_readme
from ..diracify import is_folded

__all__ = ['REPORTED_RESULTS', 'REPO_ID_PLACEHOLDER', 'DEFAULT_INT8_FLOW', 'generate_model_card', 'count_params_macs',
           'published_cfg']

AUTHORS_REPO = 'https://github.com/szagoruyko/diracnets'

_AUTHORS_IMAGENET_EVAL = (
    "The authors trained and evaluated these weights with OpenCV: resize to 256 with cv2.INTER_CUBIC (bicubic, no "
    "antialiasing), centre crop 224, ImageNet mean / std. This config uses timm's closest setting (bicubic, crop_pct "
    "0.875); timm resizes with PIL, which antialiases, so its accuracy can differ from the reported one by about a "
    "point (pytorchcv, https://github.com/osmr/imgclsmob, reports {top1:.2f} top-1 ({error:.2f}% error) for its "
    "{name}).")


def _authors_imagenet_eval(pytorchcv_top1: float, name: str) -> str:
    return _AUTHORS_IMAGENET_EVAL.format(top1=pytorchcv_top1, error=100 - pytorchcv_top1, name=name)


# Accuracy others report, per `<architecture>.<tag>`, with its source: the weights' authors (for the model cards of
# exactly those weights) and pytorchcv's re-evaluation of the same files with PIL preprocessing. The README and
# docs cite these entries (tests/test_docs.py checks the numbers they show against them).
REPORTED_RESULTS: Dict[str, Dict[str, Any]] = {
    'diracnet18.v2_in1k': dict(
        dataset='imagenet-1k', split='validation', top1=69.63, top5=89.12,
        source="the authors' export notebook (top-1 / top-5 error 30.37 / 10.88)", source_url=AUTHORS_REPO,
        pytorchcv_top1=68.53, note=_authors_imagenet_eval(68.53, 'DiracNetV2-18')),
    'diracnet34.v2_in1k': dict(
        dataset='imagenet-1k', split='validation', top1=72.21,
        source='the DiracNets paper (top-1 error 27.79), also cited by the RepVGG paper',
        source_url='https://arxiv.org/abs/1706.00388',
        pytorchcv_top1=71.25, note=_authors_imagenet_eval(71.25, 'DiracNetV2-34')),
}

# the flow `timm-dirac quantize` runs without --flow (tests/test_hub.py checks it against the command's default);
# it writes <--out>/model_int8_<flow>.onnx
DEFAULT_INT8_FLOW = 'chain'

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


# here rather than in folder.py: the card and the folder's config.json both publish it, and folder.py imports this
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


def _local_data(data: str) -> Tuple[str, str]:
    """ (model-index dataset type, readable name) of what a run read that is not a Hub dataset: a local folder is
    named by its folder name (the data shipped in this package by its path in it; never a machine's absolute path)
    and its dataset card's `pretty_name` where it has one; anything else as given. """
    from huggingface_hub import metadata_load

    from ..assets import asset_path

    prefix, _, rest = data.partition('/')
    path = Path(os.path.expanduser(rest if prefix in ('hfds', 'hfids') else data))
    if not path.is_dir():
        return data, data
    path, shipped = path.resolve(), asset_path('.').resolve()
    name = f'timm_dirac/assets/{path.relative_to(shipped).as_posix()}' if path.is_relative_to(shipped) else path.name
    card = path / 'README.md'
    pretty = (metadata_load(card) or {}).get('pretty_name') if card.is_file() else None
    where = 'shipped in timm-dirac as' if name.startswith('timm_dirac/') else 'the local folder'
    return name, f'{pretty}: {where} {name}' if pretty else f'{where} {name}'


def _fact(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)


def _usage(repo_id: str) -> str:
    """ The card's usage section (timm's card writer takes it as text): the examples of timm's own model cards, plus
    the plugin import, folding and the int8 command. """
    hub_name = f'hf-hub:{repo_id}'
    return '\n'.join([
        '```bash',
        '# timm-dirac is not on PyPI yet: install it from a clone of its repository',
        'git clone <timm-dirac repository URL> timm-dirac && pip install -e ./timm-dirac',
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
        f'`timm-dirac quantize` runs its default `{DEFAULT_INT8_FLOW}` flow, which keeps each folded Dirac tap out of '
        'the int8 weights (an identity add of the layer\'s own input in per-channel units, or an exact int8 1x1 conv '
        'where the width changes), so the learned weights keep their precision; its 7-bit weights cannot saturate '
        'the 16-bit pair sums of x86 CPUs without VNNI, so one file serves every CPU.',
        '```bash',
        'timm-dirac quantize --checkpoint <this folder> --calib hfds/<training images> --out int8/  '
        f'# writes int8/model_int8_{DEFAULT_INT8_FLOW}.onnx',
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
        lines += [f"| {r['flow']}{' (default)' if r['flow'] == DEFAULT_INT8_FLOW else ''} | {r['fp32_top1']:.2f} | "
                  f"{r['int8_top1']:.2f} | {r['fp32_top1'] - r['int8_top1']:.2f} | {r['speedup']} |"
                  for r in int8['rows']]
        lines += ['', f"Measured with `{int8['command']}` ({int8['measured']})."]
    return '\n'.join(lines).strip('\n')


def generate_model_card(
        model: nn.Module,
        train_info: Optional[Dict[str, Any]] = None,
        release: bool = False,
        repo_id: Optional[str] = None,
) -> str:
    """ README.md for a DiracNet Hub folder: timm's card layout (timm's `generate_readme`, our sections passed to
    it as data) under Hub metadata written by huggingface_hub's `ModelCardData` (with model-index).

    `release`: the weights are those of the model's pretrained tag (e.g. the authors' file, checked by its hash);
    only then does the card show the tag's name, source, licence and reported accuracy. `repo_id` fills in the
    usage examples (`push` does it on upload; until then they read REPO_ID_PLACEHOLDER).

    `train_info` may hold `dataset` (a name like 'cifar10' or a Hub dataset id), `data` (what the run read, e.g.
    `hfds/<local folder>`: names the data where `dataset` is not given), `metrics` (e.g. {'top1': 94.1,
    'top5': 99.8, 'loss': 0.2}, percent), `eval_split`, `metrics_source`, `license`, `source` (what the weights were
    converted from), `int8` (measured by `timm-dirac quantize`: `rows` of flow, fp32_top1, int8_top1, speedup;
    `command`; `measured`, the data and machine), and any other facts (epochs, recipe, command, ...), listed under
    "Training".
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    train_info = dict(train_info or {})
    cfg = published_cfg(model, release)
    arch = cfg['architecture']
    name = _model_name(cfg)
    folded = is_folded(model)
    reported = REPORTED_RESULTS.get(name) if release else None
    url = cfg.get('url') or ''
    authors_release = release and (reported is not None or 'modelzoo-networks' in url)
    dataset_id, dataset_name = _dataset(train_info.pop('dataset', None) or (reported or {}).get('dataset'))
    data = train_info.pop('data', None)
    hub_dataset = dataset_id  # only a Hub dataset goes into the metadata's `datasets`
    if not dataset_id and data:
        dataset_id, dataset_name = _local_data(data)
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
        datasets=[hub_dataset] if hub_dataset else None, model_name=name, eval_results=eval_results or None,
    )
    return str(card)
