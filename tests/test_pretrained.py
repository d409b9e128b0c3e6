""" Pretrained weights that cannot be downloaded: `timm.create_model` raises timm's (torch hub's, huggingface_hub's)
own error, and the commands turn it into one true line that says how to load a local copy. No network is used: the
torch hub download is made to fail as it does offline, and the Hugging Face cache is an empty one read offline
(whatever HF_HUB_OFFLINE the caller has set). """
import urllib.error
from pathlib import Path

import pytest
import timm
import torch

import timm_dirac  # noqa: F401
from timm_dirac.cli import main
from timm_dirac.loading import load_model

SAMPLE = Path(__file__).resolve().parents[1] / 'timm_dirac' / 'assets' / 'cifar10_sample'
AUTHORS_URL = 'https://s3.amazonaws.com/modelzoo-networks/diracnet18v2folded-a2174e15.pth'


@pytest.fixture
def no_network_torch_hub(tmp_path, monkeypatch):
    """ An empty torch hub cache whose downloads fail as they do without network. """
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, 'Name or service not known'))
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'torch_hub'))
    monkeypatch.setattr(torch.hub, 'urlopen', unreachable)
    return tmp_path / 'torch_hub' / 'checkpoints'


def _one_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_offline_the_model_raises_timms_own_download_error(no_network_torch_hub, offline_hub):
    with pytest.raises(urllib.error.URLError):
        timm.create_model('diracnet18', pretrained=True)
    from huggingface_hub.errors import LocalEntryNotFoundError
    with pytest.raises(LocalEntryNotFoundError):
        timm.create_model('diracnet16_4_cifar', pretrained=True, pretrained_cfg_overlay=dict(file=None))


def test_offline_validate_of_the_authors_weights_says_how_to_load_a_local_copy(no_network_torch_hub, capsys):
    err = _one_line(capsys, ['validate', '--model', 'diracnet18', '--pretrained', '--dataset', str(SAMPLE),
                             '--no-progress'])
    assert 'could not download the weights of diracnet18' in err and AUTHORS_URL in err
    assert '--checkpoint /path/to/diracnet18v2folded-a2174e15.pth' in err and str(no_network_torch_hub) in err
    assert 'do not fit' not in err and 'another model' not in err


def test_offline_hub_weights_say_how_to_load_a_local_copy(offline_hub, capsys):
    err = _one_line(capsys, ['validate', '--model', 'hf-hub:someone/diracnet34_1_cifar.x', '--dataset', str(SAMPLE),
                             '--no-progress'])
    assert 'could not download the weights of hf-hub:someone/diracnet34_1_cifar.x' in err
    assert 'hf download someone/diracnet34_1_cifar.x' in err and 'HF_HUB_OFFLINE=1' in err
    with pytest.raises(OSError, match='Hugging Face Hub repository timm-dirac/diracnet16_4_cifar.td_cifar10'):
        load_model('diracnet16_4_cifar', pretrained=True, pretrained_cfg_overlay=dict(file=None))


def test_offline_convert_of_a_url_names_the_download_to_do_by_hand(no_network_torch_hub, tmp_path, capsys):
    err = _one_line(capsys, ['convert', AUTHORS_URL, '--model', 'diracnet18', '--out', str(tmp_path / 'hub')])
    assert f'could not download {AUTHORS_URL}' in err and 'pass its path instead of the URL' in err
    assert not (tmp_path / 'hub').exists()


def test_offline_push_is_one_line(tmp_path, offline_hub, capsys):
    from timm_dirac.hub.folder import save_hub_folder

    out = save_hub_folder(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)), tmp_path / 'hub',
                          train_info=dict(license='apache-2.0'))
    err = _one_line(capsys, ['push', str(out), '--repo-id', 'someone/diracnet34_1_cifar.x'])
    assert 'nothing was uploaded to https://huggingface.co/someone/diracnet34_1_cifar.x' in err
    assert 'HF_HUB_OFFLINE' in err and 'hf auth login' in err
