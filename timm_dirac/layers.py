""" Dirac-parameterized convolutions

A Dirac convolution computes its kernel as

    W_hat = alpha * delta + beta * normalize(W)

with `delta` the identity (Dirac delta) kernel, `normalize` the L2 normalisation of each output filter and
`alpha`, `beta` learnable per output channel (DiracNets v2, arXiv:1706.00388). With alpha=1 and beta=0 the layer
is the identity on the channels input and output share, so a very deep chain of them starts out well conditioned
without any skip connection. `reparameterize()` bakes `W_hat` into a plain convolution for deployment.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['DiracConv1d', 'DiracConv2d', 'DiracConv3d', 'dirac_kernel', 'fold_bn', 'fold_bn_stats', 'is_folded']

_size_any = Union[int, Tuple[int, ...]]


def dirac_kernel(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ Compute `alpha * delta + beta * normalize(weight)` for a conv weight of shape (C_out, C_in, *kernel).

    `delta` carries the identity on the first min(C_out, C_in) channels at the kernel's center tap. Built in two
    passes over the weight (the norms, then the scaling), in its dtype and memory format (a channels_last weight
    gives a channels_last kernel, which the conv takes without a copy): each filter is scaled by beta / ||W[o]||,
    then alpha is added in place on the center-tap diagonal, so no delta tensor is materialized or copied, forward
    or backward.
    """
    dims = weight.dim()
    norm = torch.linalg.vector_norm(weight, dim=list(range(1, dims)), keepdim=True)
    kernel = weight * (beta.view([-1] + [1] * (dims - 1)) / norm.clamp_min(1e-12))  # F.normalize's eps
    shared = torch.arange(min(weight.shape[0], weight.shape[1]), device=weight.device)
    center = [torch.full_like(shared, k // 2) for k in weight.shape[2:]]
    return kernel.index_put_([shared, shared] + center, alpha[:shared.shape[0]], accumulate=True)


torch.fx.wrap('dirac_kernel')  # a leaf for torch.fx (timm's tracer included): shape-dependent indexing


@torch.no_grad()
def fold_bn_stats(
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        bn_weight: Optional[torch.Tensor],
        bn_bias: Optional[torch.Tensor],
        eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Fold eval-mode BatchNorm statistics into the preceding conv's weight and bias (float64 math). """
    dtype = weight.dtype
    scale = running_var.double().add(eps).rsqrt()
    if bn_weight is not None:
        scale = scale * bn_weight.double()
    shift = -running_mean.double() * scale
    if bn_bias is not None:
        shift = shift + bn_bias.double()
    if bias is not None:
        shift = shift + bias.double() * scale
    view = (-1,) + (1,) * (weight.ndim - 1)
    return (weight.double() * scale.view(view)).to(dtype), shift.to(dtype)


def fold_bn(
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        bn: nn.modules.batchnorm._BatchNorm,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Fold an eval-mode BatchNorm module that follows a conv into the conv's weight and bias (float64 math). """
    return fold_bn_stats(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


class _DiracConvNd(nn.Module):
    """ Size-preserving, stride-1 convolution with a Dirac-parameterized kernel. """
    num_spatial_dims: int = 2

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: _size_any,
            stride: _size_any = 1,
            padding: Union[_size_any, str] = 'same',
            dilation: _size_any = 1,
            bias: bool = True,
            alpha_init: float = 1.,
            beta_init: float = 0.1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dims = self.num_spatial_dims
        kernel_size = _ntuple(kernel_size, dims, 'kernel_size')
        dilation = _ntuple(dilation, dims, 'dilation')
        if any(s != 1 for s in _ntuple(stride, dims, 'stride')):
            raise ValueError(
                f'{type(self).__name__} got stride={stride}, but a Dirac conv must keep the spatial size (its '
                f'identity term maps each pixel to itself). Use stride=1 and downsample with pooling, as DiracNets do.')
        if any(k % 2 == 0 for k in kernel_size):
            raise ValueError(f'{type(self).__name__} got kernel_size={kernel_size}; it needs odd kernel sizes '
                             f'so that the identity term has a center tap.')
        same = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
        if padding != 'same' and _ntuple(padding, dims, 'padding') != same:
            raise ValueError(
                f'{type(self).__name__} got padding={padding}; a Dirac conv must preserve the spatial size, '
                f'which for kernel_size={kernel_size} and dilation={dilation} needs padding={same} (or "same").')
        factory = dict(device=device, dtype=dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.padding = same
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels) + kernel_size, **factory))
        self.alpha: Optional[nn.Parameter] = nn.Parameter(torch.full((out_channels,), float(alpha_init), **factory))
        self.beta: Optional[nn.Parameter] = nn.Parameter(torch.full((out_channels,), float(beta_init), **factory))
        self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        nn.init.kaiming_normal_(self.weight)

    @torch.no_grad()
    def folded_weight(self) -> torch.Tensor:
        """ The plain conv kernel this layer computes, in float64 (the precision every fold uses). """
        return dirac_kernel(self.weight.double(), self.alpha.double(), self.beta.double())

    @torch.no_grad()
    def reparameterize(self):
        """ Bake the Dirac parameterization into `weight` (float64 math); the layer becomes a plain conv. """
        if self.alpha is None or self.beta is None:
            return
        self.weight.copy_(self.folded_weight())
        self.alpha = None
        self.beta = None

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, alpha, beta = self.weight, self.alpha, self.beta
        if alpha is not None and beta is not None:
            weight = dirac_kernel(weight, alpha, beta)
        return self._conv(x, weight)

    def extra_repr(self) -> str:
        s = f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}'
        if any(d != 1 for d in self.dilation):
            s += f', dilation={self.dilation}'
        if self.bias is None:
            s += ', bias=False'
        if self.alpha is None:
            s += ', folded=True'
        return s


class DiracConv1d(_DiracConvNd):
    """ Dirac-parameterized `nn.Conv1d` replacement (stride 1, size-preserving padding). """
    num_spatial_dims = 1

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, weight, self.bias, 1, self.padding, self.dilation)


class DiracConv2d(_DiracConvNd):
    """ Dirac-parameterized `nn.Conv2d` replacement (stride 1, size-preserving padding). """
    num_spatial_dims = 2

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, self.bias, 1, self.padding, self.dilation)


class DiracConv3d(_DiracConvNd):
    """ Dirac-parameterized `nn.Conv3d` replacement (stride 1, size-preserving padding). """
    num_spatial_dims = 3

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, weight, self.bias, 1, self.padding, self.dilation)


def is_folded(model: nn.Module) -> bool:
    """ Whether `model` is in the folded (inference) form, read from its structure: no BatchNorm and no
    Dirac-parameterized conv left, however it was folded (`reparameterize()`, timm's `reparameterize_model`, or built
    with `inference_mode=True`). """
    return not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, _DiracConvNd)) for m in model.modules())


def _ntuple(value: _size_any, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f'{name}={value} has {len(value)} entries; this {n}d Dirac conv needs an int or {n} ints.')
    return value
