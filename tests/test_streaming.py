""" Streaming through timm's readers: a webdataset shard folder (`wds/`) and a local Parquet folder read as a stream
(`hfids/`) train on 1 and on 2 processes; each epoch reads every sample once across ranks and loader workers; a
resume continues at the epoch boundary; the class names are checked and an unreadable image stops the run.

Every image is one solid colour that numbers it (red + 256 x green), so the probe knows which sample it decoded.
"""
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest
from PIL import Image

import timm_dirac.train.data as data
from timm_dirac.data import DataError, label_names
from timm_dirac.train import parse_args, train

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / 'tests' / 'stream_probe.py'
SHARDS, PER_SHARD, VAL = 4, 16, 16
TRAIN = SHARDS * PER_SHARD
CLASSES = ['ant', 'bee']
FLAGS = ['--model', 'diracnet34_1_cifar', '--model-kwargs', 'layers=(1,1,1)', '-b', '8', '--opt', 'momentum',
         '--lr', '0.05', '--warmup-epochs', '0', '--holdout', '0']

pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')


def _image(number: int) -> Image.Image:
    return Image.new('RGB', (32, 32), (number % 256, number // 256, 7))


def _png(number: int) -> bytes:
    buffer = io.BytesIO()
    _image(number).save(buffer, format='PNG')
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    tar.addfile(member, io.BytesIO(payload))


def write_shards(folder: Path, bad: int = -1, labels: Optional[dict] = None) -> Path:
    """ timm's webdataset layout: `train-00000{k}.tar` shards of `<key>.png` + `<key>.cls` (the class index as
    text; `labels` overrides some, by sample number), one validation shard (samples TRAIN..TRAIN+VAL-1), and
    `_info.json` with the splits and class names. """
    labels = labels or {}
    folder.mkdir(parents=True)
    splits = {'train': [list(range(s * PER_SHARD, (s + 1) * PER_SHARD)) for s in range(SHARDS)],
              'validation': [list(range(TRAIN, TRAIN + VAL))]}
    info = {'label_names': CLASSES, 'splits': {}}
    for split, shards in splits.items():
        names = []
        for s, numbers in enumerate(shards):
            names.append(f'{split}-{s:06d}.tar')
            with tarfile.open(folder / names[-1], 'w') as tar:
                for n in numbers:
                    _add(tar, f'{n:06d}.png', b'\xff\xd8 not an image' if n == bad else _png(n))
                    _add(tar, f'{n:06d}.cls', str(labels.get(n, n % 2)).encode())
        info['splits'][split] = dict(name=split, num_samples=sum(map(len, shards)), filenames=names,
                                     shard_lengths=[len(s) for s in shards])
    (folder / '_info.json').write_text(json.dumps(info))
    return folder


def write_parquet(folder: Path) -> Path:
    """ A local `datasets` Parquet folder: `train` in SHARDS files (the stream's shards), `validation` in one. """
    import datasets

    (folder / 'data').mkdir(parents=True)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=CLASSES))
    for split, numbers, parts in (('train', range(TRAIN), SHARDS), ('validation', range(TRAIN, TRAIN + VAL), 1)):
        rows = datasets.Dataset.from_dict(
            dict(image=[_image(n) for n in numbers], label=[n % 2 for n in numbers]), features=features)
        for k in range(parts):
            rows.shard(parts, k, contiguous=True).to_parquet(
                str(folder / 'data' / f'{split}-{k:05d}-of-{parts:05d}.parquet'))
    return folder


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp('wds') / 'shards')


@pytest.fixture(scope='module')
def parquet(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp('hfids') / 'parquet')


@pytest.fixture
def recorded():
    """ The numbers of the training samples decoded in this process, in order (loader workers 0); patched apart
    from the `monkeypatch` fixture, which `interrupted` undoes. """
    seen = []
    make = data.train_transform

    def recording(*args, **kwargs):
        transform = make(*args, **kwargs)

        def record(image):
            red, green, _ = image.getpixel((0, 0))
            seen.append(red + 256 * green)
            return transform(image)
        return record
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, 'train_transform', recording)
        yield seen


