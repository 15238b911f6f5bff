"""Lifting and group convolutions for R^2 x| H (H = GL+(2), SL(2), SO(2)), and 5-D helpers.

Features on the group live as ``(B, C, N, H, W)``: channel, group sample, space. Translations are
handled by one ordinary ``conv2d``; the group enters only through the kernel, evaluated by a SIREN
at transformed coordinates (features are never resampled):

* lifting  ``(Lf)_c(x, h_o) = sum_{c', d} f_c'(x + d) k([h_o^-1 d])_{c c'} m(h_o^-1 d) / |det h_o|``
* group    ``(f * k)_c(x, h_o) = sum_{i, c', d} f_c'(x + d, h_i) k([h_o^-1 d ; xi^-1(h_o^-1 h_i)])_{c c'}
  m(h_o^-1 d) w_i / |det h_i|``

with ``d`` over the k x k stencil in normalised units (pixel centres ``(2j + 1) / k - 1``, as
``F.affine_grid``), ``m`` a spatial window and ``w_i`` optional importance weights. With sample
sets co-transformed (``h -> a h``) the layers are exactly equivariant for any ``a`` mapping the
pixel lattice and the stencil to themselves (90-degree rotations); otherwise up to the error of
the Riemann sum, which ``antialias`` (box-filtering the kernel over each pixel cell) and the
smooth ``cosine`` window reduce.

All kernel coordinates are computed from the float64 samples and only then cast to the layer's
dtype, so the equivariance of a float32 network is limited by the convolution's rounding alone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.registry import register_layer

from .kernels import SirenKernel
from .sampling import GroupSamples
from .spec import GroupSpec

__all__ = [
    "GroupBatchNorm",
    "GroupConv",
    "GroupLayerNorm",
    "GroupPool",
    "GroupSpatialPool",
    "LiftingConv",
    "spatial_window",
    "stencil",
]

MASKS = ("cosine", "smooth", "hard", "none")
STENCILS = ("fixed", "fit")

_CONV_TRANSFER = (
    "re-initialised: a plain conv kernel has no group structure, so the kernel network is fresh; "
    "channels, kernel size, stride, padding, dilation (and bias presence) are taken from the Conv2d"
)


def stencil(
    k: int, antialias: int = 1, *, size: int | None = None, dtype: torch.dtype = torch.float64, device=None
) -> Tensor:
    """Kernel offsets ``(K*K, m*m, 2)`` as (x = column, y = row) in normalised units.

    Pixel centres of a ``k x k`` kernel are at ``(2j + 1) / k - 1``; ``size = K`` (default ``k``)
    extends the stencil by ``(K - k) / 2`` pixel rings at the same spacing. Entry ``(r * K + c, s)``
    is the ``s``-th of ``m x m`` sub-points of the pixel cell of kernel row ``r``, column ``c``; the
    sub-point pattern is symmetric under 90-degree rotations.
    """
    m = max(int(antialias), 1)
    size = k if size is None else int(size)
    if size < k or (size - k) % 2:
        raise ValueError(f"stencil size must be k + 2 e with e >= 0, got k={k}, size={size}")
    step = 2.0 / k
    centres = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) * step
    sub = ((torch.arange(m, dtype=torch.float64) + 0.5) / m - 0.5) * step
    yy = centres[:, None, None, None] + sub[None, None, :, None]  # (K, 1, m, 1): row, sub-row
    xx = centres[None, :, None, None] + sub[None, None, None, :]  # (1, K, 1, m): col, sub-col
    yy, xx = torch.broadcast_tensors(yy, xx)  # (K, K, m, m)
    pts = torch.stack([xx, yy], -1).reshape(size * size, m * m, 2)
    return pts.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _stencil64(k: int, antialias: int, size: int) -> Tensor:
    return stencil(k, antialias, size=size)


def spatial_window(r: Tensor, mask: str, radius: float = 1.0) -> Tensor:
    """Window on the transformed offset's norm ``r``.

    ``cosine``: ``cos^2(pi r / 2)`` inside the unit disc, 0 outside (smooth, compact: the
    discretised kernel fades out before the stencil border); ``smooth``: the reference code's
    ``sigmoid(2 (1 - r))``; ``hard``: the unit disc; ``none``: 1.
    """
    r = r / radius
    if mask == "cosine":
        return torch.where(r < 1.0, torch.cos(0.5 * math.pi * r.clamp(max=1.0)) ** 2, torch.zeros_like(r))
    if mask == "smooth":
        return torch.sigmoid(2.0 * (1.0 - r))
    if mask == "hard":
        return (r <= 1.0).to(r.dtype)
    if mask == "none":
        return torch.ones_like(r)
    raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")


def _check_conv(module: nn.Module, layer: str) -> nn.Conv2d:
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"{layer} replaces an nn.Conv2d, got {type(module).__name__}")
    if module.groups != 1:
        raise NotImplementedError(
            f"{layer}: grouped/depthwise convolutions (groups={module.groups}) are not supported"
        )
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"{layer}: padding_mode={module.padding_mode!r} not supported (zeros only)")
    if isinstance(module.padding, str):
        raise NotImplementedError(f"{layer}: string padding {module.padding!r} not supported; use integers")
    kh, kw = module.kernel_size
    if kh != kw:
        raise NotImplementedError(f"{layer}: square kernels only, got {module.kernel_size}")
    return module


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _mix_features(net: nn.Module, inputs: Tensor, window: Tensor) -> Tensor:
    """Head of ``net`` on the window-weighted mean of its features over sub-points (dim -2).

    ``mean_s(window_s * head(h_s)) = head.W @ mean_s(window_s h_s) + head.b * mean_s(window_s)``:
    anti-aliasing costs one extra hidden evaluation per sub-point, not one wide head.
    """
    h = net.hidden(inputs)
    hbar = (h * window.unsqueeze(-1)).mean(-2)
    wbar = window.mean(-1, keepdim=True)
    return (F.linear(hbar, net.head.weight) + wbar * net.head.bias) * net.out_scale


def _spatial_geometry(
    s: GroupSamples, *, layer: _GroupLayer, size: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    st = _stencil64(layer.kernel_size, layer.antialias, size)
    pts = torch.einsum("nij,psj->npsi", s.g_inv.to(torch.float64), st)
    win = spatial_window(torch.linalg.vector_norm(pts, dim=-1), layer.mask, layer.radius)
    return pts.to(dtype), win.to(dtype)


def _fit_size(s: GroupSamples, *, k: int, radius: float, antialias: int) -> tuple[Tensor]:
    """Smallest ``K = k + 2 e`` that holds every sample's window ``|h^-1 d| <= R`` on the stencil.

    The window of ``h`` reaches ``|h|_op R`` normalised units = ``|h|_op R k / 2`` pixels from the
    centre. Ring ``e`` beyond the ``k x k`` stencil has its pixel centres ``(k - 1) / 2 + e`` pixels
    out and its innermost sub-point ``1/2 - 1/(2m)`` closer; rings with every sub-point outside
    every window would only add zeros.
    """
    reach = float(torch.linalg.matrix_norm(s.g.to(torch.float64), ord=2).max()) * radius * k / 2
    inner = 0.5 - 0.5 / max(antialias, 1)  # innermost sub-point of a cell, pixels from its centre
    extra = max(0, math.ceil(reach - (k - 1) / 2 + inner - 1e-9) - 1)
    return (torch.tensor(k + 2 * extra),)


def _measure(
    s: GroupSamples, *, volume_preserving: bool, weighted: bool, dtype: torch.dtype
) -> tuple[Tensor]:
    g = s.g.to(torch.float64)
    m = torch.ones(g.shape[0], dtype=g.dtype) if volume_preserving else 1.0 / torch.linalg.det(g).abs()
    if weighted and s.weights is not None:
        m = m * s.weights.to(m)
    return (m.to(dtype),)


def _group_geometry(s: GroupSamples, *, spec: GroupSpec, dtype: torch.dtype) -> tuple[Tensor]:
    g_inv, g = s.g_inv.to(torch.float64), s.g.to(torch.float64)
    return (spec.kernel_coords(g_inv[:, None] @ g[None, :]).to(dtype),)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off where it exists (``torch.autocast`` raises for device types such as meta)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _outside_autocast(weight_fn):
    """Kernel generation in the parameters' dtype even under autocast.

    A SIREN in bfloat16 rounds its pre-activations ``w0 (W x + b)`` (several radians): measured at
    the paper's size, the generated weights are then 0.7-1.0 % off (relative L2), twice the error
    of the one bf16 cast the convolution applies to float32 weights. The kernel networks are tiny
    next to the convolutions, so float32 costs nothing and saves the casts around every Linear.
    """

    @functools.wraps(weight_fn)
    def wrapper(self: _GroupLayer, samples: GroupSamples):
        with _no_autocast(self.net.head.weight.device):
            return weight_fn(self, samples)

    return wrapper


class _KernelCache:
    """Kernel reuse while nothing it depends on changed (evaluation with a fixed sample set)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.ref: Tensor | None = None
        self.value: tuple[Tensor, ...] | None = None

    def get(self, module: nn.Module, samples: GroupSamples, dtype: torch.dtype) -> tuple[Tensor, ...] | None:
        if module.training or torch.is_grad_enabled() or self.value is None:
            return None
        if self.ref is not samples.g or self.key != self._key(module, dtype):
            return None
        return self.value

    def put(
        self, module: nn.Module, samples: GroupSamples, dtype: torch.dtype, value: tuple[Tensor, ...]
    ) -> None:
        if module.training or torch.is_grad_enabled():
            self.value = None
            return
        self.key, self.ref, self.value = self._key(module, dtype), samples.g, value

    @staticmethod
    def _key(module: nn.Module, dtype: torch.dtype) -> tuple:
        geometry = tuple(getattr(module, k, None) for k in ("mask", "antialias", "radius", "stencil"))
        return (dtype, geometry, *((id(p), p._version, p.device) for p in module.parameters()))

    def __deepcopy__(self, memo: dict) -> _KernelCache:
        return _KernelCache()

    def __getstate__(self) -> dict:
        return {"key": None, "ref": None, "value": None}


