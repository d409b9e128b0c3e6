""" The Hub room (timm_dirac/hub: card.py, folder.py, push.py) and loading through timm's real code paths from local
caches in the Hub's and torch hub's layouts (no network). """
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image

from timm.utils import reparameterize_model

import timm_dirac  # noqa: F401
from timm_dirac.cli import main as cli_main
from timm_dirac.hub.card import REPO_ID_PLACEHOLDER, generate_model_card
from timm_dirac.hub.folder import save_hub_folder
from timm_dirac.hub.push import push_hub_folder

from authors_format import add_to_hf_cache, folded_forward, make_hub_cache, write_authors_folded_file

ROOT = Path(__file__).resolve().parents[1]

NS = 'offline-test'


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture
def fake_hub(monkeypatch):
    """ A Hub in memory behind `huggingface_hub.HfApi`: {repo id: {'private': bool, 'files': {path: bytes}}}, as
    the repositories end up, whichever of the client's upload calls `push` uses. """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.utils import filter_repo_objects

    repos = {}

    class FakeHfApi:
        def __init__(self, token=None, **kwargs):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
            assert exist_ok or repo_id not in repos, f'409: {repo_id} exists'
            repos.setdefault(repo_id, dict(private=bool(private), files={}))

        def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
            files = repos[repo_id]['files']  # KeyError: no such repository
            for op in operations:
                if isinstance(op, CommitOperationAdd):
                    with op.as_file() as f:
                        files[op.path_in_repo] = f.read()
                elif isinstance(op, CommitOperationDelete):
                    files.pop(op.path_in_repo)

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
            self.create_commit(repo_id, [CommitOperationAdd(path_in_repo, path_or_fileobj)])

        def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
            folder = Path(folder_path)
            paths = [p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file()]
            self.create_commit(repo_id, [CommitOperationAdd(p, str(folder / p)) for p in filter_repo_objects(
                paths, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)])

    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHfApi)
    return repos


CIFAR10 = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def test_save_hub_folder_and_generated_card(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    model.reparameterize()
    info = dict(dataset='cifar10', metrics=dict(top1=91.25, top5=99.5), eval_split='test', epochs=200,
                license='apache-2.0')
    out = save_hub_folder(model, tmp_path / 'hub', train_info=info, label_names=CIFAR10)
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert [p.name for p in tmp_path.iterdir()] == ['hub']  # no temp folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'diracnet34_1_cifar' and config['model_args']['inference_mode'] is True
    assert config['label_names'] == list(CIFAR10)

    card = ModelCard.load(out / 'README.md')
    assert card.data.library_name == 'timm' and card.data.pipeline_tag == 'image-classification'
    assert card.data.license == 'apache-2.0' and card.data.datasets == ['uoft-cs/cifar10']
    assert '  - epochs: 200' in card.text and 'zagoruyko2017diracnets' in card.text

    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.inference_mode and loaded.pretrained_cfg['label_names'] == list(CIFAR10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # the card's parameter counts are those of the two models the folder builds, to the digits it shows
    train_form = timm.create_model(f'local-dir:{out}', pretrained=True, inference_mode=False)
    shown = re.search(r'Params \(M\): ([\d.]+) train form, ([\d.]+) folded', card.text).groups()
    for text, net, form in zip(shown, (train_form, loaded), ('train form', 'folded')):
        unit = 10. ** -len(text.split('.')[1])
        assert abs(float(text) - sum(p.numel() for p in net.parameters()) / 1e6) <= unit / 2 + 1e-12, form


def test_card_metadata_reads_back_with_huggingface_hub(tmp_path):
    """ model-index: one result per metric (top-5 its own type), the split as the dataset names it, a readable
    dataset name beside the Hub id. """
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1))
    info = dict(dataset='cifar10', metrics=dict(top1=90.0, top5=99.6, loss=0.36), eval_split='test',
                license='apache-2.0')
    card = ModelCard.load(save_hub_folder(model, tmp_path / 'hub', train_info=info, label_names=CIFAR10) / 'README.md')
    assert {(r.metric_type, r.metric_name, r.metric_value) for r in card.data.eval_results} == {
        ('accuracy', 'Top-1 Accuracy', 90.0), ('top-5-accuracy', 'Top-5 Accuracy', 99.6)}
    assert {(r.dataset_type, r.dataset_name, r.dataset_split, r.task_type) for r in card.data.eval_results} == {
        ('uoft-cs/cifar10', 'CIFAR-10', 'test', 'image-classification')}
    assert '**Dataset:** CIFAR-10' in card.text


