""" The ONNX Runtime backends: export, check, run and quantize (static int8, QDQ) folded models.

A folded DiracNet is a plain conv-ReLU chain, so its ONNX graph must hold only a chain's ops (`check_graph_ops`), and
`verify_onnx` compares ONNX Runtime with PyTorch on real images. Backends: `onnxruntime` (fp32), the int8 flows of
`ONNX_FLOWS` (uint8 activations calibrated on real images), and `onnxruntime-int8` (`chain` for a folded DiracNet,
`plain` for other models). The export is timm's `onnx_export`; the comparison is ours rather than its
`check_forward` (absolute, one batch of random inputs): relative to the logit scale, on real images, at two batch
sizes so that a batch axis that is not dynamic fails.
"""
import contextlib
import copy
import io
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Set

import torch
import torch.nn as nn

from ..dirac_tap import chain_dirac_taps, split_dirac_taps
from ...diracify import is_folded
from ...diracnet import DiracBlock
from ._registry import Runner, Setup, register_backend

__all__ = ['ALLOWED_OPS', 'DEFAULT_TOLERANCE', 'ONNX_FLOWS', 'supported_opsets', 'check_opset', 'export_onnx',
           'relu_before_maxpool', 'op_types', 'check_graph_ops', 'ort_session', 'verify_onnx', 'quantize_onnxruntime',
           'write_int8_onnx', 'prepare_fp32', 'prepare_chain', 'prepare_split', 'prepare_plain', 'prepare_int8']

ALLOWED_OPS = {'Conv', 'Relu', 'MaxPool', 'GlobalAveragePool', 'ReduceMean', 'Flatten', 'Reshape', 'Gemm', 'MatMul'}
DEFAULT_TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| relative to max |PyTorch logit|
REQUIRES = ('onnx', 'onnxscript', 'onnxruntime')  # the exporter and the runtime, imported where used


@dataclass(frozen=True)
class OnnxFlow:
    """ An int8 flow: how the Dirac taps leave the int8 weights (a `dirac_tap` rewrite of the folded model; None:
    they stay in them), and the weights' bit width. """
    taps: Optional[Callable[[nn.Module], nn.Module]]
    weight_bits: int


# - chain: every same-width layer one int8 conv plus an identity add of its own input (QLinearAdd), activations in
#   per-channel units (`dirac_tap.chain_dirac_taps`); width-changing layers as in split;
# - split: the Dirac taps in an exact 1x1 int8 conv beside the learned 3x3 weights (`dirac_tap.split_dirac_taps`);
#   7-bit weights (+-64): no pair of u8 x s8 products exceeds int16, so the file is exact on CPUs without VNNI too;
# - plain: the folded model as it is, per-channel 8-bit weights (ONNX Runtime's usual static int8).
ONNX_FLOWS = {'chain': OnnxFlow(chain_dirac_taps, weight_bits=7), 'split': OnnxFlow(split_dirac_taps, weight_bits=7),
              'plain': OnnxFlow(None, weight_bits=8)}


def supported_opsets() -> range:
    """ The ONNX opsets torch's (dynamo) exporter writes: its own, torchlib's (18), up to the newest the installed
    onnx defines, to which it converts. Below 18 its conversion of a DiracNet's graph fails and it writes 18 after a
    traceback instead, so those are not offered. """
    import onnx
    try:
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET as lowest
    except ImportError:  # moved in another torch: the exporter's opset since torch 2.5
        lowest = 18
    return range(lowest, onnx.defs.onnx_opset_version() + 1)


def check_opset(opset: int) -> None:
    """ Refuse an opset the exporter does not write (`supported_opsets`), before any work. """
    opsets = supported_opsets()
    if not (isinstance(opset, int) and opset in opsets):
        raise ValueError(f'opset {opset}: torch\'s ONNX exporter writes opsets {opsets[0]} to {opsets[-1]} (the '
                         f'installed onnx\'s newest); pass --opset in that range (default 18).')


