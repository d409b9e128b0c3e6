""" timm_dirac.train: real training runs on the shipped CIFAR-10 sample (CPU, a few seconds per epoch).

One process: loss falls, accuracy beats chance, checkpoints/links/summary/Hub folders appear, and 1 epoch + resume
gives bit-identical weights to 2 straight epochs. Two processes (`accelerate launch --multi_gpu`, gloo on CPU):
distinct samples per rank, identical weights, global batch = 2 x per-rank batch, every val sample counted once.
Config precedence and the one-line errors for bad input; kills at every step of a checkpoint save resume bit for
bit; and the hostile cases: a damaged checkpoint file, a finished or empty run folder, a resume with other data
flags or into a folder another process trains in, Ctrl-C, run folders outside --output. SIGTERM stops at the next
step with a checkpoint that resumes at the same sample; what a resume changes is said once and recorded in args.yaml
(the same data at another path recognised, --epochs below the epochs done refused); configs with aliases and every
numeric flag out of bounds are refused before any work; the shipped configs train from a wheel.
"""
import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch
import yaml
from PIL import Image

import timm_dirac  # noqa: F401  registers the models
import timm_dirac.train as train_module
from timm_dirac.train import CheckpointError, ConfigError, main, parse_args, train
from timm_dirac.train.checkpoints import verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')
SAMPLE = ROOT / 'timm_dirac' / 'assets' / 'cifar10_sample'

# a 3-layer DiracNet (widths 16/32/64), tiny enough for seconds per epoch
TINY = ['--model', 'diracnet34_1_cifar', '--model-kwargs', 'layers=(1,1,1)', '--dataset', f'hfds/{SAMPLE}',
        '--holdout', '1000', '--opt', 'momentum', '--lr', '0.05', '--sched', 'step', '--decay-epochs', '1',
        '--decay-rate', '0.5', '--warmup-epochs', '0', '--workers', '1']


def _summary(run_dir: Path):
    with open(run_dir / 'summary.csv') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_train_learns_checkpoints_and_resumes_exactly(tmp_path, interrupted, capsys):
    """ 2 epochs straight vs interrupted after epoch 1 + --resume: same weights, EMA and metrics, bit for bit. """
    args = TINY + ['--train-num-samples', '1024', '--val-num-samples', '200', '-b', '32', '--output', str(tmp_path),
                   '--model-ema', '--model-ema-decay', '0.9', '--amp', '--amp-dtype', 'bfloat16', '--channels-last',
                   '--test-split', 'test']
    straight = train(parse_args(args + ['--epochs', '2', '--experiment', 'straight']))
    run = tmp_path / 'straight'
    rows = _summary(run)
    assert [r['epoch'] for r in rows] == [1, 2]
    assert rows[1]['train_loss'] < rows[0]['train_loss']
    assert rows[1]['val_loss'] < rows[0]['val_loss']
    assert rows[1]['val_top1'] > 15  # chance is 10%; 200 images
    assert [r['lr'] for r in rows] == [0.05, 0.025]
    assert os.readlink(run / 'last') == 'checkpoint-2'
    verify_checkpoint(run / 'last')  # whole: every file as its save wrote it
    assert (run / 'best').resolve().parent == run
    assert yaml.safe_load((run / 'args.yaml').read_text())['model_kwargs'] == {'layers': [1, 1, 1]}
    assert not list(run.glob('.*'))  # no leftover of a save
    out = capsys.readouterr().out
    assert 'validation on 200 images held out of train, test scored at the end' in out
    with open(run / 'test.csv') as f:
        (test,) = list(csv.DictReader(f))
    assert test['split'] == 'test' and test['count'] == '1000' and float(test['top1']) > 15
    assert f'test (test, 1000 images, best checkpoint EMA, fp32): loss {float(test["loss"]):.4f}' in out
    card = (run / 'hub-folded' / 'README.md').read_text()
    assert f'{round(float(test["top1"]), 4)}' in card and 'scored once on test in fp32' in card  # not in bf16
    for form in ('train', 'folded'):
        assert {'model.safetensors', 'config.json', 'README.md'} <= {p.name for p in (run / f'hub-{form}').iterdir()}

    # the same run, interrupted right after its first checkpoint, then resumed with the same flags
    with interrupted():
        train(parse_args(args + ['--epochs', '2', '--experiment', 'resumed']))
    resumed_run = tmp_path / 'resumed'
    assert os.readlink(resumed_run / 'last') == 'checkpoint-1'
    assert [r['epoch'] for r in _summary(resumed_run)] == [1]
    resumed = train(parse_args(args + ['--epochs', '2', '--resume', str(resumed_run / 'last')]))
    assert 'schedule flags changed' not in capsys.readouterr().out  # the scheduler state was restored
    assert os.readlink(resumed_run / 'last') == 'checkpoint-2'
    assert [r['epoch'] for r in _summary(resumed_run)] == [1, 2]

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = torch.load(run / 'last' / 'train_state.pt', weights_only=True)['ema']
    ema_b = torch.load(resumed_run / 'last' / 'train_state.pt', weights_only=True)['ema']
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    metrics = ('train_loss', 'train_top1', 'val_loss', 'val_top1', 'val_top5', 'ema_val_top1')
    assert [rows[1][m] for m in metrics] == [_summary(resumed_run)[1][m] for m in metrics]

    # an existing run folder is never reused silently
    with pytest.raises(ConfigError, match='exists'):
        train(parse_args(args + ['--epochs', '1', '--experiment', 'straight']))


PROBE = ROOT / 'tests' / 'rank_probe.py'  # trains, then dumps each rank's weights and the samples it loaded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_launch(tmp_path):
    """ Two gloo ranks through `accelerate launch --multi_gpu --num_processes 2` on CPU. """
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(_free_port()), str(PROBE), str(tmp_path), 'ddp',
           *TINY, '--workers', '0', '--train-num-samples', '256', '--val-num-samples', '101', '-b', '16',
           '--epochs', '1', '--output', str(tmp_path), '--experiment', 'ddp']
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '2 process(es) on cpu' in proc.stdout
    assert 'global batch 16 x 2 x 1 = 32' in proc.stdout
    assert 'val (101 images)' in proc.stdout

    r0, r1 = (torch.load(tmp_path / f'rank{r}-ddp.pt', weights_only=True) for r in (0, 1))
    for k, v in r0['weights'].items():
        assert torch.equal(v, r1['weights'][k]), k
    train0 = [i for s, i in r0['seen'] if s == 'train']
    train1 = [i for s, i in r1['seen'] if s == 'train']
    assert len(train0) == len(train1) == 128  # 8 steps of 16 per rank
    assert not set(train0) & set(train1)
    val0 = [i for s, i in r0['seen'] if s == 'eval']
    val1 = [i for s, i in r1['seen'] if s == 'eval']
    # every validation image is read, in the epoch's validation and in the final fp32 score; accelerate pads the
    # ranks' last batches with repeats, which gather_for_metrics drops (the log's 'val (101 images)' above)
    assert len(set(val0 + val1)) == 101 and len(val0) + len(val1) < 2 * (101 + 2 * 16)
    assert not set(val0 + val1) & set(train0 + train1)  # validation images are held out of training
    state = torch.load(tmp_path / 'ddp' / 'last' / 'train_state.pt', weights_only=True)
    assert state['num_updates'] == 256 // (2 * 16)  # one update per global batch of 2 x 16


