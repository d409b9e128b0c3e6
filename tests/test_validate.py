""" `timm-dirac validate` with the shipped trained weights on the real CIFAR-10 sample shipped in the package, checked
against an independent computation over the same images (read with pyarrow, preprocessed by hand, no timm); image
folder and `datasets` inputs agree. """
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_dirac  # noqa: F401
from timm_dirac.cli import main as cli_main
from timm_dirac.data import DataError
from timm_dirac.hub.folder import save_hub_folder

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / 'timm_dirac' / 'assets' / 'cifar10_sample'
N = 48  # sample images per test: each costs about 25 ms through the trained DiracNet-16-4 on 2 cores

WEIGHTS = ROOT / 'timm_dirac' / 'assets' / 'weights' / 'diracnet16_4_cifar.td_cifar10'


@pytest.fixture(scope='module')
def hub_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('diracnet34_1_cifar', layers=(2, 2, 2)).eval()
    return save_hub_folder(model, tmp_path_factory.mktemp('validate') / 'hub')


def _run(tmp_path, *args):
    out = tmp_path / f'result{len(list(tmp_path.glob("result*")))}.json'
    assert cli_main(['--debug', 'validate', *args, '--json', str(out), '--no-progress', '--workers', '0']) == 0
    return json.loads(out.read_text())


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4820, 0.4467), (0.2471, 0.2435, 0.2616)  # of the CIFAR-10 train split


def _by_hand(model: torch.nn.Module, n: int) -> dict:
    """ top-1 / top-5 (%) and loss of `model` on the first `n` test images of the sample, computed here: the Parquet
    rows read by pyarrow, decoded by PIL, made tensors and normalised by torchvision (32 px images: no resize). """
    import io

    import pyarrow.parquet as pq
    from PIL import Image
    from torchvision import transforms

    rows = pq.read_table(SAMPLE / 'data' / 'test-00000-of-00001.parquet').slice(0, n).to_pylist()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    x = torch.stack([transform(Image.open(io.BytesIO(r['image']['bytes'])).convert('RGB')) for r in rows])
    y = torch.tensor([r['label'] for r in rows])
    with torch.no_grad():
        logits = model.eval()(x)
    top5 = logits.topk(5, dim=1).indices
    return dict(top1=100. * (top5[:, 0] == y).float().mean().item(),
                top5=100. * (top5 == y[:, None]).any(1).float().mean().item(),
                loss=F.cross_entropy(logits, y).item())


def test_validate_scores_the_trained_weights_as_an_independent_computation_does(tmp_path):
    """ The shipped trained weights (90% on the CIFAR-10 test split): validate's numbers on 64 sample images are
    those computed by hand, far above chance (10%). A wrong transform (size, mean/std, channel order), label order
    or image decoding would move them. (The folded form scores the same: test_published_weights_on_the_sample.) """
    n = 64
    expected = _by_hand(timm.create_model('diracnet16_4_cifar.td_cifar10', pretrained=True), n)
    assert expected['top1'] > 75  # the hand computation itself sees a trained model
    result = _run(tmp_path, '--model', 'diracnet16_4_cifar.td_cifar10', '--pretrained', '--dataset', f'hfds/{SAMPLE}',
                  '--split', f'test[:{n}]', '--batch-size', '40')
    assert result['samples'] == n and result['input_size'] == [3, 32, 32]
    assert result['top1'] == pytest.approx(expected['top1'], abs=1e-3)
    assert result['top5'] == pytest.approx(expected['top5'], abs=1e-3)
    assert result['loss'] == pytest.approx(expected['loss'], abs=1e-4)


def test_image_folder_gives_the_same_result(tmp_path):
    import datasets

    rows = datasets.load_dataset(str(SAMPLE), split=f'test[:{N}]').cast_column('image', datasets.Image(decode=False))
    names = rows.features['label'].names
    root = tmp_path / 'images' / 'test'
    for i, r in enumerate(rows):
        (root / names[r['label']]).mkdir(parents=True, exist_ok=True)
        (root / names[r['label']] / f'{i:05d}.jpg').write_bytes(r['image']['bytes'])  # the same JPEG bytes
    assert sorted(names) == names  # folder classes sort into the dataset's label order
    by_folder = _run(tmp_path, '--checkpoint', str(WEIGHTS), '--dataset', str(tmp_path / 'images'), '--split', 'test')
    by_hfds = _run(tmp_path, '--checkpoint', str(WEIGHTS), '--dataset', f'hfds/{SAMPLE}', '--split', f'test[:{N}]')
    assert by_hfds['top1'] > 60  # trained weights: a mismatch in decoding or labels would show
    for key in ('samples', 'top1', 'top5'):
        assert by_folder[key] == by_hfds[key], key
    assert by_folder['loss'] == pytest.approx(by_hfds['loss'], abs=1e-4)


