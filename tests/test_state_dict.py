""" State-dict math: the authors' formats in our keys, and which form a state dict is in. """
import timm
import torch

import timm_dirac  # noqa: F401
from timm_dirac.diracnet import convert_authors_checkpoint, detect_format

from authors_format import make_functional_params, params_stats_layout


def test_scalar_alpha_beta_are_broadcast():
    params = make_functional_params((2, 2, 2), (16, 32, 64), 'cifar', 10, per_channel=False)
    sd = convert_authors_checkpoint(params_stats_layout(params))
    assert sd['stages.2.blocks.1.conv.alpha'].shape == (64,)
    assert torch.equal(sd['stages.2.blocks.1.conv.beta'], params['group2.block1.beta'].expand(64))
    assert not any('eye' in k for k in sd)
    assert sd['stages.0.blocks.0.bn.num_batches_tracked'].item() == 0


def test_detects_our_forms():
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1))
    sd = model.state_dict()
    assert detect_format(sd) == 'timm'
    assert detect_format({'module.' + k: v for k, v in sd.items()}) == 'timm'  # DDP prefixes go
    model.reparameterize()
    assert detect_format(model.state_dict()) == 'timm_folded'
