""" `timm-dirac convert` writes Hub folders that give the outputs of the authors' formulation, credits only the
release file, names the shape that fits, and writes nothing for a bad file. """
import hashlib
import json
import pickle
import re
import shlex

import pytest
import timm
import torch

import timm_dirac  # noqa: F401
from timm_dirac._timm_compat import pretrained_cfg_registry
from timm_dirac.cli import main as cli_main
from timm_dirac.loading import is_release

from authors_format import (
    authors_checkpoint, functional_forward, make_functional_params, params_epoch_optimizer_layout, params_stats_layout,
    rel_err, write_authors_folded_file)


def test_convert_names_both_shapes_and_writes_nothing(tmp_path):
    small = make_functional_params((2, 2, 2), (16, 32, 64), 'cifar', 10)  # DiracNet-10-1 for DiracNet-34-1
    path = tmp_path / 'small.pth'
    torch.save(params_stats_layout(small), path)
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match=r"\(2, 2, 2\).*not \(10, 10, 10\).*--model-kwargs 'layers=\(2,2,2\)' "
                                         r"'channels=\(16,32,64\)'\."):
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
        match = 'bad.pth is not a DiracNet checkpoint: found encoder.weight'
    elif kind == 'truncated':
        ckpt, _ = authors_checkpoint('cifar', 'folded')
        torch.save(ckpt, path)
        path.write_bytes(path.read_bytes()[:5000])
        match = 'truncated, corrupt'
    elif kind == 'not_a_dict':
        torch.save([torch.zeros(3)], path)
        match = 'bad.pth could not be read as a checkpoint'
    else:
        ckpt, _ = authors_checkpoint('cifar', 'folded')
        ckpt['features.extra.weight'] = torch.zeros(1)
        torch.save(ckpt, path)
        match = r"bad.pth does not fit diracnet34_1_cifar: Unexpected key\(s\) .*features\.extra\.weight"
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        cli_main(['--debug', 'convert', str(path), '--model', 'diracnet34_1_cifar', '--out', str(tmp_path / 'out')])
    assert 'this must never run' not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.pth'] and path.read_bytes() == before


def test_convert_cli_writes_loadable_folder(tmp_path):
    ckpt, reference = authors_checkpoint('cifar', 'params_epoch_optimizer', seed=3)
    path = tmp_path / 'diracnet34-1_checkpoint.pth'
    torch.save(ckpt, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = reference(x)
    for form in ('auto', 'folded'):
        out = tmp_path / f'hub_{form}'
        assert cli_main(['convert', str(path), '--model', 'diracnet34_1_cifar', '--out', str(out), '--form', form]) == 0
        model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
        assert model.inference_mode == (form == 'folded')
        with torch.no_grad():
            assert rel_err(model(x), ref) <= 1e-5
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
    release_cfg = pretrained_cfg_registry['diracnet18.v2_in1k']  # the registered cfg itself, not a copy
    url = f'https://s3.amazonaws.com/modelzoo-networks/diracnet18v2folded-{digest}.pth'
    monkeypatch.setattr(release_cfg, 'url', url)
    assert is_release(path, release_cfg.url) and not is_release(path, 'https://x/diracnet18v2folded-a2174e15.pth')
    assert cli_main(['convert', str(path), '--model', 'diracnet18', '--out', str(tmp_path / 'release')]) == 0
    card = (tmp_path / 'release' / 'README.md').read_text()
    assert all(fact in card for fact in ('69.63', f'diracnet18v2folded-{digest}.pth', 'v2_in1k', 'does not re-host'))
    assert json.loads((tmp_path / 'release' / 'config.json').read_text())['pretrained_cfg']['tag'] == 'v2_in1k'


def test_convert_takes_any_cifar_shape_and_cifar100(tmp_path):
    """ DiracNet-10-2 (no registered name) with the shape as --model-kwargs, as the shape error words them for the
    shell; a CIFAR-100
    file with its 100-class classifier (read from the file) and CIFAR-100's class names. """
    params = make_functional_params((2, 2, 2), (32, 64, 128), 'cifar', 100, seed=4)
    path = tmp_path / 'diracnet10_2_cifar100.pth'
    torch.save(params_epoch_optimizer_layout(params), path)
    with pytest.raises(ValueError) as refusal:
        cli_main(['--debug', 'convert', str(path), '--model', 'diracnet34_1_cifar', '--out', str(tmp_path / 'x')])
    suggested = re.search(r"(--model diracnet34_1_cifar --model-kwargs .*)\.$", str(refusal.value))[1]
    assert suggested == "--model diracnet34_1_cifar --model-kwargs 'layers=(2,2,2)' 'channels=(32,64,128)'"
    out = tmp_path / 'hub'
    assert cli_main(['convert', str(path), *shlex.split(suggested), '--out', str(out)]) == 0  # as a shell reads it
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x), functional_forward(params, x, 'cifar')) <= 1e-5
    labels = json.loads((out / 'config.json').read_text())['label_names']
    assert len(labels) == 100 and labels[:3] == ['apple', 'aquarium_fish', 'baby'] and labels[-1] == 'worm'
    assert len(set(labels)) == 100
