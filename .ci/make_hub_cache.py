""" Build offline weight caches so every diracnet* pretrained tag loads through timm's real code paths in CI.

The real weights cannot be downloaded in CI, so each source gets a synthetic stand-in with the real keys and shapes:
- tags with a `url` (the authors' folded files): a synthetic authors'-format file under the url's file name in
  the torch hub cache (`<torch-home>/hub/checkpoints/`), which timm's url loader reads instead of downloading;
- tags with an `hf_hub_id` (weights this project trains): the Hub folder shipped in the package
  (`timm_dirac/assets/weights/<model>.<tag>`) when present, else a synthetic authors' functional checkpoint of the
  same architecture converted by `timm-dirac convert`, placed in a Hugging Face cache in the Hub's layout
  (`models--<ns>--<name>/refs/main` + `snapshots/<commit>/`).

Usage: python .ci/make_hub_cache.py --torch-home DIR --hf-cache DIR
then run with TORCH_HOME=DIR HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

import timm  # noqa: E402
import torch  # noqa: E402

import timm_dirac  # noqa: E402,F401
from timm_dirac.assets import asset_path  # noqa: E402
from timm_dirac.diracnet import STYLES  # noqa: E402
from timm_dirac.cli import main as cli_main  # noqa: E402

from authors_format import (  # noqa: E402
    add_to_hf_cache, fold_functional, make_functional_params, params_epoch_optimizer_layout)


def _structure(model_name: str):
    """ (layers, widths, style, classes) of a registered DiracNet, read from a meta-device instance. """
    model = timm.create_model(model_name, device='meta')
    layers = tuple(len(s.blocks) for s in model.stages)
    widths = tuple(s.blocks[0].conv.out_channels for s in model.stages)
    style = next(name for name, style in STYLES.items() if len(style.widths) == len(layers))
    return layers, widths, style, model.num_classes


def cache_weights(name: str, cfg, checkpoints: Path, hf_cache: Path) -> str:
    """ Put a synthetic stand-in for the weights of pretrained tag `name` (cfg `cfg`) where timm will look. """
    layers, widths, style, classes = _structure(name.split('.')[0])
    params = make_functional_params(layers, widths, style, classes, seed=len(name))
    shipped = asset_path(f'weights/{name}')  # the project's own weights, shipped as a Hub folder
    if cfg.hf_hub_id and shipped.is_dir():
        add_to_hf_cache(shipped, cfg.hf_hub_id, hf_cache)
        return f'Hugging Face cache {cfg.hf_hub_id} (from the shipped {shipped.name})'
    if cfg.hf_hub_id:
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / 'checkpoint.pth', Path(tmp) / 'hub'
            torch.save(params_epoch_optimizer_layout(params), src)
            cli_main(['convert', str(src), '--model', name, '--out', str(out)])
            add_to_hf_cache(out, cfg.hf_hub_id, hf_cache)
        return f'Hugging Face cache {cfg.hf_hub_id}'
    path = checkpoints / os.path.basename(cfg.url)
    if not path.exists():
        torch.save(fold_functional(params), path)
    return f'torch hub cache {path}'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--torch-home', required=True, type=Path)
    parser.add_argument('--hf-cache', required=True, type=Path)
    args = parser.parse_args()
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
