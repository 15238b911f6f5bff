"""(before, after, Plan) -> Report: what a recipe changed, module by module, attributed to its lines.

The report is plain data (``Report.to_dict()``, schema ``surgery-diff/1``) so that CI can read the
same facts the terminal view shows. With a plan, the changed modules are exactly those the plan's
``changes`` name, each tied to the recipe line(s) responsible; without one (``surgery diff A B``),
they are found by comparing the two module trees by name. Where a rule changed the computation
graph (``rewrite call``, ``insert``), the fx code of the smallest enclosing module is diffed too.

Large models stay readable because identical changes in sibling blocks fold into one row
(``blocks.0-11.mlp.fc1  x12``); the JSON keeps every module and lists the folds separately.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from surgery import fx as sfx

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from surgery.plan import Plan

SCHEMA = "surgery-diff/1"
MAX_LISTED_PARAMS = 8
"""A module with more parameter tensors than this lists only those whose shape changed."""
MAX_GRAPHS = 64
"""Graph diffs computed at most (each is a torch.fx trace of the enclosing module, before and after)."""


# ---------------------------------------------------------------- data model


@dataclass(frozen=True)
class ParamDiff:
    """One parameter tensor of a changed module: its shape before and after (None: absent)."""

    name: str
    before: tuple[int, ...] | None
    after: tuple[int, ...] | None

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "before": list(self.before) if self.before is not None else None,
            "after": list(self.after) if self.after is not None else None,
        }


@dataclass(frozen=True)
class Cause:
    """The recipe statement behind a change: where it is written and what it did to this module."""

    rule: int
    file: str
    line: int
    text: str
    action: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "file": self.file,
            "line": self.line,
            "text": self.text,
            "action": self.action,
        }


@dataclass
class ModuleDiff:
    """One changed, added or removed module (parameters are counted over its whole subtree)."""

    name: str
    status: str  # "changed" | "added" | "removed"
    before: str | None
    after: str | None
    actions: list[str] = field(default_factory=list)
    causes: list[Cause] = field(default_factory=list)
    params: list[ParamDiff] = field(default_factory=list)
    params_truncated: bool = False
    params_before: int = 0
    params_after: int = 0
    trainable_before: int = 0
    trainable_after: int = 0
    config_before: str | None = None
    config_after: str | None = None

    @property
    def delta(self) -> int:
        return self.params_after - self.params_before

    @property
    def trainable(self) -> bool | None:
        """After the change: True when every parameter trains, False when none does, None otherwise."""
        return _trainable_flag(self.params_after, self.trainable_after)

    @property
    def trainable_changed(self) -> bool:
        return (
            _trainable_flag(self.params_before, self.trainable_before) != self.trainable
            and self.params_after > 0
        )

    def config_changes(self) -> list[str]:
        return config_changes(self.config_before, self.config_after)

    def fold_key(self) -> Hashable:
        """Two modules fold together when everything but their name is the same."""
        return (
            self.status,
            self.before,
            self.after,
            tuple(self.actions),
            tuple(c.rule for c in self.causes),
            tuple(self.params),
            self.params_truncated,
            self.params_before,
            self.params_after,
            self.trainable_before,
            self.trainable_after,
            self.config_before,
            self.config_after,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "type": {"before": self.before, "after": self.after},
            "actions": list(self.actions),
            "causes": [c.to_dict() for c in self.causes],
            "params": [p.to_dict() for p in self.params],
            "params_truncated": self.params_truncated,
            "param_count": {"before": self.params_before, "after": self.params_after, "delta": self.delta},
            "trainable": self.trainable,
            "trainable_params": {"before": self.trainable_before, "after": self.trainable_after},
            "config": {
                "before": self.config_before,
                "after": self.config_after,
                "changes": self.config_changes(),
            }
            if self.config_before != self.config_after
            else None,
        }


@dataclass
class GraphDiff:
    """The fx code of a module before and after a graph-changing rule (identical ones folded)."""

    modules: list[str]
    rules: list[int]
    before: str = ""
    after: str = ""
    error: str | None = None

    @property
    def label(self) -> str:
        return fold_names([(display_name(n), None) for n in self.modules])[0][0] if self.modules else ""

    def unified(self) -> list[str]:
        if self.error is not None:
            return []
        name = display_name(self.modules[0]) if self.modules else "<model>"
        return list(
            difflib.unified_diff(
                self.before.splitlines(),
                self.after.splitlines(),
                fromfile=f"{name} (before)",
                tofile=f"{name} (after)",
                lineterm="",
                n=2,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.modules[0] if self.modules else "",
            "modules": list(self.modules),
            "rules": list(self.rules),
            "before": self.before,
            "after": self.after,
            "diff": "\n".join(self.unified()),
            "error": self.error,
        }


@dataclass
class RuleSummary:
    """A recipe rule as the diff reports it: how many modules it matched and changed."""

    index: int
    kind: str
    file: str
    line: int
    column: int
    text: str
    optional: bool
    matched: int
    changed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "text": self.text,
            "optional": self.optional,
            "matched": self.matched,
            "changed": self.changed,
        }


@dataclass
class ModelInfo:
    """One side of the diff: where the model came from and its size."""

    ref: str | None
    cls: str
    params: int
    trainable: int

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "class": self.cls, "params": self.params, "trainable": self.trainable}


@dataclass
class Report:
    """Everything the diff knows; ``to_dict`` is the documented ``surgery-diff/1`` document."""

    before: ModelInfo
    after: ModelInfo
    modules: list[ModuleDiff]
    rules: list[RuleSummary] = field(default_factory=list)
    graphs: list[GraphDiff] = field(default_factory=list)
    recipe: dict[str, Any] | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)
    types: dict[str, tuple[int, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> list[tuple[str, list[ModuleDiff]]]:
        """The modules folded: (label, members) in module order."""
        folded = fold_names([(display_name(m.name), m.fold_key()) for m in self.modules])
        return [(label, [self.modules[i] for i in idx]) for label, idx in folded]

    def summary(self) -> dict[str, Any]:
        def lost(m: ModuleDiff) -> int:
            return sum(
                _numel(p.before) for p in m.params if p.after is None and p.name.rpartition(".")[2] == "bias"
            )

        biased = [m for m in self.modules if lost(m)]
        return {
            "modules_changed": len(self.modules),
            "params": {
                "before": self.before.params,
                "after": self.after.params,
                "delta": self.after.params - self.before.params,
            },
            "trainable": {"before": self.before.trainable, "after": self.after.trainable},
            "biases_removed": {
                "modules": len(biased),
                "params": sum(lost(m) for m in biased),
            },
            "per_rule": [
                {"rule": r.index, "line": r.line, "text": r.text, "modules": r.changed} for r in self.rules
            ],
            "types": {k: {"before": b, "after": a} for k, (b, a) in self.types.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "recipe": self.recipe,
            "rules": [r.to_dict() for r in self.rules],
            "modules": [m.to_dict() for m in self.modules],
            "groups": [
                {"label": label, "count": len(ms), "modules": [m.name for m in ms]}
                for label, ms in self.groups()
            ],
            "graphs": [g.to_dict() for g in self.graphs],
            "summary": self.summary(),
            "problems": list(self.problems),
            **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_yaml(self) -> str:
        return to_yaml(self.to_dict())


def to_yaml(data: Any) -> str:
    """YAML with keys in their given order and multi-line strings (graph code) as literal blocks."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
        style = "|" if "\n" in s and not any(ch in s for ch in "\t\r") and s == s.rstrip(" ") else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


