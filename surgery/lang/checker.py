"""Syntax tree -> checked recipe: names resolved, values evaluated and typed, includes spliced in.

Everything a recipe can get wrong without a model is caught here, each error at its line:col:
unknown layers, constructors, encodings, aliases, params and groups (with did-you-mean), wrong
argument types, missing arguments, bad regexes, include cycles and unsupported versions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from surgery import select as S
from surgery.aliases import ALIASES
from surgery.errors import RecipeError, Span, did_you_mean, with_hint
from surgery.lang import ast
from surgery.lang.parser import parse
from surgery.lang.types import coerce, conforms, describe, describe_value
from surgery.lang.values import Call, Ramp
from surgery.registry import REGISTRY, Entry

SUPPORTED_VERSIONS = ("v1",)
PARAM_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}

# ---------------------------------------------------------------- results


@dataclass
class Rule:
    """One statement, checked: what it does, to what, with which resolved arguments."""

    index: int
    kind: str
    node: ast.Statement
    span: Span
    text: str
    selector: S.Sel | None = None
    entry: Entry | None = None
    args: dict[str, Any] = field(default_factory=dict)
    optional: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.span.file}:{self.span.line}"


@dataclass
class CheckedRecipe:
    name: str | None
    version: str
    doc: str | None
    file: str
    source: str
    params: dict[str, Any]
    param_decls: dict[str, ast.Param]
    groups: dict[str, Any]
    rules: list[Rule]
    finetune: dict[str, Any] | None
    sources: dict[str, str]
    tree: ast.Recipe


# ---------------------------------------------------------------- includes


class IncludeLoader:
    """Finds included recipes: next to the including file, then among the shipped recipes.

    ``bundle`` (file name -> text) serves the sources saved in an artifact, so that loading an
    artifact never depends on files that may have changed since.
    """

    def __init__(self, bundle: dict[str, str] | None = None) -> None:
        self.bundle = dict(bundle or {})

    def load(self, path: str, including_file: str) -> tuple[str, str]:
        candidates = []
        base = (
            Path(including_file).parent if including_file and not including_file.startswith("<") else Path()
        )
        candidates.append(str(base / path))
        if not path.endswith(".recipe"):
            candidates.append(str(base / (path + ".recipe")))
        for c in candidates:
            if c in self.bundle:
                return c, self.bundle[c]
        for c in candidates:
            p = Path(c)
            if p.is_file():
                return c, p.read_text(encoding="utf-8")
        shipped = shipped_recipe(path)
        if shipped is not None:
            name, text = shipped
            key = f"<shipped>/{name}"
            return key, self.bundle.get(key, text)
        raise FileNotFoundError(path)


def shipped_recipe(name: str) -> tuple[str, str] | None:
    """A recipe shipped with surgery, by name (with or without ``.recipe``)."""
    fname = name if name.endswith(".recipe") else name + ".recipe"
    if "/" in fname or "\\" in fname:
        return None
    res = files("surgery.recipes").joinpath(fname)
    if res.is_file():
        return fname, res.read_text(encoding="utf-8")
    return None


def shipped_recipe_names() -> list[str]:
    return sorted(
        p.name[: -len(".recipe")] for p in files("surgery.recipes").iterdir() if p.name.endswith(".recipe")
    )


# ---------------------------------------------------------------- the checker


def parse_override(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` from ``--set``."""
    if "=" not in text:
        raise RecipeError(
            f"--set expects NAME=VALUE, got '{text}'", Span("--set", 1, 1, 1, len(text) + 1), text
        )
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def check(
    recipe: ast.Recipe | str,
    *,
    params: dict[str, Any] | None = None,
    overrides: Iterable[str] = (),
    loader: IncludeLoader | None = None,
    model_types: Iterable[type] = (),
    file: str = "<recipe>",
) -> CheckedRecipe:
    """Check a recipe. ``params`` are typed Python values; ``overrides`` are ``--set NAME=VALUE`` strings."""
    tree = parse(recipe, file) if isinstance(recipe, str) else recipe
    checker = _Checker(loader or IncludeLoader(), set(S.known_type_names(model_types)))
    return checker.check_root(tree, dict(params or {}), list(overrides))


