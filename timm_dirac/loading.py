""" Loading models and weights for the commands (`validate`, `export-onnx`, `quantize`, `benchmark`, `convert`)

Models come from a registry name, a `local-dir:` / `hf-hub:` name, a Hub-layout folder or a weights file, in eval mode;
weight files are read by timm's `load_state_dict` with `weights_only=True`. Ours on top: refusals in one line that say
what is wrong with a file (truncated, corrupt, not finite, another architecture) and how to get a good one.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

import timm
from timm.data import resolve_model_data_config
from timm.models import load_state_dict
from timm.utils import reparameterize_model

from ._timm_compat import download_cached_file, resolve_pretrained_source
from .assets import asset_path
from .data import eval_transform, load_eval_split
from .errors import first_sentence

__all__ = ['default_data', 'load_model', 'fold', 'load_images', 'load_checkpoint_file', 'check_weights',
           'check_safetensors', 'read_config', 'file_sha256', 'is_release', 'local_file']

MODEL_SOURCES = ('local-dir:', 'hf-hub:')  # model names that carry their own config and weights
WEIGHT_SUFFIXES = ('.safetensors', '.pth', '.pth.tar', '.bin')  # the weights files timm's `local-dir:` loads


def default_data() -> str:
    """ Real CIFAR-10 images as a timm `hfds/` dataset name: the sample shipped with the package
    (`timm_dirac/assets/cifar10_sample`). """
    return f"hfds/{asset_path('cifar10_sample')}"


def _checkpoint_folder_config(folder: Path) -> Dict[str, Any]:
    """ The config of a checkpoint folder in the Hub layout (config.json + weights), refusing an incomplete one. """
    if not (folder / 'config.json').is_file():
        raise FileNotFoundError(f'{folder} has no config.json: a checkpoint folder needs the Hub layout written by '
                                f'timm.models.save_for_hf or `timm-dirac convert` (config.json + model.safetensors); '
                                f'pass a weights file itself with --model NAME otherwise.')
    config = read_config(folder)
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()):
        raise FileNotFoundError(f'{folder} has config.json but no weights file (model.safetensors); copy the weights '
                                f'in or write the folder again.')
    if (folder / 'model.safetensors').is_file():
        check_safetensors(folder / 'model.safetensors')
    return config


def download_failed_message(model_name: str, error: OSError, **kwargs) -> str:
    """ One line for pretrained weights that could not be downloaded (`error`, e.g. offline): where timm looked
    and how to load a local copy instead. """
    if model_name.startswith('hf-hub:'):
        load_from, location = 'hf-hub', model_name[len('hf-hub:'):]
    else:
        overlay = kwargs.get('pretrained_cfg_overlay')
        cfg = timm.models.resolve_pretrained_cfg(model_name, pretrained_cfg_overlay=overlay)
        load_from, location = resolve_pretrained_source(cfg.to_dict())
        location = location[0] if isinstance(location, (tuple, list)) else location
    arch = model_name.split('.')[0]
    if load_from == 'url':
        filename = os.path.basename(location)
        return (f'could not download the weights of {model_name} from {location} ({first_sentence(error)}). To use a '
                f'local copy of {filename}: pass it with --model {arch} --checkpoint /path/to/{filename} (Python: '
                f"timm.create_model('{arch}', pretrained=True, pretrained_cfg_overlay=dict(file=...))), or put it in "
                f'{os.path.join(torch.hub.get_dir(), "checkpoints")}, where timm looks first.')
    return (f'could not download the weights of {model_name} from the Hugging Face Hub repository {location} '
            f'({first_sentence(error)}). To use a local copy: download the repository where there is network '
            f'(`hf download {location} --local-dir DIR`) and pass --checkpoint DIR, or copy a Hugging Face cache that '
            f'holds it here and set HF_HUB_OFFLINE=1 (offline without it, huggingface_hub retries for about 45 s).')


def _create_with_weights(model_name: str, source: str, architecture: Optional[str], **kwargs) -> nn.Module:
    """ `timm.create_model(model_name, pretrained=True, ...)`; a download that fails, or a state dict that does not
    fit the architecture, refused in one line that says what to do; the loaded weights checked to be finite. """
    try:
        model = timm.create_model(model_name, pretrained=True, **kwargs)
    except OSError as e:  # torch hub's URLError, huggingface_hub's LocalEntryNotFoundError: the download failed
        raise OSError(download_failed_message(model_name, e, **kwargs)) from e
    except (RuntimeError, AttributeError, KeyError) as e:  # load_state_dict, or timm's lookups of cfg layer names
        if str(e).startswith('Unknown model'):
            raise
        target = f'architecture {architecture!r}' if architecture else 'the architecture of its config.json'
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith('Error(s) in loading') else lines[0]
        raise ValueError(f'the weights in {source} do not fit {target} ({type(e).__name__}: {detail.rstrip(".")} '
                         f'...): give the weights and the architecture (and --num-classes, for a classifier of '
                         f'another size) that belong together.') from e
    check_weights(model.state_dict(), source, floating=False)
    return model


def load_model(
        name: Optional[str] = None,
        checkpoint: Optional[str] = None,
        pretrained: bool = False,
        **kwargs,
) -> nn.Module:
    """ A model in eval mode, built by `timm.create_model` (`kwargs`, e.g. num_classes, go to it) from one of:

    * a registry `name` (`arch` or `arch.tag`): its pretrained weights with `pretrained`, else random ones;
    * a `local-dir:<folder>` or `hf-hub:<repo id>` `name`: the weights there;
    * a `checkpoint` folder in the Hub layout (config.json + weights, as written by `timm.models.save_for_hf` or
      `timm-dirac convert`; a model card is not needed), of `name`'s architecture where a name is given;
    * a `checkpoint` weights file for the architecture `name`. Folded and train-form DiracNet weights, ours or the
      authors', both load (the pretrained filter unfolds a folded file exactly); `num_classes` says the size of
      its classifier.

    Loaded weights are checked to be finite; a failed download is refused in one line that says how to load a
    local copy.
    """
    if name and name.startswith(MODEL_SOURCES):  # its weights are implied (`pretrained` may be given or not)
        if checkpoint:
            raise ValueError(f'--model {name} names its weights itself: leave out --checkpoint {checkpoint}.')
        if name.startswith('local-dir:'):
            name, pretrained, checkpoint = None, False, name[len('local-dir:'):]  # checked as a --checkpoint folder
    if checkpoint is None:
        if not name:
            raise ValueError('Give --model NAME, --checkpoint DIR, or both.')
        if pretrained or name.startswith('hf-hub:'):
            architecture = None if name.startswith('hf-hub:') else name.split('.')[0]
            return _create_with_weights(name, f'the weights of {name}', architecture, **kwargs).eval()
        return timm.create_model(name, **kwargs).eval()
    if pretrained:
        raise ValueError(f'Give --pretrained or --checkpoint {checkpoint}, not both: they name different weights.')
    path = Path(checkpoint)
    arch = name.split('.')[0] if name else None
    if path.is_dir():
        config_arch = _checkpoint_folder_config(path).get('architecture')
        if arch and config_arch != arch:
            raise ValueError(f'{path / "config.json"} names architecture {config_arch!r}, not {arch!r}: the folder '
                             f'holds another model. Pass --model {config_arch} or omit --model.')
        return _create_with_weights(f'local-dir:{path}', str(path), config_arch, **kwargs).eval()
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    if not name:
        raise ValueError(f'{path} is a weights file: also give --model NAME to say which architecture it is for.')
    checkpoint = load_checkpoint_file(path)  # read safely, out of any training container
    check_weights(checkpoint, str(path))  # finite floating-point weights only
    # a --num-classes given with a weights file is the file's classifier size: timm keeps a classifier only when
    # the model's class count is the pretrained cfg's
    overlay = dict(state_dict=checkpoint, file=str(path), **{k: v for k, v in kwargs.items() if k == 'num_classes'})
    model = _create_with_weights(name, str(path), arch, pretrained_cfg_overlay=overlay, **kwargs)
    model.pretrained_cfg.pop('state_dict', None)
    return model.eval()


def fold(model: nn.Module) -> nn.Module:
    """ Reparameterize for inference in place with timm's `reparameterize_model` (a DiracNet's own `reparameterize()`
    then records the folded form in its model args). Refuses a result that is not finite (e.g. a BatchNorm variance
    below -eps). """
    model = reparameterize_model(model, inplace=True).eval()
    if hasattr(model, 'reparameterize'):
        model.reparameterize()
    check_weights(model.state_dict(), 'the folded model', floating=False)
    return model


def load_images(data: str, model: nn.Module, num: Optional[int] = 64, split: str = 'test'
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ The first `num` (all if None) images of split `split` of `data` (as validate reads it: `hfds/<Hub id or
    folder>` or an image folder) and their labels, the images preprocessed by the model's eval transform (its data
    config: resize, crop, mean/std). """
    dataset, _ = load_eval_split(data, split, eval_transform(resolve_model_data_config(model)))
    samples = [dataset[i] for i in range(len(dataset) if num is None else min(num, len(dataset)))]
    return torch.stack([image for image, _ in samples]), torch.tensor([int(label) for _, label in samples])