# The card's Python examples, then what they computed: run in a fresh interpreter, with the card's example image served
# from a local file (the only network use of the examples)
USAGE_PRELUDE = """
import urllib.request
urllib.request.urlopen = lambda url, *args, **kwargs: open({image!r}, 'rb')
"""
USAGE_RESULTS = """
import json
x = transforms(img).unsqueeze(0)
ref = timm.create_model('local-dir:{folder}', pretrained=True).eval()
with torch.no_grad():
    print(json.dumps(dict(
        labels=labels, top5=top5_class_indices.tolist(), embedding=list(output.shape), folded=folded.inference_mode,
        these_weights=bool(torch.allclose(folded(x), ref(x), rtol=1e-4, atol=1e-5)))))
"""


@pytest.mark.slow  # a fresh interpreter imports torch and timm
def test_card_usage_runs_on_a_fresh_machine(tmp_path, fake_hub):
    """ The card as `push` uploads it, its install line and Python examples run as written in a fresh interpreter
    against the repository (an offline Hugging Face cache holding what was uploaded): they register the models,
    load these weights (a registry name would load the tag's shipped ones), extract features and fold. """
    torch.manual_seed(0)
    model = timm.create_model('diracnet16_4_cifar', layers=(1, 1, 1)).eval()  # its default tag is td_cifar10
    folder = save_hub_folder(model, tmp_path / 'hub', train_info=dict(license='apache-2.0'), label_names=CIFAR10)
    repo_id = f'{NS}/diracnet16_4_cifar.mine'
    push_hub_folder(folder, repo_id)
    uploaded = tmp_path / 'uploaded'
    uploaded.mkdir()
    for name, data in fake_hub[repo_id]['files'].items():
        (uploaded / name).write_bytes(data)
    add_to_hf_cache(uploaded, repo_id, tmp_path / 'hf_cache')
    card = (uploaded / 'README.md').read_text()

    installs = re.findall(r'^git clone .* && pip install -e \./(\S+)$', card, re.M)  # from a clone, until an index serves it
    assert installs == [tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['name']]
    image = tmp_path / 'image.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    code = '\n'.join([USAGE_PRELUDE.format(image=str(image)), *re.findall(r'```python\n(.*?)```', card, re.S),
                      USAGE_RESULTS.format(folder=folder)])
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'hf_cache'), OMP_NUM_THREADS='1')
    run = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len([line for line in lines if line.startswith('torch.Size([1, ')]) == 4  # stem and three stages
    results = json.loads(lines[-1])
    assert results == dict(labels=list(CIFAR10), top5=results['top5'], embedding=[1, model.num_features],
                           folded=True, these_weights=True)
    assert len(results['top5'][0]) == 5


def test_card_takes_any_text_in_training_facts(tmp_path):
    """ The card body is plain text, not a template: braces in a training argument are written as they are. """
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1))
    info = dict(command='train.py --model-kwargs "{{layers: [4, 4, 4]}}" {% raw %}', license='apache-2.0')
    card = (save_hub_folder(model, tmp_path / 'hub', train_info=info) / 'README.md').read_text()
    assert '{{layers: [4, 4, 4]}}' in card and '{% raw %}' in card


