"""Runtime values a checked recipe hands to layers, encodings, groups and fine-tuning.

Recipe literals become plain Python values (int, float, bool, str, None, list); the two
structured forms are a call of a registered constructor that has not been built yet (inside
``finetune`` blocks, where the training code decides what ``adamw(lr=1e-3)`` means) and a ramp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Call:
    """``name(arg, key=value, ...)`` as written in a recipe, with evaluated arguments."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:  # kwargs is a dict; hash by its items
        return hash((self.name, self.args, tuple(sorted(self.kwargs.items(), key=lambda kv: kv[0]))))


@dataclass(frozen=True)
class Ramp:
    """``ramp PARAM from START to END over EPOCHS epochs`` in a ``finetune`` block."""

    param: str
    start: float
    end: float
    epochs: float

    def value_at(self, epoch: float) -> float:
        """Linear schedule: ``start`` at epoch 0, ``end`` from ``epochs`` on."""
        if self.epochs <= 0:
            return self.end
        t = min(max(epoch / self.epochs, 0.0), 1.0)
        return self.start + t * (self.end - self.start)
