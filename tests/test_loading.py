""" timm_dirac.loading: one model loader (registry names, `local-dir:` names, Hub-layout folders, weights files) for
validate and the deploy commands, and images read as training reads them. """
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import resolve_model_data_config

import timm_dirac  # noqa: F401  registers the models
import timm_dirac.validate as validate_module
from timm_dirac.cli import main as cli_main
from timm_dirac.data import eval_transform, load_split
from timm_dirac.loading import load_images, load_model

from authors_format import add_to_hf_cache

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = f'hfds/{ROOT / "timm_dirac" / "assets" / "cifar10_sample"}'
WEIGHTS = ROOT / 'timm_dirac' / 'assets' / 'weights' / 'diracnet16_4_cifar.td_cifar10'
SMALL = dict(layers=(1, 1, 1))


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture
def source():
    """ A small trained-form DiracNet with non-default weights and a batch to compare outputs on. """
    torch.manual_seed(0)
    model = timm.create_model('diracnet34_1_cifar', **SMALL).eval()
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        bn.running_mean.normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return model, x, model(x)


@pytest.fixture
def save_for_hf_folder(tmp_path, source):
    """ A folder written by timm's own `save_for_hf`: config.json + model.safetensors, no model card. """
    folder = tmp_path / 'save_for_hf'
    timm.models.save_for_hf(source[0], str(folder), model_args=SMALL, safe_serialization=True)
    assert not (folder / 'README.md').exists()
    return folder


def _output(model, x):
    assert not model.training  # every way of loading gives an eval-mode model
    with torch.no_grad():
        return model(x)


def test_hub_layout_folder_without_a_card_loads_by_every_name(save_for_hf_folder, source):
    _, x, expected = source
    for model in (load_model(None, str(save_for_hf_folder)),
                  load_model('diracnet34_1_cifar', str(save_for_hf_folder)),
                  load_model(f'local-dir:{save_for_hf_folder}')):
        assert torch.equal(_output(model, x), expected)


def test_weights_file_with_model_name(tmp_path, source):
    model, x, expected = source
    path = tmp_path / 'weights.safetensors'
    save_file(model.state_dict(), str(path))
    assert torch.equal(_output(load_model('diracnet34_1_cifar', str(path), **SMALL), x), expected)
    with pytest.raises(ValueError, match='also give --model NAME'):
        load_model(None, str(path))


def test_hf_hub_name(tmp_path, offline_hub, save_for_hf_folder, source):
    add_to_hf_cache(save_for_hf_folder, 'offline-test/small', offline_hub)
    _, x, expected = source
    assert torch.equal(_output(load_model('hf-hub:offline-test/small'), x), expected)


def test_registry_names_pretrained_tag_and_create_model_kwargs(save_for_hf_folder):
    random_init = load_model('diracnet34_1_cifar', **SMALL)
    assert not random_init.training and random_init.num_classes == 10
    assert load_model('diracnet34_1_cifar', num_classes=5, **SMALL).num_classes == 5
    assert load_model(None, str(save_for_hf_folder), num_classes=5).num_classes == 5  # head re-initialised
    tag = load_model('diracnet16_4_cifar.td_cifar10', pretrained=True)
    shipped = load_file(str(WEIGHTS / 'model.safetensors'))  # read by safetensors alone, not through timm
    assert not tag.training and tag.state_dict().keys() == shipped.keys()
    assert all(torch.equal(value, shipped[key]) for key, value in tag.state_dict().items())


def test_a_weights_file_with_another_classifier_size(tmp_path):
    """ --num-classes gives the file's classifier size, and its classifier loads; without it, one line says to. """
    torch.manual_seed(0)
    model = timm.create_model('diracnet34_1_cifar', num_classes=100, **SMALL).eval()
    path = tmp_path / 'cifar100.safetensors'
    save_file(model.state_dict(), str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_output(load_model('diracnet34_1_cifar', str(path), num_classes=100, **SMALL), x), model(x))
    with pytest.raises(ValueError, match=r'do not fit .*size mismatch for head.fc.weight.*--num-classes'):
        load_model('diracnet34_1_cifar', str(path), **SMALL)