class _Checker:
    def __init__(self, loader: IncludeLoader, type_names: set[str]) -> None:
        self.loader = loader
        self.type_names = type_names
        self.rules: list[Rule] = []
        self.sources: dict[str, str] = {}
        self.stack: list[str] = []

    # ---- entry points
    def check_root(self, tree: ast.Recipe, params: dict[str, Any], overrides: list[str]) -> CheckedRecipe:
        self.sources[tree.file] = tree.source
        for raw in overrides:
            name, value = parse_override(raw)
            params[name] = _OverrideText(value, raw)
        scope = self.check_recipe(tree, params, from_api=True)
        return CheckedRecipe(
            name=tree.name,
            version=tree.version or "v1",
            doc=tree.doc,
            file=tree.file,
            source=tree.source,
            params=scope.params,
            param_decls=scope.param_decls,
            groups=scope.groups,
            rules=self.rules,
            finetune=scope.finetune,
            sources=self.sources,
            tree=tree,
        )

    def err(self, message: str, span: Span) -> RecipeError:
        return RecipeError(message, span, self.sources.get(span.file))

    def check_recipe(self, tree: ast.Recipe, given: dict[str, Any], *, from_api: bool) -> _Scope:
        self.stack.append(tree.file)
        try:
            self._check_header(tree)
            scope = _Scope()
            decls = [i for i in tree.items if isinstance(i, ast.Param)]
            self._bind_params(decls, given, scope, from_api=from_api, file=tree.file)
            for item in tree.items:
                self._item(item, scope)
            return scope
        finally:
            self.stack.pop()

    def _check_header(self, tree: ast.Recipe) -> None:
        if tree.version is None:
            first = tree.items[0].span if tree.items else Span(tree.file)
            raise self.err(
                'a recipe starts with a header: recipe "NAME" v1',
                Span(tree.file, first.line, 1, first.line, 2),
            )
        if tree.version not in SUPPORTED_VERSIONS:
            span = _header_version_span(tree)
            supported = ", ".join(SUPPORTED_VERSIONS)
            if re.fullmatch(r"v\d+", tree.version):
                msg = f"unsupported language version '{tree.version}' (this surgery supports {supported})"
            else:
                msg = f"expected a language version such as 'v1' after the recipe name, got '{tree.version}'"
            raise self.err(msg, span)

    def _bind_params(
        self, decls: list[ast.Param], given: dict[str, Any], scope: _Scope, *, from_api: bool, file: str
    ) -> None:
        names = [d.name for d in decls]
        for d in decls:
            if d.name in scope.param_decls:
                raise self.err(f"param '{d.name}' is declared twice", d.span)
            if d.type not in PARAM_TYPES:
                raise self.err(with_hint(f"unknown param type '{d.type}'", d.type, PARAM_TYPES), d.span)
            scope.param_decls[d.name] = d
        for name, value in given.items():
            if name not in scope.param_decls:
                if isinstance(value, _OverrideText):
                    col = 1
                    raise RecipeError(
                        with_hint(f"unknown param '{name}' in --set", name, names),
                        Span("--set", 1, col, 1, col + len(name)),
                        value.raw,
                    )
                if isinstance(value, _IncludeArg):
                    raise self.err(
                        with_hint(f"the included recipe has no param '{name}'", name, names), value.span
                    )
                raise RecipeError(
                    with_hint(f"unknown param '{name}'", name, names),
                    Span(file, 1, 1, 1, 2),
                    self.sources.get(file),
                )
        for d in decls:
            ptype = PARAM_TYPES[d.type]
            if d.name in given:
                value = given[d.name]
                if isinstance(value, _OverrideText):
                    value = _parse_typed(value, ptype, d)
                elif isinstance(value, _IncludeArg):
                    span = value.span
                    value = value.value
                    if not conforms(value, ptype):
                        raise self.err(
                            f"param '{d.name}' expects {d.type}, got {describe_value(value)}", span
                        )
                elif not conforms(value, ptype):
                    raise RecipeError(
                        f"param '{d.name}' expects {d.type}, got {describe_value(value)}",
                        d.span,
                        self.sources.get(d.span.file),
                    )
            elif d.default is not None:
                value = self.value(d.default, scope)
                if not conforms(value, ptype):
                    raise self.err(
                        f"param '{d.name}' is {d.type} but its default is {describe_value(value)}",
                        d.default.span,
                    )
            else:
                raise self.err(
                    f"param '{d.name}' has no default and was not given (use --set {d.name}=...)", d.span
                )
            scope.params[d.name] = coerce(value, ptype)

    # ---- items
    def _item(self, item: ast.Item, scope: _Scope) -> None:
        if isinstance(item, ast.Param):
            return
        if isinstance(item, ast.Let):
            if item.name in scope.lets:
                raise self.err(f"'{item.name}' is already defined by an earlier let", item.span)
            scope.lets[item.name] = self.selector(item.selector, scope)
            return
        if isinstance(item, ast.Include):
            self._include(item, scope)
            return
        if isinstance(item, ast.GroupDecl):
            self._group(item, scope)
            return
        if isinstance(item, ast.Finetune):
            if scope.finetune is not None and scope.finetune.get("__own__"):
                raise self.err("a recipe has at most one finetune block", item.span)
            scope.finetune = self._finetune(item, scope)
            return
        cond = getattr(item, "condition", None)
        if cond is not None and not self.condition(cond, scope):
            return  # `... if keep_bias`: a rule whose condition is false is not part of the recipe
        self.rules.append(self._statement(item, scope))

    def _include(self, item: ast.Include, scope: _Scope) -> None:
        if item.args:
            raise self.err('include passes params by name: include "x.recipe"(b=2)', item.args[0].span)
        try:
            key, text = self.loader.load(item.path, item.span.file)
        except FileNotFoundError:
            hint = did_you_mean(item.path, shipped_recipe_names())
            extra = f" (did you mean '{hint}'?)" if hint else ""
            raise self.err(f"included recipe '{item.path}' not found{extra}", item.span) from None
        except OSError as exc:
            raise self.err(f"cannot read included recipe '{item.path}': {exc}", item.span) from None
        if key in self.stack:
            chain = " -> ".join([*self.stack[self.stack.index(key) :], key])
            raise self.err(f"include cycle: {chain}", item.span)
        self.sources[key] = text
        sub = parse(text, key)
        given = {kw.name: _IncludeArg(self.value(kw.value, scope), kw.span) for kw in item.kwargs}
        sub_scope = self.check_recipe(sub, given, from_api=False)
        if scope.finetune is None and sub_scope.finetune is not None:
            scope.finetune = dict(sub_scope.finetune, __own__=False)

    def _group(self, item: ast.GroupDecl, scope: _Scope) -> None:
        if item.name in scope.groups or item.name in scope.params:
            raise self.err(f"'{item.name}' is already defined", item.span)
        entry = REGISTRY.get("group", item.family)
        if entry is None:
            raise self.err(
                with_hint(f"unknown group '{item.family}'", item.family, REGISTRY.names("group")), item.span
            )
        dim = self.value(item.dim, scope)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise self.err(
                f"group dimension must be a positive int, got {describe_value(dim)}", item.dim.span
            )
        kwargs = {}
        for opt in item.options:
            if opt.name in kwargs:
                raise self.err(f"option '{opt.name}' is given twice", opt.span)
            spec = entry.params.get(opt.name)
            if spec is None:
                raise self.err(
                    with_hint(f"group {item.family} has no option '{opt.name}'", opt.name, entry.params),
                    opt.span,
                )
            value = self.value(opt.value, scope)
            if not conforms(value, spec.annotation):
                raise self.err(
                    f"option '{opt.name}' of {item.family} expects {describe(spec.annotation)}, "
                    f"got {describe_value(value)}",
                    opt.value.span,
                )
            kwargs[opt.name] = coerce(value, spec.annotation)
        missing = [p.name for p in entry.params.values() if p.required and p.name not in kwargs]
        if missing:
            raise self.err(f"group {item.family} needs option '{missing[0]}'", item.span)
        try:
            scope.groups[item.name] = entry.target(dim, **kwargs)
        except (ValueError, TypeError) as exc:
            raise self.err(f"invalid group {item.family}({dim}): {exc}", item.span) from None

    def _finetune(self, item: ast.Finetune, scope: _Scope) -> dict[str, Any]:
        out: dict[str, Any] = {"__own__": True}
        for opt in item.options:
            if opt.name in out:
                raise self.err(f"'{opt.name}' is set twice in finetune", opt.span)
            out[opt.name] = self.value(opt.value, scope, calls_as_data=True)
        ramps = []
        for r in item.ramps:
            if r.unit not in ("epoch", "epochs"):
                raise self.err(f"ramps are measured in epochs, got '{r.unit}'", r.span)
            vals = [self.value(v, scope) for v in (r.start, r.end, r.over)]
            for v, node in zip(vals, (r.start, r.end, r.over), strict=True):
                if not conforms(v, float):
                    raise self.err(f"ramp bounds are numbers, got {describe_value(v)}", node.span)
            ramps.append(Ramp(r.param, float(vals[0]), float(vals[1]), float(vals[2])))
        if ramps:
            out["ramps"] = ramps
        validate = _finetune_validator()
        if validate is not None:
            try:
                validate({k: v for k, v in out.items() if k != "__own__"})
            except (ValueError, TypeError) as exc:
                key = getattr(exc, "key", None)
                spans = [o.span for o in item.options if o.name == key]
                spans += [r.span for r in item.ramps if key in ("ramps", r.param)]
                raise self.err(f"invalid finetune setting: {exc}", spans[0] if spans else item.span) from None
        return out

    # ---- statements
    def _statement(self, node: ast.Statement, scope: _Scope) -> Rule:
        text = _line(self.sources.get(node.span.file, ""), node.span.line)
        rule = Rule(
            index=len(self.rules),
            kind=_KIND[type(node)],
            node=node,
            span=node.span,
            text=text,
            optional=getattr(node, "optional", False),
        )
        if isinstance(node, (ast.Replace, ast.Insert)):
            rule.entry, rule.args = self.layer_call(node.layer, scope)
            rule.selector = self.selector(node.selector, scope)
            if isinstance(node, ast.Insert):
                rule.details["position"] = node.position
        elif isinstance(node, (ast.DropBias, ast.Remove, ast.Freeze, ast.Unfreeze, ast.ExpectNone)):
            rule.selector = self.selector(node.selector, scope)
        elif isinstance(node, ast.SetAttr):
            rule.selector = self.selector(node.selector, scope)
            rule.details["attr"] = node.attr
            rule.details["value"] = self.value(node.value, scope)
        elif isinstance(node, ast.Encode):
            entry = REGISTRY.get("encoding", node.name)
            if entry is None:
                raise self.err(
                    with_hint(f"unknown input encoding '{node.name}'", node.name, REGISTRY.names("encoding")),
                    node.span,
                )
            rule.entry = entry
            rule.args = self.bind(entry, node.args, node.kwargs, scope, node.span, f"encoding {node.name}")
        elif isinstance(node, ast.Rewrite):
            rule.details["function"] = node.function
            rule.details["target"] = self._function(node.function, node.span)
            rule.entry, rule.args = self.layer_call(node.layer, scope)
            rule.selector = self.selector(node.scope, scope) if node.scope is not None else None
        elif isinstance(node, ast.ExpectNoBias):
            rule.selector = self.selector(node.selector, scope) if node.selector is not None else None
        elif isinstance(node, ast.ExpectCount):
            rule.selector = self.selector(node.selector, scope)
            value = self.value(node.value, scope)
            if not conforms(value, int):
                raise self.err(
                    f"a count is compared with an int, got {describe_value(value)}", node.value.span
                )
            rule.details.update(op=node.op, value=value)
        elif isinstance(node, ast.ExpectShape):
            dims = []
            for d in node.dims:
                v = None if d is None else self.value(d, scope)
                if v is not None and (not conforms(v, int) or v < 0):
                    raise self.err(f"shape entries are ints or *, got {describe_value(v)}", d.span)
                dims.append(v)
            rule.details["shape"] = dims
        elif isinstance(node, (ast.ExpectEquivalent, ast.ExpectComplete)):
            default = 1e-4 if isinstance(node, ast.ExpectEquivalent) else 1e-6
            tol = default if node.tolerance is None else self.value(node.tolerance, scope)
            if not conforms(tol, float) or tol < 0:
                raise self.err(
                    f"tolerance must be a non-negative number, got {describe_value(tol)}", node.span
                )
            rule.details["tolerance"] = float(tol)
        return rule

    def _function(self, path: str, span: Span) -> Callable[..., Any]:
        full = "torch.nn.functional." + path[2:] if path.startswith("F.") else path
        roots = {"torch.nn.functional.": F, "torch.": torch}
        for prefix, mod in roots.items():
            if full.startswith(prefix):
                name = full[len(prefix) :]
                obj = getattr(mod, name, None) if "." not in name else None
                if callable(obj):
                    return obj
                raise self.err(
                    with_hint(
                        f"unknown function '{path}'", name, [n for n in dir(mod) if not n.startswith("_")]
                    ),
                    span,
                )
        raise self.err(f"rewrite call takes a torch function (F.name or torch.name), got '{path}'", span)

    def layer_call(self, call: ast.LayerCall, scope: _Scope) -> tuple[Entry, dict[str, Any]]:
        entry = REGISTRY.get("layer", call.name)
        if entry is None:
            raise self.err(
                with_hint(f"unknown layer '{call.name}'", call.name, REGISTRY.names("layer")), call.span
            )
        return entry, self.bind(entry, call.args, call.kwargs, scope, call.span, call.name)

    def bind(
        self,
        entry: Entry,
        args: tuple[ast.Expr, ...],
        kwargs: tuple[ast.KwArg, ...],
        scope: _Scope,
        span: Span,
        what: str,
    ) -> dict[str, Any]:
        """Match call arguments to an entry's typed parameters, evaluating and type-checking each."""
        specs = list(entry.params.values())
        out: dict[str, Any] = {}
        for i, a in enumerate(args):
            if i >= len(specs):
                raise self.err(f"{what} takes at most {len(specs)} positional argument(s)", a.span)
            out[specs[i].name] = (self.value(a, scope), a.span)
        for kw in kwargs:
            if kw.name not in entry.params:
                raise self.err(
                    with_hint(f"{what} has no parameter '{kw.name}'", kw.name, entry.params), kw.span
                )
            if kw.name in out:
                raise self.err(f"argument '{kw.name}' of {what} is given twice", kw.span)
            out[kw.name] = (self.value(kw.value, scope), kw.value.span)
        resolved: dict[str, Any] = {}
        for name, (value, vspan) in out.items():
            ann = entry.params[name].annotation
            if not conforms(value, ann):
                raise self.err(
                    f"argument '{name}' of {what} expects {describe(ann)}, got {describe_value(value)}", vspan
                )
            resolved[name] = coerce(value, ann)
        missing = [
            p.name for p in specs if p.required and p.name not in resolved and p.name not in _CONTEXT_PARAMS
        ]
        if missing:
            raise self.err(f"{what} is missing argument '{missing[0]}'", span)
        return resolved

    # ---- values
    def value(self, e: ast.Expr, scope: _Scope, *, calls_as_data: bool = False) -> Any:
        if isinstance(e, ast.Num):
            return e.value
        if isinstance(e, (ast.Str, ast.Bool)):
            return e.value
        if isinstance(e, ast.NoneLit):
            return None
        if isinstance(e, ast.ListExpr):
            return [self.value(x, scope, calls_as_data=calls_as_data) for x in e.items]
        if isinstance(e, ast.Ref):
            if e.name in scope.params:
                return scope.params[e.name]
            if e.name in scope.groups:
                return scope.groups[e.name]
            known = [*scope.params, *scope.groups]
            raise self.err(with_hint(f"unknown name '{e.name}'", e.name, known), e.span)
        if isinstance(e, ast.Neg):
            v = self.value(e.operand, scope)
            if not conforms(v, float):
                raise self.err(f"cannot negate {describe_value(v)}", e.span)
            return -v
        if isinstance(e, ast.BinOp):
            return self._binop(e, scope)
        if isinstance(e, ast.CallExpr):
            args = tuple(self.value(a, scope, calls_as_data=calls_as_data) for a in e.args)
            kwargs = {}
            for kw in e.kwargs:
                if kw.name in kwargs:
                    raise self.err(f"argument '{kw.name}' is given twice", kw.span)
                kwargs[kw.name] = self.value(kw.value, scope, calls_as_data=calls_as_data)
            if calls_as_data:
                return Call(e.name, args, kwargs)
            return self._construct(e, scope)
        raise self.err("not a value", e.span)  # pragma: no cover - the grammar makes no other nodes

    def _construct(self, e: ast.CallExpr, scope: _Scope) -> Any:
        entry = REGISTRY.get("constructor", e.name)
        if entry is None:
            raise self.err(
                with_hint(f"unknown constructor '{e.name}'", e.name, REGISTRY.names("constructor")), e.span
            )
        kwargs = self.bind(entry, e.args, e.kwargs, scope, e.span, f"{e.name}()")
        try:
            return entry.target(**kwargs)
        except (ValueError, TypeError) as exc:
            raise self.err(f"invalid {e.name}(...): {exc}", e.span) from None

    def _binop(self, e: ast.BinOp, scope: _Scope) -> Any:
        a, b = self.value(e.left, scope), self.value(e.right, scope)
        if e.op == "+" and isinstance(a, str) and isinstance(b, str):
            return a + b
        if not (conforms(a, float) and conforms(b, float)):
            raise self.err(f"cannot compute {describe_value(a)} {e.op} {describe_value(b)}", e.span)
        if e.op == "/" and b == 0:
            raise self.err("division by zero", e.span)
        try:
            result = {"+": a + b, "-": a - b, "*": a * b}.get(e.op) if e.op != "/" else a / b
        except OverflowError:
            raise self.err("number out of range", e.span) from None
        if isinstance(result, float) and not math.isfinite(result):
            raise self.err("number out of range", e.span)
        if isinstance(result, int) and abs(result) > 2**63:
            raise self.err("number out of range", e.span)
        return result

    def condition(self, p: ast.Predicate, scope: _Scope) -> bool:
        """A statement's ``if``: the same predicate syntax, over params instead of module attributes."""
        if isinstance(p, (ast.PredCompare, ast.PredTruthy)):
            if p.attr not in scope.params:
                raise self.err(
                    with_hint(f"unknown param '{p.attr}' in condition", p.attr, scope.params), p.span
                )
            value = scope.params[p.attr]
            if isinstance(p, ast.PredTruthy):
                return bool(value)
            return S.compare(value, p.op, self.value(p.value, scope))
        if isinstance(p, ast.PredNot):
            return not self.condition(p.inner, scope)
        if isinstance(p, ast.PredAnd):
            return self.condition(p.left, scope) and self.condition(p.right, scope)
        assert isinstance(p, ast.PredOr)
        return self.condition(p.left, scope) or self.condition(p.right, scope)

    # ---- selectors
    def selector(self, s: ast.Selector, scope: _Scope) -> S.Sel:
        if isinstance(s, ast.SelName):
            if s.path in scope.lets:
                return scope.lets[s.path]
            return self._type(s.path, s.span, subclass=False)
        if isinstance(s, ast.SelSubclass):
            return self._type(s.path, s.span, subclass=True)
        if isinstance(s, ast.SelGlob):
            if not s.pattern:
                raise self.err("an empty name pattern matches nothing", s.span)
            return S.NameSel(s.pattern, re.compile(S.glob_to_regex(s.pattern)), s.span)
        if isinstance(s, ast.SelRegex):
            try:
                rx = re.compile(s.pattern)
            except re.error as exc:
                raise self.err(f"invalid regular expression: {exc}", s.span) from None
            return S.NameSel(s.pattern, rx, s.span)
        if isinstance(s, ast.SelAlias):
            if s.name not in ALIASES:
                raise self.err(with_hint(f"unknown alias '@{s.name}'", s.name, ALIASES), s.span)
            arity = ALIASES[s.name][0]
            args = tuple(self.value(a, scope) for a in s.args)
            if len(args) != arity:
                form = f"@{s.name}" if arity == 0 else f"@{s.name}(" + ", ".join(["n"] * arity) + ")"
                raise self.err(f"@{s.name} takes {arity} argument(s): write {form}", s.span)
            if any(not conforms(a, int) for a in args):
                raise self.err(f"@{s.name} takes an int", s.span)
            return S.AliasSel(s.name, args, s.span)
        if isinstance(s, ast.SelAll):
            return S.AllSel(s.span)
        if isinstance(s, (ast.SelOr, ast.SelAnd, ast.SelExcept)):
            op = {ast.SelOr: "|", ast.SelAnd: "&", ast.SelExcept: "except"}[type(s)]
            return S.SetOp(op, self.selector(s.left, scope), self.selector(s.right, scope), s.span)
        if isinstance(s, (ast.SelFirst, ast.SelLast)):
            return S.PositionSel(self.selector(s.inner, scope), isinstance(s, ast.SelLast), s.span)
        if isinstance(s, ast.SelWhere):
            return S.WhereSel(self.selector(s.inner, scope), self.predicate(s.predicate, scope), s.span)
        if isinstance(s, ast.SelIn):
            return S.InSel(self.selector(s.inner, scope), self.selector(s.scope, scope), s.span)
        raise self.err("not a selector", s.span)  # pragma: no cover

    def _type(self, path: str, span: Span, *, subclass: bool) -> S.Sel:
        if "." in path:
            try:
                cls = S.resolve_dotted(path)
            except LookupError:
                raise self.err(
                    with_hint(f"unknown layer type '{path}'", path.rsplit(".", 1)[-1], self.type_names), span
                ) from None
            return S.TypeSel(path, span, cls=cls, subclass=subclass)
        if path not in self.type_names:
            raise self.err(with_hint(f"unknown layer type '{path}'", path, self.type_names), span)
        return S.TypeSel(path, span, subclass=subclass)

    def predicate(self, p: ast.Predicate, scope: _Scope) -> S.Pred:
        if isinstance(p, ast.PredCompare):
            return S.Pred("cmp", attr=p.attr, op=p.op, value=self.value(p.value, scope))
        if isinstance(p, ast.PredTruthy):
            return S.Pred("truthy", attr=p.attr)
        if isinstance(p, ast.PredNot):
            return S.Pred("not", parts=(self.predicate(p.inner, scope),))
        kind = "and" if isinstance(p, ast.PredAnd) else "or"
        return S.Pred(kind, parts=(self.predicate(p.left, scope), self.predicate(p.right, scope)))


