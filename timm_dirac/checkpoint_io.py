""" Reading weight files safely, and telling a published release file by its hash

Checkpoints are read with `torch.load(weights_only=True)` (never arbitrary unpickling) or safetensors; a training
container (`{'state_dict_ema': ..., 'state_dict': ...}`, timm's and ours) is opened as timm's `load_state_dict` does,
and DDP / torch.compile prefixes go with timm's `clean_state_dict`. Errors say what is wrong with the file.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from safetensors.torch import load_file
from timm.models import clean_state_dict

from ._timm_compat import download_cached_file
from .errors import first_sentence

__all__ = ['load_checkpoint_file', 'check_safetensors', 'read_config', 'file_sha256', 'is_release', 'local_file']

_CONTAINERS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')  # timm's load_state_dict order


def load_checkpoint_file(path: os.PathLike) -> Dict[str, Any]:
    """ The state dict (or the authors' functional checkpoint dict) in a weights file, out of a training container
    (EMA weights first, in timm's order), keys cleaned by timm's `clean_state_dict`. Errors name the file and what
    to do. """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    if path.stat().st_size == 0:
        raise ValueError(f'{path} is empty (0 bytes): write or download the checkpoint again.')
    if path.suffix == '.safetensors':
        check_safetensors(path)
        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(
            f'{path} could not be read as a checkpoint with torch.load(weights_only=True): {first_sentence(e)}. It '
            f'may be truncated, corrupt, or a pickle that is not a tensor checkpoint (arbitrary pickles are never '
            f'unpickled).') from e
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'Not a DiracNet checkpoint: {path} holds a {type(checkpoint).__name__}, not a dict of '
                         f'tensors.')
    container = next((key for key in _CONTAINERS if isinstance(checkpoint.get(key), Mapping)), None)
    return clean_state_dict(checkpoint[container] if container else checkpoint)


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
    """ The SHA-256 of a file's bytes (hex), read in blocks: release files and training checkpoint files are both
    checked by it. """
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