def _summary(run: Path) -> list:
    import csv
    with open(run / 'summary.csv') as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('source', ['wds', pytest.param('hfids', marks=pytest.mark.slow)])  # hfids: ~30 s
def test_a_stream_trains_each_sample_once_per_epoch_and_resumes(tmp_path, shards, parquet, source, recorded,
                                                                interrupted, capsys):
    """ One process: each epoch reads every sample once, reshuffled; a run stopped after its epoch-1 checkpoint
    resumes at the epoch boundary and reads epoch 2 as the uninterrupted run did. """
    flags = FLAGS + ['--epochs', '2', '--workers', '0', '--output', str(tmp_path)]
    if source == 'wds':
        dataset = 'wds/shards'
        flags += ['--dataset', dataset, '--data-dir', str(shards)]
    else:
        dataset = f'hfids/{parquet}'
        flags += ['--dataset', dataset, '--val-num-samples', str(VAL)]
        with pytest.raises(DataError, match='does not state the size.*--train-num-samples'):
            train(parse_args(flags + ['--experiment', 'unsized']))
        flags += ['--train-num-samples', str(TRAIN)]
    train(parse_args(flags + ['--experiment', 'straight']))
    straight = list(recorded)
    epochs = straight[:TRAIN], straight[TRAIN:]
    assert len(straight) == 2 * TRAIN and epochs[0] != epochs[1]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(TRAIN))  # every sample once per epoch
    out = capsys.readouterr().out
    assert f'| {TRAIN} train images, validation on ' in out and f'| train of {dataset}, streamed, ' in out
    assert f'validation on {VAL} images of validation' in out and f'val ({VAL} images)' in out

    recorded.clear()
    with interrupted():
        train(parse_args(flags + ['--experiment', 'run']))
    assert recorded == epochs[0]
    recorded.clear()
    train(parse_args(flags + ['--experiment', 'run', '--resume', str(tmp_path / 'run')]))
    assert recorded == epochs[1]  # the resumed epoch 2 reads what the uninterrupted one read, in its order
    assert [row['epoch'] for row in _summary(tmp_path / 'run')] == ['1', '2']
    assert _summary(tmp_path / 'run')[1]['train_loss'] == _summary(tmp_path / 'straight')[1]['train_loss']
    config = json.loads((tmp_path / 'run' / 'hub-folded' / 'config.json').read_text())
    assert config['label_names'] == CLASSES


def test_wds_holdout_is_whole_fixed_shards(shards):
    args = parse_args(FLAGS + ['--dataset', 'wds/shards', '--data-dir', str(shards)])
    args.holdout = 10
    kept, held = data._wds_holdout(args)
    assert kept.count('.tar') == SHARDS - 1 and held.count('.tar') == 1  # one shard of 16 covers 10
    assert kept.endswith(f'|{TRAIN - PER_SHARD}') and held.endswith(f'|{PER_SHARD}')
    assert data._wds_holdout(args) == (kept, held)  # fixed: the same on every rank, seed and resume


def test_webdataset_class_names(tmp_path):
    """ `.cls` files hold indices: the names come from `_info.json`'s `label_names`, or for ImageNet shards from
    timm's synsets; without either, training refuses naming the fix. """
    folder = write_shards(tmp_path / 'plain')
    info = json.loads((folder / '_info.json').read_text())
    assert label_names('wds/plain', str(folder)) == CLASSES
    del info['label_names']
    (folder / '_info.json').write_text(json.dumps(info))
    from timm.data import ImageNetInfo
    assert label_names('wds/imagenet-1k', str(folder)) == ImageNetInfo('imagenet-1k').label_names()
    with pytest.raises(DataError, match='integer labels without class names.*label_names.*_info.json'):
        label_names('wds/plain', str(folder))


