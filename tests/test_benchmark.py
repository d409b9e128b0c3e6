""" `timm-dirac benchmark`: structure of the output (no timing assertions), the summary arithmetic, a peak that no
row can exceed, and benchmarks/plot_benchmark.py drawing the JSON. """
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip('onnxruntime')

import timm_dirac  # noqa: F401  registers the models
from timm_dirac.deploy.benchmark import Case, build_forms, format_table, has_reparameterization, peaks, summarize
from timm_dirac.cli import main

ROW_KEYS = {'model', 'form', 'backend', 'precision', 'batch_size', 'img_per_s', 'latency_ms', 'latency_ms_min',
            'latency_ms_max', 'iters', 'repeats', 'gflop_per_img', 'gflop_per_s', 'peak_fraction', 'vs_resnet',
            'vs_train', 'vs_fp32'}


@pytest.fixture(scope='module')  # builds, exports and quantizes three models: ~1 min on 2 cores
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    rc = main(['benchmark', '--models', 'diracnet18', 'resnet18', '--img-size', '32', '--batch-sizes', '1', '32',
               '--precision', 'fp32', 'bf16', '--backends', 'eager', 'onnxruntime', 'onnxruntime-int8',
               '--repeats', '2', '--warmup', '1', '--min-time', '0', '--gemm-sizes', '64', '--out', str(out)])
    assert rc == 0
    return out, json.loads((out / 'benchmark.json').read_text())


@pytest.mark.slow
def test_benchmark_outputs(tiny_run):
    out, result = tiny_run
    assert set(result['peak']) == {'fp32', 'bf16'}
    assert all(0 < v['gemm_gflop_per_s'] <= v['gflop_per_s'] for v in result['peak'].values())
    rows = result['rows']
    variants = {('diracnet18', 'train'), ('diracnet18', 'folded'), ('resnet18', 'train')}
    # eager: 3 variants x 2 batch sizes x 2 precisions; ONNX Runtime fp32: 3 x 2; int8: deploy forms only, 2 x 2
    assert len(rows) == 12 + 6 + 4
    assert {(r['model'], r['form']) for r in rows} == variants
    assert {(r['model'], r['form']) for r in rows if r['backend'] == 'onnxruntime-int8'} == variants - {
        ('diracnet18', 'train')}
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r['repeats'] == 2 and r['img_per_s'] > 0 and r['gflop_per_img'] > 0
        assert (r['vs_resnet'] is not None) == (r['model'] == 'diracnet18')
        assert (r['vs_train'] is not None) == (r['form'] == 'folded' and r['backend'] != 'onnxruntime-int8')
        assert (r['vs_fp32'] is not None) == (r['precision'] != 'fp32')
        assert (r['peak_fraction'] is not None) == (r['precision'] != 'int8')
        assert r['peak_fraction'] is None or 0 < r['peak_fraction'] <= 1
    assert len(result['load_average_before']) == 3 and result['machine']['torch_threads'] >= 1
    table = (out / 'benchmark.md').read_text()
    assert table.startswith('| model | form |') and table.count('| diracnet18 |') == 14


def test_summarize_ratios():
    def case(model, form, seconds, flops=2e9, batch=32):
        return Case(model, form, 'eager', 'fp32', batch, flops * batch, run=lambda: None, times=[seconds] * 3)
    cases = [
        Case('gemm64', 'gemm', 'eager', 'fp32', 1, 100e9, run=lambda: None, times=[1., 2., 1.]),  # 100 GFLOP/s
        case('resnet18', 'train', 1.5),
        case('diracnet18', 'train', 2.0),
        case('diracnet18', 'folded', 1.0),
    ]
    result = summarize(cases)
    assert result['peak'] == {'fp32': dict(gflop_per_s=pytest.approx(100.), set_by='gemm64',
                                           gemm_gflop_per_s=pytest.approx(100.))}  # its best round
    rows = {r['form'] if r['model'] == 'diracnet18' else 'resnet': r for r in result['rows']}
    assert rows['folded']['vs_resnet'] == pytest.approx(1.5)
    assert rows['folded']['vs_train'] == pytest.approx(2.0)
    assert rows['train']['vs_resnet'] == pytest.approx(0.75)
    assert rows['folded']['gflop_per_s'] == pytest.approx(64.) and rows['folded']['peak_fraction'] == pytest.approx(.64)
    assert rows['folded']['vs_fp32'] is None

    def timed(backend, precision, seconds):
        return Case('diracnet18', 'folded', backend, precision, 32, 64e9, run=lambda: None, times=[seconds] * 3)
    ratios = {(r['backend'], r['precision']): r['vs_fp32'] for r in summarize(cases + [
        timed('eager', 'bf16', .5), timed('onnxruntime', 'fp32', 2.), timed('split', 'int8', 1.),
        timed('pt2e', 'int8', .5), timed('onnxruntime-int8', 'int8', 1.)])['rows'] if r['model'] == 'diracnet18'}
    assert ratios[('eager', 'bf16')] == pytest.approx(2.)  # against eager fp32
    assert ratios[('split', 'int8')] == ratios[('onnxruntime-int8', 'int8')] == pytest.approx(2.)  # ONNX Runtime fp32
    assert ratios[('pt2e', 'int8')] == pytest.approx(4.)
    table = format_table(dict(result, load_average_before=(0., 0., 0.), load_average_after=(0., 0., 0.),
                              machine=dict(cpu='test'), settings=dict(threads=1)))
    assert '| diracnet18 | folded | eager | fp32 | 32 | 32.0 | 1000.0 (1000.0-1000.0) | 2.00 | 64 | 64 |' in table
    assert 'fp32 100 GFLOP/s, set by gemm64 (best GEMM 100)' in table


