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