def test_initial_checkpoint_sets_the_starting_weights(tmp_path, capsys):
    """ --initial-checkpoint starts from a weights file (here: lr 0, so the parameters must come out unchanged);
    the run's first line names its precision. """
    import timm
    from safetensors.torch import save_file

    start = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1), num_classes=10)
    for p in start.parameters():
        torch.nn.init.normal_(p, std=0.5)
    save_file(start.state_dict(), tmp_path / 'start.safetensors')
    model = train(parse_args(TINY + [
        '--initial-checkpoint', str(tmp_path / 'start.safetensors'), '--lr', '0', '--epochs', '1', '-b', '32',
        '--train-num-samples', '64', '--val-num-samples', '8', '--output', str(tmp_path), '--experiment', 'init']))
    for name, p in start.named_parameters():
        torch.testing.assert_close(model.get_parameter(name), p, rtol=0, atol=0, msg=name)
    out = capsys.readouterr().out
    assert out.startswith('precision: fp32 (no --amp') and out.count('precision') == 1  # one line says it


CONFIGS = sorted((ROOT / 'train_configs').glob('*.yaml'))
# the configs that reproduce the authors' recipes (github.com/szagoruyko/diracnets)
AUTHORS_RECIPES = {'diracnet18_in1k', 'diracnet34_in1k', 'diracnet28_10_cifar10', 'diracnet34_2_cifar10'}


@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: p.stem)
def test_the_authors_recipes_decay_every_parameter(config):
    """ The authors' train.py gives weight decay to every parameter, alpha, beta and BatchNorm included: the configs
    of their recipes build an optimizer that does the same, the others timm's grouping (no decay on 1-d ones). """
    import timm
    args = parse_args(['--config', str(config)])
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1))
    optimizer = train_module.build_optimizer(model, args, lr=0.1)
    decay = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    alpha, bn = model.stages[0].blocks[0].conv.alpha, model.stages[0].blocks[0].bn.weight
    assert decay[id(model.stem.conv.weight)] == args.weight_decay
    authors = config.stem in AUTHORS_RECIPES
    assert (decay[id(alpha)], decay[id(bn)]) == ((args.weight_decay,) * 2 if authors else (0., 0.))


@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: p.stem)
def test_every_config_builds_its_model(config):
    """ Each config's model and model_kwargs build (on the meta device: shapes only, no memory). """
    args = parse_args(['--config', str(config)])
    with torch.device('meta'):
        model = train_module.create_model(args, args.num_classes, start=False)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize('val', [['--holdout', '64'], ['--holdout', '0', '--val-split', 'test']],
                         ids=['holdout', 'test'])
def test_best_is_never_chosen_on_a_test_split(tmp_path, monkeypatch, capsys, val):
    """ Validation scores that fall after epoch 1: a held-out set chooses epoch 1, a test split is only shown. """
    scores = iter([50., 40., 45.])  # two epochs, then the best checkpoint scored in fp32
    monkeypatch.setattr(train_module, 'evaluate', lambda *a, **k: dict(loss=1., top1=next(scores), top5=90., count=8))
    train(parse_args(TINY + val + ['--train-num-samples', '64', '-b', '32', '--epochs', '2', '--output', str(tmp_path),
                                   '--experiment', 'run']))
    state = torch.load(tmp_path / 'run' / 'last' / 'train_state.pt', weights_only=True)
    out = capsys.readouterr().out
    if '--holdout' in val and '64' in val:
        assert state['best'] == [(50., 1), (40., 2)] and os.readlink(tmp_path / 'run' / 'best') == 'checkpoint-1'
    else:
        assert state['best'] == [(40., 2)] and os.readlink(tmp_path / 'run' / 'best') == 'checkpoint-2'
        assert 'shown only: best = the last epoch' in out and 'best = the last epoch (not chosen on test)' in out


@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: p.stem)
def test_configs_choose_on_held_out_images_and_score_the_test_split_once(config):
    args = parse_args(['--config', str(config)])
    assert args.holdout > 0 and args.test_split, 'validate on held-out train images, score --test-split at the end'


def test_a_short_run_says_why_its_validation_numbers_are_low():
    """ 39 steps of BatchNorm momentum 0.1 leave 0.9^39 = 1.6% of the initial running variance: say so. """
    import timm
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1))
    note = train_module.young_batchnorm(model, 39)
    assert '2% of their initial values' in note and 'about 44 batches' in note
    assert train_module.young_batchnorm(model, 44) == ''
    assert train_module.young_batchnorm(torch.nn.Linear(2, 2), 1) == ''


def test_config_precedence(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model: diracnet18\nbatch_size: 64\nweight_decay: 1e-4\nmodel_kwargs: {layers: [6, 8, 12, 6]}\n'
                   'decay-milestones: [3, 6]\n')
    args = parse_args(['--config', str(cfg), '--batch-size', '8', '--model-kwargs', 'channels=(32,64,128,256)'])
    assert args.model == 'diracnet18'  # YAML over default
    assert args.batch_size == 8  # command line over YAML
    assert args.weight_decay == 1e-4 and isinstance(args.weight_decay, float)  # YAML's '1e-4' string converted
    assert args.decay_milestones == [3, 6]
    assert args.model_kwargs == {'layers': [6, 8, 12, 6], 'channels': (32, 64, 128, 256)}
    assert args.epochs == 300  # default
    assert parse_args([]).batch_size == 128


def test_config_paths_count_from_the_working_directory_then_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'data').mkdir()
    (tmp_path / 'elsewhere' / 'here').mkdir(parents=True)
    cfg = tmp_path / 'configs' / 'c.yaml'
    cfg.write_text('model: diracnet18\ndataset: hfds/../data\ninitial_checkpoint: ../configs/c.yaml\n')
    monkeypatch.chdir(tmp_path / 'elsewhere' / 'here')
    args = parse_args(['--config', str(cfg)])
    assert args.dataset == f'hfds/{tmp_path / "data"}' and args.initial_checkpoint == str(cfg)
    monkeypatch.chdir(tmp_path / 'configs')  # ../data exists from here too: the working directory wins
    assert parse_args(['--config', str(cfg)]).dataset == 'hfds/../data'
    cfg.write_text('model: diracnet18\ndataset: hfds/uoft-cs/cifar10\n')  # not a folder: a Hub id, unchanged
    assert parse_args(['--config', str(cfg)]).dataset == 'hfds/uoft-cs/cifar10'
    monkeypatch.chdir(tmp_path)  # the README's main job from outside the clone
    assert parse_args(['--config', str(ROOT / 'train_configs' / 'quick_cifar10.yaml')]).dataset == f'hfds/{SAMPLE}'


def _fails(capsys, argv, *words):
    """ main(argv) exits non-zero with one error line naming `words`, and writes no run folder. """
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2  # every refusal
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith('timm-dirac-train: error: '), err
    for word in words:
        assert word in last, last
    return last


def test_bad_input_one_error_line_nothing_written(tmp_path, capsys):
    out = ['--output', str(tmp_path / 'out'), '--experiment', 'run', '--epochs', '1']
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text('model: diracnet18\nbatch_sise: 8\n')
    _fails(capsys, ['--config', str(cfg)] + out, "'batch_sise'", 'unknown key')
    _fails(capsys, TINY + out + ['--model', 'diracnet99'], "'diracnet99'", 'diracnet34')
    _fails(capsys, TINY + out + ['-b', '0'], '--batch-size')
    _fails(capsys, TINY + out + ['--initial-checkpoint', str(tmp_path / 'none.safetensors')], 'none.safetensors',
           'not a file')
    _fails(capsys, TINY + out + ['--dataset', f'hfds/{tmp_path}/missing'], 'does not exist')
    _fails(capsys, TINY + out + ['--dataset', '', '--data-dir', str(tmp_path / 'nowhere')], 'does not exist')
    _fails(capsys, TINY + out + ['--num-classes', '100', '--train-num-samples', '64', '--val-num-samples', '8',
                                 '-b', '32'],
           '--num-classes 100', '10 classes')
    assert not (tmp_path / 'out').exists()