def test_unreadable_image_in_a_shard_stops_the_run(tmp_path):
    folder = write_shards(tmp_path / 'bad', bad=5)
    flags = FLAGS + ['--dataset', 'wds/bad', '--data-dir', str(folder), '--epochs', '1', '--workers', '0',
                     '--output', str(tmp_path / 'out')]
    with pytest.raises(DataError, match='cannot read a sample of a webdataset shard'):
        train(parse_args(flags))


def test_other_class_names_in_validation_are_refused(tmp_path):
    """ The same number of classes under other names: refused, for image folders and ClassLabels alike. """
    for split, classes in (('train', ('a', 'b')), ('val', ('b', 'c'))):
        for cls in classes:
            (tmp_path / 'img' / split / cls).mkdir(parents=True)
            for i in range(8):
                Image.new('RGB', (32, 32), (i, 0, 0)).save(tmp_path / 'img' / split / cls / f'{i}.png')
    flags = FLAGS + ['--data-dir', str(tmp_path / 'img'), '--epochs', '1', '--workers', '0',
                     '--output', str(tmp_path / 'out')]
    with pytest.raises(DataError, match=r"split 'validation' of .* has 2 classes \['b', 'c'\] but 'train' has 2 "
                                        r"classes \['a', 'b'\]: the splits must share one label set"):
        train(parse_args(flags))
    assert not (tmp_path / 'out').exists()
    # `datasets` gives all splits of one dataset the same features, so ClassLabels differ only between sources
    # (e.g. a --val-split stream read apart); the check compares their names alike
    from types import SimpleNamespace
    with pytest.raises(DataError, match=r"\['ant', 'cow'\] but 'train' has 2 classes \['ant', 'bee'\]"):
        data._check_classes(CLASSES, SimpleNamespace(class_names=['ant', 'cow']), 'validation', 'train', 'hfds/x')
    with pytest.raises(DataError, match="'test' of hfds/x has integer labels without class names"):
        data._check_classes(CLASSES, SimpleNamespace(class_names=None), 'test', 'train', 'hfds/x')


@pytest.mark.parametrize('cpus,processes', [(1, 1), (2, 1), (2, 2), (3, 4), (64, 8)])
def test_default_loader_workers_never_exceed_the_cpus(tmp_path, monkeypatch, cpus, processes):
    """ Without --workers, the loaders of the `processes` training processes of a machine with `cpus` CPUs run no
    more workers together than it has CPUs, and at least one each where there are CPUs enough. """
    import timm
    from accelerate import Accelerator
    from timm.data import resolve_data_config

    for split in ('train', 'val'):
        for cls in CLASSES:
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                _image(i).save(tmp_path / split / cls / f'{i}.png')
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, 'cpu_count', lambda: cpus)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(processes))
    args = parse_args(FLAGS + ['--data-dir', str(tmp_path), '--val-split', 'validation', '--test-split', 'val'])
    data_config = resolve_data_config({}, model=timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)))
    loaders = data.create_loaders(args, data_config, Accelerator(cpu=True))
    (each,) = {loader.num_workers for loader in (loaders.train_loader, loaders.val_loader, loaders.test_loader)}
    assert each * processes <= cpus and (each >= 1) == (cpus >= processes)
    assert f'{each} loader workers per process' in loaders.description  # the run's header says it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch(dump: Optional[Path], flags: list, ok: bool = True) -> str:
    """ Two gloo ranks on this CPU (`accelerate launch --multi_gpu --num_processes 2`) running the probe (or, with
    no dump folder, train.py itself). """
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--main_process_port', str(_free_port()), '--mixed_precision', 'no',
           '--dynamo_backend', 'no', *([str(PROBE), str(dump)] if dump else [str(ROOT / 'train.py')]), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (proc.returncode == 0) == ok, out[-4000:]
    return out


def _seen(dump: Path) -> dict:
    """ {(rank, reader): [sample numbers]} from the probe's files. """
    return {f.stem: [int(n) for n in f.read_text().split()] for f in dump.glob('seen-*.txt')}


