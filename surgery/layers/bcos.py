"""B-cos linear and convolution layers (B-cos v2 and B-cosification).

``y = |cos(x, w)|^(B-1) * (w^T x)`` per output unit, with ``cos = w^T x / (||w|| ||x||)``.
The official v2 layers normalise ``w`` every forward (``normalize_weights=True``); B-cosification
keeps the pretrained, unnormalised weights (``normalize_weights=False``, the ``from_module`` default),
so ``y = |w^T x / ||x|| |^(B-1) * (w^T x)`` which at ``b == 1`` is the original layer exactly.

Numerics follow the official code so outputs match the ``bcos`` package: linear ``||x|| + 1e-12``,
conv ``sqrt(sum over patch of x^2 + 1e-6)``, ``b == 2`` uses ``|out| / norm`` without epsilon and
other ``b`` use ``(|out / norm| + 1e-6)^(b-1)``. The patch norm is computed in float32 (AMP safe)
from one reduction of the input's squared channel norm followed by one ``avg_pool2d`` (or a
depthwise ones-conv for dilated / over-padded kernels), so grouped and dilated convs cost the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from surgery.layers.bcos_autograd import BcosScaleB2, SquaredChannelSum, float_dtype, fused_backward
from surgery.layers.encoding import EncodedInput
from surgery.layers.explanation_mode import DetachableModule, carry_param
from surgery.registry import register_layer

__all__ = ["BcosConv2d", "BcosLinear", "bcos_scale"]


def bcos_scale(out: Tensor, norm: Tensor, b: float, detach: bool) -> Tensor:
    """``|cos|^(b-1)`` scaled as in the official code; ``detach`` for explanation mode.

    ``out`` may be half precision under autocast; ``norm`` is float32, so the result is float32.
    """
    if detach:
        out, norm = out.detach(), norm.detach()
    if b == 2:
        return out.abs() / norm
    return ((out / norm).abs() + 1e-6).pow(b - 1)


_float_dtype = float_dtype


def _apply_scale(out: Tensor, norm: Tensor, b: float, detach: bool, channel_dim: int) -> Tensor:
    """``bcos_scale(out, norm) * out`` rounded to ``out.dtype``.

    Eager training at ``b == 2`` goes through :class:`BcosScaleB2` (same values, a hand-written
    backward that saves one full-size tensor instead of three); explanation mode, other ``b`` and
    ``torch.compile`` (which fuses the plain formula itself) use the plain formula.
    """
    if b == 2 and not detach and fused_backward():
        return BcosScaleB2.apply(out, norm, channel_dim)
    return (bcos_scale(out, norm, b, detach) * out).to(out.dtype)


@register_layer(
    transfer="weight copied unchanged (max_out > 1: each row repeated max_out times); "
    "bias kept only with bias=true"
)
class BcosLinear(DetachableModule):
    """B-cos linear layer: ``|cos(x, w)|^(b-1) (w^T x)``; exactly linear at ``b == 1``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        b: float = 2.0,
        max_out: int = 1,
        normalize_weights: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if max_out < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        self.in_features = in_features
        self.out_features = out_features
        self.b = float(b)
        self.max_out = int(max_out)
        self.normalize_weights = bool(normalize_weights)
        dd = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features * max_out, in_features, **dd))
        self.bias = nn.Parameter(torch.zeros(out_features * max_out, **dd)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        b: float = 2.0,
        max_out: int = 1,
        normalize_weights: bool = False,
        bias: bool = False,
    ) -> nn.Module:
        """Build from an ``nn.Linear`` (or a ``BcosLinear``), keeping its weights.

        ``normalize_weights=False`` (B-cosification) keeps the pretrained function at ``b=1``;
        ``bias=True`` keeps the bias (only for function-preservation checks: B-cos layers are
        meant to be bias-free).
        """
        if module is None or not hasattr(module, "in_features") or getattr(module, "weight", None) is None:
            raise TypeError(f"BcosLinear.from_module needs a Linear, got {type(module).__name__}")
        weight = module.weight
        old_bias = getattr(module, "bias", None)
        if isinstance(module, BcosLinear) and module.max_out > 1:
            raise ValueError("cannot rebuild a BcosLinear that already has max_out > 1")
        new = cls(
            module.in_features,
            module.out_features,
            b=b,
            max_out=max_out,
            normalize_weights=normalize_weights,
            bias=False,
            device="meta",
        )
        new.weight = carry_param(_repeat_rows(weight.detach(), max_out), module.weight)
        if bias and isinstance(old_bias, Tensor):
            new.bias = carry_param(_repeat_rows(old_bias.detach(), max_out), old_bias)
        return new

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.normalize_weights:
            w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
        out = F.linear(x, w, self.bias)
        if self.max_out > 1:
            out = out.unflatten(-1, (self.out_features, self.max_out)).max(dim=-1).values
        if self.b == 1:
            return out
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=_float_dtype(x)) + 1e-12
        return _apply_scale(out, norm, self.b, self.explanation, -1)

    def extra_repr(self) -> str:
        s = f"{self.in_features}, {self.out_features}, b={self.b:g}"
        if self.max_out > 1:
            s += f", max_out={self.max_out}"
        s += f", normalize_weights={self.normalize_weights}"
        if self.bias is not None:
            s += ", bias=True"
        return s


