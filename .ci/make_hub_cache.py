""" Offline weight caches, so that every diracnet* pretrained tag loads through timm's real code paths in CI (timm's
tests/test_models.py over the model file inside timm's source tree, .ci/timm_tree.sh) with no network:

- a tag with a `url` (the authors' folded ImageNet files, not downloadable here): a stand-in with the real keys and
  shapes (a random model, folded, under the authors' key names) at the url's file name in the torch hub cache
  (`<torch-home>/hub/checkpoints/`), which timm's url loader reads instead of downloading, and converts on load as it
  does the real file;
- a tag with an `hf_hub_id`: the Hub folder shipped in the package (`timm_dirac/assets/weights/<model>.<tag>`), else
  a random model's folder (`timm.models.save_for_hf`), in a Hugging Face cache in the Hub's layout
  (`models--<ns>--<name>/refs/main` + `snapshots/<commit>/`).

Usage: python .ci/make_hub_cache.py --torch-home DIR --hf-cache DIR, then run with TORCH_HOME=DIR HF_HUB_CACHE=DIR
HF_HUB_OFFLINE=1. Needs the package installed (`pip install -e .`). The tests fill their Hugging Face caches with
this file's `add_to_hf_cache` (tests/authors_format.py loads it).
"""
import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch

import timm_dirac  # noqa: F401  registers the diracnet* models
from timm_dirac.assets import asset_path

# our folded keys -> the authors' (the inverse of the conversion in diracnet.py)
_TO_AUTHORS_KEYS = [
    (r'^stem\.conv\.', 'features.conv.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.conv\.', r'features.group\1.block\2.conv.'),
    (r'^head\.fc\.', 'fc.'),
]


def authors_folded_stand_in(model_name: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """ A state dict in the layout of the authors' folded files (`features.conv.*`, `features.group{g}.block{b}.conv.*`,
    `fc.*`) for the architecture of `model_name`, with random weights. """
    torch.manual_seed(seed)
    state_dict = timm.create_model(model_name, inference_mode=True).state_dict()
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _TO_AUTHORS_KEYS:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def add_to_hf_cache(folder: os.PathLike, repo_id: str, cache_dir: os.PathLike, commit: str = 'a' * 40) -> Path:
    """ Put the files of `folder` into a Hugging Face Hub cache in the Hub's layout (refs/main -> snapshot), where
    `hf_hub_download` finds them offline (huggingface_hub has no public call that caches local files). """
    repo = Path(cache_dir) / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    for f in Path(folder).iterdir():
        shutil.copy2(f, snapshot / f.name)
    return snapshot


def cache_weights(name: str, cfg, checkpoints: Path, hf_cache: Path) -> str:
    """ Put the weights of pretrained tag `name` (cfg `cfg`), or a stand-in, where timm looks for them. """
    shipped = asset_path(f'weights/{name}')  # the project's own weights, shipped as a Hub folder
    if cfg.hf_hub_id and shipped.is_dir():
        add_to_hf_cache(shipped, cfg.hf_hub_id, hf_cache)
        return f'Hugging Face cache {cfg.hf_hub_id} (the shipped {shipped.name})'
    if cfg.hf_hub_id:
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            timm.models.save_for_hf(timm.create_model(name), tmp, safe_serialization=True)
            add_to_hf_cache(tmp, cfg.hf_hub_id, hf_cache)
        return f'Hugging Face cache {cfg.hf_hub_id} (random stand-in)'
    path = checkpoints / os.path.basename(cfg.url)
    torch.save(authors_folded_stand_in(name), path)
    return f'torch hub cache {path} (random stand-in in the authors\' folded layout)'


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--torch-home', required=True, type=Path, help='TORCH_HOME of the run (hub/checkpoints/)')
    parser.add_argument('--hf-cache', required=True, type=Path, help='HF_HUB_CACHE of the run')
    args = parser.parse_args(argv)
    checkpoints = args.torch_home / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True, exist_ok=True)
    args.hf_cache.mkdir(parents=True, exist_ok=True)
    for name in timm.list_models('diracnet*', pretrained=True):
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg.hf_hub_id or cfg.url:
            print(f'{name}: {cache_weights(name, cfg, checkpoints, args.hf_cache)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
