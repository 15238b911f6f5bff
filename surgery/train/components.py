"""Builders for what a ``finetune`` block names: optimiser, schedule, loss and gradient clipping.

Optimisers and schedules go through timm's factories so every name timm knows (``adamw``, ``lamb``,
``cosine``, ``step`` ...) works in a recipe; the loss and clipping tables are small and ours.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.lang.values import Call

__all__ = [
    "CLIP_MODES",
    "LOSSES",
    "SCHEDULES",
    "GradClipper",
    "UniformOffLabelsBCEWithLogitsLoss",
    "build_loss",
    "build_optimizer",
    "build_scheduler",
    "optimizer_names",
]

SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant", "wsd", "rsqrt", "none")
"""timm schedules a recipe may name (``plateau`` is left out: it needs a validation metric per step)."""

_SCHED_RESERVED = ("optimizer", "sched", "num_epochs", "updates_per_epoch", "step_on_epochs")
LOSSES = ("bce", "cross_entropy")
LOSS_ALIASES = {"ce": "cross_entropy", "crossentropy": "cross_entropy", "bce_with_logits": "bce"}
CLIP_MODES = ("agc", "norm", "value")


def optimizer_names() -> list[str]:
    """Optimiser names timm's ``create_optimizer_v2`` accepts."""
    from timm.optim import list_optimizers

    return list(list_optimizers())


def scheduler_params() -> list[str]:
    """Keyword arguments a schedule call may carry (timm's ``create_scheduler_v2`` + ``per_step``)."""
    from timm.scheduler import create_scheduler_v2

    names = [p for p in inspect.signature(create_scheduler_v2).parameters if p not in _SCHED_RESERVED]
    return [*names, "per_step"]


def _opt_kwargs(call: Call) -> dict[str, Any]:
    kw = dict(call.kwargs)
    if call.args:
        kw["lr"] = call.args[0]
    for k, v in list(kw.items()):
        if isinstance(v, list):
            kw[k] = tuple(v)  # betas=[0.9, 0.999] in a recipe is a list
    return kw


def build_optimizer(model_or_params: nn.Module | Iterable[Any], call: Call) -> torch.optim.Optimizer:
    """``adamw(lr=1e-3, weight_decay=0)`` → ``timm.optim.create_optimizer_v2(model, "adamw", ...)``.

    With a module, timm excludes biases and norm weights from weight decay and honours the model's
    ``no_weight_decay()``; frozen parameters (``requires_grad=False``) are left out.
    """
    from timm.optim import create_optimizer_v2

    if isinstance(model_or_params, nn.Module) and not any(
        p.requires_grad for p in model_or_params.parameters()
    ):
        raise ValueError("finetune: the model has no trainable parameters")
    return create_optimizer_v2(model_or_params, opt=call.name, **_opt_kwargs(call))


def build_scheduler(
    optimizer: torch.optim.Optimizer, call: Call | None, *, epochs: int, updates_per_epoch: int
) -> Any | None:
    """``cosine(warmup_epochs=1)`` → a timm scheduler over ``epochs`` (``None`` for constant LR).

    timm schedules step per epoch unless ``per_step=True`` (then per optimiser update). The run length
    stays ``epochs``: timm's suggested length (cooldown, cycles) is ignored.
    """
    from timm.scheduler import create_scheduler_v2

    if call is None or call.name == "none":
        return None
    kw = dict(call.kwargs)
    per_step = bool(kw.pop("per_step", False))
    for k, v in list(kw.items()):
        if isinstance(v, list):
            kw[k] = tuple(v)
    sched, _ = create_scheduler_v2(
        optimizer,
        sched=call.name,
        num_epochs=epochs,
        step_on_epochs=not per_step,
        updates_per_epoch=max(1, updates_per_epoch),
        **kw,
    )
    return sched