def test_another_architecture_is_named(tmp_path, save_for_hf_folder, source):
    with pytest.raises(ValueError, match="names architecture 'diracnet34_1_cifar', not 'diracnet18'"):
        load_model('diracnet18', str(save_for_hf_folder))
    config = json.loads((save_for_hf_folder / 'config.json').read_text())
    config['architecture'] = 'resnet18'
    (save_for_hf_folder / 'config.json').write_text(json.dumps(config))
    before = _snapshot(save_for_hf_folder)
    with pytest.raises(ValueError, match="do not fit architecture 'resnet18'"):
        load_model(None, str(save_for_hf_folder))
    assert _snapshot(save_for_hf_folder) == before

    path = tmp_path / 'weights.safetensors'
    save_file(source[0].state_dict(), str(path))
    with pytest.raises(ValueError, match="do not fit architecture 'resnet18'"):
        load_model('resnet18', str(path))


def test_bad_checkpoints_are_refused_untouched(tmp_path, save_for_hf_folder):
    weights = save_for_hf_folder / 'model.safetensors'
    good = weights.read_bytes()
    weights.write_bytes(good[:len(good) // 2])
    before = _snapshot(save_for_hf_folder)
    with pytest.raises(ValueError, match='truncated or corrupt'):
        load_model(None, str(save_for_hf_folder))
    assert _snapshot(save_for_hf_folder) == before

    weights.unlink()
    with pytest.raises(FileNotFoundError, match='no weights file'):
        load_model(None, str(save_for_hf_folder))
    (save_for_hf_folder / 'config.json').write_text('{"architecture": ')
    with pytest.raises(ValueError, match='not valid JSON'):
        load_model(None, str(save_for_hf_folder))
    (save_for_hf_folder / 'config.json').unlink()
    with pytest.raises(FileNotFoundError, match='has no config.json'):
        load_model(None, str(save_for_hf_folder))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_model('diracnet34_1_cifar', str(tmp_path / 'missing.pth'))


def test_non_finite_weights_are_refused(tmp_path, source):
    state_dict = source[0].state_dict()
    state_dict['stem.conv.weight'][0, 0, 0, 0] = float('nan')
    folder = tmp_path / 'nan'
    timm.models.save_for_hf(source[0], str(folder), model_args=SMALL, safe_serialization=True)
    save_file(state_dict, str(folder / 'model.safetensors'))
    with pytest.raises(ValueError, match='NaN or infinite values'):
        load_model(None, str(folder))


def test_one_source_of_weights(save_for_hf_folder, source):
    with pytest.raises(ValueError, match='not both'):
        load_model('diracnet34_1_cifar', str(save_for_hf_folder), pretrained=True)
    with pytest.raises(ValueError, match='names its weights itself'):
        load_model(f'local-dir:{save_for_hf_folder}', str(save_for_hf_folder))
    # timm's habit of pretrained=True with a local-dir:/hf-hub: name names the same weights
    _, x, expected = source
    assert torch.equal(_output(load_model(f'local-dir:{save_for_hf_folder}', pretrained=True), x), expected)
    with pytest.raises(ValueError, match='Give --model NAME, --checkpoint DIR'):
        load_model(None)


def test_validate_and_load_images_read_the_samples_training_reads(monkeypatch):
    """ One reader: the sample's test split reaches validate and load_images as `load_split` gives it to training,
    the same samples in the same order. """
    model = timm.create_model('diracnet34_1_cifar').eval()
    transform = eval_transform(resolve_model_data_config(model))
    train_read, _ = load_split(SAMPLE, None, 'test', transform=transform)
    expected = [train_read[i] for i in range(len(train_read))]
    expected_images = torch.stack([image for image, _ in expected])
    expected_labels = torch.tensor([label for _, label in expected])

    images, labels = load_images(SAMPLE, model, num=None, split='test')
    assert len(labels) == 1000 and torch.equal(labels, expected_labels) and torch.equal(images, expected_images)

    seen = {}

    def record(model, dataset, *args, **kwargs):
        seen['dataset'] = dataset
        return dict(samples=len(dataset))
    monkeypatch.setattr(validate_module, 'validate', record)
    assert cli_main(['validate', '--model', 'diracnet34_1_cifar', '--dataset', SAMPLE, '--no-progress']) == 0
    validated = [seen['dataset'][i] for i in range(len(seen['dataset']))]
    assert torch.equal(torch.tensor([label for _, label in validated]), expected_labels)
    assert torch.equal(torch.stack([image for image, _ in validated]), expected_images)
