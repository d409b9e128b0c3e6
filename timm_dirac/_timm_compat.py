""" The private timm helpers timm-dirac uses, in one place: each is a `timm.models._*` function with no public
export in timm 1.0.x. If a timm release moves one, this module is the only import to fix. """
from timm.models._builder import _resolve_pretrained_source as resolve_pretrained_source  # (load_from, location)
from timm.models._hub import download_cached_file  # a URL into torch hub's cache, as timm's pretrained loader does
from timm.models._features import feature_take_indices  # forward_intermediates' index rule, shared by timm models
from timm.models._input import update_model_args  # records a model arg (inference_mode) for save_for_hf / configs

__all__ = ['download_cached_file', 'feature_take_indices', 'resolve_pretrained_source', 'update_model_args']
