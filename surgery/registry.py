"""The allowlist of everything a recipe may name.

A recipe never imports or evaluates code: every layer, input encoding, value constructor
(``siren(...)``, ``lognormal(...)``), group family (``GL+``) and call rewrite it mentions must be
registered here. Each entry carries typed parameters taken from its Python signature, so the
checker can reject ``b="two"`` at line:col before any model is touched, and each layer declares how
weights carry over from the module it replaces (``from_module``).

Third-party packages register through the ``surgery.plugins`` entry-point group: each entry point
names a module (or a callable taking no arguments) that registers its items when imported.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

REQUIRED = inspect.Parameter.empty
"""Default of a parameter that has none: the recipe must give it."""


@dataclass(frozen=True)
class ParamSpec:
    """One typed parameter of a registered item."""

    name: str
    annotation: Any
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass
class Entry:
    """A registered item: a layer, an encoding, a value constructor or a group family."""

    kind: str
    name: str
    target: Callable[..., Any]
    params: dict[str, ParamSpec]
    doc: str = ""
    transfer: str = ""
    cls: type | None = None
    returns: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def first_doc_line(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""


def params_of(fn: Callable[..., Any], *, skip: int = 0) -> dict[str, ParamSpec]:
    """Typed parameters of ``fn`` from its signature, skipping the first ``skip`` positional ones."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # one unresolvable annotation (often the return type): resolve each on its own
        hints = {}
        scope = getattr(fn, "__globals__", {})
        for name, raw in getattr(fn, "__annotations__", {}).items():
            hints[name] = _one_hint(raw, scope)
    out: dict[str, ParamSpec] = {}
    for i, p in enumerate(sig.parameters.values()):
        if i < skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self":
            continue
        ann = hints.get(p.name, p.annotation)
        out[p.name] = ParamSpec(p.name, Any if ann is inspect.Parameter.empty else ann, p.default)
    return out


def _one_hint(raw: Any, scope: dict[str, Any]) -> Any:
    """Resolve one annotation with ``typing.get_type_hints``; ``Any`` when it cannot be resolved."""

    def shim() -> None: ...

    shim.__annotations__ = {"x": raw}
    try:
        return typing.get_type_hints(shim, globalns=scope)["x"]
    except Exception:
        return Any


class Registry:
    """Named tables of entries, one per kind."""

    KINDS = ("layer", "encoding", "constructor", "group")

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, Entry]] = {k: {} for k in self.KINDS}
        self._loaded = False

    def add(self, entry: Entry) -> Entry:
        table = self.tables[entry.kind]
        old = table.get(entry.name)
        if old is not None and old.target is not entry.target:
            log.warning("%s %r registered twice; the later one wins", entry.kind, entry.name)
        table[entry.name] = entry
        return entry

    def get(self, kind: str, name: str) -> Entry | None:
        self.ensure_loaded()
        return self.tables[kind].get(name)

    def names(self, kind: str) -> list[str]:
        self.ensure_loaded()
        return sorted(self.tables[kind])

    def entries(self, kind: str) -> list[Entry]:
        self.ensure_loaded()
        return [self.tables[kind][n] for n in sorted(self.tables[kind])]

    def ensure_loaded(self) -> None:
        """Import the built-in entries and the plugins once, on first use."""
        if self._loaded:
            return
        self._loaded = True
        for mod in BUILTIN_MODULES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as exc:  # an optional part not installed
                if exc.name != mod:
                    raise
        for ep in entry_points(group="surgery.plugins"):
            try:
                obj = ep.load()
                if callable(obj) and not inspect.ismodule(obj):
                    obj()
            except Exception as exc:  # a broken plugin must not take the tool down
                log.warning("surgery plugin %r failed to load: %s", ep.name, exc)


REGISTRY = Registry()

BUILTIN_MODULES = (
    "surgery.ops.builtin_layers",
    "surgery.ops.encodings",
    "surgery.layers",
    "surgery.groups",
)


def register_layer(
    name: str | None = None,
    *,
    factory: Callable[..., nn.Module] | None = None,
    cls: type | None = None,
    transfer: str = "",
    doc: str | None = None,
) -> Callable[[Any], Any]:
    """Register an ``nn.Module`` class (or a factory) as a layer recipes may build.

    Used as a class decorator. The layer is built by ``cls.from_module(module, **params)`` when the
    class defines that classmethod (``module`` is the module being replaced, or the anchor of an
    ``insert``, or ``None`` for ``rewrite call``), else by ``cls(**params)``. Parameters and their
    types come from that signature's keyword parameters. ``from_module`` may take ownership of the
    tensors of ``module``: the engine always hands it a private copy.
    """

    def deco(obj: Any) -> Any:
        target_cls = cls or (obj if isinstance(obj, type) else None)
        if factory is not None:
            build, params = factory, params_of(factory, skip=1)
        elif isinstance(obj, type) and hasattr(obj, "from_module"):
            build, params = _from_module_builder(obj), params_of(obj.from_module, skip=1)
        elif isinstance(obj, type):
            build, params = _init_builder(obj), params_of(obj.__init__, skip=1)
        else:  # a plain function (module, **params) -> nn.Module
            build, params = obj, params_of(obj, skip=1)
        REGISTRY.add(
            Entry(
                kind="layer",
                name=name or obj.__name__,
                target=build,
                params=params,
                doc=inspect.cleandoc(doc or obj.__doc__ or ""),
                transfer=transfer,
                cls=target_cls,
            )
        )
        return obj

    return deco


def _from_module_builder(cls: type) -> Callable[..., nn.Module]:
    def build(module: nn.Module | None, **kw: Any) -> nn.Module:
        return cls.from_module(module, **kw)

    return build


def _init_builder(cls: type) -> Callable[..., nn.Module]:
    def build(module: nn.Module | None, **kw: Any) -> nn.Module:
        return cls(**kw)

    return build


def register_encoding(name: str, *, doc: str | None = None) -> Callable[[Any], Any]:
    """Register an input encoding: ``fn(model, context, **params) -> None`` edits the model copy.

    ``context`` is an :class:`surgery.ops.encodings.EncodeContext` naming the first layer, the
    input normalisation in force and the input contract; the function records the new contract
    on it.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY.add(
            Entry("encoding", name, fn, params_of(fn, skip=2), inspect.cleandoc(doc or fn.__doc__ or ""))
        )
        return fn

    return deco


def register_constructor(name: str, *, doc: str | None = None) -> Callable[[Any], Any]:
    """Register a value constructor a recipe may call in an argument, e.g. ``siren(width=60)``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn) if not isinstance(fn, type) else {}
        REGISTRY.add(
            Entry(
                "constructor",
                name,
                fn,
                params_of(fn.__init__ if isinstance(fn, type) else fn, skip=1 if isinstance(fn, type) else 0),
                inspect.cleandoc(doc or fn.__doc__ or ""),
                returns=fn if isinstance(fn, type) else hints.get("return", Any),
            )
        )
        return fn

    return deco


def register_group(name: str, *, doc: str | None = None, returns: Any = Any) -> Callable[[Any], Any]:
    """Register a Lie-group family: ``fn(n, **options)`` builds ``NAME(n)`` for a ``group`` block.

    ``name`` is what a recipe writes before the dimension: ``GL+`` for ``GL+(2)``.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY.add(
            Entry(
                "group",
                name,
                fn,
                params_of(fn, skip=1),
                inspect.cleandoc(doc or fn.__doc__ or ""),
                returns=returns,
            )
        )
        return fn

    return deco
