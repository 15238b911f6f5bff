"""One switch for explanation mode.

In explanation mode every dynamic-linear layer detaches the input-dependent part of its weights
(B-cos scale, norm variance, GELU gate, attention q/k), so the network computes ``W(x) x`` and
``d logit / d x`` is exactly the dynamic linear map ``W(x)`` (B-cos v2, ``bcos/common.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["DetachableModule", "carry_param", "explanation_mode", "set_explanation_mode"]


def carry_param(data: Tensor, like: Tensor | None) -> nn.Parameter:
    """A new parameter holding ``data`` that keeps ``like``'s ``requires_grad`` (frozen stays frozen)."""
    return nn.Parameter(data.detach(), requires_grad=like.requires_grad if like is not None else True)


class DetachableModule(nn.Module):
    """Mixin: a module whose dynamic weights are detached while ``explanation`` is on.

    The flag is a class attribute default, so subclasses of torch layers (``nn.LayerNorm`` ...)
    need no extra ``__init__`` and modules built with ``__new__`` in ``from_module`` work too.
    """

    explanation: bool = False

    def set_explanation_mode(self, activate: bool = True) -> None:
        """Turn explanation mode on or off (same name as the official ``bcos`` modules)."""
        self.explanation = bool(activate)

    @property
    def is_in_explanation_mode(self) -> bool:
        return self.explanation


def set_explanation_mode(model: nn.Module, activate: bool = True) -> int:
    """Call ``set_explanation_mode`` on every submodule that has it; return how many there were."""
    n = 0
    for m in model.modules():
        fn = getattr(m, "set_explanation_mode", None)
        if callable(fn):
            fn(activate)
            n += 1
    return n


@contextmanager
def explanation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: explanation mode on inside the block, off afterwards (even on error).

    Works on any model: modules without ``set_explanation_mode`` (ReLU, Linear, ...) are already
    piecewise linear and need nothing. Official ``bcos`` modules are switched too.
    """
    set_explanation_mode(model, True)
    try:
        yield model
    finally:
        set_explanation_mode(model, False)
