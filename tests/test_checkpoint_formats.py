""" The model file's checkpoint formats (diracnet.py): which format a checkpoint is in, the authors' in our keys, and
either form of ours into either form of the model. (The authors' checkpoints loading through timm with their
outputs: tests/test_diracnet.py.) """
import pytest
import timm
import torch

import timm_dirac  # noqa: F401
from timm_dirac.diracnet import checkpoint_filter_fn, checkpoint_format, convert_authors_checkpoint, fold_state_dict

from authors_format import authors_checkpoint, make_functional_params, params_stats_layout


@pytest.mark.parametrize('layout,expected', [('folded', 'authors_folded'), ('params_stats', 'authors_functional'),
                                             ('params_epoch_optimizer', 'authors_functional')])
def test_tells_the_authors_formats_apart(layout, expected):
    checkpoint, _ = authors_checkpoint('cifar', layout)
    assert checkpoint_format(checkpoint) == expected


def test_scalar_alpha_beta_are_broadcast_and_identities_dropped():
    params = make_functional_params((2, 2, 2), (16, 32, 64), 'cifar', 10, per_channel=False)
    sd = convert_authors_checkpoint(params_stats_layout(params))
    assert sd['stages.2.blocks.1.conv.alpha'].shape == (64,)
    assert torch.equal(sd['stages.2.blocks.1.conv.beta'], params['group2.block1.beta'].expand(64))
    assert not any('eye' in k for k in sd)
    model = timm.create_model('diracnet34_1_cifar', layers=(2, 2, 2))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == [] and all(k.endswith('num_batches_tracked') for k in missing)


def test_tells_our_two_forms_apart_and_loads_either_into_either_model():
    torch.manual_seed(0)
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    sd = model.state_dict()
    folded = fold_state_dict(sd)
    assert checkpoint_format(sd) == 'timm' and checkpoint_format(folded) == 'timm_folded'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for inference_mode in (False, True):
            for checkpoint in (sd, folded, {'module.' + k: v for k, v in folded.items()}):  # DDP's prefix goes
                target = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1), inference_mode=inference_mode)
                target.load_state_dict(checkpoint_filter_fn(checkpoint, target))  # strict
                torch.testing.assert_close(target.eval()(x), ref, rtol=1e-5, atol=1e-5)
