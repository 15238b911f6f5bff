"""The hand-written backward passes of the B-cos layers (``surgery/layers/bcos_autograd.py``).

They must give the gradients of the plain formulas (checked with ``gradcheck`` in float64 and
against autograd of the plain formula in the layers) and keep fewer tensors for the backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import gradcheck

from surgery.layers.bcos import BcosConv2d, BcosLinear, bcos_scale
from surgery.layers.bcos_autograd import (
    BcosScaleB2,
    ChannelVariance,
    SquaredChannelSum,
    batch_variance,
    use_fused_backward,
)
from surgery.layers.norms import BatchNormUncentered2d

f64 = torch.float64


def _pos(*shape: int) -> Tensor:
    return (torch.rand(*shape, dtype=f64) + 0.5).requires_grad_(True)


@pytest.mark.parametrize(
    ("out_shape", "norm_shape", "dim"),
    [((2, 6, 5, 5), (2, 1, 5, 5), 1), ((2, 3, 2, 5, 5), (2, 3, 1, 5, 5), 2), ((3, 4, 7), (3, 4, 1), -1)],
)
def test_bcos_scale_b2_gradcheck(out_shape: tuple, norm_shape: tuple, dim: int) -> None:
    torch.manual_seed(0)
    out = torch.randn(*out_shape, dtype=f64, requires_grad=True)
    norm = _pos(*norm_shape)
    assert gradcheck(lambda o, n: BcosScaleB2.apply(o, n, dim), (out, norm))
    ref = bcos_scale(out, norm, 2.0, False) * out
    torch.testing.assert_close(BcosScaleB2.apply(out, norm, dim), ref, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 3])
def test_squared_channel_sum_gradcheck(groups: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 5, dtype=f64, requires_grad=True)
    assert gradcheck(lambda t: SquaredChannelSum.apply(t, groups), (x,))
    ref = (x * x).unflatten(1, (groups, -1)).sum(2)
    torch.testing.assert_close(SquaredChannelSum.apply(x, groups), ref)


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (5, 3), (3, 4, 6)])
def test_channel_variance_gradcheck(shape: tuple) -> None:
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=f64) * 3 + 2).requires_grad_(True)
    assert gradcheck(ChannelVariance.apply, (x,))
    ref = x.var(dim=(0, *range(2, x.dim())), unbiased=False)
    torch.testing.assert_close(batch_variance(x), ref)


def _plain_conv(conv: BcosConv2d, x: Tensor) -> Tensor:
    """The B-cos conv written with plain autograd ops only (the reference for the fast path)."""
    if conv._prepad is not None:
        x = F.pad(x, conv._prepad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    w = conv.weight
    if conv.normalize_weights:
        w = w / torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)
    out = F.conv2d(x, w, conv.bias, conv.stride, conv._conv_padding, conv.dilation, conv.groups)
    if conv.max_out > 1:
        out = out.unflatten(1, (conv.out_channels, conv.max_out)).max(dim=2).values
    g = conv.groups
    sq = (x * x).unflatten(1, (g, -1)).sum(2)
    ones = sq.new_ones(g, 1, *conv.kernel_size)
    summed = F.conv2d(sq, ones, None, conv.stride, conv._conv_padding, conv.dilation, g)
    norm = (summed + 1e-6).sqrt().unsqueeze(2)
    og = out.unflatten(1, (g, -1))
    return (bcos_scale(og, norm, conv.b, False) * og).flatten(1, 2)


CONVS = [
    dict(in_channels=6, out_channels=8, kernel_size=3, stride=1, padding=1),
    dict(in_channels=6, out_channels=8, kernel_size=7, stride=2, padding=3),
    dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1, groups=4),
    dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, padding=2, dilation=2, groups=2, max_out=2),
    dict(in_channels=8, out_channels=4, kernel_size=1, stride=2, padding=0),
    dict(in_channels=8, out_channels=4, kernel_size=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", padding_mode="reflect"),
]


@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("normalize_weights", [False, True])
def test_conv_fast_path_matches_plain_autograd(cfg: dict, normalize_weights: bool) -> None:
    torch.manual_seed(0)
    conv = BcosConv2d(**cfg, b=2.0, normalize_weights=normalize_weights).to(f64)
    x = torch.randn(2, cfg["in_channels"], 9, 9, dtype=f64, requires_grad=True)
    y = conv(x)
    r = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * r).sum(), (x, conv.weight))
    y_ref = _plain_conv(conv, x)
    gx_ref, gw_ref = torch.autograd.grad((y_ref * r).sum(), (x, conv.weight))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)
    assert gradcheck(lambda t: conv(t), (x[:1, :, :6, :6].detach().requires_grad_(True),))


def test_linear_fast_path_matches_plain_autograd() -> None:
    torch.manual_seed(0)
    lin = BcosLinear(8, 5, b=2.0, max_out=2, normalize_weights=False).to(f64)
    x = torch.randn(3, 4, 8, dtype=f64, requires_grad=True)
    y = lin(x)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, lin.weight))
    out = F.linear(x, lin.weight).unflatten(-1, (5, 2)).max(-1).values
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-12
    y_ref = bcos_scale(out, norm, 2.0, False) * out
    gx_ref, gw_ref = torch.autograd.grad(y_ref.square().sum(), (x, lin.weight))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    assert gradcheck(lambda t: lin(t), (x[:1].detach().requires_grad_(True),))


def test_batchnorm_uncentered_training_grads_match_var() -> None:
    torch.manual_seed(0)
    bn = BatchNormUncentered2d(4).to(f64).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = (torch.randn(3, 4, 5, 5, dtype=f64) * 2 + 1).requires_grad_(True)
    y = bn(x)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, bn.weight))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    y_ref = x * (torch.rsqrt(var + bn.eps) * bn.weight).view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    gx_ref, gw_ref = torch.autograd.grad(y_ref.square().sum(), (x, bn.weight))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)


def _saved_bytes(fn: object, x: Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn(x)``."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)  # type: ignore[operator]
    return sum(seen.values())


def test_conv_keeps_only_input_output_and_small_norm() -> None:
    """x (shared with the conv), the conv output and one-channel maps: not |out| or the scale."""
    torch.manual_seed(0)
    conv = BcosConv2d(16, 16, 3, 1, 1, b=2.0, normalize_weights=False)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    big = x.nbytes + x.nbytes  # input + conv output (same shape here)
    small = conv.weight.nbytes + 4 * x.nbytes // 16  # weight, squared sum, norm, padding slack
    assert _saved_bytes(conv, x) <= big + small


def test_bf16_autocast_training_step() -> None:
    torch.manual_seed(0)
    conv = BcosConv2d(8, 8, 3, 1, 1, b=2.0, normalize_weights=False)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    with torch.no_grad():
        ref = _plain_conv(conv, x)
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2 * float(ref.abs().max()))


def test_switching_the_fused_backward_off_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        BcosConv2d(6, 8, 3, 2, 1, b=2.0, normalize_weights=False),
        BatchNormUncentered2d(8),
        torch.nn.ReLU(),
        BcosConv2d(8, 8, 3, 1, 1, groups=2, b=2.0, normalize_weights=False),
        BatchNormUncentered2d(8),
    ).to(f64)
    x = torch.randn(3, 6, 9, 9, dtype=f64, requires_grad=True)
    grads = []
    for fused in (True, False):
        with use_fused_backward(fused):
            y = model(x)
            grads.append(torch.autograd.grad(y.square().sum(), (x, *model.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
