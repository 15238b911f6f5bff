"""Selectors: which modules a rule touches.

One documented semantics (the tools users compare us with each answer this differently):
- a type name matches that exact class (by class name, or by the class itself when dotted:
  ``nn.Conv2d``, ``timm.layers.Mlp``); ``subclass X`` also matches subclasses;
- a string is a glob over qualified module names, matched in full: ``*`` is one name segment,
  ``**`` any number of segments; ``re"..."`` is a full-match regular expression;
- ``A in S`` keeps modules of ``A`` that lie inside (are descendants of) a module of ``S``;
- ``first``/``last`` pick by module order (``named_modules`` order);
- ``*`` is every module except the model itself (``@model`` names the root).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from surgery import aliases
from surgery.errors import Span, SurgeryError

ALLOWED_ROOTS = ("torch", "timm", "torchvision", "surgery")
SHORTHANDS = {"nn": "torch.nn"}


@dataclass
class MatchContext:
    """The model a selector is evaluated on, with its module order cached."""

    model: nn.Module
    modules: dict[str, nn.Module] = field(init=False)
    order: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules(remove_duplicate=False))
        self.order = {n: i for i, n in enumerate(self.modules)}

    def sort(self, names: Iterable[str]) -> list[str]:
        return sorted(set(names), key=lambda n: self.order.get(n, 1 << 30))


class Sel:
    """A compiled selector: ``names(ctx)`` returns the matching qualified names."""

    span: Span

    def names(self, ctx: MatchContext) -> set[str]:
        raise NotImplementedError

    def match(self, ctx: MatchContext) -> list[str]:
        return ctx.sort(self.names(ctx))


def _non_root(ctx: MatchContext) -> Iterable[tuple[str, nn.Module]]:
    return ((n, m) for n, m in ctx.modules.items() if n)


@dataclass
class TypeSel(Sel):
    path: str
    span: Span
    cls: type | None = None
    subclass: bool = False

    def hit(self, m: nn.Module) -> bool:
        t = type(m)
        if self.cls is not None:
            return issubclass(t, self.cls) if self.subclass else t is self.cls
        if "." in self.path:
            qual = f"{t.__module__}.{t.__qualname__}"
            mro = t.__mro__ if self.subclass else (t,)
            return any(f"{c.__module__}.{c.__qualname__}" == self.path or qual == self.path for c in mro)
        mro = t.__mro__ if self.subclass else (t,)
        return any(c.__name__ == self.path for c in mro)

    def names(self, ctx: MatchContext) -> set[str]:
        return {n for n, m in _non_root(ctx) if self.hit(m)}


def glob_to_regex(pattern: str) -> str:
    """``*`` = one name segment, ``**`` = any number of segments, ``?`` = one character."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**.", i):
            out.append(r"(?:[^.]+\.)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@dataclass
class NameSel(Sel):
    pattern: str
    regex: re.Pattern[str]
    span: Span

    def names(self, ctx: MatchContext) -> set[str]:
        return {n for n, _ in _non_root(ctx) if self.regex.fullmatch(n)}


@dataclass
class AliasSel(Sel):
    alias: str
    args: tuple[Any, ...]
    span: Span

    def names(self, ctx: MatchContext) -> set[str]:
        try:
            return set(aliases.resolve(ctx.model, self.alias, self.args))
        except SurgeryError as exc:
            raise SurgeryError(exc.message, span=self.span) from None


@dataclass
class AllSel(Sel):
    span: Span

    def names(self, ctx: MatchContext) -> set[str]:
        return {n for n, _ in _non_root(ctx)}


@dataclass
class SetOp(Sel):
    op: str
    left: Sel
    right: Sel
    span: Span

    def names(self, ctx: MatchContext) -> set[str]:
        a, b = self.left.names(ctx), self.right.names(ctx)
        return a | b if self.op == "|" else a & b if self.op == "&" else a - b


@dataclass
class PositionSel(Sel):
    inner: Sel
    last: bool
    span: Span

    def names(self, ctx: MatchContext) -> set[str]:
        hits = self.inner.match(ctx)
        return {hits[-1] if self.last else hits[0]} if hits else set()


@dataclass
class InSel(Sel):
    inner: Sel
    scope: Sel
    span: Span

    def names(self, ctx: MatchContext) -> set[str]:
        scopes = self.scope.names(ctx)
        prefixes = tuple(s + "." for s in scopes if s) if "" not in scopes else ("",)
        return {n for n in self.inner.names(ctx) if n.startswith(prefixes)}


# ---------------------------------------------------------------- predicates

_OPS = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_MISSING = object()


def attribute(m: nn.Module, attr: str) -> Any:
    """A module attribute as predicates see it: tensors reduce to "present", uniform tuples to a scalar."""
    value = getattr(m, attr, _MISSING)
    if isinstance(value, (tuple, list)) and value and all(v == value[0] for v in value):
        return value[0]
    return value


def compare(value: Any, op: str, target: Any) -> bool:
    if value is _MISSING:
        return op == "!="
    if isinstance(value, (tuple, list)) and not isinstance(target, (tuple, list)):
        return all(compare(v, op, target) for v in value)
    if isinstance(target, list):
        target = type(value)(target) if isinstance(value, (tuple, list)) else target
    try:
        return bool(_OPS[op](value, target))
    except TypeError:
        return op == "!="


def truthy(value: Any) -> bool:
    if value is _MISSING or value is None:
        return False
    if isinstance(value, nn.Parameter) or hasattr(value, "shape"):
        return True
    return bool(value)


@dataclass
class Pred:
    kind: str  # "cmp" | "truthy" | "not" | "and" | "or"
    attr: str = ""
    op: str = ""
    value: Any = None
    parts: tuple[Pred, ...] = ()

    def __call__(self, m: nn.Module) -> bool:
        if self.kind == "cmp":
            # a list target compares with the attribute as it is: `kernel_size == [1, 3]`
            value = (
                getattr(m, self.attr, _MISSING) if isinstance(self.value, list) else attribute(m, self.attr)
            )
            return compare(value, self.op, self.value)
        if self.kind == "truthy":
            return truthy(attribute(m, self.attr))
        if self.kind == "not":
            return not self.parts[0](m)
        if self.kind == "and":
            return all(p(m) for p in self.parts)
        return any(p(m) for p in self.parts)


@dataclass
class WhereSel(Sel):
    inner: Sel
    pred: Pred
    span: Span

    def names(self, ctx: MatchContext) -> set[str]:
        return {n for n in self.inner.names(ctx) if self.pred(ctx.modules[n])}


# ---------------------------------------------------------------- type names


@functools.cache
def _import_roots() -> None:
    import timm  # noqa: F401  (imports every timm model module, so their classes are known)
    import torch.nn  # noqa: F401

    with contextlib.suppress(Exception):  # torchvision is optional
        import torchvision.models  # noqa: F401


def known_type_names(extra: Iterable[type] = ()) -> set[str]:
    """Class names of every imported ``nn.Module`` subclass (torch, timm, torchvision, surgery, plugins)."""
    _import_roots()
    from surgery.registry import REGISTRY

    REGISTRY.ensure_loaded()
    seen: set[type] = set()
    stack = [nn.Module]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
    seen.update(extra)
    return {c.__name__ for c in seen} | {"Module"}


def resolve_dotted(path: str) -> type | None:
    """The class named by an allow-listed dotted path, or None when the path is outside the allowlist."""
    for short, full in SHORTHANDS.items():
        if path.startswith(short + "."):
            path = full + path[len(short) :]
    root = path.split(".")[0]
    if root not in ALLOWED_ROOTS:
        return None
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise LookupError(path) from None
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return obj
        raise LookupError(path)
    raise LookupError(path)
