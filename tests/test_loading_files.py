""" timm_dirac.loading's weight files (loading models from them: test_loading.py): read safely (never unpickling
code), out of any training container, with errors that name the file; a release file is told by the hash prefix in
its published name. """
import hashlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from timm_dirac.loading import file_sha256, is_release, load_checkpoint_file


def test_training_containers_give_the_ema_weights_with_clean_keys(tmp_path):
    weights, ema = {'stem.conv.weight': torch.zeros(2)}, {'stem.conv.weight': torch.ones(2)}
    path = tmp_path / 'checkpoint.pth'
    torch.save({'state_dict': {'module.' + k: v for k, v in weights.items()},
                'state_dict_ema': {'_orig_mod.module.' + k: v for k, v in ema.items()}, 'epoch': 3}, path)
    loaded = load_checkpoint_file(path)
    assert list(loaded) == ['stem.conv.weight'] and torch.equal(loaded['stem.conv.weight'], ema['stem.conv.weight'])

    torch.save({'model': {'module.stem.conv.weight': torch.zeros(2)}}, path)
    assert list(load_checkpoint_file(path)) == ['stem.conv.weight']
    save_file(weights, tmp_path / 'model.safetensors')
    assert list(load_checkpoint_file(tmp_path / 'model.safetensors')) == ['stem.conv.weight']


class Payload:
    def __reduce__(self):
        return (print, ('this must never run',))


def test_unreadable_files_name_the_file_and_never_run_code(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match='missing.pth does not exist'):
        load_checkpoint_file(tmp_path / 'missing.pth')
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(ValueError, match=r'empty.pth is empty \(0 bytes\)'):
        load_checkpoint_file(tmp_path / 'empty.pth')
    (tmp_path / 'code.pth').write_bytes(pickle.dumps({'conv': Payload()}))
    with pytest.raises(ValueError, match=r'code.pth could not be read .*weights_only=True'):
        load_checkpoint_file(tmp_path / 'code.pth')
    assert 'this must never run' not in capsys.readouterr().out
    (tmp_path / 'cut.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    with pytest.raises(ValueError, match='cut.safetensors is not a readable safetensors file'):
        load_checkpoint_file(tmp_path / 'cut.safetensors')


def test_a_release_is_the_file_whose_bytes_match_its_published_name(tmp_path):
    path = tmp_path / 'weights.pth'
    path.write_bytes(b'released bytes')
    digest = hashlib.sha256(b'released bytes').hexdigest()
    assert file_sha256(path) == digest
    assert is_release(path, f'https://example.org/diracnet18v2folded-{digest[:8]}.pth')
    assert not is_release(path, 'https://example.org/diracnet18v2folded-a2174e15.pth')
    assert not is_release(path, 'https://example.org/diracnet18v2folded.pth') and not is_release(path, None)
