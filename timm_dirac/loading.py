""" Model and image loading shared by the deploy commands (`export-onnx`, `quantize`, `benchmark`).

Models come from a registry name, a checkpoint folder in the Hub layout or a weights file, in eval mode; images are
the first N of a timm dataset in the model's own eval transform.
"""
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

import timm
from timm.data import create_dataset, create_transform, resolve_model_data_config
from timm.utils import reparameterize_model

from .assets import asset_path
from .data import to_rgb
from .finite import check_weights
from .layers import is_folded

__all__ = ['default_data', 'load_model', 'is_folded', 'fold', 'load_images']


def default_data() -> str:
    """ Real CIFAR-10 images as a timm `hfds/` dataset name: the sample shipped with the package
    (`timm_dirac/assets/cifar10_sample`). """
    return f"hfds/{asset_path('cifar10_sample')}"


def load_model(name: Optional[str], checkpoint: Optional[str] = None) -> nn.Module:
    """ Build a model in eval mode: a registry `name` (random weights without `checkpoint`), a checkpoint folder
    in the Hub layout (config.json + model.safetensors, via timm's `local-dir:`) or a weights file. Folded and
    train-form DiracNet weights both load (a folded file is unfolded exactly by the pretrained filter). """
    if checkpoint is None:
        if name is None:
            raise ValueError('Give --model NAME, --checkpoint DIR, or both.')
        return timm.create_model(name).eval()
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / 'config.json').is_file():
            raise FileNotFoundError(f'{path} has no config.json: a checkpoint folder needs the layout written by '
                                    f'timm.models.save_for_hf (config.json + model.safetensors); pass the weights '
                                    f'file itself with --model NAME otherwise.')
        model = timm.create_model(f'local-dir:{path}', pretrained=True)
        check_weights(model.state_dict(), str(path), floating=False)
        if name is not None and model.pretrained_cfg.get('architecture') not in (name, None):
            raise ValueError(f"--model {name} does not match the checkpoint's architecture "
                             f"{model.pretrained_cfg.get('architecture')!r} in {path / 'config.json'}.")
        return model.eval()
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    if name is None:
        raise ValueError(f'{path} is a weights file: also give --model NAME to say which architecture it is for.')
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    check_weights(model.state_dict(), str(path), floating=False)
    return model


def fold(model: nn.Module) -> nn.Module:
    """ Reparameterize for inference in place: DiracNet's own `reparameterize()`, else timm's helper. Refuses a
    result that is not finite (e.g. a BatchNorm variance below -eps). """
    if hasattr(model, 'reparameterize'):
        model.reparameterize()
        model = model.eval()
    else:
        model = reparameterize_model(model, inplace=True).eval()
    check_weights(model.state_dict(), 'the folded model', floating=False)
    return model


def load_images(data: str, model: nn.Module, num: Optional[int] = 64, split: str = 'test'
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ The first `num` (all if None) images of a timm dataset (e.g. `hfds/<folder>`) and their labels, the images
    preprocessed by the model's eval transform (its data config: resize, crop, mean/std). """
    dataset = create_dataset(data, root=None, split=split, input_img_mode=None)  # to_rgb scales 16-bit images
    if len(dataset) == 0:
        raise ValueError(f'Dataset {data} (split {split}) is empty.')
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    count = len(dataset) if num is None else min(num, len(dataset))
    samples = [dataset[i] for i in range(count)]
    images = torch.stack([transform(to_rgb(image)) for image, _ in samples])
    return images, torch.tensor([int(label) for _, label in samples])
