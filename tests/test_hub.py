""" Hub folders (save, model card, push) and loading through timm's real code paths from local caches in the Hub's
and torch hub's layouts (no network). """
import json
import os

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import ModelCard

import timm_dirac  # noqa: F401
from timm_dirac.cli import main as cli_main
from timm_dirac.hub import count_params_macs, generate_model_card, push_hub_folder, save_hub_folder
from timm_dirac.validate import create_validation_model

from authors_format import add_to_hf_cache, folded_forward, write_authors_folded_file

NS = 'offline-test'


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """ An empty Hugging Face cache, read offline (the env vars are read at import, so patch the constants). """
    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache


def test_save_hub_folder_and_generated_card(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    model.reparameterize()
    info = dict(dataset='cifar10', metrics=dict(top1=91.25, top5=99.5), eval_split='test', epochs=200)
    out = save_hub_folder(model, tmp_path / 'hub', train_info=info)
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert [p.name for p in tmp_path.iterdir()] == ['hub']  # no temp folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'diracnet34_1_cifar' and config['model_args']['inference_mode'] is True

    card = ModelCard.load(out / 'README.md')
    assert card.data.library_name == 'timm' and card.data.pipeline_tag == 'image-classification'
    assert card.data.license == 'apache-2.0' and card.data.datasets == ['cifar10']
    assert {(r.metric_name, r.metric_value, r.dataset_split) for r in card.data.eval_results} == {
        ('top1 accuracy', 91.25, 'test'), ('top5 accuracy', 99.5, 'test')}
    stats = count_params_macs(model)
    assert stats['train'][0] > stats['folded'][0] > 0 and stats['folded'][1] > 0
    for text in ('import timm_dirac', 'features_only=True', 'reparameterize_model', 'inference_mode=True',
                 f'{stats["train"][0]:.4f} train form', '**epochs:** 200', 'zagoruyko2017diracnets'):
        assert text in card.text, text

    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.inference_mode
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_card_shows_the_int8_command_and_measured_int8_rows():
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    assert 'timm-dirac quantize --checkpoint <this folder>' in generate_model_card(model)
    assert '## int8 deployment' not in generate_model_card(model), 'no measured rows, no int8 table'
    int8 = dict(rows=[dict(flow='split', fp32_top1=90.0, int8_top1=89.87, speedup='2.8x at batch 32')],
                command='timm-dirac quantize --flow split', measured='CIFAR-10 test')
    card = generate_model_card(model, dict(int8=int8))
    assert '| split | 90.00 | 89.87 | 0.13 | 2.8x at batch 32 |' in card
    assert 'Measured with `timm-dirac quantize --flow split` (CIFAR-10 test).' in card
    assert '**int8:**' not in card, 'the int8 rows are not listed under Training'


def test_card_of_authors_weights_names_source_licence_and_accuracy():
    card = generate_model_card(timm.create_model('diracnet34', device='meta'))
    meta = ModelCard(card).data
    assert meta.license == 'unknown' and meta.datasets == ['imagenet-1k']
    assert [(r.metric_value, r.source_url) for r in meta.eval_results] == [(72.21, 'https://arxiv.org/abs/1706.00388')]
    assert 'https://s3.amazonaws.com/modelzoo-networks/diracnet34v2folded-dfb15d34.pth' in card
    assert 'does not re-host them' in card and 'Params (M): 21.64 train form, 21.62 folded' in card
    assert 'GMACs: 3.64' in card  # measured: a DiracNet-34 has the compute of a ResNet-34


def test_existing_folder_is_refused_then_replaced_with_overwrite(tmp_path):
    out = save_hub_folder(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)), tmp_path / 'hub')
    before = _snapshot(out)
    other = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1))
    with pytest.raises(FileExistsError, match='--overwrite'):
        save_hub_folder(other, out)
    assert _snapshot(out) == before
    with pytest.raises(FileExistsError):
        cli_main(['--debug', 'convert', str(out / 'model.safetensors'), '--model', 'diracnet34_1_cifar', '--out', str(out)])
    assert _snapshot(out) == before
    save_hub_folder(other, out, overwrite=True)
    assert _snapshot(out)['model.safetensors'] != before['model.safetensors']
    assert [p.name for p in tmp_path.iterdir()] == ['hub']


