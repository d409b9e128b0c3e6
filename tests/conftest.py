""" Fixtures shared by the tests: a small folded DiracNet, a clean accelerate state, a run stopped after a checkpoint,
an empty offline Hugging Face cache. """
import contextlib

import pytest
import torch

import timm
import timm_dirac  # noqa: F401  registers the models
from timm_dirac.loading import fold


@pytest.fixture
def small_folded_diracnet():
    """ `make(layers)`: a folded `diracnet34_1_cifar` with `layers` Dirac layers per stage, seeded, its BatchNorm
    weights set to 1 (the authors' U[0, 1) init would shrink the logits towards zero). """
    def make(layers=(1, 1, 1)) -> torch.nn.Module:
        torch.manual_seed(0)
        model = timm.create_model('diracnet34_1_cifar', layers=layers).eval()
        for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.weight.data.fill_(1.)
        return fold(model)
    return make


@pytest.fixture
def fresh_accelerate_state():
    """ accelerate keeps one process-wide state (precision, device); each test builds its own Accelerator. """
    from accelerate.state import AcceleratorState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def interrupted(monkeypatch):
    """ `with interrupted(): train(...)`: the run stops (KeyboardInterrupt) right after its first checkpoint is
    written, as a kill at that moment would leave it; a later `--resume` continues it. """
    import timm_dirac.train as train_module
    save = train_module.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def stop_after_checkpoint():
        monkeypatch.setattr(train_module, 'save_checkpoint', save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            yield
        monkeypatch.undo()
    return stop_after_checkpoint


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """ An empty Hugging Face cache, read offline (the env vars are read at import, so patch the constants). """
    import huggingface_hub

    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache
