"""Hand-written backward passes for the B-cos layers (eager training speed and memory).

Why: left to autograd, ``y = (|out| / norm) * out`` keeps three full-size tensors per layer for the
backward (``out``, ``|out|`` and the scale) and its backward runs about ten elementwise passes (sgn,
div, neg, broadcast-reductions, the accumulation of two gradient paths into ``out``). The patch
norm's ``x * x`` keeps ``x`` twice and differentiates it as a product of two inputs (two passes and
an add). These Functions compute the same gradients from fewer saved tensors and passes:

* :class:`BcosScaleB2` (``b == 2``): saves ``out`` and the small norm only; backward is one
  ``2 |out| / norm * grad`` and, when the norm needs a gradient, one channel dot product.
* :class:`SquaredChannelSum`: saves ``x``, which the convolution keeps anyway (same storage, no
  extra memory); backward is one broadcast multiply ``2 x grad``.
* :class:`ChannelVariance` (the batch variance of ``BatchNormUncentered2d`` in training): on the
  CPU ``Tensor.var`` over (N, H, W) of an NCHW map is a slow Welford reduction (about 10x a fused
  BatchNorm, a tenth of a ResNet-18 train step); two passes (mean, centred squares) are as exact
  for float32 and the backward is one ``c (x - mean)`` pass.

They are used in eager mode only: under ``torch.compile`` the layers keep the plain formula, which
inductor fuses and re-materialises better than it can see through a custom Function.
:func:`use_fused_backward` (``False``) turns them off, for same-run comparisons. Gradients are
checked with ``torch.autograd.gradcheck`` in float64 and against autograd of the plain formula
(``tests/test_bcos_autograd.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BcosScaleB2",
    "ChannelVariance",
    "SquaredChannelSum",
    "batch_variance",
    "float_dtype",
    "fused_backward",
    "use_fused_backward",
]

_FUSED = True


def fused_backward() -> bool:
    """Whether the layers take these Functions (eager mode and :func:`use_fused_backward` on)."""
    return _FUSED and not torch.compiler.is_compiling()


@contextmanager
def use_fused_backward(enabled: bool) -> Iterator[None]:
    """Switch the hand-written backward passes on or off inside the block (process-wide).

    Off, every layer runs the plain autograd formula: benchmarks measure the gain in the same run
    (``bench/bcos_speed.py``'s ``ours-plain`` variant) and tests compare the two paths.
    """
    global _FUSED
    old, _FUSED = _FUSED, bool(enabled)
    try:
        yield
    finally:
        _FUSED = old


def float_dtype(x: Tensor) -> torch.dtype:
    """At least float32: AMP-safe reductions, float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _div(a: Tensor, d: Tensor) -> Tensor:
    """``a / d`` written into ``a`` (a fresh temporary) when the dtypes allow, else a new tensor."""
    return a.div_(d) if a.dtype == torch.promote_types(a.dtype, d.dtype) else torch.div(a, d)


class BcosScaleB2(torch.autograd.Function):
    """``y = (|out| / norm) * out`` (the ``b == 2`` B-cos scale), rounded to ``out.dtype``.

    ``norm`` broadcasts against ``out`` along ``channel_dim`` (size 1 there) and is float32 or
    wider, so the scale is computed in float32 under autocast, exactly as the plain formula.
    Gradients: ``dy/dout = 2 |out| / norm``, ``dy/dnorm = -out |out| / norm^2`` (summed over the
    channels that share a norm).
    """

    @staticmethod
    def forward(ctx: Any, out: Tensor, norm: Tensor, channel_dim: int) -> Tensor:
        y = _div(out.abs(), norm).mul_(out)  # same operation order (and rounding) as the plain formula
        ctx.save_for_backward(out, norm)
        ctx.channel_dim = channel_dim
        return y.to(out.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        out, norm = ctx.saved_tensors
        need_out, need_norm = ctx.needs_input_grad[:2]
        if not (need_out or need_norm):
            return None, None, None
        t = _div(out.abs(), norm * 0.5).mul_(grad)  # 2 |out| / norm * grad = dL/dout
        grad_norm = None
        if need_norm:  # -sum_c grad out |out| / norm^2 = -sum_c t out / (2 norm)
            grad_norm = (t * out).sum(ctx.channel_dim, keepdim=True).div_(norm * -2.0)
        return (t.to(out.dtype) if need_out else None), grad_norm, None


class SquaredChannelSum(torch.autograd.Function):
    """``sum_c x^2`` over each group's channels (dim 1), in float32 or wider.

    Returns shape ``(N, groups, *spatial)``. The backward, ``2 x grad`` broadcast over the group's
    channels, needs only ``x``, which the convolution that reads the same input saves already.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, groups: int) -> Tensor:
        xf = x.to(float_dtype(x))  # no-op for float32/64; half inputs are squared in float32
        sq = xf * xf
        sq = sq.sum(1, keepdim=True) if groups == 1 else sq.unflatten(1, (groups, -1)).sum(2)
        ctx.save_for_backward(x)
        ctx.groups = groups
        return sq

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (x,) = ctx.saved_tensors
        g2 = grad * 2.0  # (N, G, ...): small
        if ctx.groups == 1:
            return (x * g2).to(x.dtype), None
        return (x.unflatten(1, (ctx.groups, -1)) * g2.unsqueeze(2)).flatten(1, 2).to(x.dtype), None


class ChannelVariance(torch.autograd.Function):
    """Biased variance per channel (dim 1) over all other dims, in float32 or wider.

    Two-pass (mean, then mean of centred squares). Backward: ``2 / M * grad_c * (x - mean_c)``.
    Saves ``x`` (the layer that divides by the result keeps it too) and the per-channel mean.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        dims = (0, *range(2, x.dim()))
        xf = x.to(float_dtype(x))
        mean = xf.mean(dim=dims, keepdim=True)
        d = xf - mean
        var = d.mul_(d).mean(dim=dims)
        ctx.save_for_backward(x, mean)
        return var

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor | None:
        if not ctx.needs_input_grad[0]:
            return None
        x, mean = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        c = (grad * (2.0 * x.shape[1] / x.numel())).view(shape)
        return torch.addcmul(-c * mean, x, c).to(x.dtype)  # c (x - mean), one pass


def batch_variance(x: Tensor) -> Tensor:
    """Biased per-channel variance of an (N, C, ...) batch, float32 or wider (BatchNorm statistics).

    Eager: :class:`ChannelVariance`; under ``torch.compile`` the plain ``var`` (inductor's own
    reduction is fast).
    """
    if not fused_backward():
        return x.to(float_dtype(x)).var(dim=(0, *range(2, x.dim())), unbiased=False)
    return ChannelVariance.apply(x)
