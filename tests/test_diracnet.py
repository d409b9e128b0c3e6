""" DiracNet models: the authors' v2 architecture, the whole family, folding and timm integration. """
import copy
import re

import pytest
import timm
import torch
import torch.nn as nn

import timm_dirac
from timm_dirac import DiracNet, fold_state_dict, unfold_state_dict
from timm_dirac.diracnet import checkpoint_format
from timm_dirac.loading import load_checkpoint_file

from authors_format import (
    NETS, authors_checkpoint, functional_forward, make_functional_params, params_epoch_optimizer_layout,
    params_stats_layout)

SMALL_INPUT = {'imagenet': (3, 64, 64), 'cifar': (3, 32, 32)}

# (Dirac layers per stage, stage widths, stem kernel) of each registered net, from the paper's definitions:
# DiracNet-18/34 have ResNet-18/34's conv layout; DiracNet-D-W has WRN-D-W's: 3 stages of (D - 4) / 3 layers,
# widths (16, 32, 64) * W
SHAPES = {
    'diracnet18': ((4, 4, 4, 4), (64, 128, 256, 512), 7),
    'diracnet34': ((6, 8, 12, 6), (64, 128, 256, 512), 7),
    'diracnet16_2_cifar': ((4, 4, 4), (32, 64, 128), 3),
    'diracnet16_4_cifar': ((4, 4, 4), (64, 128, 256), 3),
    'diracnet28_10_cifar': ((8, 8, 8), (160, 320, 640), 3),
    'diracnet28_5_cifar': ((8, 8, 8), (80, 160, 320), 3),
    'diracnet34_1_cifar': ((10, 10, 10), (16, 32, 64), 3),
    'diracnet34_2_cifar': ((10, 10, 10), (32, 64, 128), 3),
}
# trainable parameters the authors publish (train form, and folded where they publish it), default heads
PUBLISHED_COUNTS = {
    'diracnet18': (11_523_368, 11_511_784),
    'diracnet34': (21_638_952, 21_616_232),
    'diracnet28_10_cifar': (36_450_090, None),
    'diracnet28_5_cifar': (9_124_250, None),
    'diracnet34_1_cifar': (466_394, None),
    'diracnet34_2_cifar': (1_854_378, None),
}


def expected_params(layers, widths, stem_kernel, num_classes, folded=False):
    """ Parameters counted by hand: per 3x3 layer its weight, alpha and beta and BN weight and bias (train form) or
    its weight and bias (folded); the stem conv with its BN (or bias); the linear head. """
    count = widths[0] * 3 * stem_kernel ** 2 + (1 if folded else 2) * widths[0]
    in_chs = widths[0]
    for num, width in zip(layers, widths):
        for _ in range(num):
            count += width * in_chs * 9 + (1 if folded else 4) * width
            in_chs = width
    return count + in_chs * num_classes + num_classes


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def style_of(model: DiracNet) -> str:
    return 'imagenet' if isinstance(model.stem.pool, nn.MaxPool2d) else 'cifar'


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """ Give alpha, beta and BN statistics non-trivial values so equivalence checks can fail. """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('alpha', 'beta')):
                p.copy_(torch.rand(p.shape, generator=gen) * 1.5 - 0.25)
            elif name.endswith('bias'):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def authors_params(model: nn.Module) -> dict:
    """ The model's tensors under the authors' flat v2 keys (conv, bn.*, group<g>.block<b>.{conv,alpha,beta,bn.*},
    fc.*), for the one reference forward in authors_format.py. """
    rules = [(r'^stem\.conv\.weight$', 'conv'), (r'^stem\.bn\.', 'bn.'), (r'^head\.fc\.', 'fc.'),
             (r'^stages\.(\d+)\.blocks\.(\d+)\.conv\.weight$', r'group\1.block\2.conv'),
             (r'^stages\.(\d+)\.blocks\.(\d+)\.conv\.(alpha|beta)$', r'group\1.block\2.\3'),
             (r'^stages\.(\d+)\.blocks\.(\d+)\.bn\.', r'group\1.block\2.bn.')]
    out = {}
    for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
        for pattern, replacement in rules:
            if re.match(pattern, name):
                out[re.sub(pattern, replacement, name)] = t
                break
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_plugin_registers_the_family():
    assert set(SHAPES) <= set(timm.list_models('diracnet*'))