def test_hub_cache_loads_all_ways(tmp_path, offline_hub):
    """ create_model by registry name (hf_hub_id) and by hf-hub: name, features_only, num_classes, in_chans,
    folded: all from a local cache in the Hub's layout, offline. """
    torch.manual_seed(0)
    src = timm.create_model('diracnet18', layers=(1, 1, 1, 1)).eval()
    repo = f'{NS}/diracnet18.tiny_in1k'
    add_to_hf_cache(save_hub_folder(src, tmp_path / 'hub'), repo, offline_hub)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
        ref_feats = src.forward_intermediates(x, intermediates_only=True)
        by_name = timm.create_model('diracnet18', layers=(1, 1, 1, 1), pretrained=True,
                                    pretrained_cfg_overlay=dict(hf_hub_id=repo)).eval()
        assert torch.equal(by_name(x), ref)
        by_hub = timm.create_model(f'hf-hub:{repo}', pretrained=True).eval()
        assert torch.equal(by_hub(x), ref)
        folded = timm.create_model(f'hf-hub:{repo}', pretrained=True, inference_mode=True).eval()
        assert folded.inference_mode and (folded(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
        feats = timm.create_model(f'hf-hub:{repo}', pretrained=True, features_only=True).eval()(x)
        assert len(feats) == 5 and all(torch.equal(a, b) for a, b in zip(feats, ref_feats))
        head10 = timm.create_model(f'hf-hub:{repo}', pretrained=True, num_classes=10).eval()
        assert head10(x).shape == (2, 10)
        assert torch.equal(head10.forward_features(x), src.forward_features(x))
        gray = timm.create_model(f'hf-hub:{repo}', pretrained=True, in_chans=1).eval()
        assert torch.allclose(gray.stem.conv.weight, src.stem.conv.weight.sum(1, keepdim=True))


def test_torch_hub_cache_serves_the_authors_address(tmp_path, monkeypatch):
    """ The v2_in1k tags load the authors' file from its address, here from a pre-filled torch hub cache. """
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'torch_hub'))
    (tmp_path / 'torch_hub' / 'checkpoints').mkdir(parents=True)
    folded = write_authors_folded_file(tmp_path / 'torch_hub' / 'checkpoints' / 'diracnet18v2folded-a2174e15.pth',
                                       'diracnet18')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = folded_forward(folded, x)
        for inference_mode in (True, False):
            model = timm.create_model('diracnet18', pretrained=True, inference_mode=inference_mode).eval()
            assert model.pretrained_cfg['url'].startswith('https://s3.amazonaws.com/modelzoo-networks/')
            assert (model(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
        local = timm.create_model('diracnet18', pretrained=True, pretrained_cfg_overlay=dict(
            file=str(tmp_path / 'torch_hub' / 'checkpoints' / 'diracnet18v2folded-a2174e15.pth'))).eval()
        assert (local(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bad_hub_folders_get_clear_errors(tmp_path):
    out = save_hub_folder(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)), tmp_path / 'hub')
    with pytest.raises(ValueError, match=r"names architecture 'diracnet34_1_cifar', not 'diracnet18'"):
        create_validation_model('diracnet18', checkpoint=str(out))

    other = tmp_path / 'other'
    other.mkdir()
    for f in out.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / 'config.json').read_text())
    config['architecture'] = 'resnet18'
    (other / 'config.json').write_text(json.dumps(config))
    before = _snapshot(other)
    with pytest.raises(ValueError, match="names architecture 'resnet18', not a DiracNet"):
        create_validation_model('', checkpoint=str(other))
    assert _snapshot(other) == before

    weights = out / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    before = _snapshot(out)
    with pytest.raises(ValueError, match='truncated or corrupt'):
        create_validation_model('', checkpoint=str(out))
    with pytest.raises(ValueError, match='truncated or corrupt'):
        push_hub_folder(out, f'{NS}/x', dry_run=True)
    assert _snapshot(out) == before


def test_push_dry_run_and_upload_calls(tmp_path, monkeypatch, capsys):
    out = save_hub_folder(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)), tmp_path / 'hub')
    (out / '.notes').write_text('hidden files are not uploaded')
    assert cli_main(['push', str(out), '--repo-id', f'{NS}/diracnet34_1_cifar.test', '--dry-run']) == 0
    printed = capsys.readouterr().out
    assert 'would upload' in printed and '.notes' not in printed
    assert [line.split()[0] for line in printed.splitlines()[1:]] == ['README.md', 'config.json', 'model.safetensors']

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', lambda self, repo_id, **kw: calls.append(
        ('create_repo', repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', lambda self, **kw: calls.append(('upload_folder', kw)))
    assert cli_main(['push', str(out), '--repo-id', f'{NS}/diracnet34_1_cifar.test', '--private']) == 0
    assert calls[0] == ('create_repo', f'{NS}/diracnet34_1_cifar.test',
                        dict(repo_type='model', private=True, exist_ok=True))
    assert calls[1][1]['allow_patterns'] == ['README.md', 'config.json', 'model.safetensors']
    assert calls[1][1]['folder_path'] == str(out)
    with pytest.raises(ValueError, match='<namespace>/<name>'):
        push_hub_folder(out, 'no-namespace', dry_run=True)