def test_validate_errors(tmp_path, hub_folder):
    with pytest.raises(ValueError, match="names architecture 'diracnet34_1_cifar', not 'diracnet18'"):
        _run(tmp_path, '--model', 'diracnet18', '--checkpoint', str(hub_folder), '--dataset', f'hfds/{SAMPLE}')
    with pytest.raises(DataError, match='is not a folder.*hfds/<Hub id or local folder>'):
        _run(tmp_path, '--checkpoint', str(hub_folder), '--dataset', str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='label 9 but the model has 5 classes'):
        _run(tmp_path, '--model', 'diracnet34_1_cifar', '--num-classes', '5', '--dataset', f'hfds/{SAMPLE}',
             '--split', 'test[:20]')


@pytest.mark.slow  # the 1,000 sample test images through the published weights: ~55 s on 2 busy cores
def test_published_weights_on_the_sample_without_split_or_prefix(tmp_path, capsys):
    """ No --split: the dataset's validation split, else its test split, said on stderr; a local `datasets` folder
    works without the hfds/ prefix; the result names where the weights came from; folded, they score the same. """
    with_prefix = _run(tmp_path, '--checkpoint', str(WEIGHTS), '--dataset', f'hfds/{SAMPLE}')
    without_prefix = _run(tmp_path, '--checkpoint', str(WEIGHTS), '--dataset', str(SAMPLE))
    assert with_prefix['split'] == without_prefix['split'] == 'test' and with_prefix['samples'] == 1000
    assert with_prefix['top1'] == without_prefix['top1'] > 85
    assert "no --split given, using 'test'" in capsys.readouterr().err
    by_name = _run(tmp_path, '--model', f'local-dir:{WEIGHTS}', '--dataset', str(SAMPLE), '--split', 'test[:50]')
    assert by_name['weights'] == f'local-dir:{WEIGHTS}' and by_name['samples'] == 50
    folded = _run(tmp_path, '--model', f'local-dir:{WEIGHTS}', '--dataset', str(SAMPLE), '--split', 'test[:50]',
                  '--reparam')
    assert folded['reparam'] and folded['param_count'] < by_name['param_count']
    assert folded['top1'] == by_name['top1'] and folded['loss'] == pytest.approx(by_name['loss'], abs=1e-4)
    tag = _run(tmp_path, '--model', 'diracnet16_4_cifar', '--pretrained', '--dataset', str(SAMPLE), '--split', 'test[:50]')
    assert tag['weights'] == f'pretrained ({WEIGHTS / "model.safetensors"})' and tag['top1'] == by_name['top1']


def test_an_unreadable_image_stops_the_run_with_its_name(tmp_path, capsys):
    """ timm's reader skipped an unreadable image with a warning (and counted the next one twice); validate now
    reads as training does and refuses, naming the file, so no result is reported over a damaged set. """
    from PIL import Image
    for cls in ('a', 'b'):
        (tmp_path / 'test' / cls).mkdir(parents=True)
        Image.new('RGB', (32, 32)).save(tmp_path / 'test' / cls / 'x.jpg')
    (tmp_path / 'test' / 'b' / 'bad.jpg').write_bytes(b'\xff\xd8 truncated')
    assert cli_main(['validate', '--model', 'diracnet34_1_cifar', '--dataset', str(tmp_path), '--split', 'test',
                     '--no-progress', '--workers', '0']) == 2
    err = capsys.readouterr().err
    assert 'cannot read image file' in err and 'bad.jpg' in err and len(err.strip().splitlines()) == 1, err


