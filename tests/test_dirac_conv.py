""" DiracConv1d/2d/3d: drop-in conv layers with a Dirac-parameterized kernel. """
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_dirac import DiracConv1d, DiracConv2d, DiracConv3d, dirac_kernel, fold_bn

CONVS = [(DiracConv1d, F.conv1d, (9,)), (DiracConv2d, F.conv2d, (9, 7)), (DiracConv3d, F.conv3d, (5, 6, 7))]
SHAPES = [(conv_cls, spatial) for conv_cls, _, spatial in CONVS]


def reference_kernel(weight, alpha, beta):
    """ alpha * delta + beta * W / ||W[o]||, delta from torch's own dirac_ initializer. """
    delta = nn.init.dirac_(torch.empty_like(weight))
    norms = weight.flatten(1).norm(dim=1).view(-1, *([1] * (weight.ndim - 1)))
    view = (-1,) + (1,) * (weight.ndim - 1)
    return alpha.view(view) * delta + beta.view(view) * weight / norms


@pytest.mark.parametrize('conv_cls,conv_fn,spatial', CONVS)
@pytest.mark.parametrize('in_chs,out_chs', [(4, 4), (3, 6), (6, 3)])
def test_kernel_is_alpha_delta_plus_beta_normalized_weight(conv_cls, conv_fn, spatial, in_chs, out_chs):
    conv = conv_cls(in_chs, out_chs, 3)
    with torch.no_grad():
        conv.alpha.uniform_(-1, 1)
        conv.beta.uniform_(-1, 1)
    x = torch.randn(2, in_chs, *spatial)
    expected = conv_fn(x, reference_kernel(conv.weight, conv.alpha, conv.beta), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize('conv_cls,spatial', SHAPES)
def test_initial_values_and_size_preserving_output(conv_cls, spatial):
    conv = conv_cls(4, 8, 5, dilation=2)
    assert torch.all(conv.alpha == 1.) and torch.all(conv.beta == 0.1)
    assert conv.padding == (4,) * len(spatial)
    assert conv(torch.randn(1, 4, *[s + 9 for s in spatial])).shape[2:] == tuple(s + 9 for s in spatial)


@pytest.mark.parametrize('conv_cls,spatial', SHAPES)
@pytest.mark.parametrize('in_chs,out_chs', [(5, 5), (3, 6), (6, 3)])
def test_alpha_one_beta_zero_is_identity_on_shared_channels(conv_cls, spatial, in_chs, out_chs):
    conv = conv_cls(in_chs, out_chs, 3, bias=False, alpha_init=1., beta_init=0.)
    x = torch.randn(2, in_chs, *spatial)
    y = conv(x)
    shared = min(in_chs, out_chs)
    assert torch.equal(y[:, :shared], x[:, :shared])
    assert torch.all(y[:, shared:] == 0)


@pytest.mark.parametrize('conv_cls,conv_fn,spatial', CONVS)
def test_reparameterize_gives_a_plain_conv_with_the_same_output(conv_cls, conv_fn, spatial):
    conv = conv_cls(4, 6, 3, bias=True)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 4, *spatial)
    expected = conv(x)
    conv.reparameterize()
    conv.reparameterize()  # idempotent
    assert conv.alpha is None and conv.beta is None
    assert sorted(n for n, _ in conv.named_parameters()) == ['bias', 'weight']
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv_fn(x, conv.weight, conv.bias, padding=1), expected, rtol=1e-5, atol=1e-6)


def test_stride_other_than_one_is_refused_with_the_fix():
    with pytest.raises(ValueError, match='stride=1 and downsample with pooling'):
        DiracConv2d(8, 8, 3, stride=2)


def test_padding_that_changes_the_size_is_refused():
    with pytest.raises(ValueError, match=r'needs padding=\(1, 1\)'):
        DiracConv2d(8, 8, 3, padding=0)
    assert DiracConv2d(8, 8, 3, padding=1).padding == (1, 1)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match='odd kernel'):
        DiracConv2d(8, 8, 2)


def test_gradients_reach_weight_alpha_and_beta():
    conv = DiracConv2d(3, 3, 3)
    conv(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (conv.weight, conv.alpha, conv.beta))


def test_dirac_kernel_matches_torch_dirac_init_delta():
    weight = torch.randn(6, 4, 3, 3)
    ones, zeros = torch.ones(6), torch.zeros(6)
    torch.testing.assert_close(dirac_kernel(weight, ones, zeros), nn.init.dirac_(torch.empty_like(weight)))


@pytest.mark.parametrize('shape,memory_format', [((6, 4, 3, 3), torch.channels_last),
                                                 ((4, 6, 3, 3, 3), torch.channels_last_3d), ((6, 4, 5), None)])
def test_dirac_kernel_and_its_gradients_match_the_reference_in_the_weights_layout(shape, memory_format):
    weight = torch.randn(shape)
    if memory_format is not None:
        weight = weight.contiguous(memory_format=memory_format)
    weight.requires_grad_()
    alpha, beta = torch.randn(shape[0], requires_grad=True), torch.randn(shape[0], requires_grad=True)
    kernel, expected = dirac_kernel(weight, alpha, beta), reference_kernel(weight, alpha, beta)
    torch.testing.assert_close(kernel, expected)
    assert kernel.stride() == weight.stride()  # the conv takes it without a layout copy
    grad = torch.randn(shape)
    for got, want in zip(torch.autograd.grad(kernel, (weight, alpha, beta), grad),
                         torch.autograd.grad(expected, (weight, alpha, beta), grad)):
        torch.testing.assert_close(got, want)


def test_dirac_kernel_keeps_the_weights_dtype():
    weight = torch.randn(6, 4, 3, 3, dtype=torch.bfloat16)
    ones = torch.ones(6, dtype=torch.bfloat16)
    kernel = dirac_kernel(weight, ones, ones)
    assert kernel.dtype == torch.bfloat16
    torch.testing.assert_close(kernel, reference_kernel(weight.float(), ones.float(), ones.float()).bfloat16())


def test_state_dict_holds_only_the_parameters():
    assert sorted(DiracConv2d(3, 4, 3).state_dict()) == ['alpha', 'beta', 'bias', 'weight']


def test_dirac_kernel_is_one_leaf_node_for_torch_fx():
    graph = torch.fx.symbolic_trace(DiracConv2d(3, 4, 3)).graph
    assert [n.target for n in graph.nodes if n.op == 'call_function'].count(dirac_kernel) == 1


def test_fold_bn_matches_eval_batchnorm():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.)
    x = torch.randn(2, 3, 8, 8)
    weight, bias = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    conv = DiracConv2d(4, 6, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    grads = []
    for fn in (conv, torch.compile(conv)):
        conv.zero_grad()
        out = fn(x)
        out.square().sum().backward()
        grads.append([out] + [p.grad.clone() for p in (conv.weight, conv.alpha, conv.beta, conv.bias)])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
