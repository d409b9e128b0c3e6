""" `timm-dirac quantize`: post-training static int8 of the folded model, calibrated on real images.

Flows (`--flow`, one or more; each is measured on the evaluation images and the fastest within `--max-drop` is
chosen):
- `split` (default): ONNX Runtime QDQ of the folded DiracNet with its Dirac taps split out (`dirac_tap`): the learned
  3x3 weights get their own per-channel scale and the identity rides in an exact 1x1 int8 conv, added by
  QLinearAdd. Weights are 7-bit (+-64), so no pair of u8 x s8 products can exceed int16: the same file is exact on
  CPUs without VNNI, whose int8 kernels sum such pairs in saturating 16-bit registers.
- `plain`: ONNX Runtime QDQ of the folded model as it is (per-channel 8-bit weights): the folded Dirac tap sets each
  filter's scale and leaves the learned weights a few int8 steps.
- `pt2e`: PyTorch 2 export quantization with torchao's x86 inductor quantizer, lowered to oneDNN int8 kernels.
Activations are uint8 per tensor in every flow, calibrated with `--method` (ONNX Runtime's calibrators).
"""
import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .benchmark import machine_info
from .dirac_tap import split_dirac_taps
from .export import check_graph_ops, default_data, export_onnx, fold, is_folded, load_images, load_model, \
    ort_session, verify_onnx
from .timing import time_interleaved


@dataclass(frozen=True)
class OnnxFlow:
    """ An ONNX Runtime QDQ flow: whether the Dirac taps are split out, and the weights' bit width. """
    split_taps: bool
    weight_bits: int


ONNX_FLOWS = {'split': OnnxFlow(split_taps=True, weight_bits=7), 'plain': OnnxFlow(split_taps=False, weight_bits=8)}
FLOWS = tuple(ONNX_FLOWS) + ('pt2e',)
METHODS = ('minmax', 'percentile', 'entropy')


