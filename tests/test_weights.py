""" The project's own weights, shipped in timm_dirac/assets/weights: both forms load and classify real images. """
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import timm_dirac  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / 'timm_dirac' / 'assets' / 'weights' / 'diracnet16_4_cifar.td_cifar10'
SAMPLE = ROOT / 'timm_dirac' / 'assets' / 'cifar10_sample'


def sample_test_images():
    datasets = pytest.importorskip('datasets')
    ds = datasets.load_dataset(str(SAMPLE), split='test')
    images = torch.from_numpy(np.stack([np.asarray(img.convert('RGB')) for img in ds['image']]))
    return images.permute(0, 3, 1, 2).float() / 255, torch.tensor(ds['label'])


@pytest.mark.slow  # 1,000 images through both forms: ~20-50 s on 2 cores
def test_td_cifar10_weights_classify_the_sample_test_images_in_both_forms():
    train_form = timm.create_model(f'local-dir:{WEIGHTS}', pretrained=True).eval()
    folded = timm.create_model(f'local-dir:{WEIGHTS}', pretrained=True, inference_mode=True).eval()
    cfg = train_form.pretrained_cfg
    images, labels = sample_test_images()
    x = (images - torch.tensor(cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(cfg['std']).view(1, 3, 1, 1)
    with torch.no_grad():
        logits, folded_logits = train_form(x), folded(x)
    top1 = (logits.argmax(1) == labels).float().mean().item() * 100
    assert top1 >= 85, f'{top1:.2f}% on the 1,000 sample test images (90.00% measured on the full test split)'
    assert torch.equal(logits.argmax(1), folded_logits.argmax(1))
    torch.testing.assert_close(folded_logits, logits, rtol=1e-4, atol=1e-4)


def test_td_cifar10_loads_by_name_from_the_shipped_copy(monkeypatch):
    """ The registered tag loads the copy shipped in the package without the network. """
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError('the Hub was asked for weights the package ships')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
    by_name = timm.create_model('diracnet16_4_cifar', pretrained=True).eval()
    from_folder = timm.create_model(f'local-dir:{WEIGHTS}', pretrained=True).eval()
    assert by_name.pretrained_cfg['file'] == str(WEIGHTS / 'model.safetensors')
    for key, value in from_folder.state_dict().items():
        assert torch.equal(by_name.state_dict()[key], value), key


def test_td_cifar10_tag_loads_from_its_hub_repository_without_the_shipped_copy(offline_hub):
    """ Where the package's copy is not used (pretrained_cfg_overlay file=None), the tag reads the Hub repository
    the folder is pushed to, `timm-dirac/diracnet16_4_cifar.td_cifar10` (here a local cache in the Hub's layout). """
    from authors_format import add_to_hf_cache

    add_to_hf_cache(WEIGHTS, 'timm-dirac/diracnet16_4_cifar.td_cifar10', offline_hub)
    from_hub = timm.create_model('diracnet16_4_cifar.td_cifar10', pretrained=True,
                                 pretrained_cfg_overlay=dict(file=None)).eval()
    shipped = timm.create_model('diracnet16_4_cifar.td_cifar10', pretrained=True).eval()
    assert 'file' not in from_hub.pretrained_cfg or not from_hub.pretrained_cfg['file']
    for key, value in shipped.state_dict().items():
        assert torch.equal(from_hub.state_dict()[key], value), key


def test_td_cifar10_folder_config_says_what_the_registry_says():
    """ timm reads the pushed config.json on download, the registry without it: both must describe the same weights. """
    in_folder = json.loads((WEIGHTS / 'config.json').read_text())['pretrained_cfg']
    registered = json.loads(json.dumps(timm.models.get_pretrained_cfg('diracnet16_4_cifar.td_cifar10').to_dict()))
    assert {key: (value, registered.get(key)) for key, value in in_folder.items() if registered.get(key) != value} == {}


def test_td_cifar10_folder_names_its_classes_and_its_card_reads_back():
    """ timm's inference.py and the Hub pipeline read label_names from config.json; huggingface_hub parses the
    card's metadata and its evaluation results. """
    from huggingface_hub import ModelCard

    model = timm.create_model(f'local-dir:{WEIGHTS}', pretrained=True)
    assert model.pretrained_cfg['label_names'] == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
                                                   'horse', 'ship', 'truck']
    card = ModelCard.load(WEIGHTS / 'README.md')
    assert card.data.license == 'apache-2.0' and card.data.datasets == ['uoft-cs/cifar10']
    assert {(r.metric_type, r.metric_value, r.dataset_name, r.dataset_split) for r in card.data.eval_results} == {
        ('accuracy', 90.0, 'CIFAR-10', 'test'), ('top-5-accuracy', 99.6, 'CIFAR-10', 'test')}
