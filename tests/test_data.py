""" timm_dirac.data and timm_dirac.train.data: the shipped CIFAR-10 sample and image folders through timm's
`create_dataset`, fixed subsets and hold-outs, splits, unreadable and 16-bit images, and the transforms. """
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

import timm
import timm_dirac  # noqa: F401
from timm.data import resolve_data_config
from timm_dirac.data import (
    DataError, MissingSplitError, eval_transform, hub_dataset_id, is_test_split, label_names, load_eval_split,
    load_split)
from timm_dirac.train.data import holdout_indices, train_transform

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')
SAMPLE = f'hfds/{ROOT / "timm_dirac" / "assets" / "cifar10_sample"}'
SHARED = ROOT.parent / 'shared' / 'data' / 'cifar10'


def _cfg(name: str):
    return resolve_data_config({}, model=timm.create_model(name, pretrained=False))


def test_shipped_sample_loads_balanced():
    train, classes = load_split(SAMPLE, None, 'train')
    test, _ = load_split(SAMPLE, None, 'test')
    assert classes == 10 and len(train) == 10000 and len(test) == 1000
    image, label = test[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and 0 <= label < 10
    counts = torch.bincount(torch.tensor(test.dataset.reader.dataset['label']), minlength=10)
    assert counts.tolist() == [100] * 10


def test_sample_limit_is_a_fixed_subset():
    a, _ = load_split(SAMPLE, None, 'train', num_samples=500)
    b, _ = load_split(SAMPLE, None, 'train', num_samples=500)
    assert len(a) == 500 and list(a.indices) == list(b.indices) and len(set(a.indices)) == 500
    column = a.dataset.dataset.reader.dataset['label']
    labels = torch.bincount(torch.tensor([column[i] for i in a.indices]), minlength=10)
    assert labels.min() > 25  # a random subset of a balanced set stays roughly balanced


def test_holdout_is_disjoint_fixed_and_covers_the_split():
    train, held = holdout_indices(10000, 1000)
    assert len(held) == 1000 and len(train) == 9000
    assert sorted(train + held) == list(range(10000)) and train == sorted(train) and held == sorted(held)
    assert holdout_indices(10000, 1000) == (train, held)  # the same on every rank, seed and resume
    ds, _ = load_split(SAMPLE, None, 'train')
    column = ds.dataset.reader.dataset['label']
    labels = torch.bincount(torch.tensor([column[i] for i in held]), minlength=10)
    assert labels.min() > 70  # a random 10% of a balanced set stays roughly balanced, unlike the split's tail
    for bad in (0, 10000, -5):
        with pytest.raises(DataError, match='--holdout'):
            holdout_indices(10000, bad)


def test_test_split_names_are_recognised():
    assert all(is_test_split(s) for s in ('test', 'Testing', 'test[:500]'))
    assert not any(is_test_split(s) for s in ('validation', 'val', 'train', 'contest'))


@pytest.mark.skipif(not SHARED.is_dir(), reason='needs ../shared/data/cifar10 (the full CIFAR-10 copy)')
def test_full_cifar10_copy_loads():
    ds, classes = load_split(f'hfds/{SHARED}', None, 'test', num_samples=10)
    assert classes == 10 and len(ds) == 10


def test_label_names_from_features_or_class_folders(tmp_path):
    assert label_names(SAMPLE) == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                                   'truck']
    for cls in ('zebra', 'ant', 'cat'):
        (tmp_path / 'val' / cls).mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(tmp_path / 'val' / cls / 'x.png')
    assert label_names('', str(tmp_path), 'validation') == ['ant', 'cat', 'zebra']  # as timm's reader numbers them
    assert hub_dataset_id('hfds/uoft-cs/cifar10') == 'uoft-cs/cifar10'
    assert hub_dataset_id(SAMPLE) is None and hub_dataset_id('') is None  # a local path names nothing public


def test_unknown_split_names_the_fix():
    with pytest.raises(DataError, match='--train-split/--val-split'):
        load_split(SAMPLE, None, 'validation')


def test_image_folders_split_aliases_and_bad_files(tmp_path):
    for split in ('train', 'val'):
        for cls in ('a', 'b', 'c'):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new('RGB', (40, 30), (10, 20, 30)).save(tmp_path / split / cls / 'x.jpg')
    ds, classes = load_split('', str(tmp_path), 'validation')  # found as val/
    assert classes == 3 and len(ds) == 3 and ds[2][1] == 2
    with pytest.raises(DataError, match='no folder for split'):
        load_split('', str(tmp_path), 'test')
    (tmp_path / 'train' / 'b' / 'bad.jpg').write_bytes(b'\xff\xd8 truncated')
    ds, _ = load_split('', str(tmp_path), 'train')
    with pytest.raises(DataError, match='bad.jpg'):
        [ds[i] for i in range(len(ds))]


