""" A NumPy reference of a QDQ int8 ONNX model, with the int8 convs computed in integers the way x86 CPUs do.

What it is for: showing what an int8 file does on a CPU one does not have. x86 CPUs without VNNI (AVX2, AVX-512
without `avx512_vnni`) run ONNX Runtime's u8 x s8 convolutions with `vpmaddubsw`, which multiplies pairs of
adjacent reduction elements and adds each pair into a *saturating* int16 before widening to int32; VNNI and AMX
accumulate in int32 directly. With `saturate_pairs=True` this reference reproduces the int16 saturation, so the
accuracy of one ONNX file can be measured for both kinds of CPU on either.

The reduction order is the one ONNX Runtime runs its int8 convs in on x86: channels-last im2col, so element k of a
filter is (kernel row, kernel column, input channel) with the input channel fastest, and the pairs are input
channels (2j, 2j+1) of the same tap. Depthwise convs do not go through the paired GEMM and are computed exactly.
A pair with |w0| + |w1| <= 128 cannot saturate (255 * 128 < 2**15), so 7-bit weights (+-64) are exact everywhere.

Covered ops: the QDQ graphs that `timm-dirac quantize` writes for folded DiracNets (QuantizeLinear,
DequantizeLinear, Conv, Add, Relu, MaxPool, GlobalAveragePool/ReduceMean, Flatten/Reshape, Gemm/MatMul). Any other
op raises, naming it.
"""
from typing import Dict, Tuple

import numpy as np

__all__ = ['QdqReference', 'saturation_risk']

INT16_MIN, INT16_MAX = -2 ** 15, 2 ** 15 - 1


def _attrs(node) -> Dict:
    import onnx
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _per_axis(value: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if value.ndim == 0:
        return value
    shape = [1] * ndim
    shape[axis] = -1
    return value.reshape(shape)


def _quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1) -> np.ndarray:
    info = np.iinfo(zero_point.dtype)
    scale, zero_point = _per_axis(scale, axis, x.ndim), _per_axis(zero_point, axis, x.ndim)
    q = np.rint(x / scale) + zero_point.astype(np.float64)  # rint: round half to even, as ONNX specifies
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1) -> np.ndarray:
    scale, zero_point = _per_axis(scale, axis, q.ndim), _per_axis(zero_point, axis, q.ndim)
    return ((q.astype(np.float64) - zero_point.astype(np.float64)) * scale).astype(np.float32)


def _im2col(x: np.ndarray, kernel: Tuple[int, int], pads, strides, pad_value: float = 0.
            ) -> Tuple[np.ndarray, int, int]:
    """ (N, C, H, W) -> (N * H_out * W_out, kh * kw * C): channels-last patches, the input channel fastest. """
    n, c, h, w = x.shape
    kh, kw = kernel
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=pad_value)
    h_out = (h + pads[0] + pads[2] - kh) // strides[0] + 1
    w_out = (w + pads[1] + pads[3] - kw) // strides[1] + 1
    cols = np.empty((n, h_out, w_out, kh, kw, c), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + strides[0] * h_out:strides[0], j:j + strides[1] * w_out:strides[1]]
            cols[:, :, :, i, j, :] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n * h_out * w_out, kh * kw * c), h_out, w_out


def saturation_risk(weight_q: np.ndarray) -> np.ndarray:
    """ For an int8 conv weight (C_out, C_in, kh, kw): the pairs (adjacent input channels of one tap, as x86 pairs
    them) with |w0| + |w1| > 128, which a uint8 input can push past int16. Returns a (C_out, pairs) boolean mask. """
    paired = _paired(weight_q.astype(np.int32))
    return np.abs(paired).sum(-1) > 128


def _paired(weight_q: np.ndarray) -> np.ndarray:
    """ (C_out, C_in, kh, kw) -> (C_out, K / 2, 2) in channels-last reduction order (a zero pads an odd C_in). """
    c_out = weight_q.shape[0]
    flat = weight_q.transpose(0, 2, 3, 1).reshape(c_out, -1)
    if flat.shape[1] % 2:
        flat = np.concatenate([flat, np.zeros((c_out, 1), flat.dtype)], 1)
    return flat.reshape(c_out, -1, 2)


def _int_conv(x_q: np.ndarray, w_q: np.ndarray, attrs: Dict, pad_value: int, saturate_pairs: bool
              ) -> Tuple[np.ndarray, int]:
    """ sum over the filter of x_q * w_q (raw uint8 x int8; the padding holds the input zero point `pad_value`,
    as in ONNX Runtime, and no zero point is subtracted yet) as int64, with the int16 saturation of adjacent pairs
    if asked. Returns (N, C_out, H, W) and the number of saturated pair sums. """
    groups = attrs.get('group', 1)
    kernel = tuple(w_q.shape[2:])
    pads = attrs.get('pads', [0, 0, 0, 0])
    strides = attrs.get('strides', [1, 1])
    n = x_q.shape[0]
    c_out = w_q.shape[0]
    if groups != 1:  # depthwise: one input channel per output channel, no pairing
        if groups != x_q.shape[1] or groups != c_out:
            raise NotImplementedError('only depthwise grouped convs are covered')
        outs = []
        for c in range(c_out):
            cols, h_out, w_out = _im2col(x_q[:, c:c + 1].astype(np.float64), kernel, pads, strides, pad_value)
            outs.append(cols @ w_q[c].reshape(-1).astype(np.float64))
        return np.stack(outs, 1).reshape(n, h_out, w_out, c_out).transpose(0, 3, 1, 2).astype(np.int64), 0
    cols, h_out, w_out = _im2col(x_q.astype(np.float64), kernel, pads, strides, pad_value)
    w_flat = w_q.transpose(0, 2, 3, 1).reshape(c_out, -1).astype(np.float64)
    acc = cols @ w_flat.T  # exact: |sum| < 2**53
    saturated = 0
    if saturate_pairs:
        risky = saturation_risk(w_q)
        if risky.any():
            if cols.shape[1] % 2:
                cols = np.concatenate([cols, np.zeros((cols.shape[0], 1))], 1)
            paired_w = _paired(w_q.astype(np.float64))
            for o, p in zip(*np.nonzero(risky)):
                pair = cols[:, 2 * p:2 * p + 2] @ paired_w[o, p]
                clipped = np.clip(pair, INT16_MIN, INT16_MAX)
                saturated += int((clipped != pair).sum())
                acc[:, o] += clipped - pair
    return np.rint(acc).astype(np.int64).reshape(n, h_out, w_out, c_out).transpose(0, 3, 1, 2), saturated