@pytest.mark.parametrize('name', SHAPES)
def test_each_net_has_the_papers_shape_and_parameter_count(name):
    layers, widths, stem_kernel = SHAPES[name]
    model = timm.create_model(name)
    assert tuple(len(s.blocks) for s in model.stages) == layers
    assert tuple(s.blocks[0].conv.out_channels for s in model.stages) == widths
    assert model.stem.conv.kernel_size == (stem_kernel, stem_kernel)
    assert num_params(model) == expected_params(layers, widths, stem_kernel, model.num_classes)
    folded = timm.create_model(name, inference_mode=True)
    assert num_params(folded) == expected_params(layers, widths, stem_kernel, model.num_classes, folded=True)
    published, published_folded = PUBLISHED_COUNTS.get(name, (None, None))
    assert published in (None, num_params(model)) and published_folded in (None, num_params(folded))


@pytest.mark.parametrize('name,layers', [('diracnet18', (4, 4, 4, 4)), ('diracnet34', (6, 8, 12, 6)),
                                         ('diracnet34_1_cifar', (10, 10, 10)), ('diracnet28_5_cifar', (8, 8, 8))])
def test_forward_matches_the_authors_functional_formulation(name, layers):
    model = randomize(timm.create_model(name))
    style = style_of(model)
    x = torch.randn(2, *SMALL_INPUT[style])
    params = authors_params(model)
    assert sum(f'group{g}.block0.conv' in params for g in range(4)) == len(layers)
    with torch.no_grad():
        assert rel_err(model(x), functional_forward(params, x, style)) <= 1e-5


def test_initial_values_follow_the_authors():
    model = timm.create_model('diracnet34_1_cifar')
    conv, bn = model.stages[1].blocks[0].conv, model.stages[1].blocks[0].bn
    assert torch.all(conv.alpha == 1.) and torch.all(conv.beta == 0.1)
    assert torch.all((bn.weight >= 0) & (bn.weight < 1)) and bn.weight.std() > 0 and torch.all(bn.bias == 0)
    assert [type(m) for m in model.stages[0].blocks[0].children()] == [nn.ReLU, timm_dirac.DiracConv2d,
                                                                      nn.BatchNorm2d]
    assert not any(n.endswith('skip') or n.endswith('shortcut') for n, _ in model.named_modules())


def test_downsampling_is_max_pooling_between_stages():
    model = timm.create_model('diracnet18')
    assert [type(s.pool) for s in model.stages] == [nn.Identity, nn.MaxPool2d, nn.MaxPool2d, nn.MaxPool2d]
    assert [f['reduction'] for f in model.feature_info] == [2, 4, 8, 16, 32]
    _, feats = model.forward_intermediates(torch.randn(1, 3, 224, 224))
    assert [f.shape[-1] for f in feats] == [112, 56, 28, 14, 7]


@pytest.mark.parametrize('layers', [(2, 2, 2), (12, 12, 12), (32, 32, 32)])
def test_any_cifar_depth_builds_from_layers_and_channels(layers):
    """ DiracNet-D-2 for D = 10, 40, 100: the depth and width of the family are the model's arguments. """
    model = timm.create_model('diracnet34_1_cifar', layers=layers, channels=(32, 64, 128))
    assert tuple(len(s.blocks) for s in model.stages) == layers
    assert [f['num_chs'] for f in model.feature_info] == [32, 32, 64, 128]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_any_number_of_stages_builds_and_folds():
    """ A two-stage net is data too: it builds, gives one feature level per stage, and folds exactly. """
    kwargs = dict(layers=(2, 2), channels=(8, 16), stem_type='cifar')
    model = randomize(timm.create_model('diracnet34_1_cifar', **kwargs))
    x = torch.randn(2, 3, 32, 32)
    features = timm.create_model('diracnet34_1_cifar', features_only=True, **kwargs)(x)
    assert [f.shape[1] for f in features] == [8, 8, 16]  # stem, then each stage
    with torch.no_grad():
        out = model(x)
        model.reparameterize()
        assert rel_err(model(x), out) < 1e-5


@pytest.mark.parametrize('kwargs,match', [(dict(layers=(2, 2), channels=(8, 16, 32)), 'one positive layer count'),
                                          (dict(layers=(2, 0, 2)), 'one positive layer count'),
                                          (dict(stem_type='wide'), "stem_type 'wide'")])
def test_inconsistent_shapes_are_refused_naming_the_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('diracnet34_1_cifar', **kwargs)


