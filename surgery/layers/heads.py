"""Classifier heads for B-cos networks: logit layer, classifier-before-pooling heads.

B-cos CNNs apply the classifier as a 1x1 B-cos conv to every position of the feature map and only
then average-pool (B-cos v2 ``resnet.py``, B-cosification ``gap=True``): the B-cos non-linearity then
sees local features, and the logit is the mean of per-position logits. At ``b == 1`` without bias the
reorder is exact (pooling and a linear map commute). ViTs do the same per token (``gap_reorder``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from surgery.layers.bcos import BcosConv2d, BcosLinear
from surgery.layers.norms import DetachableLayerNorm
from surgery.registry import register_layer

__all__ = ["BcosPooledHead", "BcosTokenHead", "LogitLayer", "infer_num_classes"]


def infer_num_classes(module: nn.Module | None) -> int | None:
    """Number of outputs of a classifier-like module (Linear, Conv2d, timm heads), if known."""
    if module is None:
        return None
    for attr in ("out_features", "out_channels", "num_classes"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    fc = getattr(module, "fc", None)
    if isinstance(fc, nn.Module) and fc is not module:
        return infer_num_classes(fc)
    return None


@register_layer(
    transfer="no weights; the number of classes C for the default bias -ln(C-1) is read from the module "
    "it is inserted after (Linear.out_features, Conv2d.out_channels, head.num_classes)"
)
class LogitLayer(nn.Module):
    """``y = x / T + b``: fixed logit temperature and bias (B-cos v2 uses b = -ln(C-1), T = 1).

    The bias makes the initial sigmoid output 1/C for a zero pre-logit, matching the BCE target
    of the off classes (``UniformOffLabelsBCEWithLogitsLoss``).
    """

    def __init__(self, logit_temperature: float | None = None, logit_bias: float | None = None) -> None:
        super().__init__()
        self.logit_temperature = logit_temperature
        self.logit_bias = logit_bias

    @classmethod
    def from_module(
        cls,
        module: nn.Module | None,
        *,
        temperature: float | None = None,
        bias: float | None = None,
        num_classes: int | None = None,
    ) -> nn.Module:
        """``bias=None``: -ln(C-1), C = ``num_classes`` or inferred from ``module`` (none if unknown)."""
        if bias is None:
            c = num_classes or infer_num_classes(module)
            bias = -math.log(c - 1) if c is not None and c >= 2 else None
        return cls(logit_temperature=temperature, logit_bias=bias)

    @property
    def explanation_offset(self) -> float | None:
        """The constant this layer adds to its output (an explanation's ``logit_bias``)."""
        return self.logit_bias

    def forward(self, x: Tensor) -> Tensor:
        if self.logit_temperature is not None:
            x = x / self.logit_temperature
        if self.logit_bias is not None:
            x = x + self.logit_bias
        return x

    def extra_repr(self) -> str:
        return f"logit_temperature={self.logit_temperature}, logit_bias={self.logit_bias}"


def _timm_head_parts(module: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(classifier, per-position norm or None) of a timm ``ClassifierHead`` / ``NormMlpClassifierHead``."""
    fc = module.fc
    pre = getattr(module, "pre_logits", None)
    if pre is not None and not isinstance(pre, nn.Identity):
        raise NotImplementedError(
            "BcosPooledHead: heads with a pre-logits MLP are not supported; replace head.fc instead"
        )
    norm = getattr(module, "norm", None)
    if norm is None or isinstance(norm, nn.Identity):
        return fc, None
    if isinstance(norm, DetachableLayerNorm):
        return fc, norm
    if isinstance(norm, nn.LayerNorm):  # timm LayerNorm2d in NormMlpClassifierHead (ConvNeXt)
        new_norm = DetachableLayerNorm.from_module(norm)
        new_norm.channels_first = True
        return fc, new_norm
    raise NotImplementedError(f"BcosPooledHead: unsupported head norm {type(norm).__name__}")


@register_layer(
    transfer="classifier weight (K, C) viewed as a 1x1 conv (K, C, 1, 1), unchanged; from a timm "
    "ClassifierHead/NormMlpClassifierHead: its fc, and its LayerNorm2d kept as a per-position "
    "DetachableLayerNorm; bias kept only with bias=true"
)
class BcosPooledHead(BcosConv2d):
    """Classifier as a 1x1 B-cos conv on the feature map, *then* global average pool + flatten.

    Replace the classifier with this and the model's global pool with ``Identity``: the head
    receives (N, C, H, W) and returns (N, K). A 2-D input (pool not removed) is treated as a 1x1
    map, so the head also works unreordered. Built from a whole timm head (ConvNeXt's
    ``NormMlpClassifierHead``), it applies the head's LayerNorm2d per position first, so
    ``replace head with BcosPooledHead(b=b)`` is the whole reorder there.
    """

    def __init__(self, *args: Any, norm: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm

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
        """Build from the classifier ``Linear`` (or a 1x1 conv, or a timm classifier head)."""
        norm = None
        if hasattr(module, "fc") and hasattr(module, "global_pool"):
            module, norm = _timm_head_parts(module)
        if getattr(module, "weight", None) is None:
            raise TypeError(
                f"BcosPooledHead.from_module needs a Linear classifier, got {type(module).__name__}"
            )
        if module.weight.dim() == 4 and tuple(module.weight.shape[2:]) != (1, 1):
            raise ValueError("BcosPooledHead needs a Linear or a 1x1 conv classifier")
        new: BcosPooledHead = super().from_module(
            module, b=b, max_out=max_out, normalize_weights=normalize_weights, bias=bias
        )  # type: ignore[assignment]
        new.norm = norm
        return new

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if x.dim() == 2:
            x = x[:, :, None, None]
        if self.norm is not None:
            x = self.norm(x)
        if pre_logits:
            return x.mean(dim=(2, 3))
        return super().forward(x).mean(dim=(2, 3))

    @property
    def num_classes(self) -> int:
        return self.out_channels


@register_layer(
    transfer="classifier weight copied unchanged; bias kept only with bias=true; pooling after the head"
)
class BcosTokenHead(BcosLinear):
    """ViT head applied to every token, then pooled (B-cosification ``gap_reorder``).

    Expects (N, T, D) tokens, so the ViT must stop pooling before its head: built by the engine
    (which passes ``context``) from the head of a timm ``VisionTransformer``, it sets the model's
    ``global_pool`` to ``""`` itself and reads ``num_prefix_tokens`` and the default ``pool`` from
    the model. ``pool="avg"`` averages the per-token logits of the non-prefix tokens (class /
    register tokens excluded), ``"token"`` takes token 0 (then equal to the original class-token
    head), ``"none"`` returns per-token logits. A 2-D input is treated as a plain B-cos linear head.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        pool: str = "avg",
        num_prefix_tokens: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, **kwargs)
        self.pool = _check_pool(pool)
        self.num_prefix_tokens = num_prefix_tokens

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        b: float = 2.0,
        max_out: int = 1,
        normalize_weights: bool = False,
        bias: bool = False,
        pool: str | None = None,
        num_prefix_tokens: int | None = None,
        context: Any = None,
    ) -> nn.Module:
        """Build from the ViT ``head`` Linear, keeping its weights.

        ``pool=None``: the model's own pooling ("token" stays "token", anything else becomes "avg");
        ``num_prefix_tokens=None``: the model's (1 if unknown). ``context`` is the engine's build
        context (``context.model`` is the model being edited); it is never written in a recipe.
        """
        model = getattr(context, "model", None)
        vit_pool = getattr(model, "global_pool", None) if model is not None else None
        if getattr(model, "attn_pool", None) is not None:
            raise NotImplementedError("BcosTokenHead: attention-pooled ViTs ('map') are not supported")
        if pool is None:
            pool = "token" if vit_pool == "token" else "avg"
        if num_prefix_tokens is None:
            num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        new: BcosTokenHead = super().from_module(
            module, b=b, max_out=max_out, normalize_weights=normalize_weights, bias=bias
        )  # type: ignore[assignment]
        new.pool = _check_pool(pool)
        new.num_prefix_tokens = num_prefix_tokens
        if isinstance(vit_pool, str):  # a timm ViT: hand the head every token
            model.global_pool = ""
        return new

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if x.dim() != 3 or self.pool == "none":
            return y
        if self.pool == "token":
            return y[:, 0]
        return y[:, self.num_prefix_tokens :].mean(dim=1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pool={self.pool!r}, num_prefix_tokens={self.num_prefix_tokens}"

    @property
    def num_classes(self) -> int:
        return self.out_features


def _check_pool(pool: str) -> str:
    if pool not in ("avg", "token", "none"):
        raise ValueError(f"pool must be 'avg', 'token' or 'none', got {pool!r}")
    return pool
