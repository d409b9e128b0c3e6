""" timm_dirac.diracify: any plain CNN Dirac-parameterized, then folded back into its own architecture.

The fold is exact (randomized alpha/beta and BatchNorm statistics, several timm models and a hand-written module),
the folded state dict loads strictly into the untouched original, a trained model keeps its outputs with
`from_pretrained=True`, the convs left alone are reported with the reason, and bad input gets one clear message.
"""
import copy

import pytest
import torch
import torch.nn as nn

import timm
from timm.layers import Conv2dSame
from timm.models.vgg import VGG
from timm.utils import reparameterize_model

from timm_dirac import DiracifiedConv2d, diracify, plan_diracify
from timm_dirac.diracify import DiracifiedConv1d, DiracifiedConv3d


class Hand(nn.Module):
    """ A user's own net: 1d, 2d and 3d convs, widening and narrowing, dilation, 'same' padding, no bias, a shared
    conv, and convs that must be left alone. """

    def __init__(self):
        super().__init__()
        self.seq = nn.Conv1d(3, 6, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 12, 5, padding='same', dilation=2), nn.ReLU(),
                                  nn.Conv2d(12, 8, (1, 3), padding=(0, 1)), nn.BatchNorm2d(8), nn.ReLU())
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.again = nn.ModuleList([self.shared])
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.vol = nn.Conv3d(2, 4, 3, padding=1)

    def forward(self, x):
        y = self.bn(self.stem(x))
        y = self.again[0](self.shared(self.body(y)))
        seq = self.seq(x.mean(2))
        vol = self.vol(x[:, :2, None].expand(-1, -1, 3, -1, -1))
        return torch.cat([self.down(y).flatten(1), seq.flatten(1), vol.flatten(1)], 1)


def tiny_vgg(**kwargs) -> nn.Module:
    return VGG([8, 'M', 16, 16, 'M'], num_classes=5, mlp_ratio=1 / 256, norm_layer=nn.BatchNorm2d, **kwargs)


MODELS = {
    'vgg': (tiny_vgg, 32),
    'test_resnet': (lambda: timm.create_model('test_resnet', num_classes=5), 32),
    'test_byobnet': (lambda: timm.create_model('test_byobnet', num_classes=5), 32),
    'test_efficientnet': (lambda: timm.create_model('test_efficientnet', num_classes=5), 32),
    'hand': (Hand, 8),
}


@torch.no_grad()
def randomize(model: nn.Module) -> nn.Module:
    """ Random weights, Dirac alpha/beta and BatchNorm statistics, so that no term of the fold hides behind an init. """
    for name, p in model.named_parameters():
        if name.endswith(('alpha', 'beta')):
            p.uniform_(-1.5, 1.5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.3)
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('name', MODELS)
def test_fold_is_exact_and_loads_strictly_into_the_original(name):
    make, size = MODELS[name]
    torch.manual_seed(0)
    original = make().eval()
    dirac = randomize(diracify(copy.deepcopy(original))).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = dirac(x)
        folded = reparameterize_model(dirac)
        assert rel_error(folded(x), expected) <= 1e-5

    assert [type(m) for m in folded.modules()] == [type(m) for m in original.modules()]
    assert not any(type(m).__module__.startswith('timm_dirac') for m in folded.modules())
    fresh = make()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), folded(x), rtol=0, atol=0)


def test_diracified_keeps_the_conv_keys_and_adds_alpha_beta():
    original = tiny_vgg()
    dirac = diracify(copy.deepcopy(original))
    extra = set(dirac.state_dict()) - set(original.state_dict())
    assert set(original.state_dict()) <= set(dirac.state_dict())
    assert extra == {f'features.{i}.{p}' for i in (0, 4, 7) for p in ('alpha', 'beta')} | {
        'pre_logits.fc2.alpha', 'pre_logits.fc2.beta'}
    assert isinstance(dirac.features[0], DiracifiedConv2d) and type(dirac.features[3]) is nn.MaxPool2d


def test_fresh_start_is_the_papers_and_keeps_the_convs_weights():
    torch.manual_seed(0)
    original = Hand()
    dirac = diracify(copy.deepcopy(original))
    assert isinstance(dirac.seq, DiracifiedConv1d) and isinstance(dirac.vol, DiracifiedConv3d)
    torch.testing.assert_close(dirac.stem.alpha, torch.ones(8))
    torch.testing.assert_close(dirac.stem.beta, torch.full((8,), 0.1))
    torch.testing.assert_close(dirac.stem.weight, original.stem.weight)
    torch.testing.assert_close(dirac.body[0].bias, original.body[0].bias)
    custom = Hand()
    state = torch.random.get_rng_state()
    diracify(custom, alpha_init=0.5, beta_init=1.)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is not consumed

    conv = nn.Conv2d(4, 4, 3, padding=1)
    dirac = diracify(conv, from_pretrained=True)  # a lone conv: its Dirac form comes back, and folds back
    assert isinstance(dirac, DiracifiedConv2d) and type(dirac.fuse()) is nn.Conv2d
    torch.testing.assert_close(dirac.fuse().weight, conv.weight)
    torch.testing.assert_close(custom.vol.alpha, torch.full((4,), 0.5))
    torch.testing.assert_close(custom.vol.beta, torch.ones(4))


