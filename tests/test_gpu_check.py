""" benchmarks/gpu_check.py on a CPU with tiny settings: every section runs and writes only what it measured.

The GPU run itself (benchmarks/gpu_check.sh) is never part of the tests; these run the same code on the CPU with
a tiny DiracNet standing in for the recipes' models (the recipes' epochs, batches and optimizers kept).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / 'timm_dirac' / 'assets' / 'cifar10_sample'
spec = importlib.util.spec_from_file_location('gpu_check', ROOT / 'benchmarks' / 'gpu_check.py')
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

TINY_MODEL = dict(model='diracnet34_1_cifar', model_kwargs=dict(layers=[1, 1, 1]))
EPOCH_FLAGS = '--train-num-samples 64 --val-num-samples 32 --workers 0 -b 16'


@pytest.fixture
def tiny_recipes(tmp_path, monkeypatch):
    """ The recipe configs with a 3-layer DiracNet as their model (everything else as shipped). """
    configs = tmp_path / 'configs'
    configs.mkdir()
    for name in gpu_check.RECIPES:
        recipe = yaml.safe_load((ROOT / 'train_configs' / name).read_text())
        (configs / name).write_text(yaml.safe_dump({**recipe, **TINY_MODEL}))
    monkeypatch.setattr(gpu_check, 'CONFIGS', configs)
    return configs


@pytest.mark.slow
def test_cpu_run_fills_every_section_with_measurements(tmp_path, tiny_recipes):
    out = tmp_path / 'gpu'
    rc = gpu_check.main([
        '--device', 'cpu', '--out', str(out), '--models', 'diracnet34_1_cifar', '--img-size', '32',
        '--precisions', 'bf16', '--batch-sizes', '2', '--repeats', '1', '--warmup', '1', '--min-time', '0',
        '--gemm-size', '64', '--compile-reserve-s', '0', '--train-batch', '2', '--train-img-size', '32',
        '--dataset', str(SAMPLE), '--epochs', '1', '--train-args', EPOCH_FLAGS])
    assert rc == 0
    result = json.loads((out / 'gpu_check.json').read_text())
    assert result['status'] == 'Finished' and not result['skipped'] and not result['failed']

    rows = result['inference']['rows']
    assert [(r['backend'], r['model'], r['form'], r['precision'], r['batch_size']) for r in rows] == [
        ('eager', 'diracnet34_1_cifar', 'folded', 'bf16', 2), ('compile', 'diracnet34_1_cifar', 'folded', 'bf16', 2)]
    for r in rows:
        assert math.isfinite(r['img_per_s']) and r['img_per_s'] > 0 and r['gflop_per_img'] > 0
        assert r['peak_memory_mib'] is None  # PyTorch tracks no CPU memory: nothing is made up
    assert rows[0]['first_call_s'] is None and rows[1]['first_call_s'] > 0  # the compile's own time
    assert set(result['inference']['gemm_peak_gflop_per_s']) == {'bf16'}

    train = {r['recipe']: r for r in result['training']}
    assert set(train) == set(gpu_check.RECIPES)
    for name, r in train.items():
        assert (r['model'], r['batch_size'], r['input_size'], r['peak_memory_mib']) == ('diracnet34_1_cifar', 2, 32,
                                                                                         None)
        holdout = gpu_check.parse_args(['--config', str(tiny_recipes / name)]).holdout  # validation images
        assert r['train_images'] == gpu_check.RECIPES[name] - holdout
        assert r['projected_hours'] == pytest.approx(r['recipe_epochs'] * r['train_images'] / r['img_per_s'] / 3600)
    assert [(train[name]['recipe_epochs'], train[name]['train_images']) for name in sorted(train)] == [
        (200, 45_000), (100, 1_271_167)]
    assert train['diracnet28_10_cifar10.yaml']['precision'] == gpu_check.recipe_precision(
        gpu_check.parse_args(['--amp']), 'cpu')

    epochs = result['epochs']
    assert epochs['status'] == 'finished' and epochs['train_images'] == 64
    assert [r['epoch'] for r in epochs['rows']] == [1] and epochs['rows'][0]['epoch_s'] > 0
    assert epochs['projected_hours'] == pytest.approx(200 * epochs['rows'][0]['epoch_s'] * 45_000 / 64 / 3600)
    assert 'held out' in epochs['validation'] and 0 <= epochs['rows'][0]['val_top1'] <= 100
    assert (epochs['test']['split'], epochs['test']['epoch'], epochs['test']['count']) == ('test', 1, 1000)
    assert '--epochs 1' in epochs['command'] and str(ROOT) not in epochs['command']

    report = (out / 'gpu_check.md').read_text()
    assert report.count('| diracnet34_1_cifar | folded |') == 2
    assert report.count('| diracnet34_1_cifar | 32 | 2 |') == 2
    assert '| 1 | ' in report and 'Projected wall time of the 200-epoch recipe' in report
    assert 'Test top-1 (test split, 1000 images' in report
    assert 'nan' not in report and 'Not measured' not in report
    assert not list(out.glob('.*tmp'))


@pytest.mark.usefixtures('tiny_recipes')
def test_spent_budget_measures_nothing_and_says_so(tmp_path):
    out = tmp_path / 'gpu'
    assert gpu_check.main(['--device', 'cpu', '--out', str(out), '--models', 'diracnet34_1_cifar', '--img-size',
                           '32', '--batch-sizes', '2', '--budget-s', '0', '--dataset', str(SAMPLE)]) == 0
    result = json.loads((out / 'gpu_check.json').read_text())
    assert result['inference']['rows'] == [] and result['training'] == [] and result['epochs'] is None
    assert result['inference']['gemm_peak_gflop_per_s'] == {}
    assert result['skipped'] == ['eager inference (time budget)', 'training step of diracnet34_in1k.yaml (time budget)',
                                 'training step of diracnet28_10_cifar10.yaml (time budget)',
                                 '2 real epoch(s) with train.py (time budget)', 'torch.compile inference (time budget)']
    report = (out / 'gpu_check.md').read_text()
    assert '| diracnet34_1_cifar |' not in report and 'skipped: eager inference (time budget)' in report


def test_refusals_are_one_line(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert gpu_check.main(['--out', str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and 'no CUDA GPU' in err and '--device cpu' in err
    assert gpu_check.main(['--device', 'cpu', '--out', str(tmp_path), '--dataset', str(tmp_path / 'none')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'is not a folder' in err and '--epochs 0' in err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # the shell wrapper runs the whole script in a subprocess: ~12 s
@pytest.mark.skipif(torch.cuda.is_available(), reason='on a GPU machine the wrapper would start the real run')
def test_shell_wrapper_runs_the_script_on_cuda():
    """ gpu_check.sh runs gpu_check.py for CUDA: without a GPU that is its one-line refusal, exit 2. """
    proc = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_check.sh')], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith('gpu_check: error: no CUDA GPU')


@pytest.mark.usefixtures('tiny_recipes')
def test_a_failure_is_reported_and_the_rest_still_runs(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError('CUDA out of memory. Tried to allocate 20.00 GiB')
    monkeypatch.setattr(gpu_check, 'training_step', out_of_memory)
    out = tmp_path / 'gpu'
    assert gpu_check.main(['--device', 'cpu', '--out', str(out), '--models', 'diracnet34_1_cifar', '--img-size', '32',
                           '--precisions', 'bf16', '--batch-sizes', '2', '--backends', 'eager', '--repeats', '1',
                           '--min-time', '0', '--gemm-size', '64', '--epochs', '0']) == 0
    result = json.loads((out / 'gpu_check.json').read_text())
    assert result['status'] == 'Finished' and result['training'] == []
    assert [f['what'] for f in result['failed']] == [f'training step of {name}' for name in gpu_check.RECIPES]
    assert result['failed'][0]['error'] == 'RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB'
    assert len(result['inference']['rows']) == 1  # the eager inference before it was kept
    report = (out / 'gpu_check.md').read_text()
    assert '- failed: training step of diracnet34_in1k.yaml: RuntimeError: CUDA out of memory' in report
