""" Files shipped inside the package, so that an installed wheel finds them exactly as a clone does:

- `cifar10_sample/`: 10,000 train / 1,000 test real CIFAR-10 images as a `datasets` folder (Parquet), the data of
  the quick training config and the default images of `quantize`, `export-onnx` and `benchmark`;
- `weights/<model>.<tag>/`: weights this project trained, as Hub folders, which `pretrained=True` loads offline
  (`use_shipped_weights`, called by `import timm_dirac`).
"""
from importlib.resources import files
from pathlib import Path

__all__ = ['asset_path', 'use_shipped_weights']


def asset_path(relative: str) -> Path:
    """ The filesystem path of a file or folder shipped in `timm_dirac/assets`, e.g. `asset_path('cifar10_sample')`.
    pip installs packages as plain files, so the path is a real one that `datasets` and safetensors can open. """
    return Path(str(files(__name__).joinpath(relative)))


def use_shipped_weights() -> None:
    """ Point each registered pretrained cfg whose weights ship here (`weights/<model>.<tag>/model.safetensors`) at
    that file, so `timm.create_model('<model>', pretrained=True)` loads it offline: timm reads a cfg's `file` before
    its `hf_hub_id`. The model file keeps the Hub id only; this is the package's overlay of it. """
    from .._timm_compat import set_pretrained_file  # timm has no public setter for a registered cfg

    for folder in asset_path('weights').iterdir():
        set_pretrained_file(folder.name, str(folder / 'model.safetensors'))
