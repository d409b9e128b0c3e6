""" The `pt2e` backend: PyTorch 2 export int8 with torchao's x86 inductor quantizer (per-channel 8-bit weights, uint8
activations), lowered to oneDNN int8 kernels. The lowered graph has a static batch size. """
import copy
import os
from typing import Tuple

import torch
import torch.nn as nn

from ._registry import Runner, Setup, register_backend

__all__ = ['quantize_pt2e', 'prepare']


def quantize_pt2e(model: nn.Module, calib: torch.Tensor, batch_size: int = 32) -> Tuple[nn.Module, nn.Module]:
    """ PT2E static int8 with torchao's x86 inductor quantizer (per-channel int8 weights, uint8 activations).
    Returns the converted graph (quantize/dequantize ops around float convs, what `torch.export.save` stores)
    and its lowering to oneDNN int8 kernels (`lower_pt2e_quantized_to_x86`), which runs the int8 convs. """
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError as e:
        raise ImportError('The pt2e flow needs torchao (PyTorch 2 export quantization moved there from torch.ao): '
                          'pip install "timm-dirac[export]", or use --flow split.') from e
    example = calib[:batch_size]
    exported = torch.export.export(
        model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim('batch')},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calib.split(batch_size):
            prepared(batch)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    # torch.compile(converted, options={'freezing': True}) fails with torch 2.14 + torchao 0.18 (no fake kernel
    # for onednn.qconv_prepack during constant folding); the explicit lowering runs the same oneDNN int8 kernels
    with torch.no_grad():
        lowered = lower_pt2e_quantized_to_x86(copy.deepcopy(converted), (example,))
    return converted, lowered


@register_backend('pt2e', precisions=('int8',), requires=('torchao',))
def prepare(model: nn.Module, setup: Setup) -> Runner:
    """ int8 `model` calibrated on `setup.calib`, lowered for batches of `setup.batch_size` (at most the number of
    calibration images); the converted graph is saved in the workdir as `<tag>_int8_pt2e.pt2` (`torch.export.save`,
    dynamic batch). """
    batch_size = min(setup.batch_size, len(setup.calib))  # the lowered graph takes the example's batch
    converted, lowered = quantize_pt2e(model, setup.calib, batch_size)
    path = os.path.join(setup.workdir, f'{setup.tag}_int8_pt2e.pt2')
    torch.export.save(torch.export.export(
        converted, (setup.calib[:2],), dynamic_shapes=({0: torch.export.Dim('batch')},)), path)

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return lowered(x)
    return Runner(predict=predict, bind=lambda x: lambda: predict(x), precision='int8',
                  static_batch=batch_size, file=path, weight_bits=8)
