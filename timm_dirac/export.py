""" `timm-dirac export-onnx`: the folded model as ONNX, checked against PyTorch on real images before success.

A folded DiracNet is a plain conv-ReLU chain, so its ONNX graph must hold only Conv, Relu, MaxPool, the global
pool, a reshape and the classifier GEMM; `check_graph_ops` enforces that, and `verify_onnx` compares ONNX Runtime
with PyTorch on real images at two batch sizes (the batch axis is dynamic).
"""
import argparse
import contextlib
import copy
import io
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

import timm
from timm.data import create_dataset, create_transform, resolve_model_data_config
from timm.utils import reparameterize_model

ALLOWED_OPS = {'Conv', 'Relu', 'MaxPool', 'GlobalAveragePool', 'ReduceMean', 'Flatten', 'Reshape', 'Gemm', 'MatMul'}
DEFAULT_TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| relative to max |PyTorch logit|


def default_data() -> Optional[str]:
    """ Real CIFAR-10 images as a timm `hfds/` dataset name: the repository's sample (`data/cifar10_sample`) or the
    full copy in the `shared/` folder beside the repository, whichever exists first; None if neither does. """
    root = Path(__file__).resolve().parents[1]
    for path in (root / 'data' / 'cifar10_sample', root.parent / 'shared' / 'data' / 'cifar10'):
        if path.is_dir():
            return f'hfds/{path}'
    return None


def load_model(name: Optional[str], checkpoint: Optional[str] = None) -> nn.Module:
    """ Build a model in eval mode: a registry `name` (random weights without `checkpoint`), a checkpoint folder
    in the Hub layout (config.json + model.safetensors, via timm's `local-dir:`) or a weights file. Folded and
    train-form DiracNet weights both load (a folded file is unfolded exactly by the pretrained filter). """
    if checkpoint is None:
        if name is None:
            raise ValueError('Give --model NAME, --checkpoint DIR, or both.')
        return timm.create_model(name).eval()
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / 'config.json').is_file():
            raise FileNotFoundError(f'{path} has no config.json: a checkpoint folder needs the layout written by '
                                    f'timm.models.save_for_hf (config.json + model.safetensors); pass the weights '
                                    f'file itself with --model NAME otherwise.')
        model = timm.create_model(f'local-dir:{path}', pretrained=True)
        if name is not None and model.pretrained_cfg.get('architecture') not in (name, None):
            raise ValueError(f"--model {name} does not match the checkpoint's architecture "
                             f"{model.pretrained_cfg.get('architecture')!r} in {path / 'config.json'}.")
        return model.eval()
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    if name is None:
        raise ValueError(f'{path} is a weights file: also give --model NAME to say which architecture it is for.')
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()


def is_folded(model: nn.Module) -> bool:
    """ Whether a model is in the inference form: no BatchNorm and no Dirac-parameterized conv left. """
    from .layers import _DiracConvNd
    return not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, _DiracConvNd)) for m in model.modules())


def fold(model: nn.Module) -> nn.Module:
    """ Reparameterize for inference in place: DiracNet's own `reparameterize()`, else timm's helper. """
    if hasattr(model, 'reparameterize'):
        model.reparameterize()
        return model.eval()
    return reparameterize_model(model, inplace=True).eval()


def load_images(data: str, model: nn.Module, num: Optional[int] = 64, split: str = 'test'
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ The first `num` (all if None) images of a timm dataset (e.g. `hfds/<folder>`) and their labels, the images
    preprocessed by the model's eval transform (its data config: resize, crop, mean/std). """
    dataset = create_dataset(data, root=None, split=split)
    if len(dataset) == 0:
        raise ValueError(f'Dataset {data} (split {split}) is empty.')
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    count = len(dataset) if num is None else min(num, len(dataset))
    samples = [dataset[i] for i in range(count)]
    return torch.stack([transform(image) for image, _ in samples]), torch.tensor([int(label) for _, label in samples])


def export_onnx(model: nn.Module, path: str, input_size: Sequence[int], opset: int = 18) -> None:
    """ Export `model` (eval, fp32) with a dynamic batch axis: input 'input' (N, C, H, W), output 'logits';
    `MaxPool -> Relu` pairs are reordered to `Relu -> MaxPool` (see `relu_before_maxpool`). ONNX is NCHW: a
    channels_last model is exported from a contiguous copy (the exporter would otherwise add layout ops). """
    import onnx
    if any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
           for p in model.parameters()):
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    example = torch.randn(2, *input_size)  # batch 2: torch.export would specialize a batch of 1 to a constant
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress; failures still raise
        program = torch.onnx.export(
            model.eval(), (example,), None, dynamo=True, opset_version=opset, input_names=['input'],
            output_names=['logits'], dynamic_shapes=({0: torch.export.Dim('batch')},), verbose=False)
    proto = program.model_proto
    relu_before_maxpool(proto.graph)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


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
    and, with `split_taps`, Add of two Conv outputs (a Dirac layer with its taps split out, `dirac_tap`). """
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}

    def allowed_add(node) -> bool:
        inputs = [producers.get(name) for name in node.input]
        return 'MatMul' in inputs or (split_taps and inputs == ['Conv', 'Conv'])
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
    if relative > tolerance:
        raise RuntimeError(f'ONNX Runtime differs from PyTorch by {worst:.3g} (= {relative:.3g} of the logit scale '
                           f'{scale:.3g}; tolerance {tolerance:g}) in {path}: the export is not faithful.')
    return dict(max_abs_diff=worst, logit_scale=scale, relative_diff=relative, images=images.shape[0],
                top1_agreement=(outputs[0].argmax(1) == reference.argmax(1)).float().mean().item())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default=None, help='timm model name (optional with a --checkpoint folder)')
    parser.add_argument('--checkpoint', default=None, metavar='DIR',
                        help='checkpoint folder (config.json + model.safetensors) or weights file')
    parser.add_argument('--out', required=True, metavar='FILE.onnx')
    parser.add_argument('--data', default=None,
                        help='real images for the check, a timm dataset name (default: the CIFAR-10 sample in '
                             'data/cifar10_sample, else the copy in shared/ beside the repository)')
    parser.add_argument('--split', default='test')
    parser.add_argument('--num-images', type=int, default=32)
    parser.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                        help='max |ONNX - PyTorch| as a fraction of the largest |logit|')
    parser.add_argument('--opset', type=int, default=18)


def run(args: argparse.Namespace) -> int:
    data = args.data or default_data()
    if data is None:
        print('No real images to check the export with: pass --data hfds/<dataset folder> (or another timm '
              'dataset name).', file=sys.stderr)
        return 2
    model = fold(load_model(args.model, args.checkpoint))
    images, _ = load_images(data, model, args.num_images, args.split)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, str(out), tuple(images.shape[1:]), args.opset)
    ops = check_graph_ops(str(out))
    report = verify_onnx(str(out), model, images, args.tolerance)
    print(f'Wrote {out}: folded {model.pretrained_cfg.get("architecture", args.model)}, dynamic batch, nodes '
          f'{sorted(ops)}; ONNX Runtime vs PyTorch on {report["images"]} real images from {data}: max abs diff '
          f'{report["max_abs_diff"]:.2e} ({report["relative_diff"]:.2e} of the logit scale '
          f'{report["logit_scale"]:.3g}, tolerance {args.tolerance:g}).')
    return 0