def test_integer_labels_without_class_names_validate_alike(tmp_path, capsys):
    """ A `datasets` split whose label column is plain integers (no ClassLabel), as timm's reader takes: validate
    scores it exactly like the ClassLabel original; training trains it as timm does, under the indices of the
    model's classes (said once, with how to name them); a Hub folder's class names are asked for by name. """
    import datasets
    from timm_dirac.data import DataError, label_names
    from timm_dirac.train import main as train_main

    rows = datasets.load_dataset(str(SAMPLE), split=f'test[:{N}]')
    plain = rows.cast_column('label', datasets.Value('int64'))
    (tmp_path / 'plain').mkdir()
    plain.to_parquet(str(tmp_path / 'plain' / 'test-00000-of-00001.parquet'))
    expected = _run(tmp_path, '--checkpoint', str(WEIGHTS), '--dataset', f'hfds/{SAMPLE}', '--split', f'test[:{N}]')
    result = _run(tmp_path, '--checkpoint', str(WEIGHTS), '--dataset', f'hfds/{tmp_path / "plain"}', '--split', 'test')
    assert result['samples'] == N and (result['top1'], result['top5']) == (expected['top1'], expected['top5'])
    assert result['loss'] == pytest.approx(expected['loss'], abs=1e-6)
    with pytest.raises(DataError, match='integer labels without class names.*ClassLabel'):
        label_names(f'hfds/{tmp_path / "plain"}', split='test')
    capsys.readouterr()
    train_main(['--model', 'diracnet34_1_cifar', '--model-kwargs', 'layers=(1,1,1)', '--dataset',
                f'hfds/{tmp_path / "plain"}', '--train-split', 'test', '--holdout', '0', '--val-split', 'test',
                '--test-split', '', '--epochs', '1', '-b', '16', '--warmup-epochs', '0', '--workers', '0',
                '--output', str(tmp_path / 'run'), '--experiment', 'plain', '--debug'])
    out = capsys.readouterr().out
    assert out.count('integer labels without class names') == 1 and "cast_column('label'" in out
    config = json.loads((tmp_path / 'run' / 'plain' / 'hub-folded' / 'config.json').read_text())
    assert config['label_names'] == [str(i) for i in range(10)]


def test_validate_works_from_any_folder_with_the_shipped_sample(tmp_path, monkeypatch):
    """ `--dataset timm_dirac/assets/cifar10_sample` from a folder without it (as after `pip install` in an empty
    folder): a relative path that does not exist from there is looked up beside the installed package. """
    monkeypatch.chdir(tmp_path)
    for dataset in ('timm_dirac/assets/cifar10_sample', 'hfds/timm_dirac/assets/cifar10_sample'):
        result = _run(tmp_path, '--model', 'diracnet16_4_cifar.td_cifar10', '--pretrained', '--dataset', dataset,
                      '--split', 'test[:8]')
        assert result['samples'] == 8 and result['dataset'] == dataset


def test_a_folder_of_other_classes_or_a_model_without_classifier_is_refused(tmp_path, capsys):
    """ Folder classes a/b for a CIFAR-10 model printed a top-1: the data's class names are compared with the
    model's `label_names`, as training compares splits; a head-less model gives features, not scores. """
    from PIL import Image
    from timm_dirac.validate import validate
    for cls in ('a', 'b'):
        (tmp_path / 'ab' / 'test' / cls).mkdir(parents=True)
        Image.new('RGB', (32, 32)).save(tmp_path / 'ab' / 'test' / cls / 'x.png')
    assert cli_main(['validate', '--checkpoint', str(WEIGHTS), '--dataset', str(tmp_path / 'ab'), '--split', 'test',
                     '--no-progress', '--workers', '0']) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has 2 classes ['a', 'b'] but the model was trained on 10 " \
                                                  "classes ['airplane'" in err, err
    from torchvision import transforms
    from timm_dirac.data import load_eval_split
    dataset, _ = load_eval_split(str(tmp_path / 'ab'), 'test', transforms.ToTensor())
    with pytest.raises(ValueError, match=r'has no classifier \(num_classes=0\)'):
        validate(timm.create_model('diracnet34_1_cifar', num_classes=0), dataset, progress=False)


@pytest.mark.parametrize('label', [-1, -100, 3])
def test_a_label_the_classifier_does_not_have_is_refused(label):
    """ -100 is what cross-entropy skips: it would have been left out of the loss and counted as a miss. """
    from timm_dirac.metrics import evaluate
    batches = [(torch.zeros(2, 3), torch.tensor([0, label]))]
    with pytest.raises(ValueError, match=f'The data has label {label} but the model has 3 classes'):
        evaluate(lambda x: x, batches)
