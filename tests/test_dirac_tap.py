""" The folded Dirac tap: how large it is in trained weights, its split into a learned conv plus an exact identity,
and the chained form where it is an identity add in per-channel units. """
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm
import timm_dirac  # noqa: F401  registers the models
from timm_dirac.deploy.dirac_tap import IdentityDiracConv, SplitDiracConv, centre_tap_ratio, chain_dirac_taps, \
    split_dirac_taps
from timm_dirac.loading import fold

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / 'timm_dirac' / 'assets' / 'weights' / 'diracnet16_4_cifar.td_cifar10'


def _trained_like(**kwargs) -> nn.Module:
    """ A small random DiracNet with BatchNorm statistics away from their init, folded. """
    torch.manual_seed(0)
    model = timm.create_model('diracnet34_1_cifar', layers=(2, 2, 2), **kwargs)
    for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
        bn.weight.data.uniform_(0.5, 1.5)
        bn.running_var.uniform_(0.5, 2.)
        bn.running_mean.normal_()
    return fold(model.eval())


def test_split_model_computes_the_folded_function():
    model = _trained_like()
    split = split_dirac_taps(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, SplitDiracConv) for m in split.modules()) == 6
    assert not any(isinstance(m, SplitDiracConv) for m in model.modules()), 'the original is left unchanged'


@pytest.mark.parametrize('kwargs, last', [({}, IdentityDiracConv), (dict(num_classes=0), SplitDiracConv),
                                          (dict(global_pool='catavgmax'), SplitDiracConv)])
def test_chained_model_computes_the_folded_function(kwargs, last):
    """ Widths 16-32-64, two layers a stage: every layer that keeps the width takes the identity form, the
    width-changing ones stay split; the last layer too unless a classifier after an average pool takes its units. """
    model = _trained_like(**kwargs)
    blocks = [m for m in model.modules() if isinstance(m, timm_dirac.diracnet.DiracBlock)]
    with torch.no_grad():
        blocks[1].conv.weight[2, 2, 1, 1] = -0.3  # a negative tap
    chained = chain_dirac_taps(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(chained(x), model(x), rtol=1e-4, atol=1e-4)
    kinds = [type(b.conv) for b in chained.modules() if isinstance(b, timm_dirac.diracnet.DiracBlock)]
    assert kinds == [IdentityDiracConv, IdentityDiracConv, SplitDiracConv, IdentityDiracConv, SplitDiracConv, last]
    assert all(isinstance(b.conv, nn.Conv2d) for b in blocks), 'the original is left unchanged'


def test_chain_carries_the_taps_exactly_in_units_centred_on_one():
    """ In the identity form the conv keeps no part of a tap above a quarter of its layer's median (under it, its
    shortfall from the floor in the layer's units), so the learned weights set the int8 scale; and along the four same-width layers of
    the published weights' first stage the per-channel units stay centred on 1 (their geometric mean is 1). """
    model = timm.create_model(f'local-dir:{WEIGHTS}', pretrained=True, inference_mode=True)
    chained = chain_dirac_taps(model)
    pairs = [(b.conv, c.conv) for b, c in zip(
        [m for m in model.modules() if isinstance(m, timm_dirac.diracnet.DiracBlock)],
        [m for m in chained.modules() if isinstance(m, timm_dirac.diracnet.DiracBlock)])]
    log_units = [model.stem.conv.weight.flatten(1).norm(dim=1).log()
                 - chained.stem.conv.weight.flatten(1).norm(dim=1).log()]
    for folded, rewritten in pairs[:4]:
        assert isinstance(rewritten, IdentityDiracConv)
        conv = rewritten.conv
        index = torch.arange(conv.out_channels)
        taps, kept = folded.weight[index, index, 1, 1], conv.weight[index, index, 1, 1]
        floor = taps[taps > 0].median() / 4
        large = taps >= floor
        assert large.float().mean() > 0.85
        assert torch.all(kept[large].abs() < 1e-5)
        assert torch.all(kept[~large].abs() <= 1 + taps[~large].abs() / floor + 1e-5)
        log_units.append(log_units[-1] + taps.double().clamp(min=floor).log())
    centre = torch.stack(log_units).mean(0)
    torch.testing.assert_close(centre, torch.zeros_like(centre), atol=1e-4, rtol=0)


def test_split_leaves_the_learned_conv_without_its_diagonal_centre_taps():
    conv = nn.Conv2d(4, 8, 3, padding=1)  # widens: the identity covers the first 4 output channels
    split = SplitDiracConv(conv)
    index = torch.arange(4)
    assert torch.all(split.learned.weight[index, index, 1, 1] == 0)
    torch.testing.assert_close(split.identity.weight[index, index, 0, 0], conv.weight[index, index, 1, 1])
    assert torch.all(split.identity.weight[4:] == 0)
    same_width = SplitDiracConv(nn.Conv2d(8, 8, 3, padding=1))
    assert same_width.identity.groups == 8, 'depthwise where the width does not change'
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(split(x), conv(x), rtol=1e-5, atol=1e-5)


def test_split_refuses_what_it_cannot_split_exactly():
    with pytest.raises(ValueError, match='not a folded Dirac conv'):
        SplitDiracConv(nn.Conv2d(8, 8, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match='train form'):
        split_dirac_taps(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)))
    with pytest.raises(ValueError, match='--flow plain'):
        split_dirac_taps(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)))
    with pytest.raises(ValueError, match='train form'):
        chain_dirac_taps(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)))


def test_trained_weights_have_a_dominant_centre_tap():
    """ What breaks plain per-channel int8: in our published weights the Dirac tap dwarfs the learned weights. """
    model = timm.create_model(f'local-dir:{WEIGHTS}', pretrained=True, inference_mode=True)
    ratios = centre_tap_ratio(model)
    assert len(ratios) == 12
    assert min(ratios) > 10, ratios