def test_without_dirac_switch_builds_the_plain_baseline():
    model = timm.create_model('diracnet34_1_cifar', dirac=False)
    assert not any(isinstance(m, timm_dirac.DiracConv2d) for m in model.modules())
    alpha_beta = 2 * 10 * (16 + 32 + 64)  # one alpha and one beta per channel of each of the 30 Dirac layers
    assert num_params(model) == PUBLISHED_COUNTS['diracnet34_1_cifar'][0] - alpha_beta
    model = randomize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.reparameterize()
        assert rel_err(model(x), expected) <= 1e-5


def test_timm_kwargs_num_classes_in_chans_drop_rate():
    model = timm.create_model('diracnet34', num_classes=10, in_chans=1, drop_rate=0.2)
    assert model.stem.conv.in_channels == 1 and model.head.drop.p == 0.2
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_features_only_out_indices():
    model = timm.create_model('diracnet18', features_only=True, out_indices=(1, 2, 3))
    feats = model(torch.randn(1, 3, 64, 64))
    assert model.feature_info.channels() == [64, 128, 256]
    assert [f.shape[1:] for f in feats] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]


FOLDED_TYPES = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Identity, nn.Flatten,
                nn.Dropout)


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n == 'diracnet28_10_cifar' else n
                                  for n in SHAPES])  # 36M parameters: ~6 s on 2 cores
def test_folding_keeps_eval_outputs_and_leaves_a_plain_chain(name):
    model = randomize(timm.create_model(name))
    x = torch.randn(2, *SMALL_INPUT[style_of(model)])
    with torch.no_grad():
        expected = model(x)
        model.reparameterize()
        model.reparameterize()  # idempotent
        assert rel_err(model(x), expected) <= 1e-5
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(type(m) in FOLDED_TYPES or type(m).__name__ == 'SelectAdaptivePool2d' or
               isinstance(m, timm.layers.adaptive_avgmax_pool.FastAdaptiveAvgPool) for m in leaves), \
        {type(m).__name__ for m in leaves}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(c) is nn.Conv2d and c.bias is not None for c in convs)
    assert not any(n.endswith(('alpha', 'beta')) or '.bn.' in n for n, _ in model.named_parameters())
    assert model.inference_mode


def test_timm_reparameterize_model_folds_a_copy():
    model = randomize(timm.create_model('diracnet34_1_cifar'))
    folded = timm.utils.reparameterize_model(model)
    x = torch.randn(2, 3, 32, 32)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    assert not any(isinstance(m, (nn.BatchNorm2d, timm_dirac.DiracConv2d)) for m in folded.modules())
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-5


