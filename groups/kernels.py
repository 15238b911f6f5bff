"""Continuous kernels: a SIREN on (spatial offset, Lie-algebra coordinates) -> C_out x C_in weights.

A group-convolution kernel must be defined at arbitrary group elements (the samples change every
forward), so it is a small network of continuous coordinates rather than a weight table. As in
the paper the network is a SIREN (sin activations), initialised so the produced weights have
variance ``1 / fan_in`` of the convolution that uses them.

``SirenKernel`` is the recipe value (``siren(width=60, depth=3, w0=10)``): a configuration that
layers turn into a fresh network with ``build``; one value can be shared by many layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from surgery.registry import register_constructor

__all__ = ["SineLayer", "Siren", "SirenKernel"]


class SineLayer(nn.Module):
    """``sin(w0 (W x + b))`` with SIREN initialisation (Sitzmann et al. 2020)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        w0: float,
        *,
        first: bool,
        learn_w0: bool = False,
        fold_w0: bool = False,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        bound = 1.0 / in_dim if first else math.sqrt(6.0 / in_dim) / w0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)
            if first:
                self.linear.bias.uniform_(-bound, bound)
            else:
                self.linear.bias.zero_()
        # fold_w0 stores w0 (W, b) as the parameters: the same function, but an optimizer step of
        # size lr moves the pre-activations by O(lr) instead of O(w0 lr) (Adam is scale-free)
        self.fold_w0 = bool(fold_w0) and not learn_w0
        if self.fold_w0:
            with torch.no_grad():
                self.linear.weight.mul_(w0)
                self.linear.bias.mul_(w0)
        w = torch.tensor(float(w0))
        if learn_w0:
            self.w0 = nn.Parameter(w)
        else:
            self.register_buffer("w0", w)

    def forward(self, x: Tensor) -> Tensor:
        if self.fold_w0:
            return torch.sin(self.linear(x))
        return torch.sin(self.w0 * self.linear(x))


class Siren(nn.Module):
    """``depth`` sine layers of ``width`` units and a linear head to ``out_dim`` values.

    ``hidden`` exposes the last sine features: the head is linear, so averaging over sub-pixel
    points (anti-aliasing) can be done on the features before the wide head at no extra cost.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        width: int = 60,
        depth: int = 3,
        w0: float = 10.0,
        w0_first: float | None = None,
        learn_w0: bool = False,
        fan_in: int = 1,
        gain: float = 6.0,
        scaled: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"siren: need depth >= 1 and width >= 1, got depth={depth}, width={width}")
        first = w0 if w0_first is None else w0_first
        kw = {"learn_w0": learn_w0, "fold_w0": scaled}
        layers = [SineLayer(in_dim, width, first, first=True, **kw)]
        layers += [SineLayer(width, width, w0, first=False, **kw) for _ in range(depth - 1)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_dim)
        # scaled: head weights stored at unit fan-in scale, the 1/sqrt(fan_in) applied at run time
        # ("equalised learning rate"), so Adam changes the produced kernel by O(lr) relative to it
        self.out_scale = 1.0 / math.sqrt(max(fan_in, 1)) if scaled else 1.0
        bound = math.sqrt(gain / width) / math.sqrt(max(fan_in, 1)) / self.out_scale
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound)
            self.head.bias.zero_()
        self.in_dim, self.out_dim = in_dim, out_dim

    def hidden(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)) * self.out_scale


@register_constructor("siren")
@dataclass(frozen=True)
class SirenKernel:
    """SIREN kernel network: ``depth`` sine layers of ``width`` units, frequency ``w0``.

    The paper uses width 60, depth 3, w0 = 10. ``w0_first`` sets the first layer's frequency
    separately (the highest-frequency part of the kernel; lower values make the discretised
    kernel alias less off the pixel lattice). ``learn_w0`` makes the frequencies trainable.
    """

    width: int = 60
    depth: int = 3
    w0: float = 10.0
    w0_first: float | None = None
    learn_w0: bool = False
    scaled: bool = True

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"siren: need width >= 1 and depth >= 1, got {self.width}, {self.depth}")
        if self.w0 <= 0 or (self.w0_first is not None and self.w0_first <= 0):
            raise ValueError("siren: w0 must be > 0")

    def build(self, in_dim: int, out_dim: int, *, fan_in: int) -> Siren:
        return Siren(
            in_dim,
            out_dim,
            width=self.width,
            depth=self.depth,
            w0=self.w0,
            w0_first=self.w0_first,
            learn_w0=self.learn_w0,
            fan_in=fan_in,
            scaled=self.scaled,
        )
