""" `timm-dirac quantize`: post-training static int8 of the folded model, calibrated on real images.

Two flows are run and measured side by side, and the faster one within the accuracy budget is chosen:
- `onnxruntime`: ONNX Runtime `quantize_static` (QDQ, per-channel int8 weights, uint8 activations);
- `pt2e`: PyTorch 2 export quantization with the x86 inductor quantizer (torchao), run through `torch.compile`.
A folded DiracNet is a plain conv-ReLU chain with no BatchNorm left and no skip additions to requantize, which is
the structure that lets plain post-training quantization work (RepVGG's multi-branch kernels are what break it).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .export import default_data, export_onnx, fold, load_images, load_model, ort_session

FLOWS = ('onnxruntime', 'pt2e')


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
                         method: str = 'minmax') -> None:
    """ ONNX Runtime static int8 (QDQ): per-channel symmetric int8 weights, uint8 activations calibrated on
    `calib`. """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method])


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
                          'pip install "timm-dirac[export]", or use --flows onnxruntime.') from e
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


def _time(run: Callable[[], Any], repeats: int, min_time: float) -> float:
    run()
    start = time.perf_counter()
    run()
    iters = max(1, round(min_time / (time.perf_counter() - start)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            run()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def measure_speed(runners: Dict[str, Callable[[], Any]], batch_size: int, repeats: int = 5,
                  min_time: float = 0.5) -> Dict[str, float]:
    """ Images/s of each runner, interleaved over `repeats` rounds (median). """
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(_time(run, 1, min_time))
    return {name: batch_size / statistics.median(t) for name, t in times.items()}


def run_quantize(
        model_name: Optional[str],
        checkpoint: Optional[str],
        calib_data: str,
        out: str,
        eval_data: Optional[str] = None,
        flows: Sequence[str] = FLOWS,
        num_calib: int = 512,
        num_eval: Optional[int] = None,
        calib_split: str = 'train',
        eval_split: str = 'test',
        method: str = 'minmax',
        max_drop: float = 0.5,
        bench_batch: int = 32,
        repeats: int = 5,
        log=print,
) -> Dict[str, Any]:
    """ Fold, calibrate, quantize with each flow, measure top-1 on `eval_data` and int8 vs fp32 speed; writes the
    int8 models and quantize.json to `out` and returns the report (with the chosen flow). """
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = fold(load_model(model_name, checkpoint))
    calib, _ = load_images(calib_data, model, num_calib, calib_split)
    images, labels = load_images(eval_data or calib_data, model, num_eval, eval_split)
    log(f'calibration: {len(calib)} images ({calib_data} {calib_split}); evaluation: {len(images)} images '
        f'({eval_data or calib_data} {eval_split})')
    input_size = tuple(images.shape[1:])
    bench_input = images[:bench_batch].contiguous()

    with torch.no_grad():
        fp32_top1 = top1(model, images, labels, bench_batch)
    report: Dict[str, Any] = dict(
        model=model.pretrained_cfg.get('architecture', model_name), checkpoint=checkpoint, calib_data=calib_data,
        calib_split=calib_split, num_calib=len(calib), eval_data=eval_data or calib_data, eval_split=eval_split,
        num_eval=len(images), method=method, max_drop=max_drop, fp32_top1=fp32_top1, flows={})
    runners: Dict[str, Callable[[], Any]] = {'pytorch-fp32': _no_grad_call(model, bench_input)}

    if 'onnxruntime' in flows:
        fp32_path, int8_path = str(out_dir / 'model_fp32.onnx'), str(out_dir / 'model_int8.onnx')
        export_onnx(model, fp32_path, input_size)
        quantize_onnxruntime(fp32_path, int8_path, calib, method=method)
        sessions = {'fp32': ort_session(fp32_path), 'int8': ort_session(int8_path)}

        def ort_predict(session):
            return lambda b: torch.from_numpy(session.run(None, {'input': b.contiguous().numpy()})[0])
        int8_top1 = top1(ort_predict(sessions['int8']), images, labels, bench_batch)
        report['flows']['onnxruntime'] = dict(
            fp32_top1=top1(ort_predict(sessions['fp32']), images, labels, bench_batch), int8_top1=int8_top1,
            drop=fp32_top1 - int8_top1, file=int8_path)
        feed = {'input': bench_input.numpy()}
        runners['onnxruntime-fp32'] = lambda: sessions['fp32'].run(None, feed)
        runners['onnxruntime-int8'] = lambda: sessions['int8'].run(None, feed)
        log(f"onnxruntime int8 top-1 {int8_top1:.2f} (fp32 {fp32_top1:.2f})")

    if 'pt2e' in flows:
        converted, lowered = quantize_pt2e(model, calib, bench_batch)
        with torch.no_grad():
            int8_top1 = top1(lowered, images, labels, bench_batch)
        path = out_dir / 'model_int8_pt2e.pt2'
        torch.export.save(torch.export.export(
            converted, (bench_input,), dynamic_shapes=({0: torch.export.Dim('batch')},)), str(path))
        report['flows']['pt2e'] = dict(int8_top1=int8_top1, drop=fp32_top1 - int8_top1, file=str(path))
        runners['pt2e-int8'] = _no_grad_call(lowered, bench_input)
        log(f"pt2e int8 top-1 {int8_top1:.2f} (fp32 {fp32_top1:.2f})")

    speed = measure_speed(runners, len(bench_input), repeats)
    report['img_per_s'] = speed
    report['bench_batch'] = len(bench_input)
    baselines = {'onnxruntime': 'onnxruntime-fp32', 'pt2e': 'pytorch-fp32'}
    int8_names = {'onnxruntime': 'onnxruntime-int8', 'pt2e': 'pt2e-int8'}
    for flow, info in report['flows'].items():
        info['img_per_s'] = speed[int8_names[flow]]
        info['speedup_vs_same_backend_fp32'] = speed[int8_names[flow]] / speed[baselines[flow]]
        info['speedup_vs_eager_fp32'] = speed[int8_names[flow]] / speed['pytorch-fp32']
    within = [f for f, i in report['flows'].items() if i['drop'] <= max_drop]
    pool = within or list(report['flows'])
    chosen = max(pool, key=lambda f: report['flows'][f]['img_per_s']) if within else \
        min(pool, key=lambda f: report['flows'][f]['drop'])
    report['chosen'] = chosen
    report['goal_met'] = bool(within)
    (out_dir / 'quantize.json').write_text(json.dumps(report, indent=2))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default=None, help='timm model name (optional with a --checkpoint folder)')
    parser.add_argument('--checkpoint', default=None, metavar='DIR',
                        help='checkpoint folder (config.json + model.safetensors) or weights file')
    parser.add_argument('--calib', default=None,
                        help='calibration images, a timm dataset name such as hfds/<folder> (default: the CIFAR-10 '
                             'sample in data/cifar10_sample, else ../shared/data/cifar10)')
    parser.add_argument('--calib-split', default='train')
    parser.add_argument('--num-calib', type=int, default=512)
    parser.add_argument('--eval-data', default=None, help='dataset for the accuracy check (default: --calib)')
    parser.add_argument('--eval-split', default='test')
    parser.add_argument('--num-eval', type=int, default=None, help='evaluation images (default: the whole split)')
    parser.add_argument('--flows', nargs='+', default=list(FLOWS), choices=FLOWS)
    parser.add_argument('--method', default='minmax', choices=['minmax', 'percentile', 'entropy'],
                        help='ONNX Runtime calibration method')
    parser.add_argument('--max-drop', type=float, default=0.5, help='top-1 points an int8 flow may lose')
    parser.add_argument('--bench-batch', type=int, default=32,
                        help='batch size of the speed comparison and of evaluation (the lowered pt2e graph is static)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--out', required=True, metavar='DIR')


def run(args: argparse.Namespace) -> int:
    calib = args.calib or default_data()
    if calib is None:
        print('No calibration images: pass --calib hfds/<dataset folder> (real images of the training '
              'distribution).', file=sys.stderr)
        return 2
    report = run_quantize(
        args.model, args.checkpoint, calib, args.out, args.eval_data, args.flows, args.num_calib, args.num_eval,
        args.calib_split, args.eval_split, args.method, args.max_drop, args.bench_batch, args.repeats,
        log=lambda msg: print(msg, file=sys.stderr))
    print(f"fp32 top-1 {report['fp32_top1']:.2f} on {report['num_eval']} images; images/s at batch "
          f"{report['bench_batch']}: " + ', '.join(f'{k} {v:.1f}' for k, v in report['img_per_s'].items()))
    for flow, info in report['flows'].items():
        print(f"{flow}: int8 top-1 {info['int8_top1']:.2f} (drop {info['drop']:+.2f} points), "
              f"{info['speedup_vs_same_backend_fp32']:.2f}x its fp32, {info['speedup_vs_eager_fp32']:.2f}x eager "
              f"fp32 -> {info['file']}")
    verdict = 'within' if report['goal_met'] else 'NOT within'
    print(f"chosen: {report['chosen']} ({verdict} the {report['max_drop']} point budget); report "
          f"{Path(args.out) / 'quantize.json'}")
    return 0
