""" timm-dirac: DiracNets (arXiv:1706.00388) as timm models. Importing this package registers them with timm (and
points the pretrained cfgs of the weights shipped in the package at their files). """
from .assets import use_shipped_weights
from .diracify import (
    DiracConv1d, DiracConv3d, DiracifiedConv1d, DiracifiedConv2d, DiracifiedConv3d, DiracifyPlan, diracify, is_folded,
    plan_diracify)
from .diracnet import (
    DiracBlock, DiracConv2d, DiracNet, DiracStage, DiracStem, checkpoint_filter_fn, dirac_kernel, fold_bn,
    fold_state_dict, unfold_state_dict)

use_shipped_weights()

__version__ = '0.1.0'
