"""Losses used to train B-cos networks (B-cos v2 ``bcos/modules/losses.py``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UniformOffLabelsBCEWithLogitsLoss"]


class UniformOffLabelsBCEWithLogitsLoss(nn.Module):
    """BCE with logits where the off-classes get target ``off_label`` (default 1/C) instead of 0.

    B-cos v2 and B-cosification train with this loss (and a logit bias -ln(C-1)): the B-cos
    alignment pressure comes from maximising each logit independently. Targets may be class
    indices (N,) or dense (N, C) (e.g. mixup); dense targets are clamped to at least ``off_label``.
    """

    def __init__(self, reduction: str = "mean", off_label: float | None = None) -> None:
        super().__init__()
        self.reduction = reduction
        self.off_label = off_label

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.shape[0] != target.shape[0]:
            raise ValueError(f"batch sizes differ: {logits.shape[0]} vs {target.shape[0]}")
        num_classes = logits.shape[-1]
        off = self.off_label if self.off_label is not None else 1.0 / num_classes
        if target.shape != logits.shape:
            target = F.one_hot(target.long(), num_classes=num_classes).to(logits.dtype)
        target = target.to(logits.dtype).clamp(min=off)
        return F.binary_cross_entropy_with_logits(logits, target, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, off_label={self.off_label}"
