""" Pretrained weights that cannot be fetched fail at once, with an error that names their source and the offline
fix. """
import pytest
import timm

import timm_dirac  # noqa: F401
from timm_dirac.pretrained import hub_unreachable, pretrained_source_error


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
