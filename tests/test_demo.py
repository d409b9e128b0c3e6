""" timm_dirac.deploy.demo (`timm-dirac demo`): builds a DiracNet, folds it, checks both forms agree and times them. """
from timm_dirac.cli import main


def _line(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix))[len(prefix):]


def test_demo_folds_checks_and_times(capsys):
    assert main(['demo', '--model', 'diracnet34_1_cifar', '--batch-size', '2', '--repeats', '2']) == 0
    out = capsys.readouterr().out
    assert 'DiracConv2d' in _line(out, 'train-form layers:') and 'BatchNorm2d' in _line(out, 'train-form layers:')
    assert 'DiracConv2d' not in _line(out, 'folded layers:') and 'BatchNorm2d' not in _line(out, 'folded layers:')
    assert float(_line(out, 'max |folded - train| / max |train| = ').split()[0]) <= 1e-5
    assert 'median of 2 interleaved rounds: train form' in out and 'speedup' in out


def test_demo_refuses_a_batch_or_repeat_count_of_zero_in_one_line(capsys):
    for flag in ('--batch-size', '--repeats'):
        assert main(['demo', '--model', 'diracnet34_1_cifar', flag, '0']) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and f"argument {flag}: '0' is not an integer at least 1" in err, err
