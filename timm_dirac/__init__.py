""" timm-dirac: DiracNets (arXiv:1706.00388) as timm models. Importing this package registers them with timm (and
points the pretrained cfgs of the weights shipped in the package at their files). """
from .assets import use_shipped_weights
from .diracify import DiracifiedConv1d, DiracifiedConv2d, DiracifiedConv3d, DiracifyPlan, diracify, plan_diracify
from .diracnet import DiracBlock, DiracNet, DiracStage, DiracStem, checkpoint_filter_fn, dirac_layers
from .layers import DiracConv1d, DiracConv2d, DiracConv3d, dirac_kernel, fold_bn, fold_bn_stats, is_folded
from .state_dict import fold_state_dict, is_folded_state_dict, unfold_state_dict

use_shipped_weights()

__version__ = '0.1.0'
