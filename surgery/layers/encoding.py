"""Input-encoding modules placed inside the model (B-cos ``AddInverse`` and the normalisation).

``EncodedInput(encode, normalize, conv)`` replaces the model's first layer in place, so the model
keeps its class and methods (timm ``forward_features``, ``reset_classifier``) and still takes the
raw image. State-dict keys are predictable: ``<first>.conv.weight`` (the 6-channel first layer),
``<first>.normalize.mean`` / ``.std``. Explanations hook the output of ``encode`` (the raw
``[x, 1-x]``) to get the dynamic linear weights w.r.t. the encoded input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from surgery.registry import register_layer

__all__ = ["AddInverse", "EncodedInput", "Normalize", "find_encoded_input"]


@register_layer(transfer="no weights")
class AddInverse(nn.Module):
    """``x -> [x, 1 - x]`` along the channel dim: every colour (black too) becomes a non-zero vector.

    Its output is what explanations explain (``explanation_input``): the constant 1 is part of the
    encoded image, not a term of the network."""

    explanation_input = True

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, 1 - x], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


@register_layer(transfer="no weights; mean and std are buffers saved with the model")
class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (NCHW), inside the model so the data pipeline feeds [0, 1].

    The mean is an additive constant of the network (``explanation_constants``): its share is the
    explanation's ``constant``."""

    explanation_constants = ("mean",)

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have the same length")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @property
    def has_mean(self) -> bool:
        return bool(self.mean.abs().max() > 0)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class EncodedInput(nn.Module):
    """``conv(normalize(encode(x)))``: the first layer with the input encoding prepended.

    Attribute reads that the wrapper does not have (``weight``, ``in_channels``, ``kernel_size``,
    ``stride`` ...) fall through to ``conv``, so model code that inspects its first conv keeps
    working. ``conv`` is an ordinary child: later rules (``replace Conv2d with BcosConv2d``) match
    and replace it like any other conv.
    """

    def __init__(self, encode: nn.Module, normalize: nn.Module, conv: nn.Module) -> None:
        super().__init__()
        self.encode = encode
        self.normalize = normalize
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.normalize(self.encode(x)))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "conv" not in modules or name.startswith("__"):
                raise
            return getattr(modules["conv"], name)


def find_encoded_input(model: nn.Module) -> EncodedInput | None:
    """The first ``EncodedInput`` in module order, if the model has one."""
    for m in model.modules():
        if isinstance(m, EncodedInput):
            return m
    return None