# ---------------------------------------------------------------- helpers


@dataclass
class _Scope:
    params: dict[str, Any] = field(default_factory=dict)
    param_decls: dict[str, ast.Param] = field(default_factory=dict)
    lets: dict[str, S.Sel] = field(default_factory=dict)
    groups: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] | None = None


@dataclass
class _OverrideText:
    text: str
    raw: str


@dataclass
class _IncludeArg:
    value: Any
    span: Span


# Parameters the engine supplies itself (never written in a recipe).
_CONTEXT_PARAMS = ("context",)

_KIND: dict[type, str] = {
    ast.Replace: "replace",
    ast.DropBias: "drop_bias",
    ast.Remove: "remove",
    ast.Insert: "insert",
    ast.SetAttr: "set",
    ast.Freeze: "freeze",
    ast.Unfreeze: "unfreeze",
    ast.Encode: "encode",
    ast.Rewrite: "rewrite",
    ast.ExpectNone: "expect_none",
    ast.ExpectNoBias: "expect_no_bias",
    ast.ExpectCount: "expect_count",
    ast.ExpectShape: "expect_shape",
    ast.ExpectEquivalent: "expect_equivalent",
    ast.ExpectComplete: "expect_complete",
}


def _parse_typed(value: _OverrideText, ptype: type, decl: ast.Param) -> Any:
    text = value.text
    name_len = len(value.raw.split("=", 1)[0])
    span = Span("--set", 1, name_len + 2, 1, len(value.raw) + 1)
    try:
        if ptype is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if ptype is str:
            return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text
        result = ptype(text)
        if isinstance(result, float) and not math.isfinite(result):
            raise ValueError
        return result
    except ValueError:
        raise RecipeError(f"param '{decl.name}' expects {decl.type}, got '{text}'", span, value.raw) from None


def _line(source: str, line: int) -> str:
    lines = source.splitlines()
    return lines[line - 1].strip() if 0 < line <= len(lines) else ""


def _header_version_span(tree: ast.Recipe) -> Span:
    lines = tree.source.splitlines()
    for i, text in enumerate(lines, 1):
        if text.lstrip().startswith("recipe") and tree.version and tree.version in text:
            col = text.rfind(tree.version) + 1
            return Span(tree.file, i, col, i, col + len(tree.version))
    return Span(tree.file)


def _finetune_validator() -> Callable[[dict[str, Any]], Any] | None:
    try:
        from surgery.train.config import FinetuneConfig
    except Exception:  # training support not installed or still incomplete
        return None
    return getattr(FinetuneConfig, "from_block", None)
