""" `timm-dirac quantize`: int8 mechanics on a small random DiracNet calibrated on real images (no accuracy goal:
an untrained model has none to keep; the accuracy drop of a trained model is measured by the command itself). """
import json

import pytest
import torch

import timm
import timm_dirac  # noqa: F401  registers the models
from timm_dirac.cli import main
from timm_dirac.export import default_data, export_onnx, fold, load_images, op_types, ort_session
from timm_dirac.quantize import quantize_onnxruntime, quantize_pt2e, top1

pytest.importorskip('onnxruntime')
DATA = default_data()
pytestmark = pytest.mark.skipif(DATA is None, reason='no real CIFAR-10 images (data/cifar10_sample, ../shared)')


def _small_model():
    torch.manual_seed(0)
    model = timm.create_model('diracnet34_1_cifar', layers=(1, 1, 1)).eval()
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        bn.weight.data.fill_(1.)  # keep the logits away from the tiny scale of the authors' U[0, 1) BN init
    return fold(model)


def _close(int8: torch.Tensor, fp32: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(int8.flatten(), fp32.flatten(), dim=0).item()


def test_both_flows_track_fp32(tmp_path):
    model = _small_model()
    calib, _ = load_images(DATA, model, 64, split='train')
    images, labels = load_images(DATA, model, 32, split='test')
    with torch.no_grad():
        reference = model(images)

    fp32_path, int8_path = str(tmp_path / 'fp32.onnx'), str(tmp_path / 'int8.onnx')
    export_onnx(model, fp32_path, (3, 32, 32))
    quantize_onnxruntime(fp32_path, int8_path, calib)
    assert {'QuantizeLinear', 'DequantizeLinear', 'Conv'} <= op_types(int8_path)
    got = torch.from_numpy(ort_session(int8_path).run(None, {'input': images.numpy()})[0])
    assert _close(got, reference) > 0.98

    converted, lowered = quantize_pt2e(model, calib)
    assert any('qconv' in str(n.target) for n in lowered.graph.nodes)
    with torch.no_grad():
        assert _close(lowered(images), reference) > 0.98


def test_top1_pads_the_last_batch():
    labels = torch.arange(10) % 3
    images = torch.zeros(10, 3, 4, 4)
    images[:, 0, 0, 0] = labels.float() + 1  # each image carries its label; zero padding predicts class -1
    seen = []

    def predict(batch):
        seen.append(len(batch))
        return torch.nn.functional.one_hot(batch[:, 0, 0, 0].long(), 4).float()[:, 1:]
    assert top1(predict, images, labels, batch_size=4) == 100.
    assert seen == [4, 4, 4]
    labels[-1] = 1 - labels[-1].clamp(max=1)  # one wrong label in the padded last batch
    assert top1(predict, images, labels, batch_size=4) == 90.


@pytest.mark.slow
def test_quantize_cli(tmp_path, capsys):
    checkpoint = tmp_path / 'ckpt'
    timm.models.save_for_hf(_small_model(), str(checkpoint), model_args=dict(layers=(1, 1, 1), inference_mode=True))
    out = tmp_path / 'int8'
    assert main(['quantize', '--checkpoint', str(checkpoint), '--num-calib', '32', '--num-eval', '32',
                 '--repeats', '1', '--bench-batch', '8', '--out', str(out)]) == 0
    report = json.loads((out / 'quantize.json').read_text())
    assert set(report['flows']) == {'onnxruntime', 'pt2e'} and report['chosen'] in report['flows']
    assert report['num_eval'] == 32 and report['num_calib'] == 32
    for flow in report['flows'].values():
        assert 0 <= flow['int8_top1'] <= 100 and flow['img_per_s'] > 0
        assert flow['drop'] == pytest.approx(report['fp32_top1'] - flow['int8_top1'])
    assert (out / 'model_int8.onnx').is_file() and (out / 'model_int8_pt2e.pt2').is_file()
    assert 'chosen:' in capsys.readouterr().out