def test_unreadable_image_one_error_line(tmp_path, capsys):
    for split in ('train', 'val'):
        for cls in ('cat', 'dog'):
            (tmp_path / 'imgs' / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new('RGB', (32, 32), (60 * i, 0, 200 if cls == 'cat' else 0)).save(
                    tmp_path / 'imgs' / split / cls / f'{i}.png')
    (tmp_path / 'imgs' / 'train' / 'cat' / 'broken.png').write_bytes(b'not an image at all')
    argv = TINY + ['--dataset', '', '--data-dir', str(tmp_path / 'imgs'), '--holdout', '0', '--val-split', 'val',
                   '-b', '9',
                   '--epochs', '1', '--output', str(tmp_path / 'out'), '--experiment', 'run']
    _fails(capsys, argv, 'broken.png', 'cannot read image')
    assert not (tmp_path / 'out' / 'run').exists()  # a new run that failed before its first checkpoint


@pytest.mark.slow
def test_imagenet_path_mixup_accumulation_ema(tmp_path):
    """ Image folders, timm's transforms (RandAugment) at 96 px, mixup/cutmix, gradient accumulation, clipping, EMA. """
    for split in ('train', 'val'):
        for c, cls in enumerate(('cat', 'dog', 'fox')):
            (tmp_path / 'imgs' / split / cls).mkdir(parents=True)
            for i in range(8):
                Image.new('RGB', (120, 100), (80 * c, 30 * i, 90)).save(tmp_path / 'imgs' / split / cls / f'{i}.jpg')
    args = ['--model', 'diracnet18', '--model-kwargs', 'layers=(1,1,1,1)', 'channels=(16,32,64,128)', '--img-size', '96',
            '--data-dir', str(tmp_path / 'imgs'), '--val-split', 'validation', '-b', '4', '--epochs', '1',
            '--aa', 'rand-m9-mstd0.5', '--mixup', '0.2', '--cutmix', '1.0', '--grad-accum-steps', '2',
            '--clip-grad', '1.0', '--model-ema', '--workers', '1', '--output', str(tmp_path), '--experiment', 'in']
    model = train(parse_args(args))
    assert model.num_classes == 3  # from the dataset, the model default (1000) replaced
    state = torch.load(tmp_path / 'in' / 'last' / 'train_state.pt', weights_only=True)
    assert state['num_updates'] == 24 // 4 // 2
    row = _summary(tmp_path / 'in')[0]
    assert 0 < row['train_loss'] < 10 and 'ema_val_top1' in row
    config = yaml.safe_load((tmp_path / 'in' / 'hub-folded' / 'config.json').read_text())
    assert config['model_args']['inference_mode'] is True and config['num_classes'] == 3
    assert config['label_names'] == ['cat', 'dog', 'fox']  # the class folders, in label order
    card = (tmp_path / 'in' / 'hub-folded' / 'README.md').read_text()
    assert 'v2_in1k' not in card and '69.63' not in card and 'modelzoo-networks' not in card, \
        "a run of diracnet18 is not the authors' release"


def test_evaluate_counts_every_sample_once():
    from accelerate import Accelerator
    from torch.utils.data import TensorDataset

    from torch.utils.data import DataLoader

    from timm_dirac.train import evaluate

    torch.manual_seed(0)
    x, y = torch.randn(37, 3, 8, 8), torch.randint(0, 10, (37,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))
    accelerator = Accelerator(cpu=True)
    metrics = evaluate(model, accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=8)), accelerator)
    with torch.no_grad():
        logits = model(x)
    assert metrics['count'] == 37
    assert metrics['top1'] == pytest.approx(100 * (logits.argmax(1) == y).sum().item() / 37)
    assert metrics['top5'] == pytest.approx(100 * (logits.topk(5).indices == y[:, None]).any(1).sum().item() / 37)
    assert metrics['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_validation_is_named_by_what_it_runs_on():
    args = parse_args(TINY + ['--holdout', '500', '--val-num-samples', '50'])
    assert train_module._val_name(args) == '50 images held out of train'
    assert train_module._val_name(parse_args(TINY + ['--holdout', '500'])) == '500 images held out of train'
    assert train_module._val_name(parse_args(TINY + ['--holdout', '0', '--val-split', 'val'])) == 'val'


@pytest.mark.slow  # 1 to 20 s on 2 shared cores
def test_diracify_trains_a_plain_timm_net_that_folds_back(tmp_path, capsys):
    """ --diracify: the plain net trains in Dirac form (the plan is printed first), the checkpoint holds alpha/beta,
    and timm's reparameterize_model gives back the original architecture's convs with the same outputs. """
    import timm
    from timm.utils import reparameterize_model

    from timm_dirac import DiracifiedConv2d

    args = ['--model', 'test_resnet', '--img-size', '32', '--diracify', '--dataset', f'hfds/{SAMPLE}', '--val-split',
            'test', '--train-num-samples', '256', '--val-num-samples', '64', '-b', '32', '--epochs', '1',
            '--warmup-epochs', '0', '--lr', '0.05', '--workers', '0', '--output', str(tmp_path), '--experiment', 'run']
    model = train(parse_args(args)).eval()
    out = capsys.readouterr().out
    assert 'diracify: 11 conv(s) Dirac-parameterized, 4 left alone' in out
    assert '  kept conv1.0: stride (2, 2)' in out
    assert isinstance(model.layer1[0].conv1, DiracifiedConv2d)
    assert model.layer1[0].conv1.alpha.detach().ne(1).any()  # trained
    from accelerate.utils import SAFE_WEIGHTS_NAME
    from safetensors.torch import load_file
    assert 'layer1.0.conv1.alpha' in load_file(tmp_path / 'run' / 'last' / SAFE_WEIGHTS_NAME)
    folded = reparameterize_model(model)
    original = timm.create_model('test_resnet', num_classes=10)
    original.load_state_dict(folded.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(original.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_diracify_from_an_initial_checkpoint_keeps_its_function(tmp_path):
    """ --diracify with --initial-checkpoint (plain weights) starts from the checkpoint's function (alpha=0,
    beta=||W||): with lr 0 the Dirac-parameterized model computes what the checkpoint's plain model does. """
    import timm
    from safetensors.torch import save_file

    from timm_dirac import DiracifiedConv2d

    torch.manual_seed(0)
    start = timm.create_model('test_resnet', num_classes=10)
    with torch.no_grad():  # BatchNorm affine weights away from 1 and 0, so that each conv's scale shows
        for bn in [m for m in start.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    save_file(start.state_dict(), tmp_path / 'start.safetensors')
    model = train(parse_args([
        '--model', 'test_resnet', '--img-size', '32', '--diracify', '--initial-checkpoint',
        str(tmp_path / 'start.safetensors'), '--num-classes', '10', '--dataset', f'hfds/{SAMPLE}', '--val-split',
        'test', '--lr', '0', '--warmup-epochs', '0',
        '--epochs', '1', '-b', '32', '--train-num-samples', '64', '--val-num-samples', '8', '--workers', '0',
        '--output', str(tmp_path), '--experiment', 'init']))
    assert sum(isinstance(m, DiracifiedConv2d) for m in model.modules()) > 5  # the convs were diracified
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():  # train mode: BatchNorm normalises with the batch's statistics, not the running ones the
        # epoch moved, so both models compute their weights' function
        torch.testing.assert_close(model.train()(x), start.train()(x), rtol=1e-4, atol=1e-4)


def test_diracify_bad_input_one_error_line(tmp_path, capsys):
    out = ['--output', str(tmp_path / 'out'), '--experiment', 'run', '--epochs', '1']
    _fails(capsys, TINY + out + ['--diracify'], '--diracify', 'already has Dirac-parameterized convs')
    _fails(capsys, TINY + out + ['--model', 'test_resnet', '--diracify', '--diracify-layers', 'head.*'],
           "'head.*' matches no conv")
    _fails(capsys, TINY + out + ['--diracify-layers', 'layer1.*'], 'add --diracify')
    _fails(capsys, TINY + out + ['--diracify', '--qat', '--pretrained'], '--qat and --diracify')
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------------------- kills and resume
class Killed(BaseException):
    """ What `kill -9` at that moment would leave: nothing after it runs (no `except Exception` cleanup). """


def _kill_during_save(monkeypatch, epoch: int, step: int) -> List[str]:
    """ Make the run die at the `step`-th file-system step (from 0) of its checkpoint save of `epoch`, whatever the
    files are called: a file write (left half written), a rename or link move (not made), a folder removal (cut
    short after one file). Returns the list of the save's steps seen, which the caller reads to know how many
    there are. """
    import io
    import shutil
    steps, saving = [], [False]
    real_save_checkpoint = train_module.save_checkpoint
    real_torch_save, real_replace, real_rmtree = torch.save, os.replace, shutil.rmtree

    def save_checkpoint(accelerator, run_dir, state):
        saving[0] = state['epoch'] == epoch
        try:
            return real_save_checkpoint(accelerator, run_dir, state)
        finally:
            saving[0] = False

    def now(what: str) -> bool:
        if saving[0]:
            steps.append(what)
            return len(steps) - 1 == step
        return False

    def torch_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and now(f'write {Path(f).name}'):
            buffer = io.BytesIO()
            real_torch_save(obj, buffer)
            Path(f).write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            raise Killed
        return real_torch_save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if now(f'move {Path(src).name} -> {Path(dst).name}'):
            raise Killed
        return real_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if os.path.exists(path) and now(f'remove {Path(path).name}'):
            files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
            if files:
                os.remove(files[0])
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(train_module, 'save_checkpoint', save_checkpoint)
    monkeypatch.setattr(torch, 'save', torch_save)
    monkeypatch.setattr(os, 'replace', replace)
    monkeypatch.setattr(shutil, 'rmtree', rmtree)
    return steps


KILL_ARGS = TINY + ['--train-num-samples', '128', '--val-num-samples', '32', '-b', '32', '--epochs', '3',
                    '--checkpoint-hist', '1', '--eval-metric', 'loss', '--workers', '0']


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
    """ The uninterrupted reference run: its weights and summary. """
    from accelerate.state import AcceleratorState
    out = tmp_path_factory.mktemp('straight')
    model = train(parse_args(KILL_ARGS + ['--output', str(out), '--experiment', 'run']))
    AcceleratorState._reset_state(reset_partial_state=True)
    return model.state_dict(), _summary(out / 'run')


def _assert_consistent(run: Path, epochs: int):
    """ `last` is the newest checkpoint, `best` the best epoch's, no other checkpoint or temp leftover is there,
    summary.csv has every epoch. """
    state = torch.load(run / 'last' / 'train_state.pt', weights_only=True)
    assert os.readlink(run / 'last') == f'checkpoint-{epochs}' and state['epoch'] == epochs
    assert os.readlink(run / 'best') == f'checkpoint-{state["best"][0][1]}' and (run / 'best').is_dir()
    assert {p.name for p in run.glob('checkpoint-*')} == {f'checkpoint-{epochs}'} | {
        f'checkpoint-{e}' for _, e in state['best']}
    assert not list(run.glob('.*')), list(run.glob('.*'))
    assert [r['epoch'] for r in _summary(run)] == list(range(1, epochs + 1))


@pytest.mark.slow
@pytest.mark.parametrize('epoch', [1, 2, 3])
def test_a_kill_at_any_step_of_a_checkpoint_save_resumes_bit_identically(tmp_path, straight_run, epoch):
    """ A run killed at each step in turn of its checkpoint save of `epoch` (the first save; one that moves `best`
    and prunes; the last), resumed with `--resume <run>/last`, repairs its run folder and ends with the weights and
    metrics of the uninterrupted run, bit for bit. """
    from accelerate.state import AcceleratorState
    weights, rows = straight_run
    timing = ('epoch_s', 'train_img_s')
    step = 0
    while True:
        args = KILL_ARGS + ['--output', str(tmp_path), '--experiment', f'kill{step}']
        with pytest.MonkeyPatch.context() as patch:
            steps = _kill_during_save(patch, epoch, step)
            try:
                train(parse_args(args))
                killed = False
            except Killed:
                killed = True
        AcceleratorState._reset_state(reset_partial_state=True)
        if not killed:  # past the save's last step: every one was a kill point
            break
        run = tmp_path / f'kill{step}'
        resumed = train(parse_args(args + ['--resume', str(run / 'last')]))
        AcceleratorState._reset_state(reset_partial_state=True)
        where = f'killed at {steps[step]!r} (step {step}) of the epoch-{epoch} save'
        for k, v in resumed.state_dict().items():
            assert torch.equal(v, weights[k]), f'{where}: {k}'
        _assert_consistent(run, 3)
        assert [{k: v for k, v in r.items() if k not in timing} for r in _summary(run)] == \
            [{k: v for k, v in r.items() if k not in timing} for r in rows], where
        step += 1
    assert step == len(steps) >= 5, steps  # writes, renames, link moves (and removals) were each a kill point


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['garbage', 'foreign', 'garbage_with_its_sha256'])
def test_resume_restores_everything_or_says_what_it_could_not(tmp_path, interrupted, damage):
    """ A corrupt or foreign RNG state file (accelerate skips an unreadable one silently and the run would
    drift from the uninterrupted one) is refused by name, from the checkpoint's SHA-256 list or, where the list was
    rewritten to match, by checking the restored RNG state. """
    args = KILL_ARGS + ['--output', str(tmp_path), '--epochs', '2']
    for name, seed in (('run', '42'), ('other', '7')):
        with interrupted():
            train(parse_args(args + ['--experiment', name, '--seed', seed]))
    from accelerate.utils import RNG_STATE_NAME
    rng = tmp_path / 'run' / 'checkpoint-1' / f'{RNG_STATE_NAME}_0.pkl'  # rank 0's, as accelerate names it
    if damage == 'foreign':  # a valid RNG file, from another run with another seed
        other = tmp_path / 'other' / 'checkpoint-1' / rng.name
        rng.write_bytes(other.read_bytes())
    else:
        rng.write_bytes(b'\x80\x04not a pickle')
    if damage == 'garbage_with_its_sha256':
        from timm_dirac.loading import file_sha256
        sums = tmp_path / 'run' / 'checkpoint-1' / 'checkpoint.sha256'
        sums.write_text(''.join(f'{file_sha256(rng)}  {rng.name}\n' if line.endswith(rng.name) else f'{line}\n'
                                for line in sums.read_text().splitlines()))
    with pytest.raises(CheckpointError, match=rng.name):
        train(parse_args(args + ['--resume', str(tmp_path / 'run')]))


# ------------------------------------------------------------------------------------------- refusals
def test_config_file_mistakes_one_error_line(tmp_path, capsys):
    """ YAML that is broken, carries a python tag, or gives 2.7 epochs is refused like the command line would. """
    out = ['--output', str(tmp_path / 'out'), '--experiment', 'run']
    cases = {'broken': ('model: [diracnet18\n', 'not plain YAML'),
             'tag': ('model: !!python/object/apply:os.system ["echo owned"]\n', 'not plain YAML'),
             'float_epochs': ('model: diracnet18\nepochs: 2.7\n', "'epochs'")}
    for name, (text, words) in cases.items():
        cfg = tmp_path / f'{name}.yaml'
        cfg.write_text(text)
        _fails(capsys, ['--config', str(cfg)] + out, words)
    assert 'owned' not in capsys.readouterr().out
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('flag,value', [('--lr', 'nan'), ('--lr', '-0.1'), ('--weight-decay', 'inf'),
                                        ('--smoothing', '1.5')])
def test_bad_numbers_refused_before_training(tmp_path, capsys, flag, value):
    _fails(capsys, TINY + ['--output', str(tmp_path / 'out'), flag, value], flag)
    assert not (tmp_path / 'out').exists()


def test_unwritable_output_refused_before_training(tmp_path, capsys):
    """ An --output that cannot hold a run folder (here: below a file, which no user can write into) is refused
    before the first epoch, not after it. """
    (tmp_path / 'file').write_text('')
    started = []
    original = train_module.train_one_epoch
    train_module.train_one_epoch = lambda *a, **k: started.append(1) or original(*a, **k)
    try:
        _fails(capsys, TINY + ['--train-num-samples', '64', '--val-num-samples', '8', '-b', '32', '--output',
                               str(tmp_path / 'file' / 'out')], 'cannot write the run folder', '--output')
    finally:
        train_module.train_one_epoch = original
    assert not started


def test_one_class_dataset_refused(tmp_path, capsys):
    for split in ('train', 'val'):
        (tmp_path / 'imgs' / split / 'cat').mkdir(parents=True)
        for i in range(4):
            Image.new('RGB', (32, 32), (60 * i, 0, 0)).save(tmp_path / 'imgs' / split / 'cat' / f'{i}.png')
    argv = TINY + ['--dataset', '', '--data-dir', str(tmp_path / 'imgs'), '--holdout', '0', '--val-split', 'val',
                   '-b', '2', '--output', str(tmp_path / 'out')]
    _fails(capsys, argv, '1 class', 'at least 2')


def test_disk_full_during_a_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    """ torch.save reports a full disk as 'unexpected pos'; the refusal says 'no space left' and what is kept. """
    import shutil

    def full(obj, f, *args, **kwargs):  # every torch.save fails, as on a full disk
        raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 568320 vs 568208')
    monkeypatch.setattr(torch, 'save', full)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1000))
    line = _fails(capsys, KILL_ARGS + ['--output', str(tmp_path), '--experiment', 'run', '--epochs', '1'],
                  'no space left', 'checkpoint-1', 'free space', 'run the command again')
    assert 'unexpected pos' not in line and '--help' not in line  # a full disk is not a flag's mistake


def test_diverging_training_stops_with_the_last_good_checkpoint(tmp_path, interrupted, capsys):
    """ A non-finite loss stops the run before its checkpoint: `last` stays at the good epoch, no NaN row in
    summary.csv, no Hub folder. """
    args = KILL_ARGS + ['--output', str(tmp_path), '--experiment', 'run', '--epochs', '2']
    with interrupted():
        train(parse_args(args))
    line = _fails(capsys, args + ['--resume', str(tmp_path / 'run'), '--lr', '1e30'], 'epoch 2', 'diverged',
                  '--lr', 'checkpoint')
    assert 'epoch 1' in line
    run = tmp_path / 'run'
    assert os.readlink(run / 'last') == 'checkpoint-1' and [r['epoch'] for r in _summary(run)] == [1]
    assert not list(run.glob('checkpoint-2')) and not list(run.glob('hub-*'))


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match='--batch-size'):
        main(TINY + ['--output', str(tmp_path), '-b', '0', '--debug'])


