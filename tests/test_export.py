""" ONNX export of the folded model checked with ONNX Runtime on real images; torch.compile of both forms. """
import pytest
import torch
from torch.optim.swa_utils import update_bn

import timm
import timm_dirac  # noqa: F401  registers the models
from timm_dirac.cli import main
from timm_dirac.deploy.backends.onnxruntime import ALLOWED_OPS, check_graph_ops, export_onnx, op_types, verify_onnx
from timm_dirac.loading import default_data, fold, load_images

pytest.importorskip('onnxruntime')
DATA = default_data()


@pytest.mark.slow
def test_export_onnx_cli(tmp_path, capsys):
    """ An untrained model is checked on logits of real size (its BatchNorm statistics come from the check images)
    and the command says the file is untrained; the file appears only once checked, and is never overwritten. """
    out = tmp_path / 'diracnet34_1_cifar.onnx'
    assert main(['export-onnx', '--model', 'diracnet34_1_cifar', '--out', str(out), '--num-images', '16']) == 0
    ops = op_types(str(out))
    assert ops <= ALLOWED_OPS and {'Conv', 'Relu', 'MaxPool', 'Gemm'} <= ops
    captured = capsys.readouterr()
    assert float(captured.out.split('of the logit scale ')[1].split(',')[0]) > 0.1  # with the initial stats: ~1e-9
    assert 'The weights are untrained' in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert main(['export-onnx', '--model', 'diracnet34_1_cifar', '--out', str(out)]) == 2
    assert 'already exists' in capsys.readouterr().err


def test_export_onnx_without_the_extra_names_it(tmp_path, capsys, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnx' else find_spec(name, *a))
    assert main(['export-onnx', '--model', 'diracnet34_1_cifar', '--out', str(tmp_path / 'm.onnx')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'needs onnx, not installed: pip install "timm-dirac[export]"' in err


@pytest.mark.parametrize('opset', ['1', '7', '17', '99'])
def test_an_opset_the_exporter_does_not_write_is_refused_before_work(tmp_path, capsys, monkeypatch, opset):
    """ torch's exporter printed a traceback for --opset 1 and 99 and wrote an opset-18 file, exit 0. """
    import timm_dirac.deploy.export as export
    monkeypatch.setattr(export, 'load_model', lambda *a, **k: pytest.fail('work started'))
    assert main(['export-onnx', '--model', 'diracnet34_1_cifar', '--out', str(tmp_path / 'm.onnx'),
                 '--opset', opset]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'opset {opset}: torch\'s ONNX exporter writes opsets 18 to ' in err, err
    assert not list(tmp_path.iterdir())


def test_a_file_in_another_opset_than_asked_is_refused(tmp_path, monkeypatch):
    """ Where the exporter's conversion fails it keeps its own opset: the file is checked, not trusted. """
    from timm_dirac.deploy.backends import onnxruntime as ort_backend
    monkeypatch.setattr(ort_backend, 'supported_opsets', lambda: range(13, 29))
    model = fold(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval())
    with pytest.raises(RuntimeError, match=r'could not write this model in opset 13 \(it wrote \[18\]\)'):
        export_onnx(model, str(tmp_path / 'm.onnx'), (3, 32, 32), 13)
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    assert ort_backend.supported_opsets()[0] == 18  # the exporter's own: below it the conversion fails like that


def test_batchnorm_statistics_of_the_check_images_give_untrained_models_real_logits():
    """ Why export-onnx (and demo) give untrained weights the BatchNorm statistics of their images (torch's
    `update_bn`, one pass) before checking: with the initial ones the signal vanishes over 34 layers. """
    model = timm.create_model('diracnet34_1_cifar').eval()
    images, _ = load_images(DATA, model, num=8)
    with torch.no_grad():
        assert model(images).abs().max() < 1e-6
        update_bn([images], model)
        assert not model.training and model(images).abs().max() > 0.1


def test_verify_catches_a_wrong_model(tmp_path):
    model = fold(timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval())
    images, labels = load_images(DATA, model, num=8)
    assert labels.shape == (8,) and labels.dtype == torch.int64
    assert images.shape == (8, 3, 32, 32)
    path = str(tmp_path / 'm.onnx')
    export_onnx(model, path, (3, 32, 32))
    import onnx
    graph = onnx.load(path).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    pools = [node for node in graph.node if node.op_type == 'MaxPool']
    assert len(pools) == 2 and all(producer[p.input[0]] == 'Relu' for p in pools)  # ReLU moved before each pool
    report = verify_onnx(path, model, images)
    assert report['relative_diff'] <= 1e-4 and report['top1_agreement'] == 1.
    with torch.no_grad():
        model.head.fc.bias.add_(model(images).abs().max())  # PyTorch now disagrees with the exported graph
    with pytest.raises(RuntimeError, match='differs from PyTorch'):
        verify_onnx(path, model, images)


def test_train_form_graph_is_refused(tmp_path):
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    path = str(tmp_path / 'train.onnx')
    export_onnx(model, path, (3, 32, 32))
    with pytest.raises(RuntimeError, match='not folded'):
        check_graph_ops(path)


@pytest.mark.slow  # inductor's first compile: ~35 s on 2 cores
@pytest.mark.parametrize('folded', [False, True], ids=['train', 'folded'])
def test_torch_compile(folded):
    torch._dynamo.reset()
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    if folded:
        fold(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, dynamic=False, options={'freezing': True})
        got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
