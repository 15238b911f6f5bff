"""Torch built-in layers a recipe may build (``replace MaxPool2d with AvgPool2d``).

Each factory takes the module being replaced (or the anchor of an ``insert``, or None) and keyword
parameters; sizes left out are read from that module, so ``AvgPool2d`` built from a ``MaxPool2d``
keeps its kernel, stride and padding (B-cos v2 / B-cosification: ``MaxPool2d(3, 2, 1)`` becomes
``AvgPool2d(3, 2, 1)``, which is linear).
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.registry import register_layer

__all__: list[str] = []


def _channels(module: nn.Module | None) -> int | None:
    """Channel / feature count of a module, read from the usual attribute names."""
    if module is None:
        return None
    for attr in ("num_features", "num_channels", "out_channels", "out_features"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return None


def _need(value: int | None, what: str, layer: str) -> int:
    if value is None:
        raise ValueError(f"{layer}: give {what}= (it cannot be read from the module being replaced)")
    return value


@register_layer("Identity", cls=nn.Identity, transfer="no weights; the module is dropped")
def identity(module: nn.Module | None) -> nn.Module:
    """Pass-through: removes the module (e.g. the global pool before a ``BcosPooledHead``)."""
    return nn.Identity()


@register_layer(
    "AvgPool2d", cls=nn.AvgPool2d, transfer="kernel_size, stride, padding, ceil_mode from the pool"
)
def avg_pool2d(
    module: nn.Module | None,
    *,
    kernel_size: int | None = None,
    stride: int | None = None,
    padding: int | None = None,
    count_include_pad: bool = True,
) -> nn.Module:
    """Average pooling, sized from the ``MaxPool2d`` (or pool) it replaces unless given."""
    if module is not None and getattr(module, "dilation", 1) not in (1, (1, 1)):
        raise ValueError("AvgPool2d cannot replace a dilated MaxPool2d")
    k = kernel_size if kernel_size is not None else getattr(module, "kernel_size", None)
    s = stride if stride is not None else getattr(module, "stride", None)
    p = padding if padding is not None else getattr(module, "padding", 0)
    return nn.AvgPool2d(
        _need(k, "kernel_size", "AvgPool2d"),
        stride=s,
        padding=p,
        ceil_mode=bool(getattr(module, "ceil_mode", False)),
        count_include_pad=count_include_pad,
    )


@register_layer("ReLU", cls=nn.ReLU, transfer="no weights")
def relu(module: nn.Module | None) -> nn.Module:
    """ReLU (not in place, so explanation hooks see unmodified tensors)."""
    return nn.ReLU()


@register_layer("GELU", cls=nn.GELU, transfer="approximate copied from a GELU, else the given value")
def gelu(module: nn.Module | None, *, approximate: str = "none") -> nn.Module:
    """GELU."""
    return nn.GELU(approximate=getattr(module, "approximate", approximate))


@register_layer("SiLU", cls=nn.SiLU, transfer="no weights")
def silu(module: nn.Module | None) -> nn.Module:
    """SiLU / swish."""
    return nn.SiLU()


@register_layer("Dropout", cls=nn.Dropout, transfer="no weights")
def dropout(module: nn.Module | None, *, p: float = 0.0) -> nn.Module:
    """Dropout with probability ``p`` (default 0: a no-op kept for structure)."""
    return nn.Dropout(p)


@register_layer("Flatten", cls=nn.Flatten, transfer="no weights")
def flatten(module: nn.Module | None, *, start_dim: int = 1) -> nn.Module:
    """Flatten from ``start_dim`` on."""
    return nn.Flatten(start_dim)


def _device(module: nn.Module | None) -> torch.device | None:
    for t in [
        *(module.parameters() if module is not None else []),
        *(module.buffers() if module is not None else []),
    ]:
        return t.device
    return None


def _take_tensors(new: nn.Module, old: nn.Module) -> nn.Module:
    """Move ``old``'s parameters and buffers into ``new`` by name (no copy: works on meta modules too).

    Parameters keep their ``requires_grad``; names ``new`` lacks or holds as None are skipped.
    """
    for name, p in old.named_parameters(recurse=False):
        if new._parameters.get(name) is not None:
            new._parameters[name] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for name, b in old.named_buffers(recurse=False):
        if new._buffers.get(name) is not None:
            new._buffers[name] = b.detach()
    return new


@register_layer(
    "BatchNorm2d",
    cls=nn.BatchNorm2d,
    transfer="from a BatchNorm2d (or subclass): weight, bias, running stats, eps and momentum carried "
    "(eps/momentum given in the recipe win); else fresh, sized from the module's channel count",
)
def batch_norm2d(
    module: nn.Module | None,
    *,
    num_features: int | None = None,
    eps: float | None = None,
    momentum: float | None = None,
) -> nn.Module:
    """A standard (centred) BatchNorm2d."""
    c = _need(num_features if num_features is not None else _channels(module), "num_features", "BatchNorm2d")
    same = isinstance(module, nn.BatchNorm2d) and module.num_features == c
    new = nn.BatchNorm2d(
        c,
        eps=eps if eps is not None else (module.eps if same else 1e-5),
        momentum=momentum if momentum is not None else (module.momentum if same else 0.1),
        affine=module.affine if same else True,
        track_running_stats=module.track_running_stats if same else True,
        device=_device(module),
    )
    return _take_tensors(new, module) if same else new


@register_layer(
    "LayerNorm",
    cls=nn.LayerNorm,
    transfer="from a LayerNorm: normalized_shape, eps, weight, bias carried (eps given in the recipe "
    "wins); else sized from the module",
)
def layer_norm(
    module: nn.Module | None, *, normalized_shape: int | None = None, eps: float | None = None
) -> nn.Module:
    """A standard LayerNorm over the last dimension."""
    c = _need(
        normalized_shape if normalized_shape is not None else _channels(module),
        "normalized_shape",
        "LayerNorm",
    )
    same = isinstance(module, nn.LayerNorm) and module.normalized_shape == (c,)
    new = nn.LayerNorm(
        c,
        eps=eps if eps is not None else (module.eps if same else 1e-5),
        elementwise_affine=module.elementwise_affine if same else True,
        bias=(module.bias is not None) if same else True,
        device=_device(module),
    )
    return _take_tensors(new, module) if same else new


@register_layer(
    "GroupNorm",
    cls=nn.GroupNorm,
    transfer="from a GroupNorm: groups, weight, bias carried (values given in the recipe win); else "
    "sized from the module's channel count",
)
def group_norm(
    module: nn.Module | None,
    *,
    num_groups: int | None = None,
    num_channels: int | None = None,
    eps: float | None = None,
) -> nn.Module:
    """A standard GroupNorm (``num_groups=1``: LayerNorm over C, H, W)."""
    c = _need(num_channels if num_channels is not None else _channels(module), "num_channels", "GroupNorm")
    same = isinstance(module, nn.GroupNorm) and module.num_channels == c
    new = nn.GroupNorm(
        num_groups if num_groups is not None else (module.num_groups if same else 1),
        c,
        eps=eps if eps is not None else (module.eps if same else 1e-5),
        affine=module.affine if same else True,
        device=_device(module),
    )
    return _take_tensors(new, module) if same else new