# ------------------------------------------------------------------------------------------- the hostile cases
SHORT = TINY + ['--train-num-samples', '64', '--val-num-samples', '8', '-b', '32', '--epochs', '1', '--workers', '0']


def test_config_values_go_through_their_flags(tmp_path, capsys):
    """ A YAML value is parsed by its flag's own parser: wrong types are refused in one line naming the key, a
    switch takes true/false only, and `debug: true` acts (the traceback instead of the one line). """
    out = ['--output', str(tmp_path / 'out'), '--experiment', 'run']
    for text, words in (('epochs: true\n', "'epochs'"), ('lr: true\n', "'lr'"), ('amp: 1\n', 'true or false'),
                        ('decay_milestones: {a: 1}\n', 'one value'), ('model: [a, b]\n', 'one value')):
        cfg = tmp_path / 'c.yaml'
        cfg.write_text('model: diracnet18\n' + text)
        _fails(capsys, ['--config', str(cfg)] + out, str(cfg), words)
    cfg.write_text('model: diracnet18\ndebug: true\nbatch_size: 0\n')
    with pytest.raises(ConfigError, match='--batch-size'):
        main(['--config', str(cfg)] + out)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('flags,words', [
    (['--warmup-epochs', '-1'], ['--warmup-epochs', 'at least 0']),
    (['--decay-milestones', '-5'], ['--decay-milestones', 'at least 1']),
    (['--model-kwargs', 'layers'], ['--model-kwargs', 'key=value']),
    (['--experiment', '../../x'], ['--experiment', 'inside --output']),
    (['--experiment', '/tmp/x'], ['--experiment', 'inside --output']),
    (['--dataset', 'hfds/'], []),
])
def test_impossible_flags_refused_in_one_line(tmp_path, capsys, flags, words):
    _fails(capsys, SHORT + ['--output', str(tmp_path / 'out')] + flags, *words)
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'x').exists()