class QdqReference:
    """ Runs a QDQ ONNX model in NumPy. Convs whose input and weight are dequantized int8 tensors run in integers
    (`_int_conv`), optionally with the int16 pair saturation of pre-VNNI x86; the rest follows ONNX float
    semantics. `saturated_pairs` counts saturated pair sums over the calls since construction. """

    def __init__(self, path: str, saturate_pairs: bool = False):
        import onnx
        from onnx import numpy_helper
        self.model = onnx.load(path)
        self.graph = self.model.graph
        self.saturate_pairs = saturate_pairs
        self.constants = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.saturated_pairs = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        values: Dict[str, np.ndarray] = dict(self.constants)
        values[self.graph.input[0].name] = x.astype(np.float32)
        quantized: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}  # DQ output -> (q, scale, zp, axis)
        for node in self.graph.node:
            attrs = _attrs(node)
            ins = [values.get(name) if name else None for name in node.input]
            op = node.op_type
            if op == 'QuantizeLinear':
                out = _quantize(ins[0], ins[1], ins[2], attrs.get('axis', 1))
            elif op == 'DequantizeLinear':
                axis = attrs.get('axis', 1)
                out = _dequantize(ins[0], ins[1], ins[2], axis)
                quantized[node.output[0]] = (ins[0], ins[1], ins[2], axis)
            elif op == 'Conv':
                out = self._conv(node, ins, attrs, quantized)
            elif op == 'Add':
                out = ins[0] + ins[1]
            elif op == 'Relu':
                out = np.maximum(ins[0], 0)
            elif op == 'MaxPool':
                out = self._maxpool(ins[0], attrs)
            elif op in ('GlobalAveragePool', 'ReduceMean'):
                axes = tuple(ins[1]) if op == 'ReduceMean' and len(ins) > 1 and ins[1] is not None else (2, 3)
                out = ins[0].mean(axis=axes, keepdims=bool(attrs.get('keepdims', 1)))
            elif op == 'Flatten':
                out = ins[0].reshape(ins[0].shape[0], -1)
            elif op == 'Reshape':
                shape = [ins[0].shape[i] if s == 0 and not attrs.get('allowzero', 0) else s
                         for i, s in enumerate(ins[1].tolist())]
                out = ins[0].reshape(shape)
            elif op == 'Gemm':
                a = ins[0].T if attrs.get('transA', 0) else ins[0]
                b = ins[1].T if attrs.get('transB', 0) else ins[1]
                out = attrs.get('alpha', 1.) * (a @ b)
                if len(ins) > 2 and ins[2] is not None:
                    out = out + attrs.get('beta', 1.) * ins[2]
            elif op == 'MatMul':
                out = ins[0] @ ins[1]
            else:
                raise NotImplementedError(f'op {op} is not covered by the int8 reference')
            values[node.output[0]] = np.asarray(out, dtype=np.asarray(out).dtype)
        return values[self.graph.output[0].name]

    def _conv(self, node, ins, attrs, quantized) -> np.ndarray:
        x_info, w_info = quantized.get(node.input[0]), quantized.get(node.input[1])
        if x_info is None or w_info is None or x_info[0].dtype != np.uint8 or w_info[0].dtype != np.int8:
            raise NotImplementedError(f'Conv {node.name} is not a uint8 x int8 conv (its input and weight must come '
                                      f'from DequantizeLinear)')
        x_q, x_scale, zero_point, _ = x_info
        w_q, w_scale, _, _ = w_info
        acc, saturated = _int_conv(x_q, w_q, attrs, int(zero_point), self.saturate_pairs)
        self.saturated_pairs += saturated
        acc = acc - int(zero_point) * w_q.astype(np.int64).sum((1, 2, 3))[None, :, None, None]
        out = acc * (np.float64(x_scale) * w_scale.astype(np.float64))[None, :, None, None]
        if len(ins) > 2 and ins[2] is not None:
            out = out + ins[2].astype(np.float64)[None, :, None, None]
        return out.astype(np.float32)

    @staticmethod
    def _maxpool(x: np.ndarray, attrs: Dict) -> np.ndarray:
        kh, kw = attrs['kernel_shape']
        sh, sw = attrs.get('strides', [1, 1])
        pads = attrs.get('pads', [0, 0, 0, 0])
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=-np.inf)
        h_out = (x.shape[2] - kh) // sh + 1
        w_out = (x.shape[3] - kw) // sw + 1
        out = np.full(x.shape[:2] + (h_out, w_out), -np.inf, dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                out = np.maximum(out, x[:, :, i:i + sh * h_out:sh, j:j + sw * w_out:sw])
        return out
