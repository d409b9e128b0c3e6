""" The backends' one interface and registry: every registered backend turns the same folded model into a `Runner`
whose `predict` gives that model's logits (exactly in fp32, closely in bf16 and int8) and whose `bind` gives a call
to time; a backend registered anywhere else becomes a choice of `timm-dirac benchmark` and `quantize`. """
import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm
from timm_dirac.deploy.backends import BACKENDS, Runner, Setup, backend_names, get_backends, register_backend
from timm_dirac.cli import main
from timm_dirac.loading import default_data, load_images

ROOT = Path(__file__).resolve().parents[1]
DATA = default_data()


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in ('compile', 'pt2e') else n  # ~25 s
                                  for n in backend_names()])  # each (inductor lowering)
def test_every_backend_runs_the_folded_model(name, tmp_path, small_folded_diracnet):
    for package in BACKENDS[name].requires:
        pytest.importorskip(package)
    model = small_folded_diracnet()
    calib, _ = load_images(DATA, model, 32, split='train')
    images, _ = load_images(DATA, model, 8, split='test')
    with torch.no_grad():
        reference = model(images)
    backend = BACKENDS[name]
    for precision in backend.precisions:
        runner = backend.prepare(model, Setup((3, 32, 32), str(tmp_path), precision, calib=calib, batch_size=8))
        assert runner.precision == precision
        logits = runner.predict(images).float()
        assert logits.shape == reference.shape
        similarity = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0).item()
        assert similarity > (0.99999 if precision == 'fp32' else 0.98), (precision, similarity)
        assert runner.bind(images)() is not None
        assert runner.static_batch == (8 if name == 'pt2e' else None)
        assert (runner.weight_bits is not None) == backend.int8
        if runner.file:  # what a user deploys: in the workdir, and it loads and runs on its own
            assert Path(runner.file).parent == tmp_path
            assert _load_and_run(runner.file, images).shape == reference.shape


def test_the_names_the_commands_rely_on_are_registered():
    """ benchmark's default (eager), quantize's default flow (chain), its flow for QAT files (split) and its fp32
    baseline (onnxruntime), and the int8 file benchmark times for any model (onnxruntime-int8). """
    assert {'eager', 'onnxruntime'} <= set(backend_names(int8=False))
    assert {'chain', 'split', 'onnxruntime-int8'} <= set(backend_names(int8=True))


def test_listing_follows_registration_and_precisions(registered):
    """ Names are listed in registration order; a backend is int8 exactly when it runs int8, and the two
    listings split the registry between them. """
    registered('late-fp32', ('fp32', 'bf16'), _eager_fp32)
    registered('late-int8', ('int8',), _rounded_int8)
    assert backend_names() == list(BACKENDS) and backend_names()[-2:] == ['late-fp32', 'late-int8']
    assert backend_names(int8=True) == [n for n in BACKENDS if 'int8' in BACKENDS[n].precisions]
    assert sorted(backend_names(int8=True) + backend_names(int8=False)) == sorted(BACKENDS)


def test_a_backend_runs_the_asked_precisions_it_has_else_its_own_first():
    assert BACKENDS['eager'].run_precisions(['fp32', 'bf16']) == ['fp32', 'bf16']
    assert BACKENDS['eager'].run_precisions(['bf16']) == ['bf16']
    assert BACKENDS['onnxruntime'].run_precisions(['fp32', 'bf16']) == ['fp32']
    assert BACKENDS['onnxruntime'].run_precisions(['bf16']) == ['fp32']  # ONNX Runtime runs fp32 whatever is asked
    assert BACKENDS['split'].run_precisions(['fp32', 'bf16']) == ['int8']


def test_names_are_unique(tmp_path, small_folded_diracnet):
    with pytest.raises(ValueError, match="backend 'eager' is already registered"):
        register_backend('eager')(lambda model, setup: None)
    model = small_folded_diracnet()  # the refused registration left the first one in place: it still runs models
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(BACKENDS['eager'].prepare(model, Setup((3, 32, 32), str(tmp_path))).predict(x),
                                   model(x))


def test_unknown_names_and_missing_packages_are_refused(registered):
    registered('needs-a-package', ('fp32',), _eager_fp32, requires=('a_package_nobody_installed',))
    with pytest.raises(ValueError, match=r"unknown flow \['eager'\]: choose from chain, split, plain"):
        get_backends(['eager'], int8=True, what='flow')
    with pytest.raises(ValueError, match='the needs-a-package backend needs a_package_nobody_installed, not installed'):
        get_backends(['eager', 'needs-a-package'])


