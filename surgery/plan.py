"""Recipe x model -> Plan: which modules each rule touches, found without touching the model.

Rules run in order, and a later rule sees what earlier ones produced (``set b = 2 on BcosConv2d``
after ``replace Conv2d with BcosConv2d``). To match faithfully without mutating or copying any
weights, planning executes the rules on a *meta* copy of the model: the same module tree, with every
tensor replaced by a shape-only meta tensor. The plan records per rule the matched names, rules that
match nothing, and overlaps; ``apply`` replays it on a real copy without matching again.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery import select as S
from surgery.errors import RecipeError, SurgeryError, UserError, with_hint
from surgery.lang.checker import CheckedRecipe, IncludeLoader, Rule, check
from surgery.lang.parser import parse
from surgery.ops.execute import (
    EXECUTORS,
    STRUCTURAL,
    Change,
    RunState,
    has_bias,
    rewrite_candidates,
    settable,
)


@dataclass
class Step:
    rule: Rule
    names: list[str]


@dataclass
class Problem:
    """A rule that matches nothing, or an overlap between rules."""

    level: str  # "error" | "warning"
    rule: Rule
    message: str

    def render(self) -> str:
        return f"{self.rule.span}: {self.message}\n  {self.rule.text}"


@dataclass
class Plan:
    """The resolved plan: per rule, the modules it touches, in order."""

    recipe: CheckedRecipe
    steps: list[Step]
    problems: list[Problem] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    contract: dict[str, Any] = field(default_factory=dict)
    model_class: str = ""

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    def matched(self) -> dict[int, list[str]]:
        return {s.rule.index: s.names for s in self.steps}

    def raise_for_errors(self) -> None:
        errs = self.errors
        if errs:
            first = errs[0]
            extra = f" (and {len(errs) - 1} more unmatched rule(s))" if len(errs) > 1 else ""
            raise RecipeError(
                first.message + extra, first.rule.span, self.recipe.sources.get(first.rule.span.file)
            )

    def to_dict(self) -> dict[str, Any]:
        """The resolved plan as JSON-able data: params substituted, matched names listed."""
        r = self.recipe
        return {
            "recipe": r.name,
            "version": r.version,
            "file": r.file,
            "params": jsonable(r.params),
            "groups": {k: jsonable(v) for k, v in r.groups.items()},
            "finetune": jsonable({k: v for k, v in (r.finetune or {}).items() if k != "__own__"})
            if r.finetune
            else None,
            "model_class": self.model_class,
            "rules": [
                {
                    "index": s.rule.index,
                    "kind": s.rule.kind,
                    "file": s.rule.span.file,
                    "line": s.rule.span.line,
                    "column": s.rule.span.column,
                    "text": s.rule.text,
                    "optional": s.rule.optional,
                    "layer": s.rule.entry.name if s.rule.entry is not None else None,
                    "args": jsonable(s.rule.args),
                    "details": jsonable({k: v for k, v in s.rule.details.items() if k != "target"}),
                    "matched": s.names,
                    "count": len(s.names),
                }
                for s in self.steps
            ],
            "problems": [
                {"level": p.level, "line": p.rule.span.line, "file": p.rule.span.file, "message": p.message}
                for p in self.problems
            ],
            "contract": jsonable(self.contract),
        }


def jsonable(v: Any) -> Any:
    """Recipe values as JSON: objects that know how (``to_dict``) say so, others by their repr."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    to_dict = getattr(v, "to_dict", None)
    if callable(to_dict):
        return jsonable(to_dict())
    if hasattr(v, "__dataclass_fields__"):
        return {"type": type(v).__name__, **{k: jsonable(getattr(v, k)) for k in v.__dataclass_fields__}}
    return {"type": type(v).__name__, "repr": repr(v)}


def meta_copy(model: nn.Module) -> nn.Module:
    """The module tree of ``model`` with every parameter and buffer as a meta tensor (no data copied)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        if isinstance(t, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
    return copy.deepcopy(model, memo)


def load_recipe(recipe: str | CheckedRecipe | Any, **kwargs: Any) -> CheckedRecipe:
    """A recipe given as text, a file path, a shipped recipe's name, a parsed tree or a checked recipe."""
    from pathlib import Path

    from surgery.lang import ast
    from surgery.lang.checker import shipped_recipe
    from surgery.lang.parser import parse_file

    if isinstance(recipe, CheckedRecipe):
        return recipe
    if isinstance(recipe, ast.Recipe):
        return check(recipe, **kwargs)
    if isinstance(recipe, Path):
        return check(parse_file(recipe), **kwargs)
    if isinstance(recipe, str):
        looks_like_text = "\n" in recipe or recipe.lstrip().startswith("recipe ")
        if not looks_like_text:
            if Path(recipe).is_file():
                return check(parse_file(recipe), **kwargs)
            shipped = shipped_recipe(recipe)
            if shipped is not None:
                return check(parse(shipped[1], f"<shipped>/{shipped[0]}"), **kwargs)
            if recipe.endswith(".recipe") or "/" in recipe:
                return check(parse_file(recipe), **kwargs)  # raises "recipe file not found"
        return check(parse(recipe), **kwargs)
    raise TypeError(f"cannot use {type(recipe).__name__} as a recipe")