def test_eval_split_falls_back_to_test_and_takes_slices_and_folders_without_prefix():
    """ Without a split, the first of validation, test the data has (the sample has train and test); a local
    `datasets` folder needs no hfds/ prefix; a slice is passed to `datasets`. """
    folder = SAMPLE[len('hfds/'):]
    for source in (SAMPLE, folder):
        ds, split = load_eval_split(source)
        assert split == 'test' and len(ds) == 1000
    train_read, _ = load_split(SAMPLE, None, 'test')
    sliced, split = load_eval_split(folder, 'test[:50]')
    assert split == 'test[:50]' and len(sliced) == 50
    assert [sliced[i][1] for i in range(50)] == [train_read[i][1] for i in range(50)]
    with pytest.raises(MissingSplitError, match="no split 'validation'"):
        load_eval_split(SAMPLE, 'validation')


def test_eval_split_of_image_folders(tmp_path):
    for split in ('train', 'val'):
        for cls in ('a', 'b', 'c'):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new('RGB', (40, 30), (10, 20, 30)).save(tmp_path / split / cls / f'{split}.jpg')
    ds, split = load_eval_split(str(tmp_path))  # validation, found as val/
    assert split == 'validation' and [ds[i][1] for i in range(len(ds))] == [0, 1, 2]
    def files(ds):
        return [ds.where(i) for i in range(len(ds))]
    assert files(load_eval_split(str(tmp_path), 'train')[0]) == files(load_split('', str(tmp_path), 'train')[0])
    with pytest.raises(MissingSplitError, match="no folder for split 'test'"):
        load_eval_split(str(tmp_path), 'test')
    # a folder of class folders (e.g. ImageNet's val/) is the split itself, named after the folder
    ds, split = load_eval_split(str(tmp_path / 'val'))
    assert split == 'val' and len(ds) == 3 and files(ds) == files(load_split('', str(tmp_path), 'validation')[0])
    with pytest.raises(DataError, match='slices apply to hfds/ datasets'):
        load_eval_split(str(tmp_path / 'val'), 'test[:2]')
    (tmp_path / 'val').rename(tmp_path / 'holdout')
    with pytest.raises(DataError, match='none of the splits validation, test: pass --split NAME'):
        load_eval_split(str(tmp_path))
    with pytest.raises(DataError, match='is not a folder'):
        load_eval_split(str(tmp_path / 'missing'))


def test_16_bit_png_folder_is_not_washed_out(tmp_path):
    """ An evaluation reads a 16-bit PNG scaled to 8 bits, not clipped to near-white by convert('RGB'). """
    import numpy as np
    for cls in ('a', 'b'):
        (tmp_path / 'validation' / cls).mkdir(parents=True)
        Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(tmp_path / 'validation' / cls / 'x.png')
    dataset, _ = load_eval_split(str(tmp_path), 'validation')
    image, _ = dataset[0]
    assert np.asarray(image).mean() == pytest.approx(128, abs=1)


def test_cifar_transform_pads_reflect_and_crops():
    cfg = _cfg('diracnet34_1_cifar')
    tf = train_transform(cfg)
    crop = next(t for t in tf.transforms if isinstance(t, transforms.RandomCrop))
    assert crop.size == (32, 32) and crop.padding == 4 and crop.padding_mode == 'reflect'
    assert any(isinstance(t, transforms.RandomHorizontalFlip) for t in tf.transforms)
    x = tf(Image.new('RGB', (32, 32), (255, 0, 0)))
    assert x.shape == (3, 32, 32)
    # normalised with the model's CIFAR mean/std: a pure red image maps to (1 - mean) / std in channel 0
    assert torch.allclose(x[0], torch.full((32, 32), (1 - cfg['mean'][0]) / cfg['std'][0]), atol=1e-5)
    assert eval_transform(cfg)(Image.new('RGB', (32, 32))).shape == (3, 32, 32)
    with pytest.raises(DataError, match='--aa'):
        train_transform(cfg, auto_augment='rand-m9-mstd0.5')


def test_cifar_transform_random_erasing_zeroes_one_box_after_normalising():
    cfg = _cfg('diracnet34_1_cifar')
    random.seed(0)  # timm's RandomErasing draws its box from Python's `random`, torchvision's crop and flip from torch
    torch.manual_seed(0)
    x = train_transform(cfg, re_prob=1.0)(Image.new('RGB', (32, 32), (255, 0, 0)))
    erased = (x == 0).all(0)
    rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
    box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all() and 0.02 * 32 * 32 <= box.numel() <= 32 * 32 / 3  # one solid box of 2-33% of the image
    assert not (train_transform(cfg)(Image.new('RGB', (32, 32), (255, 0, 0))) == 0).all(0).any()


