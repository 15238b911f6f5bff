"""Gated activations written as ``gate(x) * x`` with the gate detached in explanation mode.

GELU(x) = Phi(x) x, SiLU(x) = sigmoid(x) x, Hardswish(x) = relu6(x + 3)/6 x. Detaching the gate makes
each a dynamic linear map ``diag(gate(x)) x`` (B-cosification's ``MyGELU``); with explanation mode
off they call the torch kernels and equal the originals exactly. ReLU needs nothing: it is
piecewise linear already.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.layers.explanation_mode import DetachableModule, carry_param
from surgery.registry import register_layer

__all__ = [
    "DetachableGELU",
    "DetachableHardswish",
    "DetachableSiLU",
    "DetachableSquaredReLU",
    "DetachableStarReLU",
    "gelu_gate",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_gate(x: Tensor, approximate: str = "none") -> Tensor:
    """Phi(x) such that ``F.gelu(x, approximate) == Phi(x) * x``."""
    if approximate == "tanh":
        return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


@register_layer(transfer="approximate ('none' or 'tanh') taken from the GELU it replaces; no weights")
class DetachableGELU(DetachableModule, nn.GELU):
    """GELU whose gate Phi(x) is detached in explanation mode; ``nn.GELU`` otherwise."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__(approximate=approximate)

    @classmethod
    def from_module(cls, module: nn.Module | None, *, approximate: str | None = None) -> nn.Module:
        """From ``nn.GELU`` / timm ``GELU`` / ``GELUTanh`` (or ``None`` for a call rewrite)."""
        if approximate is None:
            approximate = getattr(module, "approximate", None)
            if approximate is None:
                approximate = "tanh" if type(module).__name__ in ("GELUTanh", "GELUTanhFp32") else "none"
        return cls(approximate=approximate)

    def forward(self, x: Tensor) -> Tensor:
        if not self.explanation:
            return F.gelu(x, approximate=self.approximate)
        return gelu_gate(x, self.approximate).detach() * x


@register_layer(transfer="no weights")
class DetachableSiLU(DetachableModule, nn.SiLU):
    """SiLU / swish ``sigmoid(x) x`` with the sigmoid gate detached in explanation mode."""

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_module(cls, module: nn.Module | None) -> nn.Module:
        return cls()

    def forward(self, x: Tensor) -> Tensor:
        if not self.explanation:
            return F.silu(x)
        return torch.sigmoid(x).detach() * x


@register_layer(transfer="no weights")
class DetachableHardswish(DetachableModule, nn.Hardswish):
    """Hardswish ``x relu6(x + 3) / 6`` with the gate detached in explanation mode (MobileNetV3)."""

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_module(cls, module: nn.Module | None) -> nn.Module:
        return cls()

    def forward(self, x: Tensor) -> Tensor:
        if not self.explanation:
            return F.hardswish(x)
        return (F.relu6(x + 3.0) / 6.0).detach() * x


@register_layer(transfer="scale and bias copied from timm's StarReLU (MetaFormer: CAFormer, ConvFormer)")
class DetachableStarReLU(DetachableModule):
    """StarReLU ``s relu(x)^2 + b`` as ``(s relu(x)) * relu(x) + b`` with the first factor detached in
    explanation mode: a dynamic linear map of ``x`` (relu is piecewise linear). ``bias`` may be None
    (dropped), so ``drop bias`` removes the additive constant."""

    def __init__(self, scale_value: float = 1.0, bias_value: float | None = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), float(scale_value)))
        self.bias = nn.Parameter(torch.full((1,), float(bias_value))) if bias_value is not None else None

    @classmethod
    def from_module(cls, module: nn.Module | None) -> nn.Module:
        """From timm ``StarReLU`` (its learned scale and bias carried), or fresh (s = 1, b = 0)."""
        new = cls()
        scale, bias = getattr(module, "scale", None), getattr(module, "bias", None)
        if isinstance(scale, torch.Tensor):
            new.scale = carry_param(scale.detach().clone(), scale)
        if isinstance(bias, torch.Tensor):
            new.bias = carry_param(bias.detach().clone(), bias)
        elif module is not None:
            new.bias = None
        return new

    def forward(self, x: Tensor) -> Tensor:
        r = F.relu(x)
        gate = self.scale * r
        y = (gate.detach() if self.explanation else gate) * r
        return y if self.bias is None else y + self.bias


@register_layer(
    transfer="no weights (timm MetaFormer SquaredReLU, the CAFormer/ConvFormer MLP-head activation)"
)
class DetachableSquaredReLU(DetachableModule):
    """Squared ReLU ``relu(x)^2`` as ``relu(x) * relu(x)`` with the first factor detached in
    explanation mode.

    ``relu(x)^2`` is homogeneous of degree 2, so its plain gradient counts the output twice
    (``x * d/dx = 2 relu(x)^2``) and the explanation is not complete; with one factor detached it
    is the dynamic linear map ``diag(relu(x)) relu(x)``. No parameters (unlike StarReLU)."""

    @classmethod
    def from_module(cls, module: nn.Module | None) -> nn.Module:
        return cls()

    def forward(self, x: Tensor) -> Tensor:
        r = F.relu(x)
        return (r.detach() if self.explanation else r) * r