def test_inference_mode_builds_folded_and_loads_folded_state_dict_strictly():
    model = randomize(timm.create_model('diracnet34_1_cifar'))
    folded = timm.create_model('diracnet34_1_cifar', inference_mode=True).eval()
    folded.load_state_dict(fold_state_dict(model.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-5


def test_unfolding_a_folded_state_dict_is_exact_enough_to_fine_tune():
    model = randomize(timm.create_model('diracnet34_1_cifar'))
    train_form = timm.create_model('diracnet34_1_cifar').eval()
    train_form.load_state_dict(unfold_state_dict(fold_state_dict(model.state_dict())), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(train_form(x), model(x)) <= 1e-5


def test_the_other_form_loads_through_timm_and_plain_load_state_dict_refuses_it():
    """ timm's pretrained path (the checkpoint filter) converts between the forms; a plain `load_state_dict` of the
    other form is torch's ordinary key error, and `fold_state_dict` / `unfold_state_dict` are the fix. """
    model = randomize(timm.create_model('diracnet34_1_cifar'))
    train_sd = model.state_dict()
    folded = timm.create_model('diracnet34_1_cifar', inference_mode=True,
                               pretrained=True, pretrained_cfg_overlay=dict(state_dict=train_sd)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-5
    with pytest.raises(RuntimeError, match='Unexpected key.*stem.bn.running_var'):
        folded.load_state_dict(train_sd)
    with pytest.raises(RuntimeError, match='Missing key.*stem.bn.running_var'):
        timm.create_model('diracnet34_1_cifar').load_state_dict(folded.state_dict())
    folded.load_state_dict(fold_state_dict(train_sd))


def test_folded_model_scripts_traces_and_exports():
    model = randomize(timm.create_model('diracnet34_1_cifar', layers=(2, 2, 2)))
    model.reparameterize()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)


def test_train_form_traces_with_plain_torch_fx():
    model = randomize(timm.create_model('diracnet34_1_cifar', layers=(2, 2, 2)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


def test_model_folded_after_creation_round_trips_through_save_for_hf(tmp_path):
    model = randomize(timm.create_model('diracnet34_1_cifar', layers=(4, 4, 4)))
    model.reparameterize()
    timm.models.save_for_hf(model, tmp_path / 'folded', safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path / "folded"}', pretrained=True).eval()
    assert loaded.inference_mode and not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_grad_checkpointing_keeps_outputs_and_gradients():
    model = timm.create_model('diracnet34_1_cifar', layers=(2, 2, 2))
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model)
    model.set_grad_checkpointing()
    out, ref = model(x), reference(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(model.stem.conv.weight.grad, reference.stem.conv.weight.grad)


# Loading: `checkpoint_filter_fn` brings the authors' formats and ours into the model's form

@pytest.mark.parametrize('net', list(NETS))
@pytest.mark.parametrize('layout', ['folded', 'params_stats', 'params_epoch_optimizer'])
@pytest.mark.parametrize('legacy_zip', [False, True], ids=['zip', 'legacy'])
def test_authors_checkpoint_loads_through_timm(tmp_path, net, layout, legacy_zip):
    name, kwargs, style, _, _, _, size = NETS[net]
    ckpt, reference = authors_checkpoint(net, layout)
    path = tmp_path / 'authors.pth'
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy_zip)
    expected_fmt = 'authors_folded' if layout == 'folded' else 'authors_functional'
    assert checkpoint_format(load_checkpoint_file(path)) == expected_fmt

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference(x)
        for inference_mode in (False, True):
            model = timm.create_model(
                name, pretrained=True, inference_mode=inference_mode,
                pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
            assert rel_err(model(x), ref) <= 1e-5, (inference_mode, rel_err(model(x), ref))


def test_folded_checkpoint_unfolds_exactly_and_fine_tunes():
    """ The authors' folded weights in the train form: same function, trainable Dirac parameters. """
    ckpt, reference = authors_checkpoint('cifar', 'folded')
    model = timm.create_model('diracnet34_1_cifar', pretrained=True, pretrained_cfg_overlay=dict(state_dict=ckpt))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model.eval()(x), reference(x)) <= 1e-5
    assert model.stages[0].blocks[0].conv.alpha.abs().max() == 0  # unfolded as alpha = 0, beta = ||W||
    model.train()
    model(x).sum().backward()
    assert model.stages[1].blocks[3].conv.beta.grad.abs().sum() > 0


def test_a_checkpoint_of_another_shape_is_refused_by_the_strict_load():
    """ A diracnet34 checkpoint given for diracnet18: timm's strict load names the keys that do not fit. """
    params = make_functional_params((6, 8, 12, 6), (64, 128, 256, 512), empty=True)
    with pytest.raises(RuntimeError, match=r'Unexpected key.*stages\.0\.blocks\.4'):
        timm.create_model('diracnet18', pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict=params_epoch_optimizer_layout(params)))


def test_a_classifier_loads_when_the_pretrained_cfg_says_its_size(tmp_path):
    """ timm's rule, as for every timm model: the file's classifier loads when the model's class count is the
    pretrained cfg's (a CIFAR-100 file: num_classes=100 and pretrained_cfg_overlay num_classes=100); another class
    count gets a new classifier; a mismatch timm keeps is torch's size-mismatch error. (Before, the filter rewrote
    the model's pretrained cfg to make num_classes=100 alone load the file's classifier.) """
    params = make_functional_params((10, 10, 10), (16, 32, 64), 'cifar', 100, seed=5)
    path = tmp_path / 'diracnet34-1_cifar100.pth'
    torch.save(params_stats_layout(params), path)
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model('diracnet34_1_cifar', num_classes=100, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=100)).eval()
    with torch.no_grad():
        assert rel_err(model(x), functional_forward(params, x, 'cifar')) <= 1e-5
    with pytest.raises(RuntimeError, match=r'size mismatch for head.fc.weight'):
        timm.create_model('diracnet34_1_cifar', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    head5 = timm.create_model('diracnet34_1_cifar', num_classes=5, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert head5.head.fc.weight.shape == (5, 64)
    feats = timm.create_model('diracnet34_1_cifar', features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert len(feats(x)) == 4