def test_imagenet_transform_is_timms():
    cfg = _cfg('diracnet18')
    tf = train_transform(cfg, auto_augment='rand-m9-mstd0.5')
    names = [type(t).__name__ for t in tf.transforms]
    assert names[0] == 'RandomResizedCropAndInterpolation' and 'RandAugment' in names
    assert tf(Image.new('RGB', (300, 250))).shape == (3, 224, 224)
    assert eval_transform(cfg)(Image.new('RGB', (300, 250))).shape == (3, 224, 224)


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    """ PIL's convert('RGB') clips a 16-bit PNG to white; to_rgb scales it to 8 bits. """
    import numpy as np
    from PIL import Image
    from timm_dirac.data import to_rgb
    levels = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(levels).save(tmp_path / 'deep.png')
    with Image.open(tmp_path / 'deep.png') as image:
        rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(rgb[..., 0], levels / 257., atol=0.51)
    with Image.open(tmp_path / 'deep.png') as image:  # 8-bit images are unchanged
        assert np.array_equal(np.asarray(to_rgb(image.convert('L'))), np.asarray(image.convert('L').convert('RGB')))


def test_unreadable_row_of_a_datasets_split_is_named_and_empty_names_refused(tmp_path):
    """ timm's reader would return the next row in place of an undecodable one; ours names the row. """
    import datasets

    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=['a', 'b']))
    good = datasets.Dataset.from_dict(dict(image=[Image.new('RGB', (8, 8))] * 3, label=[0, 1, 0]), features=features)
    rows = good.cast_column('image', datasets.Image(decode=False)).to_list()
    rows[1]['image'] = dict(bytes=b'\xff\xd8 truncated', path=None)
    bad = datasets.Dataset.from_list(rows, features=features)
    (tmp_path / 'bad').mkdir()
    bad.to_parquet(str(tmp_path / 'bad' / 'test-00000-of-00001.parquet'))
    ds, _ = load_split(f'hfds/{tmp_path / "bad"}', None, 'test')
    assert ds[0][1] == 0
    with pytest.raises(DataError, match="cannot read image 1 of split 'test' of hfds/.*replace or delete it"):
        ds[1]
    for empty in ('hfds/', 'hfids/'):
        with pytest.raises(DataError, match='names no dataset'):
            load_eval_split(empty) if empty == 'hfds/' else label_names(empty)


def test_a_relative_path_missing_here_is_found_beside_the_installed_package(tmp_path, monkeypatch):
    """ `timm_dirac/assets/...` from any working directory (an installed wheel in an empty folder); what exists
    here wins, and what exists nowhere comes back as given (a Hub id). """
    from timm_dirac.data import local_path
    monkeypatch.chdir(tmp_path)
    shipped = Path(timm_dirac.__file__).resolve().parent / 'assets' / 'cifar10_sample'
    assert Path(local_path('timm_dirac/assets/cifar10_sample')) == shipped
    (tmp_path / 'timm_dirac' / 'assets' / 'cifar10_sample').mkdir(parents=True)
    assert local_path('timm_dirac/assets/cifar10_sample') == 'timm_dirac/assets/cifar10_sample'
    assert local_path('uoft-cs/cifar10') == 'uoft-cs/cifar10'
    monkeypatch.chdir(tmp_path / 'timm_dirac')
    ds, classes = load_split('hfds/timm_dirac/assets/cifar10_sample', None, 'test', num_samples=4)
    assert classes == 10 and len(ds) == 4


def test_model_and_data_classes_are_compared_by_name():
    from timm_dirac.data import check_model_classes
    names = ['airplane', 'automobile', 'bird']
    check_model_classes(names, list(names), 'x', 'test')
    check_model_classes(None, names, 'x', 'test')  # a model without names: the evaluation checks labels only
    with pytest.raises(DataError, match=r"split 'test' of x has 2 classes \['bird', 'cat'\] but the model was "
                                        r"trained on 3 classes"):
        check_model_classes(names, ['bird', 'cat'], 'x', 'test')
    with pytest.raises(DataError, match='in the same order'):
        check_model_classes(names, names[::-1], 'x', 'test')


def test_a_train_sample_count_above_the_split_is_refused_before_a_run_folder(tmp_path):
    """ `--train-num-samples 1000` on 8 images trained on the 8 in silence. """
    from timm_dirac.train import parse_args, train
    for split in ('train', 'val'):
        for cls in ('a', 'b'):
            (tmp_path / 'img' / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new('RGB', (32, 32), (i, 0, 0)).save(tmp_path / 'img' / split / cls / f'{i}.png')
    flags = ['--model', 'diracnet34_1_cifar', '--model-kwargs', 'layers=(1,1,1)', '--data-dir', str(tmp_path / 'img'),
             '--holdout', '0', '--epochs', '1', '-b', '4', '--workers', '0', '--output', str(tmp_path / 'out')]
    with pytest.raises(DataError, match='--train-num-samples 1000 is more than the 8 train samples'):
        train(parse_args(flags + ['--train-num-samples', '1000']))
    assert not (tmp_path / 'out').exists()
