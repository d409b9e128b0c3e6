""" The authors' checkpoint formats load, converted, through timm's own pretrained loader and `timm-dirac convert`,
and give the outputs of the authors' formulation; bad files get clear errors and write nothing. """
import pickle

import pytest
import timm
import torch

import timm_dirac  # noqa: F401
from timm_dirac.cli import main as cli_main
from timm_dirac.convert import (
    checkpoint_filter_fn, convert_authors_checkpoint, detect_format, load_checkpoint_file, pretrained_source_error)

from authors_format import (
    folded_forward, fold_functional, functional_forward, make_functional_params, params_epoch_optimizer_layout,
    params_stats_layout)

# (model name, model kwargs, style, authors' layers, widths, classes, input size)
NETS = {
    'imagenet': ('diracnet18', dict(layers=(1, 2, 1, 1)), 'imagenet', (1, 2, 1, 1), (64, 128, 256, 512), 1000, 64),
    'cifar': ('diracnet34_1_cifar', {}, 'cifar', (10, 10, 10), (16, 32, 64), 10, 32),
}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _authors_checkpoint(net: str, layout: str, seed: int = 0):
    """ (checkpoint object, reference output fn) for one of the authors' formats. """
    _, _, style, layers, widths, classes, _ = NETS[net]
    params = make_functional_params(layers, widths, style, classes, per_channel=layout != 'params_stats', seed=seed)
    if layout == 'folded':
        folded = fold_functional(params)
        return folded, lambda x: folded_forward(folded, x, style)
    ckpt = params_stats_layout(params) if layout == 'params_stats' else params_epoch_optimizer_layout(params)
    return ckpt, lambda x: functional_forward(params, x, style)