def test_importing_the_backends_loads_no_optional_package():
    """ The CLI stays fast: registering every backend imports neither the exporter nor a runtime. """
    code = ('import sys, timm_dirac.deploy.backends; '
            'print(sorted(m for m in ("onnx", "onnxscript", "onnxruntime", "torchao") if m in sys.modules))')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'


def _load_and_run(path: str, images: torch.Tensor, like: nn.Module = None) -> torch.Tensor:
    """ The logits of a file a backend wrote, loaded without the backend: ONNX Runtime for .onnx, torch.export for
    .pt2, a state dict (the test backend's .pt) into a copy of the model `like`. """
    if path.endswith('.onnx'):
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    with torch.no_grad():
        if path.endswith('.pt2'):
            return torch.export.load(path).module()(images)
        model = copy.deepcopy(like)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model(images)


def _eager_fp32(model: nn.Module, setup: Setup) -> Runner:
    """ A backend written outside the package: the model as it is, fp32. """
    def predict(x):
        with torch.no_grad():
            return model(x)
    return Runner(predict=predict, bind=lambda x: lambda: predict(x), precision='fp32')


def _rounded_int8(model: nn.Module, setup: Setup) -> Runner:
    """ A backend written outside the package: weights rounded to a per-tensor 8-bit grid (computed in fp32), saved
    in the workdir. """
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for weight in [p for p in rounded.parameters() if p.dim() > 1]:
            step = weight.abs().max() / 127
            weight.copy_((weight / step).round() * step)
    path = os.path.join(setup.workdir, f'{setup.tag}_int8_rounded.pt')
    torch.save(rounded.state_dict(), path)
    return replace(_eager_fp32(rounded, setup), precision='int8', file=path, weight_bits=8)


@pytest.fixture
def registered():
    """ `registered(name, precisions, prepare, requires=())`: a backend registered for one test only. """
    names = []

    def register(name, precisions, prepare, requires=()):
        register_backend(name, precisions, requires)(prepare)
        names.append(name)
    yield register
    for name in names:
        del BACKENDS[name]


@pytest.mark.slow
def test_a_registered_backend_is_a_choice_of_benchmark_and_quantize(registered, tmp_path, capsys,
                                                                     small_folded_diracnet):
    """ The bar: adding a backend is one module plus a registration; neither command is edited. """
    pytest.importorskip('onnxruntime')  # quantize's fp32 baseline
    registered('my-eager', ('fp32',), _eager_fp32)
    registered('my-int8', ('int8',), _rounded_int8)

    for command, listed, absent in (('benchmark', 'my-eager', None), ('quantize', 'my-int8', 'my-eager')):
        with pytest.raises(SystemExit):
            main([command, '--help'])
        usage = capsys.readouterr().out
        assert listed in usage and (absent is None or absent not in usage)

    bench = tmp_path / 'bench'
    assert main(['benchmark', '--models', 'diracnet34_1_cifar', '--forms', 'folded', '--backends', 'eager', 'my-eager',
                 'my-int8', '--precision', 'fp32', '--batch-sizes', '2', '--repeats', '1', '--warmup', '0',
                 '--min-time', '0', '--gemm-sizes', '64', '--out', str(bench)]) == 0
    rows = json.loads((bench / 'benchmark.json').read_text())['rows']
    assert [(r['backend'], r['precision']) for r in rows] == [('eager', 'fp32'), ('my-eager', 'fp32'),
                                                              ('my-int8', 'int8')]
    assert '| diracnet34_1_cifar | folded | my-eager | fp32 | 2 |' in (bench / 'benchmark.md').read_text()

    checkpoint = tmp_path / 'ckpt'
    timm.models.save_for_hf(small_folded_diracnet(), str(checkpoint),
                            model_args=dict(layers=(1, 1, 1), inference_mode=True))
    out = tmp_path / 'int8'
    assert main(['quantize', '--checkpoint', str(checkpoint), '--flow', 'my-int8', '--num-calib', '16',
                 '--num-eval', '16', '--repeats', '1', '--bench-batch', '8', '--out', str(out)]) == 0
    report = json.loads((out / 'quantize.json').read_text())
    assert list(report['flows']) == ['my-int8'] and report['chosen'] == 'my-int8'
    assert report['flows']['my-int8']['weight_bits'] == 8
    assert report['flows']['my-int8']['file'] == str(out / 'model_int8_rounded.pt')
    assert set(report['img_per_s']['8']) == {'onnxruntime-fp32', 'my-int8-int8'}
    logits = _load_and_run(report['flows']['my-int8']['file'], torch.zeros(2, 3, 32, 32), small_folded_diracnet())
    assert logits.shape == (2, 10)  # the file the report names loads and runs