def export_onnx(model: nn.Module, path: str, input_size: Sequence[int], opset: int = 18) -> None:
    """ Export `model` (eval, fp32) with timm's `onnx_export` (the dynamo exporter, a dynamic batch axis): input
    'input' (N, C, H, W), output 'logits'; then `MaxPool -> Relu` pairs are reordered to `Relu -> MaxPool` (see
    `relu_before_maxpool`) and the graph checked, its opset the one asked for (`check_opset`; the exporter keeps
    its own where a conversion fails). ONNX is NCHW: a channels_last model is exported from a contiguous copy (the
    exporter would otherwise add layout ops). """
    import onnx
    from timm.utils.onnx import onnx_export

    check_opset(opset)
    if any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
           for p in model.parameters()):
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    partial = f'{path}.partial'  # `path` appears only once checked (a backend reuses a file it finds)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress; failures still raise
            # batch 2: torch.export would specialize a batch of 1 to a constant
            onnx_export(model.eval(), partial, batch_size=2, input_size=tuple(input_size), opset=opset,
                        use_dynamo=True, check=False, input_names=['input'], output_names=['logits'])
        proto = onnx.load(partial)
        written = [o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')]
        if written != [opset]:
            raise RuntimeError(f'torch\'s ONNX exporter could not write this model in opset {opset} (it wrote '
                               f'{written}); pass --opset {written[0] if written else 18}.')
        relu_before_maxpool(proto.graph)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def relu_before_maxpool(graph) -> int:
    """ Rewrite each `MaxPool -> Relu` (the pool's only consumer) in an ONNX graph into `Relu -> MaxPool`: the
    same function (max-pooling commutes with ReLU), but the ReLU then follows the conv before the pool, so ONNX
    Runtime fuses it into the conv (fp32 and int8) and runs the pool on uint8 in a quantized graph instead of
    dequantizing around it. A folded DiracNet has this pattern at each of its pools. Returns the rewrites made. """
    nodes = list(graph.node)
    consumers: Dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    stale = set()
    swapped = 0
    for pool in [n for n in nodes if n.op_type == 'MaxPool' and len(n.output) == 1]:
        users = consumers.get(pool.output[0], [])
        if pool.output[0] in outputs or len(users) != 1 or users[0].op_type != 'Relu':
            continue
        relu = users[0]
        source, pooled, result = pool.input[0], pool.output[0], relu.output[0]
        relu.input[0], relu.output[0] = source, f'{source}_relu'  # the ReLU now reads the pool's input
        pool.input[0], pool.output[0] = f'{source}_relu', result  # and the pool writes what the ReLU wrote
        stale.add(pooled)
        nodes.remove(relu)
        nodes.insert(nodes.index(pool), relu)
        swapped += 1
    if swapped:
        del graph.node[:]
        graph.node.extend(nodes)
        infos = [v for v in graph.value_info if v.name not in stale]  # shapes of tensors that no longer exist
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return swapped


def op_types(path: str) -> Set[str]:
    import onnx
    return {node.op_type for node in onnx.load(path, load_external_data=False).graph.node}


def check_graph_ops(path: str, split_taps: bool = False) -> Set[str]:
    """ Raise unless the graph is a plain chain: only ALLOWED_OPS, plus Add right after a MatMul (a split GEMM)
    and, with `split_taps`, the Add of a Dirac layer with its taps out of the conv (`dirac_tap`): of two Conv outputs
    (`SplitDiracConv`) or of a Conv output and that Conv's own input (`IdentityDiracConv`). """
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}

    def allowed_add(node) -> bool:
        inputs = [producers.get(name) for name in node.input]
        kinds = [n.op_type if n is not None else None for n in inputs]
        if 'MatMul' in kinds:
            return True
        if not split_taps or 'Conv' not in kinds:
            return False
        conv = inputs[kinds.index('Conv')]
        other = node.input[1 - kinds.index('Conv')]
        return kinds == ['Conv', 'Conv'] or other == conv.input[0]
    bad = sorted({
        node.op_type for node in graph.node
        if node.op_type not in ALLOWED_OPS and not (node.op_type == 'Add' and allowed_add(node))})
    if bad:
        raise RuntimeError(
            f'{path} holds {bad} nodes; a folded DiracNet graph may only hold {sorted(ALLOWED_OPS)} (+ Add after '
            f'MatMul). A BatchNormalization or Add node means the model was not folded: call '
            f'model.reparameterize() (or build it with inference_mode=True) before exporting.')
    return {node.op_type for node in graph.node}


def ort_session(path: str, threads: Optional[int] = None):
    """ An ONNX Runtime CPU session with all graph optimizations and `threads` intra-op threads. """
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def verify_onnx(path: str, model: nn.Module, images: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE) -> Dict[str, Any]:
    """ Compare ONNX Runtime with PyTorch (fp32, eval) on `images` as one batch and on the first image alone.
    Raises if the largest difference exceeds `tolerance` times the largest PyTorch logit magnitude. """
    session = ort_session(path)
    name = session.get_inputs()[0].name
    with torch.no_grad():
        reference = model.eval()(images)
    outputs = []
    for batch in (images, images[:1]):
        got = torch.from_numpy(session.run(None, {name: batch.contiguous().numpy()})[0])
        expected = (batch.shape[0],) + tuple(reference.shape[1:])
        if tuple(got.shape) != expected:
            raise RuntimeError(f'ONNX Runtime returned shape {tuple(got.shape)} for a batch of {batch.shape[0]}, '
                               f'expected {expected}: the exported batch axis is not dynamic.')
        outputs.append(got)
    worst = max((got - reference[:got.shape[0]]).abs().max().item() for got in outputs)
    scale = reference.abs().max().item()
    relative = worst / max(scale, 1e-12)
    if not relative <= tolerance:  # NaN fails too
        raise RuntimeError(f'ONNX Runtime differs from PyTorch by {worst:.3g} (= {relative:.3g} of the logit scale '
                           f'{scale:.3g}; tolerance {tolerance:g}) in {path}: the export is not faithful.')
    return dict(max_abs_diff=worst, logit_scale=scale, relative_diff=relative, images=images.shape[0],
                top1_agreement=(outputs[0].argmax(1) == reference.argmax(1)).float().mean().item())