@pytest.mark.parametrize('net', list(NETS))
@pytest.mark.parametrize('layout', ['folded', 'params_stats', 'params_epoch_optimizer'])
@pytest.mark.parametrize('legacy_zip', [False, True], ids=['zip', 'legacy'])
def test_authors_checkpoint_loads_through_timm(tmp_path, net, layout, legacy_zip):
    name, kwargs, style, _, _, _, size = NETS[net]
    ckpt, reference = _authors_checkpoint(net, layout)
    path = tmp_path / 'authors.pth'
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy_zip)
    expected_fmt = 'authors_folded' if layout == 'folded' else 'authors_functional'
    assert detect_format(load_checkpoint_file(path)) == expected_fmt

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference(x)
        for inference_mode in (False, True):
            model = timm.create_model(
                name, pretrained=True, inference_mode=inference_mode,
                pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
            assert _rel_err(model(x), ref) <= 1e-5, (inference_mode, _rel_err(model(x), ref))


def test_folded_checkpoint_unfolds_exactly_and_fine_tunes():
    """ The authors' folded weights in the train form: same function, trainable Dirac parameters. """
    ckpt, reference = _authors_checkpoint('cifar', 'folded')
    model = timm.create_model('diracnet34_1_cifar', pretrained=True, pretrained_cfg_overlay=dict(state_dict=ckpt))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel_err(model.eval()(x), reference(x)) <= 1e-5
    assert model.stages[0].blocks[0].conv.alpha.abs().max() == 0  # unfolded as alpha = 0, beta = ||W||
    model.train()
    model(x).sum().backward()
    assert model.stages[1].blocks[3].conv.beta.grad.abs().sum() > 0


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
    assert detect_format({'state_dict': {'module.' + k: v for k, v in sd.items()}}) == 'timm'
    model.reparameterize()
    assert detect_format(model.state_dict()) == 'timm_folded'


def test_wrong_architecture_is_named(tmp_path):
    """ A diracnet34 checkpoint given for diracnet18: the error names diracnet34, and convert writes nothing. """
    params = make_functional_params((6, 8, 12, 6), (64, 128, 256, 512), empty=True)
    model = timm.create_model('diracnet18', device='meta')
    with pytest.raises(ValueError, match=r"diracnet34.*") as info:
        checkpoint_filter_fn(params_epoch_optimizer_layout(params), model)
    assert '(6, 8, 12, 6)' in str(info.value) and '(4, 4, 4, 4)' in str(info.value)

    small = make_functional_params((2, 2, 2), (16, 32, 64), 'cifar', 10)  # DiracNet-10-1 for DiracNet-34-1
    path = tmp_path / 'small.pth'
    torch.save(params_stats_layout(small), path)
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match=r"depth=10, width=1, style='cifar'"):
        cli_main(['--debug', 'convert', str(path), '--model', 'diracnet34_1_cifar', '--out', str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['small.pth']


class NotAWeight:
    def __reduce__(self):
        return (print, ('this must never run',))


@pytest.mark.parametrize('kind', ['object_pickle', 'dict_of_other', 'truncated', 'not_a_dict', 'unknown_keys'])
def test_bad_files_get_clear_errors_and_write_nothing(tmp_path, kind, capsys):
    path = tmp_path / 'bad.pth'
    if kind == 'object_pickle':
        path.write_bytes(pickle.dumps({'conv': NotAWeight()}))
        match = 'weights_only=True'
    elif kind == 'dict_of_other':
        torch.save({'encoder.weight': torch.zeros(2), 'decoder.bias': torch.zeros(2)}, path)
        match = 'Not a DiracNet checkpoint: found encoder.weight'
    elif kind == 'truncated':
        ckpt, _ = _authors_checkpoint('cifar', 'folded')
        torch.save(ckpt, path)
        path.write_bytes(path.read_bytes()[:5000])
        match = 'truncated, corrupt'
    elif kind == 'not_a_dict':
        torch.save([torch.zeros(3)], path)
        match = 'holds a list'
    else:
        ckpt, _ = _authors_checkpoint('cifar', 'folded')
        ckpt['features.extra.weight'] = torch.zeros(1)
        torch.save(ckpt, path)
        match = r"Unexpected keys .*features\.extra\.weight"
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        cli_main(['--debug', 'convert', str(path), '--model', 'diracnet34_1_cifar', '--out', str(tmp_path / 'out')])
    assert 'this must never run' not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.pth'] and path.read_bytes() == before


def test_unreachable_source_error_names_source_and_fix():
    err = pretrained_source_error('diracnet18', OSError('Network is unreachable'))
    msg = str(err)
    assert 'https://s3.amazonaws.com/modelzoo-networks/diracnet18v2folded-a2174e15.pth' in msg
    assert "pretrained_cfg_overlay=dict(file='/path/to/diracnet18v2folded-a2174e15.pth')" in msg
    assert 'Network is unreachable' in msg
    hub = pretrained_source_error(
        'diracnet34_1_cifar', OSError('offline'), pretrained_cfg_overlay=dict(hf_hub_id='ns/diracnet34_1_cifar.x'))
    assert 'ns/diracnet34_1_cifar.x' in str(hub) and 'hf download' in str(hub)


def test_convert_cli_writes_loadable_folder(tmp_path):
    ckpt, reference = _authors_checkpoint('cifar', 'params_epoch_optimizer', seed=3)
    path = tmp_path / 'diracnet34-1_checkpoint.pth'
    torch.save(ckpt, path)
    for form in ('auto', 'folded'):
        out = tmp_path / f'hub_{form}'
        assert cli_main(['convert', str(path), '--model', 'diracnet34_1_cifar', '--out', str(out), '--form', form]) == 0
        model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
        assert model.inference_mode == (form == 'folded')
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert _rel_err(model(x), reference(x)) <= 1e-5
        card = (out / 'README.md').read_text()
        assert 'authors_functional' in card and str(path) in card


def test_dirac_weights_into_another_architecture_named():
    """ A config or --model naming another architecture reaches the DiracNet filter with, e.g., a ResNet. """
    resnet = timm.create_model('resnet18', device='meta')
    dirac = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).state_dict()
    with pytest.raises(ValueError, match='cannot be loaded into a ResNet'):
        checkpoint_filter_fn(dirac, resnet)
