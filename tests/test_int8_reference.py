""" benchmarks/int8_reference.py, the NumPy int8 reference: it computes what ONNX Runtime computes, and it saturates
where pre-VNNI x86 does. """
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from timm_dirac.deploy.backends.onnxruntime import export_onnx, ort_session, quantize_onnxruntime
from timm_dirac.deploy.dirac_tap import chain_dirac_taps, split_dirac_taps
from timm_dirac.loading import default_data, load_images

pytest.importorskip('onnxruntime')
SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'int8_reference.py'
if not SCRIPT.is_file():
    pytest.skip(f'{SCRIPT} is not here (the benchmarks are in the source tree only)', allow_module_level=True)
spec = importlib.util.spec_from_file_location('int8_reference', SCRIPT)
int8_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(int8_reference)
QdqReference, _int_conv, saturation_risk = int8_reference.QdqReference, int8_reference._int_conv, \
    int8_reference.saturation_risk
DATA = default_data()


def test_pair_sums_saturate_at_int16_like_vpmaddubsw():
    x = np.full((1, 2, 1, 1), 255, dtype=np.uint8)  # two input channels: one pair of the same tap
    w = np.array([127, 127], dtype=np.int8).reshape(1, 2, 1, 1)
    exact, count = _int_conv(x, w, {}, pad_value=0, saturate_pairs=False)
    clipped, saturated = _int_conv(x, w, {}, pad_value=0, saturate_pairs=True)
    assert exact.item() == 2 * 255 * 127 and count == 0
    assert clipped.item() == 2 ** 15 - 1 and saturated == 1
    w7 = np.array([64, 64], dtype=np.int8).reshape(1, 2, 1, 1)
    assert _int_conv(x, w7, {}, pad_value=0, saturate_pairs=True)[0].item() == 2 * 255 * 64, '7-bit cannot saturate'


def test_saturation_risk_pairs_input_channels_of_one_tap():
    w = np.zeros((1, 4, 3, 3), dtype=np.int8)
    w[0, 0, 1, 1], w[0, 1, 1, 1] = 127, 10  # a dominant centre tap and its pair partner (channel 1, same tap)
    w[0, 2, 0, 0] = 127  # alone in its pair
    risky = saturation_risk(w)
    assert risky.shape == (1, 18) and risky.sum() == 1
    assert not saturation_risk(np.clip(w, -64, 64)).any()


@pytest.mark.parametrize('rewrite', [split_dirac_taps, chain_dirac_taps])
def test_reference_agrees_with_onnxruntime_on_a_split_model(tmp_path, small_folded_diracnet, rewrite):
    model = small_folded_diracnet((2, 2, 2))
    calib, _ = load_images(DATA, model, 64, split='train')
    images, _ = load_images(DATA, model, 32, split='test')
    fp32_path, int8_path = str(tmp_path / 'split.onnx'), str(tmp_path / 'split-int8.onnx')
    export_onnx(rewrite(model), fp32_path, (3, 32, 32))
    quantize_onnxruntime(fp32_path, int8_path, calib, weight_bits=7)
    ort_logits = ort_session(int8_path).run(None, {'input': images.numpy()})[0]
    reference = QdqReference(int8_path, saturate_pairs=True)
    logits = reference(images.numpy())
    # the two requantize in different orders, so a value may land one step apart; logits are quantized too
    step = float(np.diff(np.unique(ort_logits)).min())
    assert np.abs(logits - ort_logits).max() <= 3 * step
    assert (logits.argmax(1) == ort_logits.argmax(1)).mean() >= 0.95
    assert reference.saturated_pairs == 0, '7-bit weights never saturate'