def test_no_row_reads_above_the_peak():
    """ On a loaded machine a GEMM can be slowed more than the models beside it: a model that outran the GEMMs in
    its best round sets the peak, so its median (and every other row's) stays at or below 100%. """
    gemm = Case('gemm64', 'gemm', 'eager', 'bf16', 1, 100e9, run=lambda: None, times=[2., 1., 4.])  # best 100
    fast = Case('diracnet18', 'folded', 'eager', 'bf16', 32, 32 * 5e9, run=lambda: None, times=[1., .8, 1.2])
    slow = Case('resnet18', 'train', 'eager', 'bf16', 32, 32 * 2e9, run=lambda: None, times=[1., 1., 1.])
    assert peaks([gemm, fast, slow])['bf16'] == dict(
        gflop_per_s=pytest.approx(200.), set_by='diracnet18 folded eager batch 32', gemm_gflop_per_s=pytest.approx(100.))
    fractions = {r['model']: r['peak_fraction'] for r in summarize([gemm, fast, slow])['rows']}
    assert fractions == {'diracnet18': pytest.approx(160 / 200), 'resnet18': pytest.approx(64 / 200)}
    int8 = Case('diracnet18', 'folded', 'split', 'int8', 32, 32 * 5e9, run=lambda: None, times=[.1])
    assert summarize([gemm, int8])['rows'][0]['peak_fraction'] is None  # no int8 GEMM: no peak to compare with


def test_forms():
    assert not has_reparameterization(build_forms('resnet18', ['train', 'folded'])['train'])
    forms = build_forms('diracnet34_1_cifar', ['train', 'folded'])
    assert set(forms) == {'train', 'folded'}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(forms['folded'](x), forms['train'](x), rtol=1e-4, atol=1e-4 * forms['train'](x).abs().max().item())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in forms['folded'].modules())
    assert set(build_forms('repvgg_a0', ['folded'])) == {'folded'}


def test_plot_script_draws_the_json_the_command_writes(tmp_path):
    pytest.importorskip('matplotlib')
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'plot_benchmark.py'
    if not script.is_file():
        pytest.skip(f'{script} is not here (the benchmarks are in the source tree only)')
    spec = importlib.util.spec_from_file_location('plot_benchmark', script)
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)

    def case(model, form, precision):
        return Case(model, form, 'eager', precision, 32, 64e9, run=lambda: None, times=[1.] * 3)
    cases = [case(m, f, p) for m, f in (('diracnet18', 'train'), ('diracnet18', 'folded'), ('resnet18', 'train'))
             for p in ('fp32', 'bf16')]
    result = dict(summarize(cases), settings=dict(precisions=['fp32', 'bf16'], threads=1), machine=dict(cpu='test'))
    (tmp_path / 'benchmark.json').write_text(json.dumps(result))
    assert plot.main([str(tmp_path / 'benchmark.json')]) == 0
    assert (tmp_path / 'benchmark.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    (tmp_path / 'cifar.json').write_text(json.dumps(dict(result, rows=[dict(r, model='diracnet16_4_cifar')
                                                                       for r in result['rows']])))
    with pytest.raises(SystemExit, match='nothing to plot'):
        plot.main([str(tmp_path / 'cifar.json')])


@pytest.mark.parametrize('kwargs, message', [
    (dict(repeats=0), 'repeats'), (dict(batch_sizes=(1, 0)), 'batch_sizes'), (dict(batch_sizes=()), 'batch_sizes'),
    (dict(img_size=-32), 'img_size'), (dict(gemm_sizes=(0,)), 'gemm_sizes'), (dict(threads=-1), 'threads'),
    (dict(warmup=-1), 'warmup'), (dict(min_time=float('nan')), 'min_time')])
def test_the_python_api_refuses_meaningless_numbers_before_any_model_is_built(monkeypatch, kwargs, message):
    import timm_dirac.deploy.benchmark as benchmark
    monkeypatch.setattr(benchmark, 'build_cases', lambda *a, **k: pytest.fail('models were built'))
    with pytest.raises(ValueError, match=message):
        benchmark.run_benchmark(models=('diracnet34_1_cifar',), **kwargs)