INTEGER_KEYS = ('num_batches_tracked',)  # BatchNorm's step counter: the one integer tensor of a DiracNet


def load_checkpoint_file(path: os.PathLike) -> Dict[str, Any]:
    """ The state dict (or the authors' functional checkpoint dict) in a weights file, read by timm's
    `load_state_dict` (`weights_only=True`; out of a training container, EMA weights first; keys cleaned). Errors name
    the file and what to do. """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    if path.stat().st_size == 0:
        raise ValueError(f'{path} is empty (0 bytes): write or download the checkpoint again.')
    if path.suffix == '.safetensors':
        check_safetensors(path)
    try:
        checkpoint = load_state_dict(str(path), weights_only=True)
    except Exception as e:
        raise ValueError(
            f'{path} could not be read as a checkpoint with torch.load(weights_only=True): {first_sentence(e)}. It '
            f'may be truncated, corrupt, or a pickle that is not a tensor checkpoint (arbitrary pickles are never '
            f'unpickled).') from e
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'Not a DiracNet checkpoint: {path} holds a {type(checkpoint).__name__}, not a dict of '
                         f'tensors.')
    return dict(checkpoint)


def check_safetensors(file: os.PathLike) -> List[str]:
    """ The tensor names in a safetensors file, reading only its header; a truncated or corrupt file is refused in
    one line (the library's own error is obscure). """
    from safetensors import safe_open

    try:
        with safe_open(file, framework='pt') as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types, not OSError/ValueError
        raise ValueError(f'{file} is not a readable safetensors file ({first_sentence(e)}); it may be truncated or '
                         f'corrupt: download or write it again.') from e


