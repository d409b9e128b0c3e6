""" The precision rule: bf16 only where the hardware computes it, with the CPU and GPU probes mocked both ways. """
from pathlib import Path

import pytest
import torch

import timm_dirac.machine as precision
from timm_dirac.machine import auto_precision
from timm_dirac.train import parse_args, pick_precision


@pytest.mark.parametrize('flags, expected', [
    ({'avx512f', 'avx512bw', 'avx512_vnni', 'amx_bf16', 'amx_tile'}, 'bf16'),  # Sapphire Rapids
    ({'avx512f', 'avx512bw', 'avx512_bf16'}, 'bf16'),  # Cooper Lake, Zen 4
    ({'avx512f', 'avx512bw', 'avx512vl'}, 'fp32'),  # Skylake/Cascade Lake-SP: bf16 would be emulated
    ({'avx2', 'fma'}, 'fp32'),
    (set(), 'fp32'),  # no /proc/cpuinfo
])
def test_cpu_gets_bf16_only_with_bf16_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, 'cpu_flags', lambda: flags)
    chosen, why = auto_precision('cpu')
    assert chosen == expected
    assert ('emulated' in why) == (expected == 'fp32')


@pytest.mark.parametrize('bf16, expected', [(True, 'bf16'), (False, 'fp16')])
def test_cuda_gets_bf16_or_fp16_with_a_scaler(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16)
    chosen, why = auto_precision('cuda')
    assert chosen == expected and ('loss scaler' in why) == (not bf16)


def test_train_amp_auto_follows_the_rule_and_flags_override_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr('timm_dirac.train.loop._has_accelerator', lambda: False)
    monkeypatch.setattr(precision, 'cpu_flags', lambda: {'avx512f'})
    assert parse_args([]).amp_dtype == 'auto'
    chosen, why = pick_precision(parse_args(['--amp']))
    assert chosen == 'no' and why.startswith('--amp auto: ') and 'emulated' in why
    monkeypatch.setattr(precision, 'cpu_flags', lambda: {'amx_bf16'})
    assert pick_precision(parse_args(['--amp']))[0] == 'bf16'
    assert pick_precision(parse_args(['--amp', '--amp-dtype', 'float16']))[0] == 'fp16'
    assert pick_precision(parse_args(['--amp', '--no-amp']))[0] is None  # the accelerate launch setting


def test_quick_config_asks_for_the_automatic_precision():
    args = parse_args(['--config', str(Path(__file__).resolve().parents[1] / 'train_configs' / 'quick_cifar10.yaml')])
    assert args.amp and args.amp_dtype == 'auto'