def test_folded_by_timm_helper_is_saved_as_folded(tmp_path):
    """ timm's reparameterize_model never calls DiracNet.reparameterize: whether a model is folded is read from
    its structure, by the model and the hub writer alike. """
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    folded = reparameterize_model(model)
    assert folded.inference_mode and not model.inference_mode
    out = save_hub_folder(folded, tmp_path / 'hub', label_names=CIFAR10)
    assert json.loads((out / 'config.json').read_text())['model_args']['inference_mode'] is True
    assert 'stored in the folded (inference_mode=True) form' in (out / 'README.md').read_text()
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))


def test_card_shows_the_int8_command_and_measured_int8_rows():
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    assert 'timm-dirac quantize --checkpoint <this folder>' in generate_model_card(model)
    assert '## int8 deployment' not in generate_model_card(model), 'no measured rows, no int8 table'
    int8 = dict(rows=[dict(flow='split', fp32_top1=90.0, int8_top1=89.87, speedup='2.8x at batch 32')],
                command='timm-dirac quantize --flow split', measured='CIFAR-10 test')
    card = generate_model_card(model, dict(int8=int8))
    assert '| split | 90.00 | 89.87 | 0.13 | 2.8x at batch 32 |' in card
    assert 'Measured with `timm-dirac quantize --flow split` (CIFAR-10 test).' in card
    assert 'int8:' not in card, 'the int8 rows are not listed under Training'


def test_card_names_the_file_of_quantize_default_flow_and_calls_no_other_flow_the_default():
    """ The card's int8 section and table follow `timm-dirac quantize`'s own default, which writes
    <out>/model_int8_<flow>.onnx. """
    import argparse

    from timm_dirac.deploy import quantize
    from timm_dirac.deploy.backends import Setup
    from timm_dirac.hub.card import DEFAULT_INT8_FLOW

    parser = argparse.ArgumentParser()
    quantize.add_arguments(parser)
    assert parser.parse_args(['--out', 'int8']).flow == [DEFAULT_INT8_FLOW]
    written = f'{Setup((3, 32, 32), "out").tag}_int8_{DEFAULT_INT8_FLOW}.onnx'
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    rows = [dict(flow=flow, fp32_top1=90.0, int8_top1=89.9, speedup='1x') for flow in ('split', DEFAULT_INT8_FLOW)]
    card = generate_model_card(model, dict(int8=dict(rows=rows, command='quantize', measured='here')))
    assert f'int8/{written}' in card and 'model_int8_split' not in card
    assert [line for line in card.splitlines() if 'default' in line.lower() and '|' in line] == [
        f'| {DEFAULT_INT8_FLOW} (default) | 90.00 | 89.90 | 0.10 | 1x |']
    assert [s for s in re.findall(r'`(\w+)` flow', card)] == [DEFAULT_INT8_FLOW]


def test_card_install_line_is_one_that_works_today():
    """ No index serves timm-dirac yet: the card installs it from a clone, as the README does. """
    card = generate_model_card(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)))
    usage = card[card.index('## Model Usage'):]
    install = usage[usage.index('```bash'):usage.index('```', usage.index('```bash') + 3)]
    assert 'pip install -e' in install and not re.search(r'pip install timm-dirac\b', install)