def test_a_changed_byte_in_any_checkpoint_file_is_refused(tmp_path):
    """ verify_checkpoint: every file of a checkpoint is listed in checkpoint.sha256 with its hash; a flipped bit,
    a missing file or an extra one is refused naming the file. """
    from timm_dirac.loading import file_sha256
    from timm_dirac.train.checkpoints import find_resume_checkpoint, verify_checkpoint

    ckpt = tmp_path / 'checkpoint-3'
    ckpt.mkdir()
    for name in ('model.safetensors', 'train_state.pt'):
        (ckpt / name).write_bytes(bytes(range(256)))
    (ckpt / 'checkpoint.sha256').write_text(''.join(f'{file_sha256(p)}  {p.name}\n' for p in sorted(ckpt.iterdir())))
    verify_checkpoint(ckpt)
    data = bytearray((ckpt / 'model.safetensors').read_bytes())
    data[100] ^= 1
    (ckpt / 'model.safetensors').write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match='model.safetensors is not the file this checkpoint saved'):
        verify_checkpoint(ckpt)
    (ckpt / 'model.safetensors').unlink()
    with pytest.raises(CheckpointError, match='model.safetensors is missing'):
        verify_checkpoint(ckpt)
    (ckpt / 'extra.bin').write_bytes(b'')
    with pytest.raises(CheckpointError, match='extra.bin is not in checkpoint.sha256'):
        verify_checkpoint(ckpt)
    (ckpt / 'checkpoint.sha256').unlink()  # a checkpoint folder no save made: never resumed, never pruned
    with pytest.raises(CheckpointError, match='checkpoint-3 has no checkpoint.sha256'):
        find_resume_checkpoint(str(tmp_path))


@pytest.mark.slow
def test_a_finished_run_resumed_exports_only_what_is_missing_and_never_from_a_damaged_best(tmp_path, capsys):
    """ A finished run resumed says so and writes nothing new (no hub-train-1); with its Hub folders deleted it
    writes them again, and a bit flipped in the best checkpoint's weights is refused before anything is written. """
    args = SHORT + ['--output', str(tmp_path), '--experiment', 'run', '--test-split', 'test[:16]']
    train(parse_args(args))
    run = tmp_path / 'run'
    before = sorted(p.name for p in run.iterdir())
    assert {'hub-train', 'hub-folded', 'test.csv'} <= set(before)
    capsys.readouterr()
    main(args + ['--resume', str(run)])
    assert 'is finished (epoch 1 of 1) and exported; nothing to do' in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == before

    import shutil
    shutil.rmtree(run / 'hub-folded')
    main(args + ['--resume', str(run)])
    assert sorted(p.name for p in run.iterdir()) == before

    for form in ('train', 'folded'):
        shutil.rmtree(run / f'hub-{form}')
    from accelerate.utils import SAFE_WEIGHTS_NAME
    weights = run / 'best' / SAFE_WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    _fails(capsys, args + ['--resume', str(run)], weights.name, 'not the file this checkpoint saved')
    assert not list(run.glob('hub-*'))


