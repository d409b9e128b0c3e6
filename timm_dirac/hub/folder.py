""" Hub folders of DiracNets: write one (weights, timm config, model card), check one, list what an upload sends.

`save_hub_folder` writes a folder that both the Hub and `timm.create_model('local-dir:<folder>')` accept:
`model.safetensors` and timm's `config.json` (both by `timm.models.save_for_hf`) and a `README.md` model card
(`card.py`). The folder appears atomically (written to a temp dir, then renamed) and an existing folder is never
replaced unless asked.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn

from ..diracify import is_folded
from ..loading import check_safetensors, read_config
from .card import generate_model_card, published_cfg

__all__ = ['HUB_FILES', 'save_hub_folder', 'check_hub_folder', 'upload_file_list']

HUB_FILES = ('model.safetensors', 'config.json', 'README.md')


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
                                f'`timm-dirac convert` or timm_dirac.hub.folder.save_hub_folder().')
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