@pytest.mark.parametrize('name', ['vgg', 'test_resnet', 'hand'])
def test_from_pretrained_keeps_a_trained_models_outputs(name):
    make, size = MODELS[name]
    torch.manual_seed(0)
    trained = randomize(make()).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = trained(x)
        dirac = diracify(copy.deepcopy(trained), from_pretrained=True)
        assert rel_error(dirac(x), expected) <= 1e-5
        assert rel_error(reparameterize_model(dirac)(x), expected) <= 1e-5
    assert all(float(m.alpha.detach().abs().max()) == 0 for m in dirac.modules() if isinstance(m, DiracifiedConv2d))


def test_a_shared_conv_is_left_alone_and_the_fold_keeps_train_mode():
    dirac = diracify(Hand().train())
    assert dirac.shared is dirac.again[0] and type(dirac.shared) is nn.Conv2d
    assert plan_diracify(Hand()).skipped['shared'] == 'shared under several names (shared, again.0)'
    folded = reparameterize_model(dirac)
    assert type(folded.stem) is nn.Conv2d and folded.stem.training


def test_plan_lists_the_convs_left_alone_with_the_reason(capsys):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Conv2d(8, 8, 2, padding='same'),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 8, 3, padding=0),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode='reflect'),
        nn.ConvTranspose2d(8, 8, 3, padding=1),
        Conv2dSame(8, 8, 3),
    )
    plan = plan_diracify(model)
    assert plan.eligible == ['0']
    reasons = plan.skipped
    assert 'stride (2, 2)' in reasons['1']
    assert 'even kernel_size (2, 2)' in reasons['2']
    assert 'groups=8' in reasons['3']
    assert 'padding (0, 0)' in reasons['4'] and 'padding (1, 1)' in reasons['4']
    assert "padding_mode='reflect'" in reasons['5']
    assert 'ConvTranspose2d is not a plain' in reasons['6'] and 'Conv2dSame is not a plain' in reasons['7']

    diracify(model, verbose=True)
    out = capsys.readouterr().out
    assert out.startswith('diracify: 1 conv(s) Dirac-parameterized, 7 left alone')
    assert '  kept 1: stride (2, 2)' in out
    assert isinstance(model[0], DiracifiedConv2d) and type(model[1]) is nn.Conv2d


def test_layers_selects_convs_by_name():
    dirac = diracify(Hand(), layers=['body.*', 'stem'])
    assert isinstance(dirac.stem, DiracifiedConv2d) and isinstance(dirac.body[2], DiracifiedConv2d)
    assert type(dirac.shared) is nn.Conv2d and type(dirac.seq) is nn.Conv1d
    assert plan_diracify(Hand(), 'body.*').skipped['vol'] == 'not selected by layers'


def test_features_only_torchscript_and_compile():
    original = timm.create_model('vgg11_bn', features_only=True, out_indices=(1, 2)).eval()
    dirac = randomize(diracify(copy.deepcopy(original))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = dirac(x)
        for out, ref in zip(torch.jit.script(dirac)(x), expected):
            torch.testing.assert_close(out, ref)
        compiled = torch.compile(dirac, backend='eager')
        for out, ref in zip(compiled(x), expected):
            torch.testing.assert_close(out, ref)
        folded = reparameterize_model(dirac)
        for out, ref in zip(folded(x), expected):
            assert rel_error(out, ref) <= 1e-5
    original.load_state_dict(folded.state_dict(), strict=True)


def test_folded_hub_folder_needs_no_timm_dirac(tmp_path):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = randomize(diracify(timm.create_model('test_resnet', num_classes=5))).eval()
    folded = reparameterize_model(model)
    save_for_hf(folded, tmp_path / 'hub', safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    assert type(loaded).__module__.startswith('timm.')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)


def test_bad_input_gets_one_clear_message():
    with pytest.raises(ValueError, match=r'no eligible conv in Sequential .*kept 0: stride \(2, 2\)'):
        diracify(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match=r'no eligible conv in Linear'):
        diracify(nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r'already has Dirac-parameterized convs \(seq is a DiracifiedConv1d\).*'
                                         r'reparameterize_model'):
        diracify(diracify(Hand()))
    import timm_dirac  # noqa: F401  registers the DiracNets
    with pytest.raises(ValueError, match=r'already has Dirac-parameterized convs .*DiracConv2d'):
        diracify(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)))
    with pytest.raises(ValueError, match=r"layers pattern 'head\.\*' matches no conv of Hand; its convs are: seq, "):
        diracify(Hand(), layers=['stem', 'head.*'])
    with pytest.raises(ValueError, match=r'from_pretrained=True sets alpha=0.*drop alpha_init'):
        diracify(Hand(), from_pretrained=True, alpha_init=1.)