@pytest.mark.slow
def test_a_run_folder_left_empty_by_a_kill_starts_over_either_way(tmp_path):
    """ A kill between the run folder's mkdir and its args.yaml (what an older version could leave): a fresh start
    with that --experiment and a --resume of it both train, neither is refused. """
    for how in ('fresh', 'resume'):
        (tmp_path / how).mkdir()
        flags = ['--experiment', how] if how == 'fresh' else ['--resume', str(tmp_path / how)]
        train(parse_args(SHORT + ['--output', str(tmp_path)] + flags))
        assert os.readlink(tmp_path / how / 'last') == 'checkpoint-1' and (tmp_path / how / 'args.yaml').is_file()
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize('flag,value', [('--train-num-samples', '96'), ('--holdout', '500'), ('--seed', '7')])
def test_resume_with_other_data_flags_is_refused(tmp_path, capsys, flag, value):
    from timm_dirac.train.checkpoints import create_run_folder

    create_run_folder(tmp_path / 'run', yaml.safe_dump(vars(parse_args(SHORT)), sort_keys=False))
    _fails(capsys, SHORT + ['--output', str(tmp_path), '--resume', str(tmp_path / 'run'), flag, value], flag,
           'args.yaml')


def test_a_resume_into_a_folder_another_process_trains_in_is_refused(tmp_path, capsys):
    from timm_dirac.train.checkpoints import create_run_folder, lock_run_folder

    create_run_folder(tmp_path / 'run', yaml.safe_dump(vars(parse_args(SHORT)), sort_keys=False))
    with lock_run_folder(tmp_path / 'run'):
        line = _fails(capsys, SHORT + ['--resume', str(tmp_path / 'run')], 'another process is training in')
    assert 'free space' not in line


def test_ctrl_c_prints_one_line_naming_the_run_to_resume(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, 'train_one_epoch', interrupt)
    with pytest.raises(SystemExit) as exc:
        main(SHORT + ['--output', str(tmp_path), '--experiment', 'run'])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and 'Traceback' not in err
    (line,) = [l for l in err.splitlines() if l.startswith('timm-dirac-train')]
    assert f'--resume {tmp_path / "run"}' in line


# ------------------------------------------------------------------------------------------- pre-emption
class SigtermNotHandled(Exception):
    pass


@pytest.fixture
def sigterm_at(monkeypatch):
    """ `sigterm_at(step)`: this process gets SIGTERM during its `step`-th training step (from 1; 0: only guard), as
    from a scheduler. A SIGTERM the run leaves unhandled fails the test (instead of ending pytest). """
    import signal
    import timm_dirac.train.loop as loop

    def unhandled(signum, frame):
        raise SigtermNotHandled
    previous = signal.signal(signal.SIGTERM, unhandled)
    accuracy = loop.accuracy

    def at(step: int) -> None:
        steps = [0]

        def counting(*args, **kwargs):
            steps[0] += 1
            if steps[0] == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return accuracy(*args, **kwargs)
        monkeypatch.setattr(loop, 'accuracy', counting)
    yield at
    signal.signal(signal.SIGTERM, previous)


def _record_samples(monkeypatch) -> List[int]:
    """ The indices of the training images read, in order (workers 0: read in this process). """
    import timm_dirac.data as data
    seen, get = [], data.Images.__getitem__

    def record(self, index):
        if self.transform is not None and any(type(t).__name__ == 'RandomCrop' for t in self.transform.transforms):
            seen.append(index)
        return get(self, index)
    monkeypatch.setattr(data.Images, '__getitem__', record)
    return seen


SIGTERM_ARGS = SHORT + ['-b', '16', '--epochs', '2']  # 4 batches an epoch


def _stopped_by_sigterm(capsys, argv) -> str:
    """ main(argv) stopped by SIGTERM: exit code 143, one line on stderr, which is returned (with stdout). """
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 143 and 'Traceback' not in err  # a shell's code for a process SIGTERM ended
    (line,) = [l for l in err.splitlines() if l.startswith('timm-dirac-train')]
    return line + '\n' + out


def test_sigterm_stops_at_the_next_step_with_a_checkpoint_there(tmp_path, sigterm_at, capsys):
    """ SIGTERM during step 2 of epoch 1: the run stops after that step, writes `checkpoint-0-step2` (verified,
    `last`), and says in one line the run to resume; no traceback, exit code 143. """
    run = tmp_path / 'run'
    sigterm_at(2)
    line = _stopped_by_sigterm(capsys, SIGTERM_ARGS + ['--output', str(tmp_path), '--experiment', 'run'])
    assert f'--resume {run}' in line and 'checkpoint-0-step2 (epoch 1 at batch 2)' in line
    assert os.readlink(run / 'last') == 'checkpoint-0-step2'
    verify_checkpoint(run / 'last')
    state = torch.load(run / 'last' / 'train_state.pt', weights_only=True)
    assert state['epoch'] == 0 and state['num_updates'] == 2 and state['partial']['samples'] == 32


def test_sigterm_during_evaluation_stops_after_that_epochs_checkpoint(tmp_path, monkeypatch, sigterm_at, capsys):
    import signal
    evaluate = train_module.evaluate

    def evaluate_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(train_module, 'evaluate', evaluate_then_sigterm)
    line = _stopped_by_sigterm(capsys, SIGTERM_ARGS + ['--output', str(tmp_path), '--experiment', 'run'])
    assert 'keeps checkpoint-1 (epoch 1)' in line and f'--resume {tmp_path / "run"}' in line
    assert os.readlink(tmp_path / 'run' / 'last') == 'checkpoint-1'


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_resumes_at_the_same_sample(tmp_path, monkeypatch, sigterm_at, capsys):
    """ Stopped at step 2 of epoch 1 and resumed: the two sessions read epoch 1's images in the uninterrupted run's
    order, each once, then epoch 2 as it does; the updates, the lr and the epochs come out as in that run. """
    straight_seen = _record_samples(monkeypatch)
    main(SIGTERM_ARGS + ['--output', str(tmp_path), '--experiment', 'straight'])
    straight = list(straight_seen)
    straight_seen.clear()
    sigterm_at(2)
    _stopped_by_sigterm(capsys, SIGTERM_ARGS + ['--output', str(tmp_path), '--experiment', 'run'])
    sigterm_at(0)
    first = list(straight_seen)
    straight_seen.clear()
    main(SIGTERM_ARGS + ['--output', str(tmp_path), '--resume', str(tmp_path / 'run')])
    out = capsys.readouterr().out
    assert 'continues at the sample after the 32 its epoch has trained on' in out
    prefetched = 16  # accelerate's loader reads one batch ahead: the stopped session read batch 3 too
    assert first[:32] + straight_seen == straight and len(first) == 32 + prefetched
    run = tmp_path / 'run'
    assert [r['epoch'] for r in _summary(run)] == [1, 2] and not list(run.glob('checkpoint-*-step*'))
    assert [r['lr'] for r in _summary(run)] == [r['lr'] for r in _summary(tmp_path / 'straight')]
    a, b = (torch.load(tmp_path / r / 'last' / 'train_state.pt', weights_only=True) for r in ('straight', 'run'))
    assert a['num_updates'] == b['num_updates'] == 8