def read_config(folder: os.PathLike) -> Dict[str, Any]:
    """ The config.json of a folder in the Hub layout; invalid JSON is refused in one line. """
    config_file = Path(folder) / 'config.json'
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{config_file} is not valid JSON ({e}); write the folder again.') from e


def file_sha256(path: os.PathLike) -> str:
    """ The SHA-256 of a file's bytes (hex), read in blocks: release files and training checkpoints are checked
    by it. """
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def is_release(path: os.PathLike, url: Optional[str]) -> bool:
    """ Whether the file at `path` is the one published at `url`: release file names carry a prefix of the file's
    sha256 (`<name>-<hash prefix>.<ext>`, torch.hub's convention), checked here on the bytes. """
    match = torch.hub.HASH_REGEX.search(os.path.basename(url or ''))
    return bool(match) and file_sha256(path).startswith(match.group(1))


def local_file(source: str) -> Path:
    """ The local file of a path or URL (a URL is downloaded once into torch hub's cache); a failed download is
    refused in one line that says how to use a copy downloaded by hand. """
    if '://' not in source:
        return Path(source)
    try:
        return Path(download_cached_file(source, check_hash=False, progress=True))
    except OSError as e:  # urllib's URLError / HTTPError: no network, or no such file there
        name = os.path.basename(source)
        raise OSError(f'could not download {source} ({first_sentence(e)}): download {name} by hand where there is '
                      f'network (e.g. in a browser) and pass its path instead of the URL, or copy it to '
                      f'{os.path.join(torch.hub.get_dir(), "checkpoints", name)}.') from e


def check_weights(state_dict: Mapping[str, torch.Tensor], source: str, floating: bool = True) -> None:
    """ Refuse weights that are not finite (a diverged run), or (with `floating`, for DiracNet state dicts) integer
    weights other than BatchNorm's step counter, which folding and the model would truncate; names `source`. """
    if floating:
        wrong = [(k, v.dtype) for k, v in state_dict.items() if isinstance(v, torch.Tensor)
                 and not v.is_floating_point() and not k.endswith(INTEGER_KEYS)]
        if wrong:
            names = ', '.join(f'{k} ({str(dtype).replace("torch.", "")})' for k, dtype in wrong[:3])
            raise ValueError(f'{source}: {len(wrong)} weight tensors are not floating point, e.g. {names}; '
                             f'weights must be float32/float16/bfloat16: save them from the trained model as floats.')
    bad = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f'{source}: {len(bad)} tensors hold NaN or infinite values (e.g. {", ".join(bad[:3])}); '
                         f'these weights are broken (a diverged training run?): use an earlier checkpoint.')