@register_layer(
    transfer="weight copied unchanged (from a Linear: viewed as a 1x1 kernel; max_out > 1: each filter "
    "repeated max_out times); bias kept only with bias=true"
)
class BcosConv2d(DetachableModule):
    """B-cos 2-D convolution: ``|cos(patch, w)|^(b-1) (w * patch)`` per output position.

    Any kernel, stride, padding (incl. ``"same"``/``"valid"`` and non-zero padding modes),
    dilation and groups. The state dict has the keys of ``nn.Conv2d`` (``weight``, ``bias``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        b: float = 2.0,
        max_out: int = 1,
        normalize_weights: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if max_out < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        if in_channels % groups or out_channels % groups:
            raise ValueError("in_channels and out_channels must be divisible by groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.groups = groups
        self.padding_mode = padding_mode
        self.b = float(b)
        self.max_out = int(max_out)
        self.normalize_weights = bool(normalize_weights)
        dd = {"device": device, "dtype": dtype}
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels * max_out, in_channels // groups, kh, kw, **dd))
        self.bias = nn.Parameter(torch.zeros(out_channels * max_out, **dd)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._resolve_padding()

    def _resolve_padding(self) -> None:
        """Turn the padding spec into (pre-pad for F.pad, symmetric conv padding, pool-able?)."""
        kh, kw = self.kernel_size
        dh, dw = self.dilation
        if self.padding == "valid":
            pads = [(0, 0), (0, 0)]
        elif self.padding == "same":
            pads = []
            for d, k in ((dh, kh), (dw, kw)):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
        elif isinstance(self.padding, str):
            raise ValueError(f"unknown padding {self.padding!r}")
        else:
            pads = [(p, p) for p in self.padding]
        symmetric = all(lo == hi for lo, hi in pads)
        self._prepad: tuple[int, int, int, int] | None = None
        if self.padding_mode != "zeros" or not symmetric:
            # F.pad order: (left, right, top, bottom); the conv and the norm then use no padding
            (t, bo), (le, r) = pads
            self._prepad = (le, r, t, bo)
            self._conv_padding: tuple[int, int] = (0, 0)
        else:
            self._conv_padding = (pads[0][0], pads[1][0])
        ph, pw = self._conv_padding
        self._pool_ok = self.dilation == (1, 1) and 2 * ph <= kh and 2 * pw <= kw
        self._identity_norm = self.kernel_size == (1, 1) and self.stride == (1, 1) and (ph, pw) == (0, 0)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        b: float = 2.0,
        max_out: int = 1,
        normalize_weights: bool = False,
        bias: bool = False,
    ) -> nn.Module:
        """Build from an ``nn.Conv2d`` (or a ``Linear``, as a 1x1 conv; or a ``BcosConv2d``).

        From an ``EncodedInput`` (the first layer after ``encode input``) the wrapped conv is
        replaced and the wrapper returned, so the encoding stays in place.

        ``normalize_weights=False`` (B-cosification) carries the pretrained weights unchanged so
        that ``b=1`` with ``bias=True`` is the original layer exactly.
        """
        if isinstance(module, EncodedInput):  # @first_conv after `encode input`: keep the encoding
            module.conv = cls.from_module(
                module.conv, b=b, max_out=max_out, normalize_weights=normalize_weights, bias=bias
            )
            return module
        from surgery.layers.conv_variants import bcos_from_conv_variant, is_conv_variant  # (import cycle)

        if module is not None and is_conv_variant(module):  # timm Conv2dSame, StdConv2d, ...
            return bcos_from_conv_variant(
                cls, module, b=b, max_out=max_out, normalize_weights=normalize_weights, bias=bias
            )
        if module is None or getattr(module, "weight", None) is None:
            raise TypeError(f"BcosConv2d.from_module needs a Conv2d or Linear, got {type(module).__name__}")
        weight = module.weight.detach()
        old_bias = getattr(module, "bias", None)
        if isinstance(module, (BcosConv2d, BcosLinear)) and module.max_out > 1:
            raise ValueError("cannot rebuild a B-cos layer that already has max_out > 1")
        if weight.dim() == 2:  # Linear -> 1x1 conv
            out_ch, in_ch = weight.shape
            weight = weight.view(out_ch, in_ch, 1, 1)
            new = cls(
                in_ch, out_ch, 1, b=b, max_out=max_out, normalize_weights=normalize_weights, device="meta"
            )
        elif weight.dim() == 4:
            if getattr(module, "padding_mode", "zeros") not in ("zeros", "reflect", "replicate", "circular"):
                raise ValueError(f"unsupported padding_mode {module.padding_mode!r}")
            new = cls(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                getattr(module, "padding_mode", "zeros"),
                b=b,
                max_out=max_out,
                normalize_weights=normalize_weights,
                device="meta",
            )
        else:
            raise TypeError(f"BcosConv2d.from_module: unsupported weight shape {tuple(weight.shape)}")
        new.weight = carry_param(_repeat_rows(weight, max_out), module.weight)
        if bias and isinstance(old_bias, Tensor):
            new.bias = carry_param(_repeat_rows(old_bias.detach(), max_out), old_bias)
        return new

    def patch_norm(self, x: Tensor) -> Tensor:
        """``sqrt(sum_{patch, group channels} x^2 + 1e-6)``: shape (N, groups, H_out, W_out), float32+.

        One reduction over channels (in float32) and one window sum over the G-channel map; the
        window sum is ``avg_pool2d * k_h k_w`` (zero padding counted, as in the official code) or,
        for dilation / padding > k/2, a depthwise conv with a ones kernel.
        """
        g = self.groups
        if not fused_backward():  # plain ops (torch.compile: inductor fuses them with the rest)
            xf = x.to(_float_dtype(x))  # no-op for float32/64; half inputs are squared in float32
            sq = xf * xf  # measured faster than linalg.vector_norm (esp. grouped) on CPU, fwd and bwd
            sq = sq.sum(1, keepdim=True) if g == 1 else sq.unflatten(1, (g, x.shape[1] // g)).sum(2)
        else:  # same values; backward is one 2*x*grad pass and keeps no tensor the conv does not
            sq = SquaredChannelSum.apply(x, g)
        kh, kw = self.kernel_size
        if self._identity_norm:
            summed = sq
        elif self._pool_ok:
            summed = F.avg_pool2d(sq, self.kernel_size, self.stride, self._conv_padding) * (kh * kw)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                ones = sq.new_ones(g, 1, kh, kw)
                summed = F.conv2d(sq, ones, None, self.stride, self._conv_padding, self.dilation, g)
        return (summed + 1e-6).sqrt()

    def forward(self, x: Tensor) -> Tensor:
        if self._prepad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._prepad, mode=mode)
        w = self.weight
        if self.normalize_weights:
            w = w / torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)
        out = F.conv2d(x, w, self.bias, self.stride, self._conv_padding, self.dilation, self.groups)
        if self.max_out > 1:
            out = out.unflatten(1, (self.out_channels, self.max_out)).max(dim=2).values
        if self.b == 1:
            return out
        norm = self.patch_norm(x)  # (N, G, H, W)
        g = self.groups
        if g == 1:
            return _apply_scale(out, norm, self.b, self.explanation, 1)
        # per-group norms broadcast over that group's output channels without a copy
        og = out.unflatten(1, (g, self.out_channels // g))
        return _apply_scale(og, norm.unsqueeze(2), self.b, self.explanation, 2).flatten(1, 2)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        s += f", b={self.b:g}"
        if self.max_out > 1:
            s += f", max_out={self.max_out}"
        s += f", normalize_weights={self.normalize_weights}"
        if self.bias is not None:
            s += ", bias=True"
        return s

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_conv_padding" not in self.__dict__:
            self._resolve_padding()


def _repeat_rows(t: Tensor, max_out: int) -> Tensor:
    """Row ``o`` -> rows ``o*M .. o*M+M-1``, matching the MaxOut layout ``unflatten(O, M)``."""
    return t if max_out == 1 else t.repeat_interleave(max_out, dim=0).contiguous()