def quantize_onnxruntime(fp32_path: str, int8_path: str, calib: torch.Tensor, batch_size: int = 32,
                         method: str = 'minmax', weight_bits: int = 8) -> None:
    """ ONNX Runtime static int8 (QDQ): per-channel symmetric int8 weights (7-bit, +-64, with `weight_bits=7`),
    uint8 activations calibrated on `calib`. """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if weight_bits not in (7, 8):
        raise ValueError(f'weight_bits must be 7 or 8, got {weight_bits}.')

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{'input': b.contiguous().numpy()} for b in calib.split(batch_size)])

        def get_next(self):
            return next(self.feeds, None)

    methods = dict(minmax=CalibrationMethod.MinMax, percentile=CalibrationMethod.Percentile,
                   entropy=CalibrationMethod.Entropy)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, 'prepared.onnx')
        quant_pre_process(fp32_path, prepared)  # shape inference + graph optimization, as ORT recommends
        quantize_static(
            prepared, int8_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=weight_bits == 7, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[method])


def write_int8_onnx(model: nn.Module, flow: str, path: str, calib: torch.Tensor, method: str = 'minmax') -> None:
    """ The int8 ONNX file of a folded model by an ONNX Runtime flow of `ONNX_FLOWS` (the exported graph is checked
    against the model on calibration images before it is quantized; the split graph's ops too). """
    spec = ONNX_FLOWS[flow]
    input_size = tuple(calib.shape[1:])
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, 'fp32.onnx')
        export_onnx(spec.taps(model) if spec.taps else model, source, input_size)
        if spec.taps:
            check_graph_ops(source, split_taps=True)
        verify_onnx(source, model, calib[:32])
        quantize_onnxruntime(source, path, calib, method=method, weight_bits=spec.weight_bits)


def _prepare(model: nn.Module, setup: Setup, flow: Optional[str] = None) -> Runner:
    """ ONNX Runtime on `model` exported to `setup.workdir`: fp32 without `flow`, else the int8 file of that flow
    calibrated on `setup.calib`. The file is reused if the workdir already holds it. """
    if flow is None:
        path = os.path.join(setup.workdir, f'{setup.tag}_fp32.onnx')
        if not os.path.exists(path):
            export_onnx(model, path, setup.input_size)
    else:
        path = os.path.join(setup.workdir, f'{setup.tag}_int8_{flow}.onnx')
        if not os.path.exists(path):
            write_int8_onnx(model, flow, path, setup.calib, setup.method)
    session = ort_session(path, setup.threads)
    name = session.get_inputs()[0].name

    def bind(x: torch.Tensor):
        feed = {name: x.contiguous().numpy()}
        return lambda: session.run(None, feed)
    return Runner(predict=lambda x: torch.from_numpy(bind(x)()[0]), bind=bind,
                  precision='fp32' if flow is None else 'int8', file=path,
                  weight_bits=None if flow is None else ONNX_FLOWS[flow].weight_bits)


@register_backend('onnxruntime', precisions=('fp32',), requires=REQUIRES)
def prepare_fp32(model: nn.Module, setup: Setup) -> Runner:
    """ ONNX Runtime fp32: NCHW input, dynamic batch. """
    return _prepare(model, setup)


@register_backend('chain', precisions=('int8',), requires=REQUIRES)
def prepare_chain(model: nn.Module, setup: Setup) -> Runner:
    """ ONNX Runtime static int8 with the Dirac taps as identity adds in per-channel units (7-bit weights); folded
    DiracNets only. """
    return _prepare(model, setup, 'chain')


@register_backend('split', precisions=('int8',), requires=REQUIRES)
def prepare_split(model: nn.Module, setup: Setup) -> Runner:
    """ ONNX Runtime static int8 with the Dirac taps split out (7-bit weights); folded DiracNets only. """
    return _prepare(model, setup, 'split')


@register_backend('plain', precisions=('int8',), requires=REQUIRES)
def prepare_plain(model: nn.Module, setup: Setup) -> Runner:
    """ ONNX Runtime's usual static int8 (per-channel 8-bit weights) of the model as it is. """
    return _prepare(model, setup, 'plain')


@register_backend('onnxruntime-int8', precisions=('int8',), requires=REQUIRES)
def prepare_int8(model: nn.Module, setup: Setup) -> Runner:
    """ ONNX Runtime static int8 as `timm-dirac quantize` writes it by default: the `chain` flow for a folded
    DiracNet, `plain` for any other model. """
    dirac = any(isinstance(m, DiracBlock) for m in model.modules()) and is_folded(model)
    return _prepare(model, setup, 'chain' if dirac else 'plain')
