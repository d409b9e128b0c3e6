""" timm_dirac.cli and timm_dirac.errors: every subcommand refuses bad input in one line (exit 2, no traceback,
nothing written); `--debug` shows the traceback instead. Weights that are not finite floats are never converted,
exported or validated. """
from pathlib import Path

import pytest
import torch

import timm
import timm_dirac  # noqa: F401  registers the models
from timm_dirac.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / 'timm_dirac' / 'assets' / 'cifar10_sample'


@pytest.fixture(scope='module')
def bad_weights(tmp_path_factory):
    """ diracnet34_1_cifar weight files damaged in the ways a user meets: NaN, int32, no alpha, empty, truncated. """
    folder = tmp_path_factory.mktemp('weights')
    torch.manual_seed(0)
    good = timm.create_model('diracnet34_1_cifar').state_dict()
    nan = dict(good, **{'stem.conv.weight': good['stem.conv.weight'].clone().fill_(float('nan'))})
    files = {
        'nan': nan,
        'int32': {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in good.items()},
        'no_alpha': {k: v for k, v in good.items() if k != 'stages.0.blocks.0.conv.alpha'},
    }
    for name, state_dict in files.items():
        torch.save(state_dict, folder / f'{name}.pth')
    (folder / 'empty.pth').write_bytes(b'')
    torch.save(good, folder / 'good.pth')
    data = (folder / 'good.pth').read_bytes()
    (folder / 'truncated.pth').write_bytes(data[:len(data) // 2])
    return folder


def _refused(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize('name,words', [
    ('nan', ('NaN', 'stem.conv.weight')), ('int32', ('not floating point', 'int32')),
    ('no_alpha', ('stages.0.blocks.0.conv.alpha',)), ('empty', ('empty',)),
    ('truncated', ('truncated', 'failed reading zip archive'))])
def test_damaged_weights_refused_by_every_command(tmp_path, capsys, bad_weights, name, words):
    path = str(bad_weights / f'{name}.pth')
    _refused(capsys, ['convert', path, '--model', 'diracnet34_1_cifar', '--out', str(tmp_path / 'hub')], *words)
    if name in ('nan', 'empty'):
        _refused(capsys, ['export-onnx', '--model', 'diracnet34_1_cifar', '--checkpoint', path, '--out',
                          str(tmp_path / 'm.onnx'), '--num-images', '4'], *words)
        _refused(capsys, ['validate', '--model', 'diracnet34_1_cifar', '--checkpoint', path, '--dataset',
                          str(SAMPLE), '--split', 'test[:8]', '--no-progress', '--workers', '0'], *words)
    assert not list(tmp_path.iterdir())


def test_another_architecture_named(tmp_path, capsys, bad_weights):
    _refused(capsys, ['convert', str(bad_weights / 'good.pth'), '--model', 'diracnet16_4_cifar', '--out',
                      str(tmp_path / 'hub')], 'diracnet16_4_cifar', 'another DiracNet')


def test_debug_reraises(tmp_path, bad_weights):
    with pytest.raises(ValueError, match='NaN'):
        main(['--debug', 'convert', str(bad_weights / 'nan.pth'), '--model', 'diracnet34_1_cifar', '--out',
              str(tmp_path / 'hub')])
    with pytest.raises(ValueError, match='NaN'):
        main(['convert', '--debug', str(bad_weights / 'nan.pth'), '--model', 'diracnet34_1_cifar', '--out',
              str(tmp_path / 'hub')])


def test_nan_comparison_fails_the_onnx_check():
    """ `nan > tolerance` is False: the check must treat a NaN difference as a failure. """
    from timm_dirac.deploy.backends import onnxruntime as ort_backend
    pytest.importorskip('onnxruntime')
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    images = torch.rand(2, 3, 8, 8)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = f'{folder}/m.onnx'
        ort_backend.export_onnx(model, path, (3, 8, 8), 18)
        with torch.no_grad():
            model[0].weight.fill_(float('nan'))
        with pytest.raises(RuntimeError, match='differs from PyTorch'):
            ort_backend.verify_onnx(path, model, images)


# every numeric flag of every command, with values that mean nothing there: refused by argparse in one line (exit 2)
# before the command runs, so no model is built, no data read and no folder made
NUMERIC_FLAGS = {
    'validate': {'--batch-size': ('0', '-1'), '--workers': ('-1',), '--num-classes': ('0', '-3'),
                 '--img-size': ('0', '-32'), '--crop-pct': ('nan', 'inf', '0', '-0.5', '1.5')},
    'export-onnx': {'--num-images': ('0', '-4'), '--tolerance': ('nan', 'inf', '0', '-0.001'), '--opset': ('x', '1.5')},
    'quantize': {'--num-calib': ('0', '-1'), '--num-eval': ('0',), '--max-drop': ('nan', 'inf', '-0.5', '101'),
                 '--bench-batch': ('0', '-8'), '--repeats': ('0', '-2')},
    'benchmark': {'--batch-sizes': ('0', '-1'), '--img-size': ('0', '-1'), '--repeats': ('0',), '--warmup': ('-1',),
                  '--min-time': ('nan', 'inf', '-1'), '--gemm-sizes': ('0',), '--threads': ('0', '-2')},
    'demo': {'--batch-size': ('0', '-2'), '--repeats': ('0', '-1')},
    'convert': {'--num-classes': ('0', '-10')},
}
REQUIRED = {'validate': ['--dataset', str(SAMPLE)], 'export-onnx': ['--out', 'OUT/m.onnx'],
            'quantize': ['--out', 'OUT/int8'], 'benchmark': ['--out', 'OUT/bench'], 'demo': [],
            'convert': ['x.pth', '--model', 'diracnet34_1_cifar', '--out', 'OUT/hub']}


@pytest.mark.parametrize('command,flag,value', [(c, f, v) for c, flags in NUMERIC_FLAGS.items()
                                                for f, values in flags.items() for v in values])
def test_every_numeric_flag_is_checked_before_work(tmp_path, capsys, command, flag, value):
    argv = [command] + [a.replace('OUT', str(tmp_path)) for a in REQUIRED[command]] + [flag, value]
    err = _refused(capsys, argv, f'argument {flag}: {value!r} is not')
    assert 'timm-dirac ' + command in err
    assert not list(tmp_path.iterdir())


def test_the_numeric_flags_accept_what_means_something():
    import argparse
    from timm_dirac.errors import number
    assert number(int, 1)('3') == 3 and number(float, 0, 100)('0') == 0. and number(float, 0, above=True)('1e-9')
    for parse, text in ((number(int, 0), '-1'), (number(float, 0, 1, above=True), '0'), (number(float), 'nan'),
                        (number(float), '-inf'), (number(int), '2.5')):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