@pytest.mark.slow
@pytest.mark.timeout(700)
@pytest.mark.parametrize('source', ['wds', 'hfids'])
def test_two_processes_read_every_sample_once(tmp_path, shards, parquet, source):
    """ 2 ranks x 2 loader workers (wds) or the default workers (hfids): each reader reads its own shards, and the
    epoch reads each of the 64 samples exactly once across ranks; validation counts its 16 samples once. """
    dump = tmp_path / 'dump'
    dump.mkdir()
    flags = FLAGS + ['--epochs', '1', '--output', str(tmp_path / 'out'), '--experiment', 'run']
    if source == 'wds':
        flags += ['--dataset', 'wds/shards', '--data-dir', str(shards), '--workers', '2']
    else:
        flags += ['--dataset', f'hfids/{parquet}', '--train-num-samples', str(TRAIN), '--val-num-samples', str(VAL)]
    out = _launch(dump, flags)
    seen = _seen(dump)
    counts = Counter(n for numbers in seen.values() for n in numbers)
    assert sorted(counts) == list(range(TRAIN)) and set(counts.values()) == {1}, counts
    ranks = {name.split('-')[1] for name in seen}
    assert ranks == {'0', '1'}  # both ranks read, disjoint shards
    assert '2 process(es) on cpu' in out and f'val ({VAL} images)' in out
    if source == 'wds':
        assert len(seen) == 4 and all(len(v) == PER_SHARD for v in seen.values())  # 4 readers, one shard each


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_resume_a_stream_at_the_epoch_boundary(tmp_path, shards):
    """ A 2-epoch wds run on 2 ranks x 2 workers, and its epoch-1 checkpoint resumed in a new folder: the resumed
    epoch 2 reads what the uninterrupted epoch 2 read, reader by reader, in the same order. """
    import shutil

    flags = FLAGS + ['--epochs', '2', '--dataset', 'wds/shards', '--data-dir', str(shards), '--workers', '2']
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    straight.mkdir()
    resumed.mkdir()
    _launch(straight, flags + ['--output', str(tmp_path / 'out'), '--experiment', 'run'])
    shutil.copytree(tmp_path / 'out' / 'run' / 'checkpoint-1', tmp_path / 'out' / 'again' / 'checkpoint-1')
    _launch(resumed, flags + ['--resume', str(tmp_path / 'out' / 'again' / 'checkpoint-1')])
    # loader workers start afresh each epoch: a file per rank, worker and epoch, epoch 1's written first
    files = sorted(straight.glob('seen-*.txt'), key=lambda f: f.stat().st_mtime)
    epochs = [{tuple(int(n) for n in f.read_text().split()) for f in part} for part in (files[:4], files[4:])]
    again = {tuple(numbers) for numbers in _seen(resumed).values()}
    assert len(files) == 8 and len(again) == 4
    for epoch in epochs + [again]:
        assert sorted(n for numbers in epoch for n in numbers) == list(range(TRAIN))
    assert again == epochs[1] != epochs[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_refuse_bad_data_in_one_line(tmp_path, shards):
    """ A refusal while the data is built is said once, by rank 0; the other rank stops without a second message
    (and without a gloo error from a barrier rank 0 never reached). """
    out = _launch(None, FLAGS + ['--dataset', 'wds/shards', '--data-dir', str(shards), '--train-split', 'nope',
                                 '--output', str(tmp_path / 'out')], ok=False)
    errors = [line for line in out.splitlines() if line.startswith('timm-dirac-train: error:')]
    assert len(errors) == 1 and "has no split 'nope'" in errors[0], out[-3000:]
    assert 'gloo' not in out and not (tmp_path / 'out').exists()


def test_loader_workers_of_a_stream_give_every_reader_its_shards(capsys):
    """ The default is lowered to a count that splits the shards evenly; a count that leaves a reader without a
    shard is refused; an uneven split is said. """
    from types import SimpleNamespace

    def reader(lengths):
        info = SimpleNamespace(filenames=[f'{i}.tar' for i in range(len(lengths))], shard_lengths=lengths, name='train')
        return SimpleNamespace(split_info=info, num_samples=sum(lengths))
    printer = SimpleNamespace(print=print)
    assert data._stream_workers(reader([16] * 4), 'wds', 2, None, 4, printer) == 2  # 2 ranks x 2 workers, 1 shard each
    assert data._stream_workers(reader([16] * 3), 'wds', 1, None, 2, printer) == 1  # 2 workers would split 3 unevenly
    assert capsys.readouterr().out == ''
    assert data._stream_workers(reader([16] * 3), 'wds', 1, 2, 4, printer) == 2
    assert 'the 3 shards of train do not split evenly over 2 readers' in capsys.readouterr().out
    with pytest.raises(DataError, match='--workers 3: 4 shards over 2 process.* pass --workers 2 or fewer'):
        data._stream_workers(reader([16] * 4), 'wds', 2, 3, 4, printer)
    with pytest.raises(DataError, match='1 shard.* each of the 2 processes'):
        data._stream_workers(reader([16]), 'wds', 2, None, 4, printer)


def test_wds_trains_as_the_imagenet_config_does(tmp_path, shards, capsys):
    """ The shape of the ImageNet recipe on shards: --holdout N validates on whole held-out train shards, and the
    validation split is scored once at the end. """
    train(parse_args(FLAGS[:-2] + ['--dataset', 'wds/shards', '--data-dir', str(shards), '--holdout', '10',
                                   '--test-split', 'validation', '--epochs', '1', '--workers', '0',
                                   '--output', str(tmp_path), '--experiment', 'run']))
    out = capsys.readouterr().out
    assert f'| {TRAIN - PER_SHARD} train images, validation on' in out
    assert f'validation on {PER_SHARD} images held out of train, validation scored at the end' in out
    assert f'val ({PER_SHARD} images)' in out and f'test (validation, {VAL} images' in out
    assert (tmp_path / 'run' / 'test.csv').is_file()


# ------------------------------------------------------------------------------ a stream that is not its index
def _truncate(shard: Path) -> None:
    """ Cut a tar shard in the middle of a member, as an interrupted copy leaves it. """
    payload = shard.read_bytes()
    shard.write_bytes(payload[:len(payload) * 6 // 10 + 100])


def _edit_info(folder: Path, **split_fields) -> None:
    info = json.loads((folder / '_info.json').read_text())
    info['splits']['train'].update(split_fields)
    (folder / '_info.json').write_text(json.dumps(info))


def _wds_flags(folder: Path, out: Path, *extra: str, workers: Optional[str] = '0') -> list:
    return FLAGS + ['--dataset', 'wds/shards', '--data-dir', str(folder), '--epochs', '1', '--output', str(out),
                    '--experiment', 'run', *extra] + (['--workers', workers] if workers else [])


@pytest.mark.parametrize('workers', ['0', '2'])
def test_a_truncated_train_shard_is_named_with_both_counts(tmp_path, workers):
    """ timm's reader read the 9 samples left of a cut shard and filled the epoch by reading others twice; the
    counts of each loader worker (other processes: shared memory) name the shard at the end of the epoch, and the
    new run leaves no folder. """
    folder = write_shards(tmp_path / 'shards')
    _truncate(folder / 'train-000001.tar')
    flags = _wds_flags(folder, tmp_path / 'out', workers=workers)
    with pytest.raises(DataError, match=r"split 'train' of wds/shards are not what _info.json says: "
                                        r"train-000001.tar holds \d+ samples where the index says 16"):
        train(parse_args(flags))
    assert not (tmp_path / 'out' / 'run').exists()


def test_a_shard_damaged_between_epochs_stops_the_run_before_its_checkpoint(tmp_path, interrupted):
    folder = write_shards(tmp_path / 'shards')
    flags = _wds_flags(folder, tmp_path / 'out')
    flags[flags.index('--epochs') + 1] = '2'
    with interrupted():
        train(parse_args(flags))
    _truncate(folder / 'train-000002.tar')
    run = tmp_path / 'out' / 'run'
    with pytest.raises(DataError, match=r'train-000002.tar holds \d+ samples where the index says 16.*stops before'):
        train(parse_args(flags + ['--resume', str(run)]))
    assert (run / 'checkpoint-1').is_dir() and not (run / 'checkpoint-2').exists()
    assert (run / 'last').resolve().name == 'checkpoint-1'


def test_a_truncated_validation_shard_is_named_before_a_score(tmp_path):
    """ The validation stream announced 16 images and scored fewer: now it is refused before a score is said. """
    folder = write_shards(tmp_path / 'shards')
    _truncate(folder / 'validation-000000.tar')
    with pytest.raises(DataError, match=r"split 'validation' .* validation-000000.tar holds \d+ samples where the "
                                        r"index says 16"):
        train(parse_args(_wds_flags(folder, tmp_path / 'out')))


@pytest.mark.parametrize('fields, message', [
    (dict(num_samples=100), 'says num_samples 100 but its shard_lengths add up to 64'),
    (dict(num_samples=40), 'says num_samples 40 but its shard_lengths add up to 64'),
    (dict(shard_lengths=[16, 16, 16]), 'lists 4 shard files but 3 shard_lengths'),
])
def test_an_index_that_disagrees_with_itself_is_refused_before_training(tmp_path, fields, message):
    folder = write_shards(tmp_path / 'shards')
    _edit_info(folder, **fields)
    with pytest.raises(DataError, match=message):
        train(parse_args(_wds_flags(folder, tmp_path / 'out')))
    assert not (tmp_path / 'out').exists()


def test_shard_lengths_that_disagree_with_the_shards_are_named(tmp_path):
    """ shard_lengths 4 x 40 over shards of 16: timm read every sample about 2.5 times an epoch. """
    folder = write_shards(tmp_path / 'shards')
    _edit_info(folder, shard_lengths=[40] * SHARDS, num_samples=40 * SHARDS)
    with pytest.raises(DataError, match=r'train-00000\d.tar holds 16 samples where the index says 40.* \(and 1 more\)'):
        train(parse_args(_wds_flags(folder, tmp_path / 'out')))


@pytest.mark.parametrize('label', [7, -1, -100])
def test_a_label_outside_the_classes_is_named_by_shard_and_key(tmp_path, label):
    """ 7 >= 2 classes, -1, and -100 (which the loss would ignore): refused naming the sample and its shard, where
    the loss reported `index 7 is out of bounds for dimension 1 with size 2`. """
    folder = write_shards(tmp_path / 'shards', labels={21: label})
    with pytest.raises(DataError, match=rf"sample '000021' of shard .*train-000001.tar has label {label}, outside the "
                                        r"2 classes \(0 to 1\)"):
        train(parse_args(_wds_flags(folder, tmp_path / 'out')))


@pytest.mark.parametrize('extra, message', [
    (['-b', '4096'], '64 training samples per epoch do not fill one global batch of 4096'),
    (['-b', '100000'], 'do not fill one global batch of 100000'),
    (['--train-num-samples', '1000'], '--train-num-samples 1000 is more than the 64 samples'),
    (['-b', '32', '--workers', '4'], r'64 training samples per epoch cannot fill batches of 32 for each of the 4 '
                                     r'readers .*pass -b 16 or less, or fewer --workers'),
])
def test_a_batch_or_sample_count_the_stream_cannot_give_is_refused_up_front(tmp_path, shards, extra, message):
    """ Before any batch or run folder: -b 100000 over 64 samples ran a machine out of memory (timm's reader
    repeats samples until each reader's batches are full). """
    with pytest.raises(DataError, match=message):
        train(parse_args(_wds_flags(shards, tmp_path / 'out', *extra, workers=None)))
    assert not (tmp_path / 'out').exists()


def test_loader_workers_are_lowered_until_each_fills_its_batches(capsys):
    from types import SimpleNamespace
    info = SimpleNamespace(filenames=[f'{i}.tar' for i in range(4)], shard_lengths=[16] * 4, name='train')
    reader = SimpleNamespace(split_info=info, num_samples=64)
    printer = SimpleNamespace(print=print)
    assert data._stream_workers(reader, 'wds', 1, None, 4, printer, samples=64, batch_size=32) == 2
    assert data._stream_workers(reader, 'wds', 1, None, 4, printer, samples=64, batch_size=8) == 4


def test_a_shard_folder_without_its_index_names_the_flag(tmp_path):
    folder = write_shards(tmp_path / 'shards')
    (folder / '_info.json').unlink()
    with pytest.raises(DataError, match=r'has no _info.json .* --train-split "train-\{000000..000003\}.tar\|64"'):
        train(parse_args(_wds_flags(folder, tmp_path / 'out')))
    assert not (tmp_path / 'out').exists()


def test_a_streamed_validation_split_scores_what_it_announces(tmp_path, shards):
    """ A streamed evaluation is read whole: a --val-num-samples other than its index is refused up front, and a
    stream without an index that gives another count than announced is refused before a score. """
    with pytest.raises(DataError, match='--val-num-samples 10: a streamed evaluation split is read whole'):
        train(parse_args(_wds_flags(shards, tmp_path / 'out', '--val-num-samples', '10')))
    from types import SimpleNamespace
    import torch

    class Announced(torch.utils.data.IterableDataset):  # a stream that says 10 and gives 16
        reader = None

        def __iter__(self):
            return iter([(torch.zeros(3), 0)] * 16)

        def __len__(self):
            return 10
    stream = data._Stream(Announced(), 'hfids', 'hfids/x', 'validation', CLASSES, False, 0)
    accelerator = SimpleNamespace(device=torch.device('cpu'), num_processes=1, gather=lambda t: t, is_main_process=True)
    loader = data._CheckedLoader(torch.utils.data.DataLoader(stream, batch_size=4), stream, accelerator, False)
    with pytest.raises(DataError, match="split 'validation' of hfids/x gave 16 samples where 10 were announced"):
        list(loader)


def test_integer_labelled_shards_train_under_their_indices(tmp_path, capsys):
    """ timm trains shards without label_names: so do we, with the model's class count (or --num-classes), said
    once; the Hub folder names the classes by index. """
    folder = write_shards(tmp_path / 'shards')
    info = json.loads((folder / '_info.json').read_text())
    del info['label_names']
    (folder / '_info.json').write_text(json.dumps(info))
    train(parse_args(_wds_flags(folder, tmp_path / 'out')))
    out = capsys.readouterr().out
    assert out.count('has integer labels without class names') == 1
    assert 'training a 10-class classifier (the default of diracnet34_1_cifar' in out and '"label_names"' in out
    config = json.loads((tmp_path / 'out' / 'run' / 'hub-folded' / 'config.json').read_text())
    assert config['label_names'] == [str(i) for i in range(10)]
    more = write_shards(tmp_path / 'more', labels={5: 3})  # --num-classes 3 names 0, 1, 2: label 3 is refused
    (more / '_info.json').write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"label 3, outside the 3 classes .*or pass --num-classes"):
        train(parse_args(_wds_flags(more, tmp_path / 'out2', '--num-classes', '3')))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_name_a_truncated_shard_once(tmp_path):
    """ 2 ranks x 2 loader workers: the rank whose worker read the cut shard knows its count; the gather at the end
    of the epoch tells every rank, rank 0 names the shard once, and the new run leaves no folder. """
    folder = write_shards(tmp_path / 'shards')
    _truncate(folder / 'train-000003.tar')
    out = _launch(None, FLAGS + ['--dataset', 'wds/shards', '--data-dir', str(folder), '--workers', '2', '--epochs',
                                 '1', '--output', str(tmp_path / 'out'), '--experiment', 'run'], ok=False)
    errors = [line for line in out.splitlines() if 'timm-dirac-train: error:' in line]
    assert len(errors) == 1 and re.search(r'train-000003.tar holds \d+ samples where the index says 16', errors[0]), \
        out[-3000:]
    assert 'gloo' not in out and not (tmp_path / 'out' / 'run').exists()