def test_run_card_on_a_local_folder_names_the_data_and_puts_its_scores_in_the_metadata(tmp_path):
    """ A run on local data (the main job reads the sample shipped in the package) names that data, not an absolute
    path of the machine, and its scores go into model-index; only Hub datasets are listed under `datasets`. """
    from timm_dirac.assets import asset_path

    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1))
    info = dict(dataset=None, data=f'hfds/{asset_path("cifar10_sample")}', metrics=dict(top1=71.6, top5=98.1),
                eval_split='test', license='apache-2.0')
    card = ModelCard.load(save_hub_folder(model, tmp_path / 'hub', train_info=info, label_names=CIFAR10) / 'README.md')
    assert {(r.metric_type, r.metric_value, r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {
        ('accuracy', 71.6, 'timm_dirac/assets/cifar10_sample', 'test'),
        ('top-5-accuracy', 98.1, 'timm_dirac/assets/cifar10_sample', 'test')}
    assert card.data.datasets is None and str(ROOT) not in card.text and 'not stated' not in card.text
    assert '**Dataset:** CIFAR-10 sample' in card.text and 'timm_dirac/assets/cifar10_sample' in card.text

    elsewhere = tmp_path / 'my_images'
    (elsewhere / 'train').mkdir(parents=True)
    info.update(data=str(elsewhere))
    card = ModelCard.load(save_hub_folder(model, tmp_path / 'hub2', train_info=info) / 'README.md')
    assert {r.dataset_type for r in card.data.eval_results} == {'my_images'} and str(tmp_path) not in card.text


RELEASE_FACTS = ('69.63', '89.12', 'modelzoo-networks', 'v2_in1k', 'does not re-host', 'OpenCV')


def test_card_of_authors_release_names_source_licence_accuracy_and_preprocessing():
    card = generate_model_card(timm.create_model('diracnet34', device='meta'), release=True)
    meta = ModelCard(card).data
    assert meta.license == 'unknown' and meta.datasets == ['ILSVRC/imagenet-1k']
    assert [(r.metric_value, r.source_url) for r in meta.eval_results] == [(72.21, 'https://arxiv.org/abs/1706.00388')]
    assert 'https://s3.amazonaws.com/modelzoo-networks/diracnet34v2folded-dfb15d34.pth' in card
    assert 'does not re-host these weights' in card and 'Params (M): 21.64 train form, 21.62 folded' in card
    assert 'GMACs: 3.64' in card  # measured: a DiracNet-34 has the compute of a ResNet-34
    assert 'bicubic interpolation' in card and 'cv2.INTER_CUBIC' in card


def test_weights_not_of_the_tag_never_carry_its_credit(tmp_path):
    """ create_model gives every model its default tag's cfg: without release=True nothing of the tag (name,
    address, licence, accuracy, notes) reaches the folder. """
    model = timm.create_model('diracnet18', layers=(1, 1, 1, 1)).eval()  # random weights, cfg of v2_in1k
    out = save_hub_folder(model, tmp_path / 'hub', train_info=dict(license='apache-2.0'))
    text = (out / 'README.md').read_text()
    assert [fact for fact in RELEASE_FACTS if fact in text] == []
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert not {'tag', 'notes', 'origin_url', 'license'} & set(cfg)
    assert ModelCard.load(out / 'README.md').data.eval_results is None

    trained = timm.create_model('diracnet16_4_cifar', layers=(1, 1, 1)).eval()  # cfg of td_cifar10 (90.00%)
    info = dict(dataset='cifar10', metrics=dict(top1=71.0), eval_split='test', license='apache-2.0', epochs=5)
    text = (save_hub_folder(trained, tmp_path / 'run', train_info=info, label_names=CIFAR10) / 'README.md').read_text()
    assert '90.00' not in text and '112 min' not in text and 'td_cifar10' not in text and '| top1 | 71.0 |' in text


def test_existing_folder_is_refused_then_replaced_with_overwrite(tmp_path):
    out = save_hub_folder(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)), tmp_path / 'hub')
    before = _snapshot(out)
    other = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1))
    with pytest.raises(FileExistsError, match='--overwrite'):
        save_hub_folder(other, out)
    assert _snapshot(out) == before
    with pytest.raises(FileExistsError):
        cli_main(['--debug', 'convert', str(out / 'model.safetensors'), '--model', 'diracnet34_1_cifar',
                  '--out', str(out)])
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


