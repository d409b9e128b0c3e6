""" Where a model's pretrained weights come from, and a clear error when they cannot be fetched

timm resolves a pretrained cfg to a source (a file, an address, a Hugging Face Hub repo); these helpers name that
source in errors and find in a second that Hub weights cannot load offline (huggingface_hub would retry for about a
minute first).
"""
import os
import socket
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
from timm.models import resolve_pretrained_cfg

from ._timm_compat import resolve_pretrained_source

__all__ = ['hub_unreachable', 'pretrained_source_error']


def _pretrained_source(variant: str, pretrained_cfg: Optional[Any] = None,
                       pretrained_cfg_overlay: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], str, str]:
    """ (pretrained cfg as a dict, where timm loads it from: 'file' / 'url' / 'hf-hub' / '', and the location: the
    file, the address or the Hub repo id). """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg or {})
    load_from, location = resolve_pretrained_source(cfg)
    return cfg, load_from, location[0] if isinstance(location, (tuple, list)) else location


def hub_unreachable(variant: str, pretrained_cfg: Optional[Any] = None,
                    pretrained_cfg_overlay: Optional[Dict[str, Any]] = None) -> Optional[OSError]:
    """ Why Hub weights cannot load, found in a second: their source is a Hub repo that is not in the local cache
    and the Hub's host does not resolve (no network). huggingface_hub would retry for about a minute first. """
    from huggingface_hub import constants, try_to_load_from_cache

    _, load_from, repo = _pretrained_source(variant, pretrained_cfg, pretrained_cfg_overlay)
    if load_from != 'hf-hub' or constants.HF_HUB_OFFLINE:
        return None
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ('model.safetensors', 'pytorch_model.bin')):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return OSError(f'no network: {host} does not resolve ({e})')
    return None


def pretrained_source_error(
        variant: str,
        error: OSError,
        pretrained_cfg: Optional[Any] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
) -> RuntimeError:
    """ An error for pretrained weights that could not be fetched, naming the source and the offline fix.

    For `_create_diracnet`: `except OSError as e: raise pretrained_source_error(variant, e, ...) from e`.
    """
    cfg, load_from, location = _pretrained_source(variant, pretrained_cfg, pretrained_cfg_overlay)
    name = f"{cfg.get('architecture', variant)}{'.' + cfg['tag'] if cfg.get('tag') else ''}"
    where = {'hf-hub': 'the Hugging Face Hub repository', 'url': 'the address', 'file': 'the file'}.get(load_from, '')
    filename = os.path.basename(str(cfg.get('url') or 'model.safetensors'))
    fix = (f"If you have a copy of the weights (e.g. {filename}"
           f"{' from ' + cfg['url'] if cfg.get('url') else ''}), load it with timm.create_model('{name}', "
           f"pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/{filename}')).")
    if load_from == 'url':
        fix += f' Or copy it to {os.path.join(torch.hub.get_dir(), "checkpoints", filename)}, where timm looks first.'
    if load_from == 'hf-hub':
        fix += (' Hub weights are also read from the local Hugging Face cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1) once '
                f'downloaded, e.g. with `hf download {location}`.')
    return RuntimeError(f'Could not load the pretrained weights of {name} from {where} {location}: '
                        f'{type(error).__name__}: {error}. {fix}')