class UniformOffLabelsBCEWithLogitsLoss(nn.Module):
    """B-cos v2's loss: BCE on logits with target 1 for the true class and ``off_label`` elsewhere.

    ``off_label=None`` means uniform ``1/C`` (as ``bcos/modules/losses.py``: one-hot target clamped
    from below at the off value); ``off_label=0`` is plain one-hot BCE. Soft targets (``B×C``) are
    clamped the same way.
    """

    def __init__(self, off_label: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.off_label = off_label
        self.reduction = reduction

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = x.shape[-1]
        off = (1.0 / num_classes) if self.off_label is None else float(self.off_label)
        if target.shape != x.shape:
            target = F.one_hot(target.long(), num_classes=num_classes)
        target = target.to(dtype=torch.float32).clamp(min=off)
        return F.binary_cross_entropy_with_logits(x.float(), target, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"off_label={'1/C' if self.off_label is None else self.off_label}"


def build_loss(call: Call) -> nn.Module:
    """``bce(off_label="uniform")`` or ``cross_entropy(label_smoothing=0.1)`` → a loss module."""
    if call.name == "bce":
        off = call.kwargs.get("off_label", "uniform")
        return UniformOffLabelsBCEWithLogitsLoss(None if off in ("uniform", None) else float(off))
    if call.name == "cross_entropy":
        return nn.CrossEntropyLoss(label_smoothing=float(call.kwargs.get("label_smoothing", 0.0)))
    raise ValueError(f"finetune loss: unknown loss {call.name!r}; expected one of {', '.join(LOSSES)}")


class GradClipper:
    """Gradient clipping of a ``finetune`` block: ``agc(0.01)``, ``norm(1.0)`` or ``value(0.5)``.

    ``norm`` and ``value`` go through timm's ``dispatch_clip_grad``; ``agc`` (adaptive gradient
    clipping, NFNets; B-cos v2 uses clip_factor 0.01, eps 1e-3) through timm's ``adaptive_clip_grad``
    so ``eps`` can be set. ``exclude_head=True`` skips the last two parameter tensors like timm's
    ``train.py`` does for AGC (the classifier weight and bias).
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.mode = call.name
        kw = call.kwargs
        if self.mode == "agc":
            self.value = float(kw.get("clip_factor", 0.01))
            self.eps = float(kw.get("eps", 1e-3))
            self.exclude_head = bool(kw.get("exclude_head", False))
        elif self.mode == "norm":
            self.value = float(kw.get("max_norm", 1.0))
            self.norm_type = float(kw.get("norm_type", 2.0))
        elif self.mode == "value":
            self.value = float(kw["clip_value"])
        else:
            raise ValueError(f"finetune clip_grad: unknown mode {self.mode!r}; expected one of {CLIP_MODES}")

    def __call__(self, model: nn.Module) -> None:
        from timm.utils import adaptive_clip_grad, dispatch_clip_grad

        params = [p for p in model.parameters() if p.requires_grad]
        if self.mode == "agc":
            if self.exclude_head:
                params = params[:-2]
            adaptive_clip_grad(
                [p for p in params if p.grad is not None], clip_factor=self.value, eps=self.eps
            )
        elif self.mode == "norm":
            dispatch_clip_grad(params, self.value, mode="norm", norm_type=self.norm_type)
        else:
            dispatch_clip_grad(params, self.value, mode="value")


def stub_signature(fn: Callable[..., Any]) -> inspect.Signature:
    """Signature used to bind a call's positional/keyword arguments for validation."""
    return inspect.signature(fn)


def _bce(off_label: str | float | None = "uniform") -> None: ...
def _cross_entropy(label_smoothing: float = 0.0) -> None: ...
def _agc(clip_factor: float = 0.01, eps: float = 1e-3, exclude_head: bool = False) -> None: ...
def _norm(max_norm: float = 1.0, norm_type: float = 2.0) -> None: ...
def _value(clip_value: float) -> None: ...


CALL_STUBS: dict[str, dict[str, Callable[..., None]]] = {
    "loss": {"bce": _bce, "cross_entropy": _cross_entropy},
    "clip_grad": {"agc": _agc, "norm": _norm, "value": _value},
}
"""Parameter lists of the loss and clipping calls (names, defaults, order of positional args)."""
