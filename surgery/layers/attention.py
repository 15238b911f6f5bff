"""timm ViT attention made dynamic linear: q and k detached in explanation mode.

``softmax(q k^T / sqrt(d)) v`` with the attention matrix treated as constant is linear in ``v``,
hence in the block input (B-cos ViTs, B-cosification ``bcosify_vit.py``). The layer *is* the timm
module (same class hierarchy, submodules, parameters and attributes such as ``fused_attn``); only
``forward`` differs, and with explanation mode off it calls timm's own forward, so outputs are
identical bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from surgery.layers.explanation_mode import DetachableModule
from surgery.registry import register_layer

__all__ = ["DetachableAttention", "DetachableMetaFormerAttention"]

try:
    from timm.layers.attention import Attention as _TimmAttention
except ImportError:  # pragma: no cover - timm is a dependency
    _TimmAttention = nn.Module  # type: ignore[assignment,misc]

try:
    from timm.models.metaformer import Attention as _MetaFormerAttention
except ImportError:  # pragma: no cover - timm is a dependency
    _MetaFormerAttention = nn.Module  # type: ignore[assignment,misc]


def _reclass(cls: type[nn.Module], module: nn.Module, base: type[nn.Module], what: str) -> nn.Module:
    """Switch ``module`` (exactly a ``base``) to its detachable subclass ``cls`` in place.

    The engine hands ``from_module`` a private copy, so every weight, submodule and attribute is
    kept as it is; only the class (hence ``forward``) changes.
    """
    if type(module) is cls:
        return module
    if type(module) is not base:
        raise TypeError(f"{cls.__name__}.from_module needs {what}, got {type(module).__name__}")
    module.__class__ = cls
    module.explanation = False
    return module


@register_layer(
    transfer="the timm Attention module itself is kept (class switched in place): every weight, "
    "submodule and attribute (fused_attn, scale, q_norm/k_norm, ...) is unchanged"
)
class DetachableAttention(DetachableModule, _TimmAttention):
    """timm ``Attention`` whose q and k (and sigmoid gate) are detached in explanation mode."""

    @classmethod
    def from_module(cls, module: nn.Module) -> nn.Module:
        """Take over a ``timm.layers.Attention`` (as used by ``vision_transformer``), weights included."""
        return _reclass(
            cls, module, _TimmAttention, "timm.layers.Attention (timm.models.vision_transformer.Attention)"
        )

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.explanation:
            return super().forward(x, *args, **kwargs)
        return self._forward_explain(x, *args, **kwargs)

    def _forward_explain(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        bsz, n, c = x.shape
        attn_dim = getattr(self, "attn_dim", c)
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid().detach() if gate_layer is not None else None
        qkv = self.qkv(x).reshape(bsz, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q).detach(), self.k_norm(k).detach()
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if is_causal:
                attn = attn + attn.new_full((n, n), float("-inf")).triu_(1)
            elif attn_mask is not None:
                if attn_mask.dtype.is_floating_point:
                    attn = attn + attn_mask
                else:
                    attn = attn.masked_fill(~attn_mask, float("-inf"))
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(bsz, n, attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@register_layer(
    transfer="the timm MetaFormer Attention module itself is kept (class switched in place): qkv, proj "
    "and every attribute (fused_attn, scale, attention_dim, ...) unchanged"
)
class DetachableMetaFormerAttention(DetachableModule, _MetaFormerAttention):
    """MetaFormer's own attention (CAFormer; ``timm.models.metaformer.Attention``, not timm's
    ``Attention``) with q and k detached in explanation mode.

    Without the detach the softmax's derivative enters ``d logit / d x`` and the explanation of a
    B-cosified CAFormer is not complete (its residual was as large as the logit); with it the
    mixer is ``A(x) v(x)``, linear in ``x`` for a fixed ``A``, as for :class:`DetachableAttention`.
    Outside explanation mode timm's forward runs unchanged.
    """

    @classmethod
    def from_module(cls, module: nn.Module) -> nn.Module:
        """Take over a ``timm.models.metaformer.Attention``, weights included."""
        return _reclass(cls, module, _MetaFormerAttention, "timm.models.metaformer.Attention")

    def forward(self, x: Tensor) -> Tensor:
        if not self.explanation:
            return super().forward(x)
        bsz, n, _ = x.shape
        qkv = self.qkv(x).reshape(bsz, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q.detach() @ k.detach().transpose(-2, -1)) * self.scale).softmax(dim=-1)
        # timm reshapes to the block width C (attention_dim == C for every shipped MetaFormer)
        x = (attn @ v).transpose(1, 2).reshape(bsz, n, self.attention_dim)
        return self.proj_drop(self.proj(x))
