"""What each statement does to a model, given the module names it was planned on.

The same functions run twice: on a tensor-free (meta) copy while planning, so later rules are
matched against what earlier rules produced, and on the real copy while applying, with the names
the plan recorded (applying never re-matches). Every failure names the module and the recipe line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery import fx as sfx
from surgery.aliases import first_conv, pretrained_cfg, stem_parameters
from surgery.errors import SurgeryError, UserError
from surgery.lang.checker import Rule
from surgery.layers.dynamic_linear import own_class
from surgery.select import AliasSel


@dataclass
class Change:
    """One module changed by one rule (the raw material of the diff)."""

    name: str
    rule: int
    action: str
    before: str
    after: str


@dataclass
class BuildContext:
    """Handed to a layer's ``from_module`` when it declares a ``context`` parameter."""

    model: nn.Module
    name: str
    meta: bool


@dataclass
class RunState:
    """What applying a recipe accumulates besides module swaps."""

    meta: bool
    contract: dict[str, Any] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or child in parent._modules:
        parent._modules[child] = new
    else:
        setattr(parent, child, new)


def _device_dtype(m: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in m.parameters():
        return t.device, t.dtype if t.is_floating_point() else None
    for t in m.buffers():
        return t.device, t.dtype if t.is_floating_point() else None
    return None, None


def _place(new: nn.Module, like: nn.Module, meta: bool) -> nn.Module:
    device, dtype = _device_dtype(like)
    if meta:
        device = torch.device("meta")
    if device is not None:
        new.to(device=device)
    if dtype is not None and dtype != torch.float32:
        new.to(dtype=dtype)
    return new


def _build(rule: Rule, module: nn.Module | None, model: nn.Module, name: str, state: RunState) -> nn.Module:
    assert rule.entry is not None
    kwargs = dict(rule.args)
    if "context" in rule.entry.params:
        kwargs["context"] = BuildContext(model=model, name=name, meta=state.meta)
    try:
        new = rule.entry.target(module, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        if state.meta:
            raise  # planning on meta tensors: plan() retries on a real copy
        what = type(module).__name__ if module is not None else "a call"
        raise SurgeryError(
            f"{rule.entry.name} cannot be built from {what}: {exc}", module=name or None, span=rule.span
        ) from exc
    if not isinstance(new, nn.Module):
        raise SurgeryError(f"{rule.entry.name} did not build a module", module=name, span=rule.span)
    return new


def replace(model: nn.Module, rule: Rule, names: list[str], state: RunState) -> None:
    for name in names:
        if not name:
            raise SurgeryError("the model itself cannot be replaced", module="<model>", span=rule.span)
        old = model.get_submodule(name)
        new = _place(_build(rule, old, model, name, state), old, state.meta)
        new.train(old.training)
        set_submodule(model, name, new)
        state.changes.append(Change(name, rule.index, "replace", type(old).__name__, type(new).__name__))


def remove(model: nn.Module, rule: Rule, names: list[str], state: RunState) -> None:
    for name in names:
        if not name:
            raise SurgeryError("the model itself cannot be removed", module="<model>", span=rule.span)
        old = model.get_submodule(name)
        set_submodule(model, name, nn.Identity())
        state.changes.append(Change(name, rule.index, "remove", type(old).__name__, "Identity"))


def insert(model: nn.Module, rule: Rule, names: list[str], state: RunState) -> None:
    for name in names:
        if not name:
            raise SurgeryError(
                "nothing can be inserted around the model itself", module="<model>", span=rule.span
            )
        anchor = model.get_submodule(name)
        new = _place(_build(rule, anchor, model, name, state), anchor, state.meta)
        new.train(anchor.training)
        pair = (new, anchor) if rule.details["position"] == "before" else (anchor, new)
        set_submodule(model, name, nn.Sequential(*pair))
        state.changes.append(
            Change(
                name,
                rule.index,
                "insert",
                type(anchor).__name__,
                f"Sequential({type(pair[0]).__name__}, {type(pair[1]).__name__})",
            )
        )


ZERO_BIAS = "_surgery_zero_bias"
# modules whose forward accepts `bias = None` (torch convs, linears and norms, and their subclasses:
# timm's BatchNormAct2d, LayerNorm2d, Conv2dSame, ... pass `self.bias` on to F.conv2d / F.layer_norm)
_NONE_BIAS_OK: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)


def has_bias(m: nn.Module) -> bool:
    """A bias tensor that was not dropped (a dropped bias may remain as a constant zero buffer)."""
    return isinstance(getattr(m, "bias", None), torch.Tensor) and not getattr(m, ZERO_BIAS, False)


def tolerates_none_bias(m: nn.Module) -> bool:
    """Whether ``m.bias = None`` keeps ``m`` working: torch's conv/linear/norm classes, surgery's layers
    (judged by the module's own class: a ``DynamicLinear[Base]`` runs ``Base``'s code)."""
    cls = own_class(m)
    return issubclass(cls, _NONE_BIAS_OK) or cls.__module__.startswith("surgery.")


def _zero_bias(m: nn.Module, bias: torch.Tensor) -> None:
    """Replace ``bias`` by a constant zero buffer (not trained, not saved) for modules whose forward
    uses ``self.bias`` unconditionally (timm StarReLU ``s relu(x)^2 + b``, EvoNorm, FrozenBatchNorm2d)."""
    m._parameters.pop("bias", None)
    m._buffers.pop("bias", None)
    m.register_buffer("bias", torch.zeros_like(bias.detach()), persistent=False)
    setattr(m, ZERO_BIAS, True)


def drop_bias(model: nn.Module, rule: Rule, names: list[str], state: RunState) -> None:
    for name in names:
        m = model.get_submodule(name)
        hook = getattr(m, "drop_bias", None)
        if callable(hook):
            hook()
        elif "bias" in m._parameters or "bias" in m._buffers:
            store = m._parameters if "bias" in m._parameters else m._buffers
            if tolerates_none_bias(m):
                store["bias"] = None
            else:
                _zero_bias(m, store["bias"])  # type: ignore[arg-type]
        else:
            raise SurgeryError(
                "its bias is not a parameter and cannot be dropped", module=name, span=rule.span
            )
        state.changes.append(Change(name, rule.index, "drop bias", type(m).__name__, type(m).__name__))


def settable(m: nn.Module, attr: str) -> bool:
    if attr in m._parameters or attr in m._buffers or attr in m._modules:
        return False
    return hasattr(m, attr)


def set_attr(model: nn.Module, rule: Rule, names: list[str], state: RunState) -> None:
    attr, value = rule.details["attr"], rule.details["value"]
    for name in names:
        m = model.get_submodule(name) if name else model
        if not settable(m, attr):
            raise SurgeryError(
                f"'{attr}' is not a plain attribute of {type(m).__name__}",
                module=name or "<model>",
                span=rule.span,
            )
        old = getattr(m, attr)
        if isinstance(old, tuple) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = tuple(value for _ in old)
        elif isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        setattr(m, attr, value)
        state.changes.append(Change(name, rule.index, f"set {attr}", type(m).__name__, type(m).__name__))


def freeze(model: nn.Module, rule: Rule, names: list[str], state: RunState) -> None:
    """``requires_grad`` off (on) for the matched modules; ``@stem`` also covers the model's own stem
    parameters (a ViT's class token and position embedding), which no module selector can name."""
    trainable = rule.kind == "unfreeze"
    for name in names:
        m = model.get_submodule(name) if name else model
        for p in m.parameters():
            p.requires_grad_(trainable)
        state.changes.append(Change(name, rule.index, rule.kind, type(m).__name__, type(m).__name__))
    if isinstance(rule.selector, AliasSel) and rule.selector.alias == "stem" and "" not in names:
        for pname in stem_parameters(model):
            model.get_parameter(pname).requires_grad_(trainable)
            state.changes.append(Change(pname, rule.index, rule.kind, "Parameter", "Parameter"))


def encode(model: nn.Module, rule: Rule, names: list[str], state: RunState) -> None:
    """Apply the encoding to every first layer (``@first_conv`` may name several: CrossViT, FastViT).

    The normalisation is read once, before the first layer is encoded: an encoding resets the
    model's ``pretrained_cfg`` mean/std to 0/1, and the other first layers must get the original ones.
    The contract is the first layer's, with ``first_layers`` listing all of them when there are several.
    """
    from surgery.ops.encodings import EncodeContext

    assert rule.entry is not None
    cfg = pretrained_cfg(model)
    mean = tuple(cfg["mean"]) if cfg.get("mean") else None
    std = tuple(cfg["std"]) if cfg.get("std") else None
    input_size = tuple(cfg["input_size"]) if cfg.get("input_size") else None
    firsts = list(names) if names else (first_conv(model) or [""])[:1]
    contract: dict[str, Any] = {}
    for first in firsts:
        ctx = EncodeContext(first_layer=first, mean=mean, std=std, input_size=input_size, contract={})
        before = type(model.get_submodule(first)).__name__ if first else ""
        try:
            rule.entry.target(model, ctx, **rule.args)
        except UserError:
            raise
        except Exception as exc:
            raise SurgeryError(
                f"input encoding '{rule.entry.name}' failed: {exc}", module=first, span=rule.span
            ) from exc
        if not contract:
            contract = dict(ctx.contract)
        after = type(model.get_submodule(first)).__name__ if first and _exists(model, first) else ""
        state.changes.append(Change(first, rule.index, f"encode input {rule.entry.name}", before, after))
    if len(firsts) > 1:
        contract["first_layers"] = [f"{f}.conv" for f in firsts]
    if state.meta:
        model.to("meta")
    state.contract.update(contract)


def _exists(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def rewrite(model: nn.Module, rule: Rule, names: list[str], state: RunState) -> None:
    fn = rule.details["target"]
    for name in names:
        m = model.get_submodule(name) if name else model
        try:
            gm = sfx.rewrite_calls(
                m, fn, lambda n=name, like=m: _place(_build(rule, None, model, n, state), like, state.meta)
            )
        except sfx.TraceError as exc:
            raise SurgeryError(
                f"cannot trace {type(m).__name__} with torch.fx: {exc}",
                module=name or "<model>",
                span=rule.span,
            ) from None
        if gm is None:
            continue
        gm.train(m.training)
        if name:
            set_submodule(model, name, gm)
        else:
            raise SurgeryError(
                "the model's own forward calls this function; rewriting it would replace the model's class. "
                "Scope the rewrite to submodules with `in`",
                module="<model>",
                span=rule.span,
            )
        state.changes.append(
            Change(
                name,
                rule.index,
                f"rewrite call {rule.details['function']}",
                type(m).__name__,
                f"GraphModule({type(m).__name__})",
            )
        )


def rewrite_candidates(model: nn.Module, rule: Rule, scope: set[str] | None) -> tuple[list[str], list[str]]:
    """Modules whose own code calls the rule's function, and those that could not be traced."""
    fn = rule.details["target"]
    hits, untraceable = [], []
    for name, m in model.named_modules():
        if (
            not name
            or sfx.is_torch_builtin(m)
            or isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        ):
            continue
        if scope is not None and not any(name == s or name.startswith(s + ".") or not s for s in scope):
            continue
        try:
            gm = sfx.trace_own(m)
        except sfx.TraceError:
            untraceable.append(name)
            continue
        if sfx.calls_of(gm, fn):
            hits.append(name)
    return hits, untraceable


EXECUTORS: dict[str, Callable[[nn.Module, Rule, list[str], RunState], None]] = {
    "replace": replace,
    "remove": remove,
    "insert": insert,
    "drop_bias": drop_bias,
    "set": set_attr,
    "freeze": freeze,
    "unfreeze": freeze,
    "encode": encode,
    "rewrite": rewrite,
}
STRUCTURAL = ("replace", "remove", "insert", "rewrite")
