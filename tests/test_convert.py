""" The authors' checkpoint formats load, converted, through timm's own pretrained loader and `timm-dirac convert`,
and give the outputs of the authors' formulation; bad files get clear errors and write nothing. """
import hashlib
import json
import pickle

import pytest
import timm
import torch

import timm_dirac  # noqa: F401
from timm_dirac.cli import main as cli_main
from timm_dirac.convert import (
    checkpoint_filter_fn, convert_authors_checkpoint, detect_format, is_release, load_checkpoint_file,
    hub_unreachable, pretrained_source_error)

from authors_format import (
    folded_forward, fold_functional, functional_forward, make_functional_params, params_epoch_optimizer_layout,
    params_stats_layout, write_authors_folded_file)

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
    with pytest.raises(ValueError, match=r"'diracnet34_1_cifar', depth=10, width=1\)"):
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


def test_hub_weights_without_network_fail_at_once(tmp_path, monkeypatch):
    """ Hub weights neither cached nor reachable: one error naming the fix, before huggingface_hub's minute of
    retries; cached weights (or HF_HUB_OFFLINE) are left to timm. """
    import socket
    import time
    from huggingface_hub import constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, 'Name or service not known')
    monkeypatch.setattr(socket, 'getaddrinfo', no_dns)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    hub_only = dict(file=None, hf_hub_id='ns/diracnet34_1_cifar.x')
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match='no network: huggingface.co does not resolve') as exc:
        timm.create_model('diracnet34_1_cifar', pretrained=True, pretrained_cfg_overlay=hub_only)
    assert time.perf_counter() - start < 10 and 'hf download ns/diracnet34_1_cifar.x' in str(exc.value)
    assert hub_unreachable('diracnet18') is None  # an URL source: timm's own download and error
    snapshot = tmp_path / 'models--ns--diracnet34_1_cifar.x' / 'snapshots' / 'abc'
    snapshot.mkdir(parents=True)
    (snapshot / 'model.safetensors').write_bytes(b'')
    (tmp_path / 'models--ns--diracnet34_1_cifar.x' / 'refs').mkdir()
    (tmp_path / 'models--ns--diracnet34_1_cifar.x' / 'refs' / 'main').write_text('abc')
    assert hub_unreachable('diracnet34_1_cifar', pretrained_cfg_overlay=hub_only) is None


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
        assert f'converted from {path.name} (authors_functional format)' in card
        assert str(tmp_path) not in card, 'a local absolute path names nothing for the reader'
        config = json.loads((out / 'config.json').read_text())
        assert config['label_names'][:2] == ['airplane', 'automobile'] and len(config['label_names']) == 10


def test_only_the_release_file_gets_the_release_tag(tmp_path, monkeypatch):
    """ A file in the authors' layout under the release's file name is not the release: it gets no tag, no
    reported accuracy, no address and no licence. The same file, registered as the release by its sha256 prefix
    (the convention of the authors' file names), gets all of them. """
    path = tmp_path / 'diracnet18v2folded-a2174e15.pth'
    write_authors_folded_file(path, 'diracnet18')
    assert cli_main(['convert', str(path), '--model', 'diracnet18', '--out', str(tmp_path / 'random')]) == 0
    card = (tmp_path / 'random' / 'README.md').read_text()
    assert [fact for fact in ('69.63', 'modelzoo-networks', 'v2_in1k', 'does not re-host') if fact in card] == []
    assert 'converted from diracnet18v2folded-a2174e15.pth (authors_folded format)' in card
    config = json.loads((tmp_path / 'random' / 'config.json').read_text())
    assert 'tag' not in config['pretrained_cfg'] and len(config['label_names']) == 1000

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    release_cfg = timm.models._registry._model_pretrained_cfgs['diracnet18.v2_in1k']
    url = f'https://s3.amazonaws.com/modelzoo-networks/diracnet18v2folded-{digest}.pth'
    monkeypatch.setattr(release_cfg, 'url', url)
    assert is_release(path, release_cfg.url) and not is_release(path, 'https://x/diracnet18v2folded-a2174e15.pth')
    assert cli_main(['convert', str(path), '--model', 'diracnet18', '--out', str(tmp_path / 'release')]) == 0
    card = (tmp_path / 'release' / 'README.md').read_text()
    assert all(fact in card for fact in ('69.63', f'diracnet18v2folded-{digest}.pth', 'v2_in1k', 'does not re-host'))
    assert json.loads((tmp_path / 'release' / 'config.json').read_text())['pretrained_cfg']['tag'] == 'v2_in1k'


def test_convert_takes_any_cifar_shape_and_cifar100(tmp_path):
    """ DiracNet-10-2 (no registered name) with the shape as --model-kwargs, as the shape error says; a CIFAR-100
    file with its 100-class classifier (read from the file) and CIFAR-100's class names. """
    params = make_functional_params((2, 2, 2), (32, 64, 128), 'cifar', 100, seed=4)
    path = tmp_path / 'diracnet10_2_cifar100.pth'
    torch.save(params_epoch_optimizer_layout(params), path)
    with pytest.raises(ValueError, match=r"--model diracnet34_1_cifar --model-kwargs depth=10 width=2"):
        cli_main(['--debug', 'convert', str(path), '--model', 'diracnet34_1_cifar', '--out', str(tmp_path / 'x')])
    out = tmp_path / 'hub'
    assert cli_main(['convert', str(path), '--model', 'diracnet34_1_cifar', '--model-kwargs', 'depth=10', 'width=2',
                     '--out', str(out)]) == 0
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel_err(model(x), functional_forward(params, x, 'cifar')) <= 1e-5
    labels = json.loads((out / 'config.json').read_text())['label_names']
    assert len(labels) == 100 and labels[:3] == ['apple', 'aquarium_fish', 'baby'] and labels[-1] == 'worm'
    assert len(set(labels)) == 100


def test_classifier_in_the_file_loads_or_is_refused(tmp_path):
    """ create_model(num_classes=100) with a 100-class file under a 10-class name loads the file's classifier;
    without num_classes the mismatch is an error that names the fix; another num_classes gets a new classifier. """
    params = make_functional_params((10, 10, 10), (16, 32, 64), 'cifar', 100, seed=5)
    path = tmp_path / 'diracnet34-1_cifar100.pth'
    torch.save(params_stats_layout(params), path)
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model('diracnet34_1_cifar', num_classes=100, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert _rel_err(model(x), functional_forward(params, x, 'cifar')) <= 1e-5
    with pytest.raises(ValueError, match='100-class classifier but the model has 10 classes.*num_classes=100'):
        timm.create_model('diracnet34_1_cifar', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    head5 = timm.create_model('diracnet34_1_cifar', num_classes=5, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert head5.head.fc.weight.shape == (5, 64)
    feats = timm.create_model('diracnet34_1_cifar', features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert len(feats(x)) == 4
