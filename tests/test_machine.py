""" The machine probe and the precision rule: bf16 only where the hardware computes it, with the CPU and GPU probes
mocked both ways; what the benchmarks record about the machine. """
from pathlib import Path

import pytest
import torch

import timm_dirac.machine as machine
from timm_dirac.machine import auto_precision, cpu_features, machine_info
from timm_dirac.train import parse_args, pick_precision


@pytest.mark.parametrize('features, expected', [
    ({'avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16'}, 'bf16'),  # Sapphire Rapids
    ({'avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16'}, 'bf16'),  # Cooper Lake, AMD EPYC (Zen 4)
    ({'avx2', 'avx512f', 'avx512_vnni'}, 'fp32'),  # Cascade Lake-SP: bf16 would be emulated
    ({'avx2', 'avx512f'}, 'fp32'),  # Skylake-SP
    ({'avx2'}, 'fp32'),
    (set(), 'fp32'),  # no x86 features found
])
def test_cpu_gets_bf16_only_with_bf16_instructions(monkeypatch, features, expected):
    monkeypatch.setattr(machine, 'cpu_features', lambda: features)
    chosen, why = auto_precision('cpu')
    assert chosen == expected
    assert ('emulated' in why) == (expected == 'fp32')


def test_the_probe_is_pytorchs():
    """ The features are PyTorch's cpuinfo probes, which tell bf16-capable CPUs from AVX-512 ones without bf16. """
    found = cpu_features()
    assert ('avx512_bf16' in found) == torch.cpu._is_avx512_bf16_supported()
    assert ('amx_tile' in found) == torch.cpu._is_amx_tile_supported()
    assert ('avx512_vnni' in found) == torch.cpu._is_vnni_supported()
    assert ('avx512f' in found) == torch.cpu._is_avx512_supported()


def test_machine_info_names_the_cpu_its_features_and_versions():
    info = machine_info()
    assert info['cpu'] and info['torch_threads'] >= 1 and info['logical_cpus'] >= 1
    assert info['isa'] == sorted(cpu_features())
    assert info['versions']['torch'] == torch.__version__


@pytest.mark.parametrize('bf16, expected', [(True, 'bf16'), (False, 'fp16')])
def test_cuda_gets_bf16_or_fp16_with_a_scaler(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16)
    chosen, why = auto_precision('cuda')
    assert chosen == expected and ('loss scaler' in why) == (not bf16)


def test_train_amp_auto_follows_the_rule_and_flags_override_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr('timm_dirac.train.loop._has_accelerator', lambda: False)
    monkeypatch.setattr(machine, 'cpu_features', lambda: {'avx512f'})
    assert parse_args([]).amp_dtype == 'auto'
    chosen, why = pick_precision(parse_args(['--amp']))
    assert chosen == 'no' and why.startswith('--amp auto: ') and 'emulated' in why
    monkeypatch.setattr(machine, 'cpu_features', lambda: {'amx_tile'})
    assert pick_precision(parse_args(['--amp']))[0] == 'bf16'
    assert pick_precision(parse_args(['--amp', '--amp-dtype', 'float16']))[0] == 'fp16'
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)  # `python train.py`: no launcher chose one
    chosen, why = pick_precision(parse_args(['--amp', '--no-amp']))
    assert chosen == 'no' and 'launch' not in why and why.startswith('no --amp')
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'fp16')  # what `accelerate launch --mixed_precision fp16` sets
    chosen, why = pick_precision(parse_args([]))
    assert chosen is None and why == 'no --amp: the accelerate launch setting --mixed_precision fp16'


def test_quick_config_asks_for_the_automatic_precision():
    args = parse_args(['--config', str(Path(__file__).resolve().parents[1] / 'train_configs' / 'quick_cifar10.yaml')])
    assert args.amp and args.amp_dtype == 'auto'
