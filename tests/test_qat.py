""" Quantization-aware fine-tuning: the weights trained through the int8 grid are the weights the split flow stores,
and `train.py --qat` runs, resumes and exports a folded model. """
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import timm
import timm_dirac  # noqa: F401  registers the models
from timm_dirac.deploy.dirac_tap import split_dirac_taps
from timm_dirac.deploy.backends.onnxruntime import export_onnx, quantize_onnxruntime
from timm_dirac.diracify import is_folded
from timm_dirac.deploy.qat import WeightFakeQuant, merge_qat, prepare_qat
from timm_dirac.train import main, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / 'timm_dirac' / 'assets' / 'cifar10_sample'


pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')


def _trained_like() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model('diracnet34_1_cifar', layers=(2, 2, 2))
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        bn.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _one_step(model: torch.nn.Module) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    optimizer.step()


def test_fake_quant_puts_each_channel_on_its_7_bit_grid_with_a_straight_through_gradient():
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    quantized = WeightFakeQuant()(weight)
    scale = weight.detach().flatten(1).abs().amax(1) / 64
    steps = quantized.detach() / scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert steps.abs().amax().item() == pytest.approx(64)
    quantized.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))


def test_training_keeps_the_identity_fixed_and_the_learned_diagonal_zero():
    qat = prepare_qat(_trained_like())
    identity_before = {n: p.clone() for n, p in qat.named_parameters() if '.identity.' in n}
    _one_step(qat)
    for name, weight in identity_before.items():
        assert torch.equal(qat.get_parameter(name), weight), name
    learned = qat.stages[0].blocks[1].conv.learned
    index = torch.arange(learned.out_channels)
    assert torch.all(learned.weight[index, index, 1, 1] == 0)


def test_merged_model_computes_the_qat_model_and_is_a_folded_diracnet():
    qat = prepare_qat(_trained_like())
    _one_step(qat)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = qat.eval()(x)
        merged = merge_qat(qat)
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    assert is_folded(merged) and merged.inference_mode


@pytest.mark.slow
def test_split_flow_stores_exactly_the_trained_weights(tmp_path):
    """ The contract between QAT and `quantize --flow split`: ONNX Runtime's 7-bit weights are the QAT grid. """
    qat = prepare_qat(_trained_like())
    _one_step(qat)
    merged = merge_qat(qat)
    split = split_dirac_taps(merged)
    fp32_path, int8_path = str(tmp_path / 'split.onnx'), str(tmp_path / 'split-int8.onnx')
    export_onnx(split, fp32_path, (3, 32, 32))
    quantize_onnxruntime(fp32_path, int8_path, torch.randn(32, 3, 32, 32).clamp(-2, 2), weight_bits=7)
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(int8_path).graph.initializer}
    checked = 0
    for name, module in split.named_modules():
        if name.endswith('.learned'):
            q, scale = stored[f'{name}.weight_quantized'], stored[f'{name}.weight_scale']
            np.testing.assert_allclose(q * scale.reshape(-1, 1, 1, 1), module.weight.detach().numpy(),
                                       rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked == 6


@pytest.mark.slow
def test_train_qat_fine_tunes_and_exports_the_folded_model(tmp_path, capsys):
    from safetensors.torch import save_file
    save_file(_trained_like().state_dict(), tmp_path / 'start.safetensors')
    args = ['--model', 'diracnet34_1_cifar', '--model-kwargs', 'layers=(2,2,2)', '--dataset', f'hfds/{SAMPLE}',
            '--holdout', '500', '--qat', '--lr', '0.001', '--warmup-epochs', '0', '--epochs', '1', '-b', '32',
            '--train-num-samples', '64', '--val-num-samples', '32', '--workers', '1', '--output', str(tmp_path)]
    train(parse_args(args + ['--initial-checkpoint', str(tmp_path / 'start.safetensors'), '--experiment', 'qat']))
    folded = timm.create_model(f'local-dir:{tmp_path / "qat" / "hub-folded"}', pretrained=True)
    assert is_folded(folded)
    assert not (tmp_path / 'qat' / 'hub-train').exists(), 'a QAT run has no train form to export'

    with pytest.raises(SystemExit):
        main(args + ['--experiment', 'no-start'])
    assert '--qat fine-tunes trained weights' in capsys.readouterr().err
    assert not (tmp_path / 'no-start').exists()


@pytest.mark.slow
def test_qat_resumes_exactly(tmp_path, interrupted):
    """ 2 QAT epochs straight vs 1 epoch, interrupted, then --resume: the same fake-quantized weights. """
    from safetensors.torch import save_file
    save_file(_trained_like().state_dict(), tmp_path / 'start.safetensors')
    args = ['--model', 'diracnet34_1_cifar', '--model-kwargs', 'layers=(2,2,2)', '--dataset', f'hfds/{SAMPLE}',
            '--holdout', '500', '--qat', '--initial-checkpoint', str(tmp_path / 'start.safetensors'),
            '--lr', '0.001', '--warmup-epochs', '0', '--epochs', '2', '-b', '32', '--train-num-samples', '64',
            '--val-num-samples', '32', '--workers', '1', '--output', str(tmp_path)]
    straight = train(parse_args(args + ['--experiment', 'straight']))
    with interrupted():
        train(parse_args(args + ['--experiment', 'resumed']))
    resumed = train(parse_args(args + ['--resume', str(tmp_path / 'resumed' / 'last')]))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any('parametrizations' in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