@pytest.mark.slow
def test_sigterm_to_the_process_group_leaves_the_loader_workers_to_the_run(tmp_path):
    """ SIGTERM to the whole process group, loader workers included (SLURM signals every process of a step): the
    workers do not die of it (torch's would, and the run would fail at its next batch); the run stops at a step. """
    env = dict(os.environ, OMP_NUM_THREADS='1', PROBE_FAULT='0:40:sigterm-group',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    flags = SHORT + ['-b', '16', '--epochs', '2', '--train-num-samples', '256', '--workers', '2', '--output',
                     str(tmp_path), '--experiment', 'run']
    proc = subprocess.run([sys.executable, str(PROBE), str(tmp_path), 'group', *flags], capture_output=True, text=True,
                          env=env, timeout=300, start_new_session=True)
    assert proc.returncode == 143 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert 'timm-dirac-train: stopped by SIGTERM' in proc.stderr and 'DataLoader worker' not in proc.stderr
    assert list((tmp_path / 'run').glob('checkpoint-0-step*'))


def test_loader_workers_left_by_a_failed_epoch_do_not_hold_the_process_at_exit():
    """ Workers ignore SIGTERM (so a scheduler's reaches the run); multiprocessing ends workers at exit with SIGTERM and
    waits: those a failed epoch leaves waiting for work are killed instead, quietly. """
    code = ('from torch.utils.data import DataLoader, Dataset\n'
            'from timm_dirac.train.loop import workers_leave_sigterm\n'
            'class Broken(Dataset):\n'
            '    def __len__(self): return 64\n'
            '    def __getitem__(self, i):\n'
            '        if i == 9: raise ValueError("unreadable")\n'
            '        return i\n'
            'loader = DataLoader(Broken(), batch_size=2, num_workers=2)\n'
            'workers_leave_sigterm(loader)\n'
            'batches = iter(loader)\n'
            'try:\n'
            '    list(batches)\n'
            'except ValueError:\n'
            '    print("failed as a run does")\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0 and 'failed as a run does' in proc.stdout
    assert 'killed by signal' not in proc.stderr


def test_no_checkpoint_at_sigterm_where_a_save_takes_longer_than_the_grace_period(tmp_path, monkeypatch, sigterm_at,
                                                                                  capsys):
    monkeypatch.setattr(train_module, 'GRACE_SAVE_S', -1)  # every save "took longer"
    sigterm_at(6)  # epoch 2, batch 2: after epoch 1's save was timed
    said = _stopped_by_sigterm(capsys, SIGTERM_ARGS + ['--output', str(tmp_path), '--experiment', 'run'])
    assert 'keeps checkpoint-1 (epoch 1)' in said.splitlines()[0]
    assert 'more than the -1 s that fit in a scheduler\'s usual grace period' in said
    assert sorted(p.name for p in (tmp_path / 'run').glob('checkpoint-*')) == ['checkpoint-1']


# ------------------------------------------------------------------------------------------- what a resume may change
def _fake_checkpoint(run: Path, name: str, args: List[str]) -> None:
    """ A run folder with args.yaml and an (empty, listed) checkpoint folder, enough for what is checked first. """
    from timm_dirac.train.args import args_yaml
    (run / name).mkdir(parents=True)
    (run / name / 'checkpoint.sha256').write_text('')
    (run / 'args.yaml').write_text(args_yaml(parse_args(args)))


def test_epochs_below_the_epochs_done_are_refused(tmp_path, capsys):
    _fake_checkpoint(tmp_path / 'run', 'checkpoint-5', SHORT + ['--epochs', '10'])
    _fails(capsys, SHORT + ['--epochs', '3', '--resume', str(tmp_path / 'run')], '--epochs 3', 'has done 5 epochs',
           '--epochs 5 or more')


@pytest.mark.slow
def test_a_resume_says_and_records_what_it_changes_and_knows_moved_data(tmp_path, interrupted, capsys):
    """ -b 32 -> 16 and the data copied to another folder: accepted, said in one line, recorded in args.yaml (values
    and a comment); other data at the new path is refused naming what differs. """
    import shutil
    args = SHORT + ['--epochs', '2', '--output', str(tmp_path), '--experiment', 'run']
    with interrupted():
        train(parse_args(args))
    run = tmp_path / 'run'
    moved = tmp_path / 'staged' / 'cifar10_sample'
    shutil.copytree(SAMPLE, moved)
    capsys.readouterr()
    moved_args = [a if a != f'hfds/{SAMPLE}' else f'hfds/{moved}' for a in args]
    main(moved_args + ['-b', '16', '--resume', str(run)])
    out = capsys.readouterr().out
    (said,) = [l for l in out.splitlines() if l.startswith('resume: ') and 'recorded' in l]
    assert '--batch-size 32 -> 16' in said and 'recognised as the run\'s' in said and str(moved) in said
    saved = (run / 'args.yaml').read_text()
    assert yaml.safe_load(saved)['batch_size'] == 16 and yaml.safe_load(saved)['dataset'] == f'hfds/{moved}'
    assert '# resumed ' in saved and '--batch-size 32 -> 16' in saved
    assert parse_args(['--config', str(run / 'args.yaml')]).batch_size == 16  # the record works as a config

    import pyarrow.parquet as pq
    other = tmp_path / 'other' / 'data'
    other.mkdir(parents=True)
    for split, rows in (('train', 5000), ('test', 1000)):  # the same classes, fewer train images
        name = f'{split}-00000-of-00001.parquet'
        pq.write_table(pq.read_table(SAMPLE / 'data' / name).slice(0, rows), other / name)
    _fails(capsys, [a if a != f'hfds/{SAMPLE}' else f'hfds/{tmp_path / "other"}' for a in args] +
           ['-b', '16', '--resume', str(run)], 'holds other data', 'train: 10000 in the run, 5000 now')


@pytest.mark.parametrize('was,batch,world,expected', [
    (2, 8, 1, (8, 2)),  # 2 -> 1 process: two accumulation steps
    (1, 16, 2, (8, 1)),  # 1 -> 2: half the batch each
    (4, 32, 8, (16, 1)),
    (2, 128, 3, '2 process(es) with a global batch of 256'),  # refused, naming both counts
])
def test_another_process_count_keeps_the_global_batch_or_is_refused(tmp_path, was, batch, world, expected):
    resume = train_module.Resume(tmp_path, tmp_path / 'checkpoint-3', dict(batch_size=batch, grad_accum_steps=1),
                                 was)
    args = parse_args(SHORT + ['-b', str(batch)])
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(expected)) as e:
            train_module._keep_global_batch(args, resume, world)
        assert f'which {world} processes cannot share' in str(e.value) and 'move' not in str(e.value)
        return
    train_module._keep_global_batch(args, resume, world)
    assert (args.batch_size, args.grad_accum_steps) == expected
    assert args.batch_size * args.grad_accum_steps * world == batch * was
    assert resume.notes == [] if world == was else f'{world} process(es) instead of {was}' in resume.notes[0]


def test_a_checkpoint_inside_an_epoch_resumes_only_where_the_new_batch_reaches_its_sample(tmp_path):
    resume = train_module.Resume(tmp_path, tmp_path / 'checkpoint-2-step3', dict(batch_size=16, grad_accum_steps=1),
                                 1)  # 48 samples into epoch 3
    train_module._keep_global_batch(parse_args(SHORT + ['-b', '24']), resume, 1)  # 2 steps of 24
    with pytest.raises(ConfigError, match='stopped 48 samples into epoch 3'):
        train_module._keep_global_batch(parse_args(SHORT + ['-b', '32']), resume, 1)


def test_a_runs_args_yaml_is_a_config(tmp_path):
    """ args.yaml gives back the run's flags as --config (an earlier version's, with a `config` key, too). """
    from timm_dirac.train.args import args_yaml
    args = parse_args(TINY + ['--model-kwargs', 'layers=(1,1,1)', 'drop_path_rate=0.1', '--scale', '0.5', '1.0'])
    (tmp_path / 'args.yaml').write_text(args_yaml(args))
    again = parse_args(['--config', str(tmp_path / 'args.yaml')])
    assert yaml.safe_load(args_yaml(again)) == yaml.safe_load(args_yaml(args))  # (tuples come back as lists)
    (tmp_path / 'old.yaml').write_text(yaml.safe_dump({**vars(args), 'config': 'train_configs/x.yaml'}))
    assert parse_args(['--config', str(tmp_path / 'old.yaml')]).model == 'diracnet34_1_cifar'


# ------------------------------------------------------------------------------------------- inputs refused first
def test_a_yaml_alias_bomb_is_refused_in_seconds_within_bounded_memory(tmp_path):
    """ Nested aliases inside model_kwargs (a few hundred bytes that expand exponentially) are refused at once; the
    check runs in a child whose address space is capped at 2 GB above what its imports took. """
    import time
    bomb = tmp_path / 'bomb.yaml'
    bomb.write_text('model: diracnet18\na: &a ["x","x","x","x","x","x","x","x","x"]\n'
                    + ''.join(f'{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n'
                              for p, c in zip('abcdefgh', 'bcdefghi'))
                    + 'model_kwargs: {layers: *i}\n')
    assert len(bomb.read_bytes()) < 600
    code = ('import resource, sys\nfrom timm_dirac.train import main\n'
            'used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()\n'
            'resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), resource.RLIM_INFINITY))\n'
            f'main(["--config", {str(bomb)!r}, "--output", {str(tmp_path / "out")!r}])\n')
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and time.perf_counter() - start < 60, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert 'alias' in line and str(bomb) in line and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'out').exists()


