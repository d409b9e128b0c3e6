""" benchmarks/depth_sweep.py: three networks of identical shape, a resumable sweep on real CIFAR-10. """
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / 'timm_dirac' / 'assets' / 'cifar10_sample'
SCRIPT = ROOT / 'benchmarks' / 'depth_sweep.py'
if not SCRIPT.is_file():
    pytest.skip(f'{SCRIPT} is not here (the benchmarks are in the source tree only)', allow_module_level=True)
spec = importlib.util.spec_from_file_location('depth_sweep', SCRIPT)
depth_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(depth_sweep)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_three_networks_have_the_same_shape():
    dirac, plain, resnet = (depth_sweep.build(n, depth=16, width=1, init='kaiming') for n in depth_sweep.NETWORKS)
    assert num_params(plain) == num_params(resnet)
    assert num_params(dirac) - num_params(plain) == 2 * 4 * (16 + 32 + 64)  # alpha and beta of 12 layers
    convs = [[m.weight.shape for m in net.modules() if isinstance(m, nn.Conv2d) or hasattr(m, 'alpha')]
             for net in (dirac, plain, resnet)]
    assert convs[0] == convs[1] == convs[2]


def test_resnet_variant_adds_a_zero_padded_identity_around_each_layer_pair():
    resnet = depth_sweep.build('resnet', depth=10, width=1, init='kaiming').eval()
    pair = resnet.stages[1].blocks[0]  # widens 16 -> 32 channels
    with torch.no_grad():
        pair.second.bn.weight.zero_()
        pair.second.bn.bias.zero_()
        x = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(pair(x), F.pad(x, (0, 0, 0, 0, 0, 16)))


@pytest.mark.parametrize('init,expected_std', [
    ('kaiming', (2 / 288) ** 0.5), ('xavier', (2 / (288 + 288)) ** 0.5), ('normal0.1', 0.1),
    ('orthogonal', 288 ** -0.5)])  # a 32 -> 32 channel 3x3 conv: fan in = fan out = 288
def test_initialisations_set_the_conv_weights(init, expected_std):
    torch.manual_seed(0)
    conv = depth_sweep.build('plain', depth=10, width=2, init=init).stages[0].blocks[1].conv
    assert conv.weight.shape == (32, 32, 3, 3)
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05


@pytest.mark.slow  # the sweep script in subprocesses: ~100 s on 2 busy cores
def test_sweep_trains_on_real_images_and_resumes(tmp_path):
    out = tmp_path / 'sweep.json'
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'depth_sweep.py'), '--data', str(SAMPLE), '--out', str(out),
           '--depths', '10', '--epochs', '1', '--train-samples', '256', '--test-samples', '200', '--batch-size', '64']
    subprocess.run(cmd, check=True, capture_output=True)
    runs = json.loads(out.read_text())['runs']
    assert [(r['network'], r['depth']) for r in runs] == [('dirac', 10), ('plain', 10), ('resnet', 10)]
    assert all(0 <= r['test_top1'] <= 100 and r['train_seconds'] > 0 for r in runs)
    rerun = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert rerun.stdout == '' and json.loads(out.read_text())['runs'] == runs  # finished runs are not redone
    other_budget = subprocess.run([*cmd, '--epochs', '2'], capture_output=True, text=True)
    assert other_budget.returncode != 0 and 'epochs: 1 there, 2 now' in other_budget.stderr
    assert json.loads(out.read_text())['runs'] == runs  # nothing mixed in or lost


def test_grouping_and_trained_dirac_statistics(monkeypatch):
    """ The authors' grouping decays alpha, beta and BatchNorm; timm's does not. Runs record alpha/beta statistics
    and the folded centre-tap ratio (what breaks per-channel int8). """
    model = depth_sweep.build('dirac', depth=10, width=1, init='kaiming')
    decayed = {}
    real_sgd = torch.optim.SGD

    def recording_sgd(params, **kw):
        opt = real_sgd(params, **kw)
        decayed.update({id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']})
        raise StopIteration
    monkeypatch.setattr(torch.optim, 'SGD', recording_sgd)
    data = {'train': (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))}
    for decay_1d, alpha_decay in ((True, 5e-4), (False, 0.)):
        args = depth_sweep.argparse.Namespace(weight_decay_1d=decay_1d, lr=0.1, epochs=1, batch_size=4, seed=0,
                                              bf16=False)
        with pytest.raises(StopIteration):
            depth_sweep.train_and_test(model, data, args)
        alpha = model.stages[0].blocks[0].conv.alpha
        assert decayed[id(alpha)] == alpha_decay and decayed[id(model.stages[0].blocks[0].conv.weight)] == 5e-4
    stats = depth_sweep.dirac_stats(model.eval())
    assert stats['alpha']['mean'] == pytest.approx(1.) and stats['beta']['mean'] == pytest.approx(0.1)
    assert stats['centre_tap_ratio_median'] > 1
    plain = depth_sweep.dirac_stats(depth_sweep.build('plain', depth=10, width=1, init='kaiming').eval())
    assert set(plain) == {'centre_tap_ratio_median'}, 'a plain net has no alpha or beta'