def test_ci_caches_serve_every_pretrained_tag(tmp_path, offline_hub, monkeypatch):
    """ .ci/make_hub_cache.py fills the caches that CI's check inside timm's source tree reads offline: then every
    diracnet* pretrained tag loads through timm's own loaders as timm's tests load it, none from the package's
    shipped copy or the network. """
    def unreachable(*args, **kwargs):
        raise AssertionError(f'a download was tried: {args}')
    assert make_hub_cache().main(['--torch-home', str(tmp_path / 'torch'), '--hf-cache', str(offline_hub)]) == 0
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'torch' / 'hub'))
    monkeypatch.setattr(torch.hub, 'urlopen', unreachable)
    tags = timm.list_models('diracnet*', pretrained=True)
    assert {'diracnet18.v2_in1k', 'diracnet34.v2_in1k', 'diracnet16_4_cifar.td_cifar10'} <= set(tags)
    for name in tags:
        model = timm.create_model(name, pretrained=True, in_chans=1, num_classes=5,
                                  pretrained_cfg_overlay=dict(file=None))
        assert model.stem.conv.in_channels == 1 and model.num_classes == 5, name


def test_push_refuses_bad_hub_folders_and_leaves_them_as_they_are(tmp_path):
    """ Loading the same folders is `timm_dirac.loading`'s (tests/test_loading.py). """
    out = save_hub_folder(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)), tmp_path / 'hub')
    other = tmp_path / 'other'
    other.mkdir()
    for f in out.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / 'config.json').read_text())
    config['architecture'] = 'resnet18'
    (other / 'config.json').write_text(json.dumps(config))
    before = _snapshot(other)
    with pytest.raises(ValueError, match="names architecture 'resnet18', not a DiracNet"):
        push_hub_folder(other, f'{NS}/x', dry_run=True)
    assert _snapshot(other) == before

    weights = out / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    before = _snapshot(out)
    with pytest.raises(ValueError, match='truncated or corrupt'):
        push_hub_folder(out, f'{NS}/x', dry_run=True)
    assert _snapshot(out) == before


def test_push_dry_run_and_what_reaches_the_hub(tmp_path, fake_hub, capsys):
    """ The folder's weights and config as they are, its card naming the repository, hidden files left out; the
    local folder unchanged. """
    out = save_hub_folder(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)), tmp_path / 'hub',
                          train_info=dict(license='apache-2.0'))
    (out / '.notes').write_text('hidden files are not uploaded')
    repo_id = f'{NS}/diracnet34_1_cifar.test'
    assert cli_main(['push', str(out), '--repo-id', repo_id, '--dry-run']) == 0
    printed = capsys.readouterr().out
    assert 'would upload' in printed and '.notes' not in printed
    assert [line.split()[0] for line in printed.splitlines()[1:]] == ['README.md', 'config.json', 'model.safetensors']
    assert fake_hub == {}, 'a dry run contacts no Hub'

    before = _snapshot(out)
    assert cli_main(['push', str(out), '--repo-id', repo_id, '--private']) == 0
    card = before['README.md'].decode().replace(REPO_ID_PLACEHOLDER, repo_id)
    assert fake_hub == {repo_id: dict(private=True, files={
        'README.md': card.encode(), 'config.json': before['config.json'],
        'model.safetensors': before['model.safetensors']})}
    assert f"timm.create_model('hf-hub:{repo_id}', pretrained=True)" in card
    assert _snapshot(out) == before, 'the local folder is left as it is'
    with pytest.raises(ValueError, match='<namespace>/<name>'):
        push_hub_folder(out, 'no-namespace', dry_run=True)


def test_push_refuses_unknown_licence_unless_told(tmp_path, fake_hub):
    out = save_hub_folder(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)), tmp_path / 'hub')
    assert ModelCard.load(out / 'README.md').data.license == 'unknown'
    with pytest.raises(ValueError, match='licence of these weights as unknown.*--allow-unknown-license'):
        cli_main(['--debug', 'push', str(out), '--repo-id', f'{NS}/x'])
    assert fake_hub == {}
    assert cli_main(['push', str(out), '--repo-id', f'{NS}/x', '--allow-unknown-license']) == 0
    assert sorted(fake_hub[f'{NS}/x']['files']) == ['README.md', 'config.json', 'model.safetensors']