def _numeric_flags():
    from timm_dirac.train.args import build_parser
    return [a for a in build_parser()._actions if a.type in (int, float)]


@pytest.mark.parametrize('action', _numeric_flags(), ids=lambda a: a.dest)
def test_every_numeric_flag_refuses_nan_infinity_and_negatives_before_any_work(tmp_path, capsys, action):
    flag = next(s for s in action.option_strings if s.startswith('--'))
    count = action.nargs if isinstance(action.nargs, int) else 1
    for value in (['nan', 'inf', '-1'] if action.type is float else ['-1']):
        _fails(capsys, SHORT + ['--output', str(tmp_path / 'out'), flag] + [value] * count, flag)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('flag,value', [('--decay-epochs', '0'), ('--dist-timeout', '0'), ('--img-size', '0'),
                                        ('--num-classes', '0'), ('--momentum', '1'), ('--mixup-switch-prob', '2'),
                                        ('--seed', str(2 ** 32)), ('--scale', ['0.9', '0.1']),
                                        ('--ratio', ['0', '1'])])
def test_numbers_meaningless_for_their_flag_are_refused(tmp_path, capsys, flag, value):
    _fails(capsys, SHORT + ['--output', str(tmp_path / 'out'), flag] + ([value] if isinstance(value, str) else value),
           flag)
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------------------- the package, the first hour
def test_a_shipped_config_is_found_by_name_with_its_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an empty folder: no train_configs/ here
    for name in ('quick_cifar10.yaml', 'quick_cifar10'):
        args = parse_args(['--config', name])
        assert Path(args.config) == ROOT / 'train_configs' / 'quick_cifar10.yaml'
        assert args.dataset == f'hfds/{SAMPLE}'
    _fails(capsys, ['--config', 'quick_cifar100.yaml'], 'quick_cifar100.yaml not found', 'quick_cifar10.yaml')
    copied = tmp_path / 'mine' / 'quick.yaml'  # a copy elsewhere finds the shipped sample too
    copied.parent.mkdir()
    copied.write_bytes((ROOT / 'train_configs' / 'quick_cifar10.yaml').read_bytes())
    assert parse_args(['--config', str(copied)]).dataset == f'hfds/{SAMPLE}'


def test_without_the_train_extra_one_line_names_it():
    code = 'import sys\nsys.modules["accelerate"] = None\nfrom timm_dirac.train import main\nmain(["--help"])\n'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert 'pip install "timm-dirac[train]"' in line and '-e ".[train]"' in line


def test_torch_and_torchvision_from_two_indexes_get_one_line(tmp_path):
    """ What torchvision raises at import when its build does not match torch's (two package indexes). """
    code = ('import runpy, sys\n'
            'class TwoIndexes:\n'
            '    def find_spec(self, name, path=None, target=None):\n'
            '        if name == "torchvision":\n'
            '            raise RuntimeError("operator torchvision::nms does not exist")\n'
            'sys.meta_path.insert(0, TwoIndexes())\n'
            'sys.argv = ["train.py", "--help"]\n'
            f'runpy.run_path({str(ROOT / "train.py")!r}, run_name="__main__")\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert 'torchvision' in line and 'one index' in line and 'pip install' in line


def test_a_model_input_far_from_the_data_image_size_gets_a_note():
    from types import SimpleNamespace
    from torch.utils.data import Subset
    from timm_dirac.data import open_split
    images = open_split(f'hfds/{SAMPLE}', None, 'train')
    data = SimpleNamespace(train_loader=SimpleNamespace(dataset=Subset(images, [3, 4])))
    note = train_module._image_size_note(data, dict(input_size=(3, 224, 224)))
    assert 'the model takes 224 px inputs and the data\'s images are 32 px' in note and 'upscaled 7x' in note
    assert '--img-size 32' in note
    assert train_module._image_size_note(data, dict(input_size=(3, 32, 32))) == ''
    assert train_module._image_size_note(data, dict(input_size=(3, 64, 64))) == ''  # CIFAR nets at 2x: not far


def test_the_wheel_lists_every_package_and_ships_the_configs():
    """ pyproject lists its packages (a package-dir entry maps train_configs/ into the package): every package
    folder is listed, and the configs are package data. """
    import tomllib
    from setuptools import find_packages
    tool = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
    assert sorted(tool['packages']) == sorted(find_packages(str(ROOT), include=['timm_dirac*']) +
                                              ['timm_dirac.train_configs'])
    assert tool['package-dir']['timm_dirac.train_configs'] == 'train_configs'
    assert tool['package-data']['timm_dirac.train_configs'] == ['*.yaml']


@pytest.mark.slow
def test_the_main_job_trains_from_a_wheel_in_an_empty_folder(tmp_path):
    """ The wheel, installed apart from the clone: `timm-dirac-train --config quick_cifar10.yaml` in an empty folder
    finds the shipped config and the shipped sample (shortened here to one small epoch). """
    import shutil
    src = tmp_path / 'src'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        '.git', '.ci', 'output', 'out', '__pycache__', '*.egg-info', 'build', 'dist', '.pytest_cache', 'bench'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp_path / 'wheel')], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / 'wheel').glob('timm_dirac-*.whl')
    site = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    empty = tmp_path / 'empty'
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS='1')  # the wheel's timm_dirac, not the clone's
    proc = subprocess.run([str(site / 'bin' / 'timm-dirac-train'), '--config', 'quick_cifar10.yaml', '--epochs', '1',
                           '--train-num-samples', '128', '--val-num-samples', '16', '--test-split', 'test[:16]',
                           '-b', '64', '--experiment', 'run'], cwd=empty, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'hfds/{site / "timm_dirac" / "assets" / "cifar10_sample"}' in proc.stdout
    assert (empty / 'output' / 'train' / 'run' / 'hub-folded' / 'model.safetensors').is_file()
