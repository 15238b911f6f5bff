"""torch.fx where the graph matters: call rewrites, graph views, traceability reports.

A module is always traced on its own, with every submodule a leaf (plus timm's no-trace modules and
functions), so the graph is just that module's own ``forward`` code: the smallest enclosing
submodule of whatever a rewrite touches, and a trace failure names exactly one module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn


def _timm_notrace() -> tuple[set[type], list[Callable[..., Any]]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional for plain models
        return set(), []
    return set(get_notrace_modules()), list(get_notrace_functions())


class OwnCodeTracer(fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf."""

    def __init__(self) -> None:
        leaves, functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(functions))
        self._timm_leaves = tuple(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(module_qualified_name) or isinstance(m, self._timm_leaves)


class TraceError(Exception):
    """A module that torch.fx cannot trace, with the reason."""


def trace_own(module: nn.Module) -> fx.GraphModule:
    """The module's own code as a GraphModule whose submodules are the module's children."""
    tracer = OwnCodeTracer()
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # fx raises many types: TraceError, TypeError, NotImplementedError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"{type(exc).__name__}: {first}") from None
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def traceable(module: nn.Module) -> tuple[bool, str]:
    """Whether torch.fx can trace the module's own code, and why not."""
    try:
        trace_own(module)
    except TraceError as exc:
        return False, str(exc)
    return True, ""


def graph_code(module: nn.Module) -> str | None:
    """Readable Python of the module's own traced graph, or None when it cannot be traced."""
    try:
        gm = trace_own(module)
    except TraceError:
        return None
    return gm.code.strip()


def is_torch_builtin(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.")


def calls_of(gm: fx.GraphModule, fn: Callable[..., Any]) -> list[fx.Node]:
    targets = {fn}
    method = getattr(torch.Tensor, getattr(fn, "__name__", ""), None)
    return [
        n
        for n in gm.graph.nodes
        if (n.op == "call_function" and n.target in targets)
        or (n.op == "call_method" and method is not None and n.target == fn.__name__)
    ]


def _accepted_kwargs(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's keyword arguments that the new module's forward takes (``inplace=`` usually is not)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def rewrite_calls(
    module: nn.Module, fn: Callable[..., Any], make: Callable[[], nn.Module]
) -> fx.GraphModule | None:
    """Replace each call of ``fn`` in the module's own code by a new submodule from ``make``.

    Returns the rewritten GraphModule, or None when the module's code does not call ``fn``.
    """
    gm = trace_own(module)
    nodes = calls_of(gm, fn)
    if not nodes:
        return None
    base = getattr(fn, "__name__", "call")
    for i, node in enumerate(nodes):
        name = f"rewritten_{base}_{i}"
        gm.add_submodule(name, make())
        with gm.graph.inserting_after(node):
            args = node.args[1:] if node.op == "call_method" else node.args
            if node.op == "call_method":
                args = (node.args[0], *args)
            new = gm.graph.call_module(
                name, tuple(args), _accepted_kwargs(gm.get_submodule(name), node.kwargs)
            )
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