class _GroupLayer(nn.Module):
    """Shared plumbing: the group spec, the stencil, the window and anti-aliasing."""

    group: GroupSpec

    def _init_common(
        self,
        group: GroupSpec,
        kernel_size: int,
        mask: str,
        antialias: int,
        radius: float = 1.0,
        stencil: str = "fixed",
    ) -> None:
        if not isinstance(group, GroupSpec):
            raise TypeError(f"group must be a GroupSpec (a recipe `group` block), got {type(group).__name__}")
        if group.n != 2:
            raise NotImplementedError(
                f"image layers need a group acting on R^2, got {group.family}({group.n})"
            )
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        if antialias < 1:
            raise ValueError(f"antialias must be >= 1, got {antialias}")
        self.group = group
        self.kernel_size = int(kernel_size)
        self.mask = mask
        self.antialias = int(antialias)
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        self.radius = float(radius)
        if stencil not in STENCILS:
            raise ValueError(f"stencil must be one of {STENCILS}, got {stencil!r}")
        if stencil == "fit" and mask not in ("cosine", "hard"):
            raise ValueError(
                f"stencil='fit' needs a window with compact support (cosine or hard), got {mask!r}"
            )
        self.stencil = stencil
        self._cache = _KernelCache()

    def _stencil_size(self, samples: GroupSamples) -> int:
        """``K``: the layer's ``k``, or with ``stencil="fit"`` as large as this set's windows need."""
        if self.stencil == "fixed":
            return self.kernel_size
        key = ("stencil size", self.kernel_size, self.radius, self.antialias)
        fn = functools.partial(_fit_size, k=self.kernel_size, radius=self.radius, antialias=self.antialias)
        return int(samples.derived(key, fn, on_host=True)[0])

    def _spatial_points(self, samples: GroupSamples, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``h_o^-1 d`` per sample and stencil sub-point ``(N, K*K, m*m, 2)``, and their window."""
        size = self._stencil_size(samples)
        key = ("spatial", self.kernel_size, size, self.antialias, self.mask, self.radius, dtype)
        fn = functools.partial(_spatial_geometry, layer=self, size=size, dtype=dtype)
        return samples.derived(key, fn)

    def _stencil_repr(self) -> str:
        return "" if self.stencil == "fixed" else f", stencil={self.stencil!r}"

    def _padding(self, size: int) -> tuple[int, int]:
        """The replaced conv's padding, widened so a ``K x K`` stencil keeps its output size."""
        extra = (size - self.kernel_size) // 2
        return (self.padding[0] + extra * self.dilation[0], self.padding[1] + extra * self.dilation[1])

    def _measure(self, samples: GroupSamples, dtype: torch.dtype, *, weighted: bool) -> Tensor:
        """``1 / |det h_i|`` per sample (``weighted``: times the set's importance weights, if any)."""
        key = ("measure", self.group.volume_preserving, weighted, dtype)
        fn = functools.partial(_measure, volume_preserving=key[1], weighted=weighted, dtype=dtype)
        return samples.derived(key, fn)[0]

    def _bias(self, n: int) -> Tensor | None:
        return None if self.bias is None else self.bias.repeat_interleave(n)


@register_layer(transfer=_CONV_TRANSFER)
class LiftingConv(_GroupLayer):
    """Lifting convolution R^2 -> R^2 x| H: ``(B, C, H, W) -> (B, C', N, H', W')``.

    Draws (or reuses) the forward's sample set ``{h_o}`` and correlates the input with the kernel
    ``k(h_o^-1 d) m(h_o^-1 d) / |det h_o|`` for each output sample.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        group: GroupSpec,
        kernel: SirenKernel | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        mask: str = "cosine",
        antialias: int = 2,
        radius: float = 1.4,
        stencil: str = "fixed",
    ) -> None:
        super().__init__()
        self._init_common(group, kernel_size, mask, antialias, radius, stencil)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.kernel_spec = kernel or SirenKernel()
        fan_in = self.in_channels * self.kernel_size**2
        self.net = self.kernel_spec.build(2, self.out_channels * self.in_channels, fan_in=fan_in)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        group: GroupSpec,
        kernel: SirenKernel | None = None,
        mask: str = "cosine",
        antialias: int = 2,
        radius: float = 1.4,
        stencil: str = "fixed",
        bias: bool | None = None,
    ) -> nn.Module:
        """Lifting conv with the geometry of the ``nn.Conv2d`` it replaces."""
        conv = _check_conv(module, "LiftingConv")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            group=group,
            kernel=kernel,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=(conv.bias is not None) if bias is None else bias,
            mask=mask,
            antialias=antialias,
            radius=radius,
            stencil=stencil,
        )
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @_outside_autocast
    def weight(self, samples: GroupSamples) -> Tensor:
        """Conv weight ``(C' N, C, K, K)`` for the output samples ``samples``."""
        dtype = self.net.head.weight.dtype
        cached = self._cache.get(self, samples, dtype)
        if cached is not None:
            return cached[0]
        n, k = len(samples), self._stencil_size(samples)
        pts, win = self._spatial_points(samples, dtype)  # (N, k2, m2, 2), (N, k2, m2)
        out = _mix_features(self.net, pts, win)  # (N, k2, C' C)
        out = out * self._measure(samples, dtype, weighted=False)[:, None, None]
        w = out.view(n, k, k, self.out_channels, self.in_channels).permute(3, 0, 4, 1, 2)
        w = w.reshape(self.out_channels * n, self.in_channels, k, k)
        self._cache.put(self, samples, dtype, (w,))
        return w

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"LiftingConv expects (B, C, H, W), got shape {tuple(x.shape)}")
        samples = self.group.begin_forward(training=self.training, device=x.device)
        n = len(samples)
        w = self.weight(samples)
        y = F.conv2d(x, w.to(x.dtype), self._bias(n), self.stride, self._padding(w.shape[-1]), self.dilation)
        return y.view(x.shape[0], self.out_channels, n, *y.shape[-2:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, group={self.group.family}({self.group.n}), mask={self.mask!r}, "
            f"antialias={self.antialias}, radius={self.radius}{self._stencil_repr()}"
        )


@register_layer(transfer=_CONV_TRANSFER)
class GroupConv(_GroupLayer):
    """Group convolution R^2 x| H -> R^2 x| H: ``(B, C, N, H, W) -> (B, C', N, H', W')``.

    Input and output live on the forward's sample set (set by the lifting layer). ``separable``
    factorises the kernel into a group part ``k_G(xi^-1(h_o^-1 h_i))_{c c'}`` (a 1x1 convolution
    over channels x samples) and a depthwise spatial part ``k_S(h_o^-1 d)_c`` -- about k^2 times
    fewer multiply-adds for the convolution itself, and still exactly equivariant.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        group: GroupSpec,
        kernel: SirenKernel | None = None,
        separable: bool = False,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        mask: str = "cosine",
        antialias: int = 2,
        radius: float = 1.4,
        stencil: str = "fixed",
    ) -> None:
        super().__init__()
        self._init_common(group, kernel_size, mask, antialias, radius, stencil)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.kernel_spec = kernel or SirenKernel()
        self.separable = bool(separable)
        n, d = group.samples, group.coord_dim
        ci, co, k2 = self.in_channels, self.out_channels, self.kernel_size**2
        if self.separable:
            self.net = self.kernel_spec.build(d, co * ci, fan_in=ci * n)
            self.spatial_net = self.kernel_spec.build(2, co, fan_in=k2)
        else:
            self.net = self.kernel_spec.build(2 + d, co * ci, fan_in=ci * n * k2)
            self.spatial_net = None
        self.bias = nn.Parameter(torch.zeros(co)) if bias else None

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        group: GroupSpec,
        kernel: SirenKernel | None = None,
        separable: bool = False,
        mask: str = "cosine",
        antialias: int = 2,
        radius: float = 1.4,
        stencil: str = "fixed",
        bias: bool | None = None,
    ) -> nn.Module:
        """Group conv with the geometry of the ``nn.Conv2d`` it replaces."""
        conv = _check_conv(module, "GroupConv")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            group=group,
            kernel=kernel,
            separable=separable,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=(conv.bias is not None) if bias is None else bias,
            mask=mask,
            antialias=antialias,
            radius=radius,
            stencil=stencil,
        )
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def _group_coords(self, samples: GroupSamples, dtype: torch.dtype) -> Tensor:
        """Kernel features of ``xi^-1(h_o^-1 h_i)``, ``(N_out, N_in, D)``."""
        spec = self.group
        key = ("group", spec.family, spec.n, spec.angle_encoding, dtype)
        return samples.derived(key, functools.partial(_group_geometry, spec=spec, dtype=dtype))[0]

    @_outside_autocast
    def weight(self, samples: GroupSamples) -> tuple[Tensor, ...]:
        """Full: ``(C' N, C N, K, K)``; separable: ``(C' N, C N, 1, 1)`` and ``(C' N, 1, K, K)``."""
        dtype = self.net.head.weight.dtype
        cached = self._cache.get(self, samples, dtype)
        if cached is not None:
            return cached
        n, k = len(samples), self._stencil_size(samples)
        ci, co = self.in_channels, self.out_channels
        coords = self._group_coords(samples, dtype)  # (No, Ni, D)
        measure = self._measure(samples, dtype, weighted=True)  # (Ni,)
        pts, win = self._spatial_points(samples, dtype)  # (No, k2, m2, 2), (No, k2, m2)
        if self.separable:
            kg = self.net(coords) * measure[None, :, None]  # (No, Ni, Co Ci)
            w1 = kg.view(n, n, co, ci).permute(2, 0, 3, 1).reshape(co * n, ci * n, 1, 1)
            ks = _mix_features(self.spatial_net, pts, win)  # (No, k2, Co)
            w2 = ks.view(n, k, k, co).permute(3, 0, 1, 2).reshape(co * n, 1, k, k)
            out: tuple[Tensor, ...] = (w1, w2)
        else:
            k2, m2 = pts.shape[1], pts.shape[2]
            d = coords.shape[-1]
            inp = torch.cat(
                [
                    pts[:, None].expand(n, n, k2, m2, 2),
                    coords[:, :, None, None, :].expand(n, n, k2, m2, d),
                ],
                -1,
            )
            kw = _mix_features(self.net, inp, win[:, None])  # (No, Ni, k2, Co Ci)
            kw = kw * measure[None, :, None, None]
            w = kw.view(n, n, k, k, co, ci).permute(4, 0, 5, 1, 2, 3).reshape(co * n, ci * n, k, k)
            out = (w,)
        self._cache.put(self, samples, dtype, out)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"GroupConv expects (B, C, N, H, W), got shape {tuple(x.shape)}")
        b, c, n = x.shape[:3]
        samples = self.group.current(expected=n)
        ws = self.weight(samples)
        xf = x.reshape(b, c * n, *x.shape[-2:])
        if self.separable:
            # 1x1 mixing as one matmul producing channels-last memory directly: the depthwise conv's
            # backward is several times faster in that layout on CPU, and no layout copy is needed
            hh, ww = x.shape[-2:]
            w1 = ws[0].to(x.dtype).flatten(1)  # (C' N, C N)
            y = torch.matmul(xf.reshape(b, c * n, hh * ww).transpose(1, 2), w1.T)  # (B, HW, C' N)
            y = y.view(b, hh, ww, -1).permute(0, 3, 1, 2)
            y = F.conv2d(
                y,
                ws[1].to(x.dtype),
                self._bias(n),
                self.stride,
                self._padding(ws[1].shape[-1]),
                self.dilation,
                groups=y.shape[1],
            )
        else:
            pad = self._padding(ws[0].shape[-1])
            y = F.conv2d(xf, ws[0].to(x.dtype), self._bias(n), self.stride, pad, self.dilation)
        return y.reshape(b, self.out_channels, n, *y.shape[-2:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, group={self.group.family}({self.group.n}), separable={self.separable}, "
            f"mask={self.mask!r}, antialias={self.antialias}, radius={self.radius}{self._stencil_repr()}"
        )


# ---------------------------------------------------------------------------------------------
# 5-D helpers: normalisation, spatial pooling, invariant pooling
# ---------------------------------------------------------------------------------------------


def _num_channels(module: nn.Module | None) -> int | None:
    if module is None:
        return None
    for attr in ("num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[0])
    return None


#: ``GroupLayerNorm`` implementation per device type: "split" (``_WholeMapNorm``: split reduction,
#: input dtype) or "native" (``F.layer_norm`` in the input's dtype, faster on CPUs); benchmarks
#: switch it to compare the two on the same machine
NORM_IMPL: dict[str, str] = {"cuda": "split"}


def whole_map_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over all but the batch dimension, no affine part; the output keeps ``x.dtype``.

    Under autocast ``F.layer_norm`` would run in float32 with a full-size cast before and after;
    both implementations here read the low-precision input and accumulate in float32 instead.
    """
    if NORM_IMPL.get(x.device.type, "native") == "split":
        return _WholeMapNorm.apply(x, eps)
    with _no_autocast(x.device):
        return F.layer_norm(x, x.shape[1:], eps=eps)


class _WholeMapNorm(torch.autograd.Function):
    """``(x - mean) / std`` over all but the batch dimension, in the input's dtype.

    ``F.layer_norm`` over a whole (C, N, H, W) map is one thread block per example on a GPU (128
    blocks for a batch of 128 maps of half a million values), and under bf16 autocast it runs in
    float32 with a cast before and after. Here the statistics are one split reduction
    (``var_mean``, float accumulation), the output stays in the input's dtype, and the backward
    ``dx = (dy - mean(dy) - y mean(dy y)) / std`` needs only the output ``y`` (which the next
    activation saves anyway) and ``1 / std``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        dims = tuple(range(1, x.dim()))
        with _no_autocast(x.device):
            acc = torch.promote_types(x.dtype, torch.float32)
            var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
            rstd = torch.rsqrt(var.to(acc) + eps)
            y = torch.addcmul((-mean.to(acc) * rstd).to(x.dtype), x, rstd.to(x.dtype))
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:
        y, rstd = ctx.saved_tensors
        dims = tuple(range(1, y.dim()))
        n = y[0].numel()
        with _no_autocast(y.device):
            dy = dy.to(y.dtype)
            g1 = dy.sum(dims, keepdim=True, dtype=rstd.dtype) / n
            g2 = (dy * y).sum(dims, keepdim=True, dtype=rstd.dtype) / n
            dx = torch.addcmul((-rstd * g1).to(y.dtype), y, (-rstd * g2).to(y.dtype))
            dx = torch.addcmul(dx, dy, rstd.to(y.dtype))
        return dx, None


@register_layer(
    transfer="none: per-sample normalisation over (C, N, H, W) as the paper's LayerNorm3d; "
    "affine=True adds per-channel scale/shift initialised to 1/0 (channel count taken from the module)"
)
class GroupLayerNorm(nn.Module):
    """LayerNorm over (C, N, H, W) of each example: statistics invariant to permuting samples."""

    def __init__(self, num_channels: int | None = None, *, affine: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = float(eps)
        if affine:
            if num_channels is None:
                raise ValueError("GroupLayerNorm(affine=True) needs num_channels")
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.weight = self.bias = None
        self.num_channels = num_channels

    @classmethod
    def from_module(
        cls,
        module: nn.Module | None,
        *,
        group: GroupSpec | None = None,
        affine: bool = False,
        eps: float = 1e-5,
    ) -> nn.Module:
        """Replaces a BatchNorm2d/LayerNorm/GroupNorm between group layers (``group``: documentation)."""
        layer = cls(_num_channels(module), affine=affine, eps=eps)
        ref = next(iter(module.parameters()), None) if module is not None else None
        return layer if ref is None else layer.to(device=ref.device, dtype=ref.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = whole_map_norm(x, self.eps)
        if self.weight is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


@register_layer(
    transfer="copied: affine weight/bias and running statistics of the BatchNorm2d are per channel, "
    "which is exactly what the group version keeps (statistics now pooled over samples too)"
)
class GroupBatchNorm(nn.BatchNorm3d):
    """BatchNorm per channel with statistics over (B, N, H, W); accepts 4-D input as BatchNorm2d."""

    @classmethod
    def from_module(cls, module: nn.Module, *, group: GroupSpec | None = None) -> nn.Module:
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"GroupBatchNorm replaces a BatchNorm layer, got {type(module).__name__}")
        layer = cls(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        ref = next(iter([*module.buffers(), *module.parameters()]), None)
        if ref is not None and ref.device.type == "meta":  # planning on shape-only tensors
            return layer.to(device="meta")
        layer.load_state_dict(module.state_dict())
        return layer if ref is None else layer.to(device=ref.device)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (4, 5):
            raise ValueError(f"GroupBatchNorm expects (B, C, N, H, W) or (B, C, H, W), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == 4:
            return super().forward(input.unsqueeze(2)).squeeze(2)
        return super().forward(input)


class BlurPool2d(nn.Module):
    """Anti-aliased pooling (Zhang, ICML 2019): a ``k x k`` mean (or max) at stride 1, then a
    binomial blur subsampled by ``stride``.

    Plain strided pooling aliases: features with detail near the pixel scale move between pooling
    cells under sub-pixel displacements, which every off-lattice rotation, shear or stretch
    produces, so a trained network loses the equivariance its layers have in the continuum. The
    mean version is linear, a low-pass filter with no preferred direction but the lattice's; the max
    version (``MaxBlurPool2d``) still takes a maximum over a square. Same output size as
    ``MaxPool2d(k)`` for ``k = stride = 2``; exactly equivariant to 90-degree rotations (symmetric
    filters, symmetric reflect padding).
    """

    def __init__(self, kernel_size: int = 2, stride: int = 2, *, reduce: str = "mean") -> None:
        super().__init__()
        if reduce not in ("mean", "max"):
            raise ValueError(f"BlurPool2d: reduce must be 'mean' or 'max', got {reduce!r}")
        self.kernel_size, self.stride, self.reduce = int(kernel_size), int(stride), reduce
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("blur", torch.outer(taps, taps) / 16.0, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.reduce == "max":
            y = F.max_pool2d(x, self.kernel_size, stride=1)
        else:
            y = F.avg_pool2d(x, self.kernel_size, stride=1)
        c = y.shape[1]
        y = F.pad(y, (1, 1, 1, 1), mode="reflect")
        w = self.blur.to(y.dtype).expand(c, 1, 3, 3)
        return F.conv2d(y, w, stride=self.stride, groups=c)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, reduce={self.reduce!r}"


class MaxBlurPool2d(BlurPool2d):
    """``BlurPool2d`` whose stride-1 stage is a max: anti-aliased max pooling."""

    def __init__(self, kernel_size: int = 2, stride: int = 2) -> None:
        super().__init__(kernel_size, stride, reduce="max")


SPATIAL_REDUCTIONS = ("max", "mean", "blurmax", "blur")


@register_layer(
    transfer="wraps a copy of the replaced pooling module (kernel size, stride, padding kept) unless "
    "`reduce` is given, which builds that reduction with the module's kernel size; no weights"
)
class GroupSpatialPool(nn.Module):
    """Applies a per-channel 2-D module (max/avg pooling, ...) to every (channel, sample) slice.

    ``(B, C, N, H, W) -> (B, C, N, H', W')`` by folding N into the channels; 4-D input is passed
    through unchanged, so the layer also works before the lifting convolution. ``reduce="blurmax"``
    is anti-aliased max pooling (``MaxBlurPool2d``), ``reduce="blur"`` anti-aliased average pooling
    (``BlurPool2d``: linear, no maximum over a square).
    """

    def __init__(self, pool: nn.Module | None = None, *, reduce: str = "max", kernel_size: int = 2) -> None:
        super().__init__()
        if pool is None:
            if reduce == "max":
                pool = nn.MaxPool2d(kernel_size)
            elif reduce == "mean":
                pool = nn.AvgPool2d(kernel_size)
            elif reduce == "blurmax":
                pool = MaxBlurPool2d(kernel_size, kernel_size)
            elif reduce == "blur":
                pool = BlurPool2d(kernel_size, kernel_size)
            else:
                raise ValueError(f"reduce must be one of {SPATIAL_REDUCTIONS}, got {reduce!r}")
        self.pool = pool

    @classmethod
    def from_module(
        cls, module: nn.Module | None, *, group: GroupSpec | None = None, reduce: str | None = None
    ) -> nn.Module:
        if reduce is not None:
            size = getattr(module, "kernel_size", 2)
            size = size[0] if isinstance(size, (tuple, list)) else int(size)
            return cls(reduce=reduce, kernel_size=size)
        if module is None:
            return cls()
        if isinstance(module, GroupSpatialPool):
            return copy.deepcopy(module)
        return cls(copy.deepcopy(module))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            return self.pool(x)
        b, c, n = x.shape[:3]
        y = self.pool(x.reshape(b, c * n, *x.shape[3:]))
        return y.view(b, c, n, *y.shape[-2:])


@register_layer(
    transfer="none: replaces a global/adaptive pooling module; output keeps its (B, C, 1, 1) shape "
    "when the replaced module produced one, so a following Flatten still fits"
)
class GroupPool(nn.Module):
    """Invariant pooling of group features by ``max`` or ``mean``.

    ``over="group"``: over the samples only, ``(B, C, N, H, W) -> (B, C, H, W)`` (escnn's
    GroupPooling); ``over="all"``: over samples and space, ``-> (B, C)`` or ``(B, C, 1, 1)`` with
    ``keep_spatial=True`` (the paper's global max projection).

    ``upsample=u`` (max over all only) takes the spatial maximum of the map's bicubic interpolant on
    a ``u`` times finer grid. The max over pixels of a transformed map misses its peaks by up to
    half a pixel, and the head amplifies that: on a trained SL(2) network, ``u = 4`` at evaluation
    alone lowers the co-transformed logit error from 17 % to 14 % (docs/groups.md).
    """

    def __init__(
        self, *, reduce: str = "max", over: str = "all", keep_spatial: bool = False, upsample: int = 1
    ) -> None:
        super().__init__()
        if reduce not in ("max", "mean"):
            raise ValueError(f"GroupPool: reduce must be 'max' or 'mean', got {reduce!r}")
        if over not in ("group", "all"):
            raise ValueError(f"GroupPool: over must be 'group' or 'all', got {over!r}")
        if int(upsample) != upsample or upsample < 1:
            raise ValueError(f"GroupPool: upsample must be an integer >= 1, got {upsample!r}")
        if upsample > 1 and (reduce, over) != ("max", "all"):
            raise ValueError("GroupPool: upsample applies to reduce='max', over='all' only")
        self.reduce, self.over, self.keep_spatial = reduce, over, bool(keep_spatial)
        self.upsample = int(upsample)

    @classmethod
    def from_module(
        cls,
        module: nn.Module | None,
        *,
        group: GroupSpec | None = None,
        reduce: str = "max",
        over: str | None = None,
        keep_spatial: bool | None = None,
        upsample: int = 1,
    ) -> nn.Module:
        """From a pooling module: a global one (output size 1) becomes ``over="all"`` keeping (B, C, 1, 1)."""
        size = getattr(module, "output_size", None)
        is_global = size in (1, (1, 1), [1, 1])
        if over is None:
            over = "all" if (module is None or is_global) else "group"
        if keep_spatial is None:
            keep_spatial = is_global
        return cls(reduce=reduce, over=over, keep_spatial=keep_spatial, upsample=upsample)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"GroupPool expects (B, C, N, H, W), got shape {tuple(x.shape)}")
        if self.over == "group":
            return x.amax(2) if self.reduce == "max" else x.mean(2)
        if self.upsample > 1:
            b, c, n, h, w = x.shape
            x = F.interpolate(x.reshape(b, c * n, h, w), scale_factor=self.upsample, mode="bicubic")
            x = x.view(b, c, n, *x.shape[-2:])
        flat = x.flatten(2)
        y = flat.amax(-1) if self.reduce == "max" else flat.mean(-1)
        return y[..., None, None] if self.keep_spatial else y

    def extra_repr(self) -> str:
        up = f", upsample={self.upsample}" if self.upsample > 1 else ""
        return f"reduce={self.reduce!r}, over={self.over!r}, keep_spatial={self.keep_spatial}{up}"