def _batches(images: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


def top1(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
         batch_size: int = 32) -> float:
    """ Top-1 accuracy (%) of `predict` (a batch of images -> logits), fed fixed-size batches (the last one padded
    with zeros and the padding dropped) since a lowered int8 graph has a static batch size. """
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        count = len(batch)
        if count < batch_size:
            batch = torch.cat([batch, batch.new_zeros((batch_size - count,) + batch.shape[1:])])
        correct += int((predict(batch)[:count].argmax(1) == labels[start:start + count]).sum())
    return 100. * correct / len(labels)


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
            self.feeds = iter([{'input': b.contiguous().numpy()} for b in _batches(calib, batch_size)])

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
        export_onnx(split_dirac_taps(model) if spec.split_taps else model, source, input_size)
        if spec.split_taps:
            check_graph_ops(source, split_taps=True)
        verify_onnx(source, model, calib[:32])
        quantize_onnxruntime(source, path, calib, method=method, weight_bits=spec.weight_bits)


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
        for batch in _batches(calib, batch_size):
            prepared(batch)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    # torch.compile(converted, options={'freezing': True}) fails with torch 2.14 + torchao 0.18 (no fake kernel
    # for onednn.qconv_prepack during constant folding); the explicit lowering runs the same oneDNN int8 kernels
    with torch.no_grad():
        lowered = lower_pt2e_quantized_to_x86(copy.deepcopy(converted), (example,))
    return converted, lowered


def _no_grad_call(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return fn(x)
    return run


def _ort_runner(session, x: torch.Tensor) -> Callable[[], Any]:
    feed = {'input': x.contiguous().numpy()}
    return lambda: session.run(None, feed)


def _ort_predict(session) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda b: torch.from_numpy(session.run(None, {'input': b.contiguous().numpy()})[0])


def measure_speed(runners: Dict[str, Callable[[], Any]], batch_size: int, repeats: int = 5,
                  min_time: float = 0.5) -> Dict[str, float]:
    """ Images/s of each runner: median over `repeats` interleaved rounds (`timing.time_interleaved`). """
    times, _ = time_interleaved(runners, repeats, min_time=min_time)
    return {name: batch_size / statistics.median(t) for name, t in times.items()}


def run_quantize(
        model_name: Optional[str],
        checkpoint: Optional[str],
        calib_data: str,
        out: str,
        eval_data: Optional[str] = None,
        flows: Sequence[str] = ('split',),
        num_calib: int = 512,
        num_eval: Optional[int] = None,
        calib_split: str = 'train',
        eval_split: str = 'test',
        method: str = 'minmax',
        max_drop: float = 0.5,
        bench_batches: Sequence[int] = (1, 32),
        repeats: int = 5,
        log=print,
) -> Dict[str, Any]:
    """ Fold, calibrate, quantize with each flow, measure top-1 on `eval_data` and int8 against ONNX Runtime fp32
    speed of the same model at each of `bench_batches`. Everything is written to a temporary folder beside `out`
    and renamed to `out` at the end (int8 models, the fp32 ONNX baseline, quantize.json), so a failed run leaves
    nothing behind. `out` must not exist. Returns the report (with the chosen flow). """
    unknown = [f for f in flows if f not in FLOWS]
    if unknown or not flows:
        raise ValueError(f'unknown flow {unknown or flows}: choose from {", ".join(FLOWS)} (e.g. --flow split).')
    if method not in METHODS:
        raise ValueError(f'unknown calibration method {method!r}: choose from {", ".join(METHODS)}.')
    out_dir = Path(out)
    if out_dir.exists():
        raise FileExistsError(f'{out_dir} already exists: pass a new --out folder (nothing is overwritten).')

    model = load_model(model_name, checkpoint)
    if not is_folded(model):
        log('the checkpoint is in the train form: folded it (BatchNorm and Dirac terms into plain convs) first')
    model = fold(model)
    calib, _ = load_images(calib_data, model, num_calib, calib_split)
    if len(calib) < num_calib:
        raise ValueError(f'the calibration set {calib_data} (split {calib_split}) has {len(calib)} images, '
                         f'{num_calib} were asked for: pass --num-calib {len(calib)} or a larger --calib dataset.')
    images, labels = load_images(eval_data or calib_data, model, num_eval, eval_split)
    log(f'calibration: {len(calib)} images ({calib_data} {calib_split}); evaluation: {len(images)} images '
        f'({eval_data or calib_data} {eval_split})')
    input_size = tuple(images.shape[1:])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        report = _quantize_flows(model, model_name, checkpoint, calib, images, labels, input_size, work, flows,
                                 method, max_drop, bench_batches, repeats, log)
        report.update(calib_data=calib_data, calib_split=calib_split, num_calib=len(calib),
                      eval_data=eval_data or calib_data, eval_split=eval_split, num_eval=len(images))
        for info in report['flows'].values():
            info['file'] = str(out_dir / Path(info['file']).name)
        (work / 'quantize.json').write_text(json.dumps(report, indent=2))
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _quantize_flows(model, model_name, checkpoint, calib, images, labels, input_size, work: Path,
                    flows: Sequence[str], method: str, max_drop: float, bench_batches: Sequence[int], repeats: int,
                    log) -> Dict[str, Any]:
    with torch.no_grad():
        fp32_top1 = top1(model, images, labels)
    report: Dict[str, Any] = dict(
        model=model.pretrained_cfg.get('architecture', model_name), checkpoint=checkpoint, method=method,
        max_drop=max_drop, fp32_top1=fp32_top1, machine=machine_info(), flows={})
    fp32_path = str(work / 'model_fp32.onnx')
    export_onnx(model, fp32_path, input_size)
    check_graph_ops(fp32_path)
    verify_onnx(fp32_path, model, images[:32])
    sessions = {'onnxruntime-fp32': ort_session(fp32_path)}
    report['onnxruntime_fp32_top1'] = top1(_ort_predict(sessions['onnxruntime-fp32']), images, labels)
    lowered_pt2e = None

    for flow in flows:
        if flow in ONNX_FLOWS:
            int8_path = str(work / f'model_int8_{flow}.onnx')
            write_int8_onnx(model, flow, int8_path, calib, method)
            sessions[f'{flow}-int8'] = ort_session(int8_path)
            int8_top1 = top1(_ort_predict(sessions[f'{flow}-int8']), images, labels)
            report['flows'][flow] = dict(runtime='onnxruntime', weight_bits=ONNX_FLOWS[flow].weight_bits,
                                         int8_top1=int8_top1,
                                         drop=fp32_top1 - int8_top1, file=int8_path)
        else:
            converted, lowered_pt2e = quantize_pt2e(model, calib, max(bench_batches))
            with torch.no_grad():
                int8_top1 = top1(lowered_pt2e, images, labels, max(bench_batches))
            path = work / 'model_int8_pt2e.pt2'
            torch.export.save(torch.export.export(
                converted, (images[:2],), dynamic_shapes=({0: torch.export.Dim('batch')},)), str(path))
            report['flows'][flow] = dict(runtime='torch', weight_bits=8, int8_top1=int8_top1,
                                         drop=fp32_top1 - int8_top1, file=str(path))
        log(f'{flow}: int8 top-1 {int8_top1:.2f} (fp32 {fp32_top1:.2f})')

    report['img_per_s'] = {}
    for batch_size in bench_batches:
        x = images[:batch_size]
        runners = {name: _ort_runner(session, x) for name, session in sessions.items()}
        if lowered_pt2e is not None and batch_size == max(bench_batches):  # the lowered graph has a static batch
            runners['pt2e-int8'] = _no_grad_call(lowered_pt2e, x)
        report['img_per_s'][str(batch_size)] = measure_speed(runners, len(x), repeats)
    for flow, info in report['flows'].items():
        name = f'{flow}-int8'
        info['speedup_vs_onnxruntime_fp32'] = {
            batch: speed[name] / speed['onnxruntime-fp32'] for batch, speed in report['img_per_s'].items()
            if name in speed}

    within = [f for f, info in report['flows'].items() if info['drop'] <= max_drop]
    largest = str(max(bench_batches))
    report['chosen'] = max(within, key=lambda f: report['img_per_s'][largest][f'{f}-int8']) if within else \
        min(report['flows'], key=lambda f: report['flows'][f]['drop'])
    report['goal_met'] = bool(within)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default=None, help='timm model name (optional with a --checkpoint folder)')
    parser.add_argument('--checkpoint', default=None, metavar='DIR',
                        help='checkpoint folder (config.json + model.safetensors) or weights file, train form or '
                             'folded')
    parser.add_argument('--calib', default=None,
                        help='calibration images, a timm dataset name such as hfds/<folder> (default: the CIFAR-10 '
                             'sample in data/cifar10_sample)')
    parser.add_argument('--calib-split', default='train')
    parser.add_argument('--num-calib', type=int, default=512)
    parser.add_argument('--eval-data', default=None, help='dataset for the accuracy check (default: --calib)')
    parser.add_argument('--eval-split', default='test')
    parser.add_argument('--num-eval', type=int, default=None, help='evaluation images (default: the whole split)')
    parser.add_argument('--flow', nargs='+', default=['split'], metavar='FLOW',
                        help=f'one or more of {", ".join(FLOWS)} (default: split)')
    parser.add_argument('--method', default='minmax', metavar='METHOD',
                        help=f'activation calibration: {", ".join(METHODS)} (default: minmax)')
    parser.add_argument('--max-drop', type=float, default=0.5, help='top-1 points an int8 flow may lose')
    parser.add_argument('--bench-batch', type=int, nargs='+', default=[1, 32],
                        help='batch sizes of the speed comparison with ONNX Runtime fp32')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--out', required=True, metavar='DIR', help='a new folder for the int8 models and report')


def run(args: argparse.Namespace) -> int:
    calib = args.calib or default_data()
    if calib is None:
        print('error: no calibration images: pass --calib hfds/<dataset folder> (real images of the training '
              'distribution).', file=sys.stderr)
        return 2
    try:
        report = run_quantize(
            args.model, args.checkpoint, calib, args.out, args.eval_data, args.flow, args.num_calib, args.num_eval,
            args.calib_split, args.eval_split, args.method, args.max_drop, args.bench_batch, args.repeats,
            log=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f"fp32 top-1 {report['fp32_top1']:.2f} on {report['num_eval']} images")
    for batch, speed in report['img_per_s'].items():
        print(f'images/s at batch {batch}: ' + ', '.join(f'{k} {v:.1f}' for k, v in speed.items()))
    for flow, info in report['flows'].items():
        ratios = ', '.join(f'{r:.2f}x at batch {b}' for b, r in info['speedup_vs_onnxruntime_fp32'].items())
        print(f"{flow}: int8 top-1 {info['int8_top1']:.2f} (drop {info['drop']:+.2f} points), {ratios} ONNX "
              f"Runtime fp32 -> {info['file']}")
    verdict = 'within' if report['goal_met'] else 'NOT within'
    print(f"chosen: {report['chosen']} ({verdict} the {report['max_drop']} point budget); report "
          f"{Path(args.out) / 'quantize.json'}")
    return 0
