""" The backends' one interface: every backend turns the same folded model into a `Runner` whose `predict` gives
that model's logits (exactly in fp32, closely in bf16 and int8) and whose `bind` gives a call to time. """
from pathlib import Path

import pytest
import torch

from timm_dirac.backends import onnxruntime as ort_backend
from timm_dirac.backends import pt2e, torch_eager
from timm_dirac.loading import default_data, load_images

pytest.importorskip('onnxruntime')
DATA = default_data()


def test_every_backend_runs_the_folded_model(tmp_path, small_folded_diracnet):
    model = small_folded_diracnet()
    calib, _ = load_images(DATA, model, 32, split='train')
    images, _ = load_images(DATA, model, 8, split='test')
    with torch.no_grad():
        reference = model(images)
    runners = {
        'eager fp32': torch_eager.prepare(model),
        'eager bf16': torch_eager.prepare(model, 'bf16'),
        'onnxruntime fp32': ort_backend.prepare(model, str(tmp_path), (3, 32, 32)),
        'onnxruntime split': ort_backend.prepare(model, str(tmp_path), (3, 32, 32), 'split', calib),
        'onnxruntime plain': ort_backend.prepare(model, str(tmp_path), (3, 32, 32), 'plain', calib),
        'pt2e': pt2e.prepare(model, calib, batch_size=8),
    }
    for name, runner in runners.items():
        logits = runner.predict(images).float()
        assert logits.shape == reference.shape, name
        similarity = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0).item()
        assert similarity > (0.99999 if runner.precision == 'fp32' else 0.98), (name, similarity)
        assert runner.bind(images)() is not None
    assert runners['pt2e'].static_batch == 8 and runners['onnxruntime split'].static_batch is None
    assert sorted(Path(r.file).name for r in runners.values() if r.file) == [
        'model_fp32.onnx', 'model_int8_plain.onnx', 'model_int8_split.onnx']
