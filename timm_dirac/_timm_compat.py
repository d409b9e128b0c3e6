""" The private timm helpers the command and I/O modules of timm-dirac use, in one place: each is a `timm.models._*`
symbol with no public export in timm 1.0.x. If a timm release moves one, this module is the import to fix. (The model
file imports timm's private helpers directly, as timm's own model files do.) """
from timm.models._builder import _resolve_pretrained_source as resolve_pretrained_source  # (load_from, location)
from timm.models._hub import download_cached_file  # a URL into torch hub's cache, as timm's pretrained loader does
from timm.models._registry import _model_pretrained_cfgs as pretrained_cfg_registry  # registered PretrainedCfgs

__all__ = ['download_cached_file', 'pretrained_cfg_registry', 'resolve_pretrained_source']