def plan(
    recipe: Any,
    model: nn.Module,
    *,
    params: dict[str, Any] | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    loader: IncludeLoader | None = None,
) -> Plan:
    """Match every rule of ``recipe`` against ``model``; never mutates ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError("plan() takes an nn.Module; load model references with surgery.load_model")
    types = {type(m) for m in model.modules()}
    checked = load_recipe(recipe, params=params, overrides=overrides, loader=loader, model_types=types)
    try:
        return _run(checked, meta_copy(model), meta=True, model_class=type(model).__name__)
    except UserError:
        raise
    except Exception:
        # A layer whose construction reads tensor values cannot run on meta tensors: plan on a real copy.
        return _run(checked, copy.deepcopy(model), meta=False, model_class=type(model).__name__)


def _run(checked: CheckedRecipe, work: nn.Module, *, meta: bool, model_class: str) -> Plan:
    result = Plan(recipe=checked, steps=[], model_class=model_class)
    state = RunState(meta=meta)
    touched: dict[str, int] = {}
    for rule in checked.rules:
        names = _match(rule, work, result)
        result.steps.append(Step(rule, names))
        if rule.kind.startswith("expect"):
            continue
        if not names and rule.kind != "encode":
            continue
        if rule.kind in STRUCTURAL:
            for n in names:
                if n in touched:
                    prev = checked.rules[touched[n]]
                    result.problems.append(
                        Problem(
                            "warning",
                            rule,
                            f"'{n}' was already changed by line {prev.span.line} ({prev.text})",
                        )
                    )
                touched[n] = rule.index
        EXECUTORS[rule.kind](work, rule, names, state)
    result.changes = state.changes
    result.contract = state.contract
    return result


def _match(rule: Rule, work: nn.Module, result: Plan) -> list[str]:
    if rule.kind.startswith("expect"):
        return []
    ctx = S.MatchContext(work)
    if rule.kind == "encode":
        from surgery.aliases import first_conv

        return first_conv(work)
    if rule.kind == "rewrite":
        scope = set(rule.selector.names(ctx)) if rule.selector is not None else None
        hits, untraceable = rewrite_candidates(work, rule, scope)
        if not hits:
            note = (
                f"; {len(untraceable)} module(s) could not be traced: {', '.join(untraceable[:5])}"
                if untraceable
                else ""
            )
            _unmatched(rule, result, f"no module's code calls {rule.details['function']}{note}")
        return hits
    assert rule.selector is not None
    try:
        names = rule.selector.match(ctx)
    except SurgeryError as exc:
        raise SurgeryError(exc.message, span=rule.span) from None
    if rule.kind == "drop_bias":
        with_bias = [n for n in names if has_bias(ctx.modules[n])]
        if names and not with_bias:
            _unmatched(rule, result, f"matches {len(names)} module(s), but none has a bias")
            return []
        names = with_bias
    elif rule.kind == "set":
        attr = rule.details["attr"]
        having = [n for n in names if settable(ctx.modules[n], attr)]
        if names and not having:
            _unmatched(rule, result, f"matches {len(names)} module(s), but none has an attribute '{attr}'")
            return []
        names = having
    if not names:
        _unmatched(rule, result, "matches no module" + near_hint(rule.selector, ctx))
    return names


def _unmatched(rule: Rule, result: Plan, message: str) -> None:
    level = "warning" if rule.optional else "error"
    hint = "" if rule.optional else " (write `optional` before the rule if that is expected)"
    result.problems.append(Problem(level, rule, f"rule {message}{hint}"))


def near_hint(sel: S.Sel, ctx: S.MatchContext) -> str:
    """What the model contains near an unmatched selector: a close type or module name."""
    counts = Counter(type(m).__name__ for n, m in ctx.modules.items() if n)
    if isinstance(sel, S.TypeSel):
        name = sel.path.rsplit(".", 1)[-1]
        msg = with_hint(f"; the model has no {name}", name, counts)
        common = ", ".join(f"{k} ({v})" for k, v in counts.most_common(6))
        return f"{msg}; it contains {common}"
    if isinstance(sel, S.NameSel):
        names = [n for n in ctx.modules if n]
        return with_hint("", sel.pattern, names) or f"; module names look like: {', '.join(names[:4])}"
    for attr in ("inner", "left"):
        inner = getattr(sel, attr, None)
        if isinstance(inner, S.Sel) and inner.names(ctx):
            return ""
        if isinstance(inner, S.Sel):
            return near_hint(inner, ctx)
    return ""