# ---------------------------------------------------------------- computing


def display_name(name: str) -> str:
    return name or "<model>"


def type_name(m: nn.Module | None) -> str | None:
    """The class name a person recognises; fx GraphModules say what they were traced from."""
    if m is None:
        return None
    if isinstance(m, fx.GraphModule):
        return f"GraphModule({type(m).__name__})"
    return type(m).__name__


def _numel(shape: tuple[int, ...] | None) -> int:
    n = 1
    for s in shape or ():
        n *= s
    return n if shape is not None else 0


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _param(model: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _named(m: nn.Module | None, *, recurse: bool = True, skip: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """Parameters by relative name, without those under ``skip`` (descendants reported on their own)."""
    if m is None:
        return {}
    return {
        n: p for n, p in m.named_parameters(recurse=recurse) if not any(n.startswith(s + ".") for s in skip)
    }


def _shapes(params: dict[str, nn.Parameter]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in params.items()}


def _counts(params: Iterable[nn.Parameter]) -> tuple[int, int]:
    ps = list(params)
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


def _trainable_flag(total: int, trainable: int) -> bool | None:
    if total == 0 or 0 < trainable < total:
        return None
    return trainable == total


def _wrapped_prefix(before: dict[str, tuple[int, ...]], after: nn.Module | None) -> str:
    """The child of ``after`` that holds the module ``before`` was (``insert`` makes a Sequential,
    ``encode input`` wraps the first conv), so its parameters compare under their old names."""
    if after is None or not before:
        return ""
    children = list(after.named_children())
    for exact in (True, False):
        for key, child in children:
            shapes = _shapes(_named(child))
            if (shapes == before) if exact else (set(shapes) == set(before)):
                return key + "."
    return ""


def split_config(text: str | None) -> list[str]:
    """``extra_repr`` split at top-level commas: ``8, 8, kernel_size=(3, 3)`` -> three parts."""
    if not text:
        return []
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def config_changes(before: str | None, after: str | None) -> list[str]:
    """What differs between two ``extra_repr`` strings, as ``key: old -> new`` pieces."""
    if before == after or before is None or after is None:
        return []
    b, a = split_config(before), split_config(after)

    def keyed(parts: list[str]) -> dict[str, str]:
        return {
            (p.split("=", 1)[0] if "=" in p else f"#{i}"): p.split("=", 1)[-1] for i, p in enumerate(parts)
        }

    kb, ka = keyed(b), keyed(a)
    out = []
    for k in list(dict.fromkeys([*kb, *ka])):
        if kb.get(k) != ka.get(k):
            name = "" if k.startswith("#") else f"{k}="
            out.append(f"{name}{kb.get(k, '—')} → {ka.get(k, '—')}")
    return out


def _config(m: nn.Module | None) -> str | None:
    if m is None:
        return None
    try:
        return m.extra_repr()
    except Exception:  # a third-party extra_repr that needs state it does not have
        return None


def module_diff(
    name: str,
    before: nn.Module | None,
    after: nn.Module | None,
    *,
    recurse: bool = True,
    skip: Sequence[str] = (),
) -> ModuleDiff:
    """Compare one module in two states: types, parameter shapes and counts, trainability, config.

    ``skip`` names descendants (relative) that are reported as modules of their own, so a change
    to a child is not counted again in its parent.
    """
    pb, pa = _named(before, recurse=recurse, skip=skip), _named(after, recurse=recurse, skip=skip)
    sb, sa = _shapes(pb), _shapes(pa)
    prefix = (
        _wrapped_prefix(sb, after)
        if type_name(before) != type_name(after) and not (set(sb) & set(sa))
        else ""
    )
    if prefix:
        sa = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sa.items()}
    names = list(sb) + [k for k in sa if k not in sb]
    params = [ParamDiff(k, sb.get(k), sa.get(k)) for k in names]
    truncated = False
    if len(params) > MAX_LISTED_PARAMS:
        params = [p for p in params if p.changed]
        truncated = True
    nb, tb = _counts(pb.values())
    na, ta = _counts(pa.values())
    status = (
        "changed" if before is not None and after is not None else ("added" if before is None else "removed")
    )
    return ModuleDiff(
        name=name,
        status=status,
        before=type_name(before),
        after=type_name(after),
        params=params,
        params_truncated=truncated,
        params_before=nb,
        params_after=na,
        trainable_before=tb,
        trainable_after=ta,
        config_before=_config(before),
        config_after=_config(after),
    )


def parameter_diff(name: str, before: nn.Parameter | None, after: nn.Parameter | None) -> ModuleDiff:
    """A parameter changed on its own (``freeze @stem`` on a ViT's ``cls_token``), shown like a module."""
    sb, sa = (tuple(p.shape) if p is not None else None for p in (before, after))
    nb, tb = _counts([before] if before is not None else [])
    na, ta = _counts([after] if after is not None else [])
    return ModuleDiff(
        name=name,
        status="changed",
        before="Parameter" if before is not None else None,
        after="Parameter" if after is not None else None,
        params=[ParamDiff("", sb, sa)],
        params_before=nb,
        params_after=na,
        trainable_before=tb,
        trainable_after=ta,
    )


def _model_info(m: nn.Module, ref: str | None) -> ModelInfo:
    total, trainable = _counts(m.parameters())
    return ModelInfo(ref=ref, cls=type(m).__name__, params=total, trainable=trainable)


def _type_counts(before: nn.Module, after: nn.Module) -> dict[str, tuple[int, int]]:
    cb = Counter(type_name(m) for n, m in before.named_modules() if n)
    ca = Counter(type_name(m) for n, m in after.named_modules() if n)
    keys = list(dict.fromkeys([*cb, *ca]))
    return {str(k): (cb[k], ca[k]) for k in keys if cb[k] != ca[k]}


def compute(
    before: nn.Module,
    after: nn.Module,
    plan: Plan | None = None,
    *,
    before_ref: str | None = None,
    after_ref: str | None = None,
    graphs: bool = True,
) -> Report:
    """The diff of two models; with ``plan``, exactly the modules it changed, attributed to its rules."""
    report = Report(
        before=_model_info(before, before_ref),
        after=_model_info(after, after_ref),
        modules=[],
        types=_type_counts(before, after),
    )
    if plan is None:
        report.modules = structural(before, after)
        return report
    rules = plan.recipe.rules
    order: dict[str, list[Cause]] = {}
    for ch in plan.changes:
        rule = rules[ch.rule]
        order.setdefault(ch.name, []).append(
            Cause(ch.rule, rule.span.file, rule.span.line, rule.text, ch.action)
        )
    names = list(order)
    last_after = {ch.name: ch.after for ch in plan.changes}
    for name, causes in order.items():
        inner = [
            n[len(name) + 1 :] if name else n
            for n in names
            if n != name and (not name or n.startswith(name + "."))
        ]
        b_mod, a_mod = _get(before, name), _get(after, name)
        if b_mod is None and a_mod is None and _param(after, name) is not None:
            md = parameter_diff(name, _param(before, name), _param(after, name))
        else:
            md = module_diff(name, b_mod, a_mod, skip=inner)
        if md.after and last_after[name].startswith(md.after + "("):
            md.after = last_after[name]  # "Sequential(Identity, Linear)" says more than "Sequential"
        md.causes = causes
        md.actions = list(dict.fromkeys(c.action for c in causes))
        if md.status != "changed":
            md.status = "changed"  # a stale name (a later rule rebuilt its parent) still was changed
        report.modules.append(md)
    changed_by: Counter[int] = Counter()
    for md in report.modules:
        for r in dict.fromkeys(c.rule for c in md.causes):
            changed_by[r] += 1
    report.rules = [
        RuleSummary(
            index=s.rule.index,
            kind=s.rule.kind,
            file=s.rule.span.file,
            line=s.rule.span.line,
            column=s.rule.span.column,
            text=s.rule.text,
            optional=s.rule.optional,
            matched=len(s.names),
            changed=changed_by[s.rule.index],
        )
        for s in plan.steps
    ]
    recipe = plan.recipe
    from surgery.plan import jsonable

    report.recipe = {
        "name": recipe.name,
        "version": recipe.version,
        "file": recipe.file,
        "params": jsonable(recipe.params),
    }
    report.problems = [
        {
            "level": p.level,
            "file": p.rule.span.file,
            "line": p.rule.span.line,
            "text": p.rule.text,
            "message": p.message,
        }
        for p in plan.problems
    ]
    if graphs:
        report.graphs = graph_diffs(before, after, plan)
    return report


def structural(before: nn.Module, after: nn.Module) -> list[ModuleDiff]:
    """Modules that differ between two trees, by qualified name: type, own parameters, config.

    A module on one side only is reported once with its whole subtree. A module whose type changed
    is reported with the parameters of its subtree except the descendants both trees have, which
    are compared on their own (a traced GraphModule keeps its children, an ``insert`` wraps one).
    """
    mb, ma = dict(before.named_modules()), dict(after.named_modules())
    out: list[ModuleDiff] = []
    gone: list[str] = []  # added or removed: every descendant is covered
    retyped: list[str] = []  # type changed: descendants on one side only are covered

    def under(n: str, roots: list[str]) -> bool:
        return any(r == "" or n.startswith(r + ".") for r in roots)

    for name in merged_order(list(mb), list(ma)):
        both = name in mb and name in ma
        if under(name, gone) or (not both and under(name, retyped)):
            continue
        b, a = mb.get(name), ma.get(name)
        if b is None or a is None:
            md = module_diff(name, b, a)
            md.actions = ["add" if b is None else "remove"]
            out.append(md)
            gone.append(name)
            continue
        if type(b) is not type(a):
            prefix = f"{name}." if name else ""
            shared = [n[len(prefix) :] for n in mb if n.startswith(prefix) and n != name and n in ma]
            md = module_diff(name, b, a, skip=shared)
            md.actions = ["replace"]
            out.append(md)
            retyped.append(name)
            continue
        md = module_diff(name, b, a, recurse=False)
        own_b = {n: t.requires_grad for n, t in b.named_parameters(recurse=False)}
        own_a = {n: t.requires_grad for n, t in a.named_parameters(recurse=False)}
        shapes_differ = any(p.changed for p in md.params)
        grads_differ = own_b != own_a and set(own_b) == set(own_a)
        config_differ = md.config_before != md.config_after
        if shapes_differ or grads_differ or config_differ:
            md.actions = [
                a
                for a, hit in (
                    ("params", shapes_differ),
                    ("trainable", grads_differ),
                    ("config", config_differ),
                )
                if hit
            ]
            out.append(md)
    return out


def merged_order(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """The union of two ordered name lists, interleaved so that added names sit where they appear."""
    out: list[str] = []
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            out.extend(a[i1:i2])
        else:
            out.extend(a[i1:i2])
            out.extend(x for x in b[j1:j2] if x not in out)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- graph diffs

_DEAD = re.compile(r";\s+(?:[\w.]+\s*=\s*)+None\s*$")


def clean_code(code: str) -> str:
    """fx's generated code without its ``; x = y = None`` liveness clean-ups, which only add noise."""
    return "\n".join(_DEAD.sub("", line).rstrip() for line in code.splitlines())


class _InlineTracer(sfx.OwnCodeTracer):
    """Like OwnCodeTracer, but traces *through* the named submodules (the Sequentials ``insert`` made)."""

    def __init__(self, inline: set[str]) -> None:
        super().__init__()
        self.inline = inline

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.inline:
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _code(module: nn.Module, inline: set[str] | None = None) -> tuple[str | None, str | None]:
    try:
        if inline:
            graph = _InlineTracer(inline).trace(module)
            gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
        else:
            gm = sfx.trace_own(module)
    except Exception as exc:  # fx raises many types; the reason is all the report needs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{type(exc).__name__}: {first}" if not isinstance(exc, sfx.TraceError) else first
    return clean_code(gm.code.strip()), None


def graph_diffs(before: nn.Module, after: nn.Module, plan: Plan) -> list[GraphDiff]:
    """fx code before/after for each module whose graph a rule changed, identical diffs folded."""
    targets: dict[str, tuple[set[str], set[int]]] = {}
    for ch in plan.changes:
        if ch.action.startswith("rewrite call"):
            targets.setdefault(ch.name, (set(), set()))[1].add(ch.rule)
        elif ch.action == "insert":
            parent = ch.name.rpartition(".")[0]
            entry = targets.setdefault(parent, (set(), set()))
            entry[0].add(ch.name[len(parent) + 1 :] if parent else ch.name)
            entry[1].add(ch.rule)
    found: dict[tuple[str, str, str | None], GraphDiff] = {}
    for i, (name, (inline, rule_set)) in enumerate(targets.items()):
        if i >= MAX_GRAPHS:
            break
        b, a = _get(before, name), _get(after, name)
        if b is None or a is None:
            continue
        code_b, err_b = _code(b)
        code_a, err_a = _code(a, inline)
        err = err_b or err_a
        key = (code_b or "", code_a or "", err)
        if key in found:
            found[key].modules.append(name)
            found[key].rules = sorted(set(found[key].rules) | rule_set)
            continue
        found[key] = GraphDiff(
            modules=[name],
            rules=sorted(rule_set),
            before=code_b or "",
            after=code_a or "",
            error=f"cannot trace {display_name(name)}: {err}" if err else None,
        )
    return list(found.values())


# ---------------------------------------------------------------- folding


def ranges(nums: Iterable[int]) -> str:
    xs = sorted(set(nums))
    parts: list[str] = []
    start = prev = xs[0]
    for x in [*xs[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def fold_names(items: Sequence[tuple[str, Hashable]]) -> list[tuple[str, list[int]]]:
    """Fold names that differ in one numeric component and share a key: ``layer1.0-2.conv1``.

    Returns (label, indices into ``items``) in the order of each group's first member. Greedy: the
    largest possible fold is taken first, so ``blocks.0-11.mlp.fc1`` wins over smaller ones.
    """
    tokens = [name.split(".") for name, _ in items]
    buckets: dict[tuple[Hashable, int, tuple[str | None, ...]], list[int]] = {}
    for i, (toks, (_, key)) in enumerate(zip(tokens, items, strict=True)):
        for pos, t in enumerate(toks):
            if t.isdigit():
                template = tuple(None if j == pos else x for j, x in enumerate(toks))
                buckets.setdefault((key, pos, template), []).append(i)
    assigned: set[int] = set()
    groups: list[tuple[str, list[int]]] = []
    candidates = [(k, v) for k, v in buckets.items() if len(v) > 1]
    while candidates:
        best_key, best = max(candidates, key=lambda kv: (len(kv[1]), -kv[1][0]))
        members = best
        _, pos, template = best_key
        label = ".".join(ranges(int(tokens[i][pos]) for i in members) if t is None else t for t in template)
        groups.append((label, members))
        assigned.update(members)
        candidates = [(k, [i for i in v if i not in assigned]) for k, v in candidates]
        candidates = [(k, v) for k, v in candidates if len(v) > 1]
    groups.extend((items[i][0], [i]) for i in range(len(items)) if i not in assigned)
    groups.sort(key=lambda g: g[1][0])
    return groups


# ---------------------------------------------------------------- rich view


def fmt_shape(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "—"
    return "×".join(str(s) for s in shape) if shape else "scalar"


def fmt_count(n: int, *, sign: bool = False) -> str:
    if sign:
        return f"+{n:,}" if n > 0 else (f"−{-n:,}" if n < 0 else "0")
    return f"{n:,}"


def _params_text(md: ModuleDiff) -> Any:
    from rich.text import Text

    text = Text()
    changed = [p for p in md.params if p.changed]
    if md.before == md.after and changed:
        shown = changed[:3]  # same type: the unchanged weights say nothing new
    else:
        shown = md.params if len(md.params) <= 3 else changed[:3]
    for i, p in enumerate(shown):
        if i:
            text.append(", ")
        if p.before is None:
            text.append(f"+{p.name} {fmt_shape(p.after)}", style="green")
        elif p.after is None:
            text.append(f"−{p.name} {fmt_shape(p.before)}", style="red")
        elif p.changed:
            text.append(f"{p.name} ")
            text.append(fmt_shape(p.before), style="red")
            text.append(" → ")
            text.append(fmt_shape(p.after), style="green")
        else:
            text.append(f"{p.name} {fmt_shape(p.after)}", style="dim")
    hidden = (len(changed) > len([p for p in shown if p.changed])) or (md.params_truncated and not shown)
    if hidden:
        text.append(", …" if shown else "…", style="dim")
    return text


def _change_text(md: ModuleDiff) -> Any:
    from rich.text import Text

    text = Text()
    if md.status == "added":
        text.append(f"+ {md.after}", style="green")
        return text
    if md.status == "removed":
        text.append(f"− {md.before}", style="red")
        return text
    if md.before != md.after:
        text.append(str(md.before), style="red")
        text.append(" → ")
        text.append(str(md.after), style="bold green")
    else:
        text.append(str(md.after))
    notes = [
        a
        for a in md.actions
        if a not in ("replace", "insert", "remove", "params", "config", "trainable", "freeze", "unfreeze")
        and not a.startswith(("rewrite call", "set "))
    ]
    sets = [a for a in md.actions if a.startswith("set ")]
    if md.before == md.after and (sets or "config" in md.actions):
        notes.extend(md.config_changes() or sets)
    else:
        notes.extend(sets)
    if notes:
        text.append("  " + ", ".join(notes), style="yellow")
    return text


def _delta_text(n: int) -> Any:
    from rich.text import Text

    if n == 0:
        return Text("·", style="dim")
    return Text(fmt_count(n, sign=True), style="green" if n > 0 else "red")


def _trainable_text(md: ModuleDiff) -> Any:
    from rich.text import Text

    if not md.trainable_changed:
        return Text("")
    if md.trainable is False:
        return Text("frozen", style="cyan")
    if md.trainable is True:
        return Text("trainable", style="cyan")
    return Text(f"{fmt_count(md.trainable_after)} of {fmt_count(md.params_after)} trainable", style="cyan")


def _module_table(rows: list[tuple[str, list[ModuleDiff]]], *, rule_index: int | None) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column("module", no_wrap=True, style="bold")
    table.add_column("n", justify="right", style="magenta", no_wrap=True)
    table.add_column("change", no_wrap=True)
    table.add_column("params", overflow="fold")
    table.add_column("delta", justify="right", no_wrap=True)  # of the whole folded group
    table.add_column("notes", no_wrap=True)
    for label, members in rows:
        md = members[0]
        others = [c.line for c in md.causes if c.rule != rule_index]
        note = _trainable_text(md)
        if others:
            extra = "also line " + ", ".join(str(x) for x in dict.fromkeys(others))
            note = Text.assemble(note, ("  " if note.plain else "") + extra, style="dim")
        table.add_row(
            Text(label),
            f"×{len(members)}" if len(members) > 1 else "",
            _change_text(md),
            _params_text(md),
            _delta_text(md.delta * len(members)),
            note,
        )
    return table


def render(report: Report, console: Console, *, expand: bool = False, title: str | None = None) -> None:
    """Print the report: changed modules per rule (folded unless ``expand``), summary, graph diffs."""
    console.print(renderable(report, expand=expand, title=title))


def renderable(report: Report, *, expand: bool = False, title: str | None = None) -> RenderableType:
    from rich.console import Group
    from rich.text import Text
    from rich.tree import Tree

    if expand:
        groups = [(display_name(m.name), [m]) for m in report.modules]
    else:
        groups = [(label, ms) for label, ms in report.groups()]
    head = Text()
    if title:
        head.append(title, style="bold")
    elif report.recipe:
        head.append(str(report.recipe.get("name") or report.recipe.get("file")), style="bold")
        if report.recipe.get("version"):
            head.append(f" {report.recipe['version']}", style="bold")
        params = report.recipe.get("params") or {}
        if params:
            head.append(" (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")", style="bold")
        head.append(" on ")
        head.append(report.before.ref or report.before.cls, style="cyan")
    else:
        head.append(report.before.ref or report.before.cls, style="cyan")
        head.append(" → ")
        head.append(report.after.ref or report.after.cls, style="cyan")
    n = len(report.modules)
    head.append(f"  {report.before.cls}", style="dim")
    if report.after.cls != report.before.cls:
        head.append(f" → {report.after.cls}", style="dim")
    head.append(f" · {n} module{'s' if n != 1 else ''} changed", style="dim")
    tree = Tree(head, guide_style="dim")
    if report.rules:
        for r in report.rules:
            mine = [(label, ms) for label, ms in groups if ms[0].causes and ms[0].causes[0].rule == r.index]
            label = Text()
            label.append(f"line {r.line:<3} ", style="dim")
            label.append(r.text, style="bold")
            label.append("   ")
            if r.kind.startswith("expect"):
                label.append("checked", style="dim")
                tree.add(label)
                continue
            if r.changed == 0:
                label.append("no change", style="yellow" if r.optional else "bold red")
                tree.add(label)
                continue
            label.append(f"{r.changed} module{'s' if r.changed != 1 else ''}", style="magenta")
            delta = sum(m.delta for _, ms in mine for m in ms)
            if delta:
                label.append(f"  {fmt_count(delta, sign=True)} params", style="green" if delta > 0 else "red")
            rest = r.changed - sum(len(ms) for _, ms in mine)
            if rest:
                label.append(f" ({rest} listed under an earlier line)", style="dim")
            node = tree.add(label)
            if mine:
                node.add(_module_table(mine, rule_index=r.index))
    elif groups:
        tree.add(_module_table(groups, rule_index=None))
    else:
        tree.add(Text("no structural differences", style="green"))
    parts: list[Any] = [tree, Text(""), _summary_table(report)]
    for g in report.graphs:
        parts.extend([Text(""), _graph_panel(g, report)])
    if not expand and any(len(ms) > 1 for _, ms in groups):
        parts.append(
            Text("identical changes in sibling blocks are folded; --expand lists every module", style="dim")
        )
    return Group(*parts)


def _summary_table(report: Report) -> Any:
    from rich.table import Table
    from rich.text import Text

    s = report.summary()
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    p = s["params"]
    table.add_row(
        "parameters",
        Text.assemble(
            f"{fmt_count(p['before'])} → {fmt_count(p['after'])}  ",
            _delta_text(p["delta"]) if p["delta"] else Text("(unchanged)", style="dim"),
        ),
    )
    t = s["trainable"]
    if t["before"] != p["before"] or t["after"] != p["after"]:
        table.add_row("trainable", f"{fmt_count(t['before'])} → {fmt_count(t['after'])}")
    br = s["biases_removed"]
    if br["modules"]:
        table.add_row("biases removed", f"{br['modules']} modules, {fmt_count(br['params'])} parameters")
    if report.types:
        text = Text()
        for i, (k, (b, a)) in enumerate(report.types.items()):
            if i:
                text.append("  ")
            text.append(f"{k} ")
            text.append(f"{b}→{a}", style="green" if a > b else "red")
        table.add_row("module types", text)
    for prob in report.problems:
        style = "bold red" if prob["level"] == "error" else "yellow"
        table.add_row(
            Text(prob["level"], style=style), Text(f"{prob['file']}:{prob['line']}: {prob['message']}")
        )
    if report.extra.get("verified"):
        size = report.extra.get("input_size")
        n = sum(1 for r in report.rules if r.kind.startswith("expect"))
        what = [f"{n} expect rule{'s' if n != 1 else ''} hold"] if n else []
        if size:
            what.append(f"smoke forward pass on {fmt_shape(tuple(size))} ran")
        table.add_row(
            "verified", Text("; ".join(what) or "nothing to check", style="green" if what else "dim")
        )
    return table


def _graph_panel(g: GraphDiff, report: Report) -> Any:
    from rich.panel import Panel
    from rich.text import Text

    lines = {r.index: r for r in report.rules}
    where = ", ".join(f"line {lines[i].line}: {lines[i].text}" for i in g.rules if i in lines)
    title = Text.assemble(
        ("graph ", "bold"), (g.label, "bold cyan"), (f"  ({where})" if where else "", "dim")
    )
    if g.error is not None:
        return Panel(Text(g.error, style="yellow"), title=title, title_align="left", border_style="dim")
    body = Text()
    for line in g.unified()[2:]:
        style = (
            "green"
            if line.startswith("+")
            else "red"
            if line.startswith("-")
            else "cyan"
            if line.startswith("@@")
            else "dim"
        )
        body.append(line + "\n", style=style)
    body.rstrip()
    if len(g.modules) > 1:
        body.append(f"\n(the same change in {len(g.modules)} modules)", style="dim")
    return Panel(body, title=title, title_align="left", border_style="dim", expand=False)
