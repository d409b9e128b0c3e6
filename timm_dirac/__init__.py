""" timm-dirac: DiracNets (arXiv:1706.00388) as timm models. Importing this package registers them with timm. """
from .convert import checkpoint_filter_fn, fold_state_dict, is_folded_state_dict, unfold_state_dict
from .diracify import DiracifiedConv1d, DiracifiedConv2d, DiracifiedConv3d, DiracifyPlan, diracify, plan_diracify
from .diracnet import DiracBlock, DiracNet, DiracStage, DiracStem, dirac_layers
from .layers import DiracConv1d, DiracConv2d, DiracConv3d, dirac_kernel, fold_bn, fold_bn_stats, is_folded

__version__ = '0.1.0'
