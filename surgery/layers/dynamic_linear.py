"""Any module's own ``forward`` made dynamic linear in explanation mode, found and rewritten by torch.fx.

A B-cos network explains itself because, with the input-dependent parts of its weights detached,
it computes ``W(x) x``. Hand-written layers do this for the modules we know (B-cos convs, norms,
timm's ``Attention``); everything else that is not dynamic linear sits in some module's own
``forward`` code: a squeeze-excite gate ``x * sigmoid(fc(mean(x)))``, a GLU ``act(x1) * x2``, an
attention ``softmax(q k^T) v`` written out or through ``F.scaled_dot_product_attention``, a norm
``x / std(x)`` or ``F.layer_norm``, an activation ``F.hardtanh(x, 0, 6)`` whose upper clip is an
additive constant. This module handles all of them with one mechanism:

* the module's own code is traced with every child a leaf (:class:`surgery.fx.OwnCodeTracer`);
* every value is marked input-dependent or not (parameters, buffers and shapes are not);
* walking back from the output, a product of two input-dependent factors detaches its *gate* (the
  factor computed through more operations: the sigmoid branch of an SE block, the softmax of an
  attention, the activated half of a GLU), a division by an input-dependent value detaches the
  divisor, and ``scaled_dot_product_attention`` detaches q and k;
* what is then still on the output's gradient path is rewritten: elementwise functions with
  ``f(0) = 0`` become the detached gate ``x * (f(x) / x)``, norm functions divide by a detached
  statistic (their centring is linear and stays).

:class:`DynamicLinear` switches a module to a subclass of its own class (weights, children and
attributes untouched) that runs the rewritten graph in explanation mode and its original
``forward`` otherwise, so training and inference cost nothing extra. :func:`linearity` reports
what a module's own code needs; the ``@nonlinear`` selector alias uses it to find the modules a
recipe should convert.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from surgery.fx import OwnCodeTracer, TraceError
from surgery.layers.explanation_mode import DetachableModule
from surgery.registry import register_layer

__all__ = ["DynamicLinear", "Linearity", "analyse", "gate_form", "linearity"]


# ---------------------------------------------------------------- what each operation is


def _names(*items: Any) -> set[Any]:
    """Functions (by identity) and method names (strings) of one category."""
    return set(items)


# results that carry no input dependence (shapes, dtypes, devices)
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
_METADATA_METHODS = {"size", "dim", "numel", "ndimension", "get_device", "is_contiguous", "is_floating_point"}

# ops that move or select values without computing: they add no depth
_STRUCTURAL = _names(
    operator.getitem, torch.flatten, torch.cat, torch.concat, torch.stack, torch.chunk, torch.split,
    torch.unbind, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.narrow, torch.movedim, torch.roll, torch.flip,
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze",
    "contiguous", "chunk", "split", "unbind", "expand", "expand_as", "to", "float", "half", "double",
    "bfloat16", "type_as", "narrow", "select", "movedim", "t", "clone", "flip", "roll", "repeat",
    "tile", "view_as", "reshape_as", "detach",
)  # fmt: skip

# a product of its tensor operands: two input-dependent factors make it degree 2
_PRODUCTS = _names(
    operator.mul, operator.imul, operator.matmul, operator.imatmul, torch.mul, torch.multiply,
    torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.outer,
    "mul", "mul_", "multiply", "matmul", "bmm", "mm", "outer",
)  # fmt: skip
_DIVISIONS = _names(operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide,
                    "div", "div_", "true_divide", "divide")  # fmt: skip
_SDPA = _names(F.scaled_dot_product_attention)

# elementwise f with f(0) = 0: on the output path they become the detached gate x * (f(x) / x)
_GATEABLE = _names(
    F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh, F.relu6, F.elu, F.selu, F.celu, F.softsign,
    F.tanhshrink, F.hardshrink, F.softshrink, torch.tanh, F.tanh, torch.erf, torch.sin, torch.square,
    torch.sqrt, torch.pow, operator.pow,
    "tanh", "erf", "sin", "square", "sqrt", "pow",
)  # fmt: skip
_CLAMPS = _names(torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
                 "clamp", "clip", "clamp_min", "clamp_max", "clamp_", "clip_")  # fmt: skip
# functions that are not dynamic linear on the output path and have no exact gate form here
_NONLINEAR = _names(
    torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax, F.softmax, torch.log_softmax, F.log_softmax,
    torch.exp, torch.log, F.softplus, F.logsigmoid, torch.rsqrt, torch.reciprocal, torch.var, torch.std,
    torch.norm, torch.linalg.vector_norm, torch.cos,
    "sigmoid", "softmax", "log_softmax", "exp", "log", "rsqrt", "reciprocal", "var", "std", "norm", "cos",
    "sigmoid_", "exp_", "rsqrt_", "sqrt_",
)  # fmt: skip
# norm functions rewritten with a detached statistic (the tracer sees them as one call)
_NORMS: dict[Any, str] = {
    F.layer_norm: "layer_norm",
    F.group_norm: "group_norm",
    F.normalize: "normalize",
    F.instance_norm: "instance_norm",
}
if hasattr(F, "rms_norm"):
    _NORMS[F.rms_norm] = "rms_norm"


def _target(node: fx.Node) -> Any:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return node.target
    return None


def _is(node: fx.Node, category: set[Any]) -> bool:
    t = _target(node)
    try:
        return t in category
    except TypeError:  # an unhashable target
        return False


# ---------------------------------------------------------------- the analysis


@dataclass
class Linearity:
    """What a module's own code needs to be dynamic linear in explanation mode.

    ``detach``: (node name, operand index) of each factor / divisor / q, k to detach; ``gates``:
    nodes rewritten as detached gates; ``norms``: norm calls rewritten with a detached statistic;
    ``unsupported``: non-linear operations left on the output path (``sigmoid(x)`` as an output,
    ``exp``...), which no rewrite here makes exact. ``needs_rewrite`` is true when the rewrite
    changes anything.
    """

    detach: list[tuple[str, int]] = field(default_factory=list)
    gates: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def needs_rewrite(self) -> bool:
        return bool(self.detach or self.gates or self.norms)


def _operands(node: fx.Node) -> list[tuple[int, Any]]:
    """The tensor operands of a product / division / attention call, with their positions."""
    args = list(node.args)
    if _target(node) is torch.einsum:
        ops = args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            return [(1000 + i, a) for i, a in enumerate(ops[0])]
        return [(i + 1, a) for i, a in enumerate(ops)]
    out = [(i, a) for i, a in enumerate(args[:2])]
    for k, pos in (("other", 1), ("query", 0), ("key", 1), ("value", 2)):
        if k in node.kwargs:
            out.append((pos, node.kwargs[k]))
    if _is(node, _SDPA):
        out = [(i, a) for i, a in enumerate(args[:3])] + [
            (p, node.kwargs[k]) for k, p in (("query", 0), ("key", 1), ("value", 2)) if k in node.kwargs
        ]
    return out


def own_class(module: nn.Module) -> type[nn.Module]:
    """The class whose ``forward`` is the module's own code (under a ``DynamicLinear[...]``, its base)."""
    cls = type(module)
    return cls.__bases__[-1] if cls in _SUBCLASSES.values() else cls


def _trace(module: nn.Module, concrete: dict[str, Any] | None = None) -> tuple[fx.Graph, dict[str, Any]]:
    """The module's own code (eval mode, buffers as graph inputs) with ``concrete`` arguments fixed
    (default: the optional arguments at their defaults)."""
    tracer = OwnCodeTracer()
    tracer.proxy_buffer_attributes = True  # running stats stay live (not frozen as constants)
    if concrete is None:
        concrete = _concrete_args(module)
    cls, training = type(module), module.training
    module.training = False  # explanation mode is an eval-mode view
    module.__class__ = own_class(module)  # trace the module's own forward, not ours
    # caches a forward fills in eval mode (EfficientViT's attention biases) would keep proxies
    containers = {
        k: copy.copy(v)
        for k, v in module.__dict__.items()
        if isinstance(v, (dict, list, set)) and not k.startswith("_")  # not torch's own registries
    }
    try:
        graph = tracer.trace(module, concrete_args=concrete or None)
    except Exception as exc:  # fx raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"{type(exc).__name__}: {first}") from None
    finally:
        module.__class__ = cls
        module.training = training
        module.__dict__.update(containers)
    return graph, concrete


def _optional_params(module: nn.Module) -> list[inspect.Parameter]:
    """Parameters after the first whose default is None or a plain value (``attn_mask=None``, flags)."""
    try:
        params = list(inspect.signature(own_class(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [
        p
        for p in params[1:]
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.default is not p.empty
        and (p.default is None or isinstance(p.default, (bool, int, float, str)))
    ]


def _concrete_args(module: nn.Module, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The optional arguments fixed for tracing: their values in ``given`` (a call's bound arguments)
    where those are None or plain values, their defaults where not given; tensors stay inputs."""
    given = given or {}
    out = {}
    for p in _optional_params(module):
        value = given.get(p.name, p.default)
        if value is None or isinstance(value, (bool, int, float, str)):
            out[p.name] = value
    return out


def _tainted(graph: fx.Graph, concrete: dict[str, Any]) -> set[fx.Node]:
    """Nodes whose value depends on the module's inputs."""
    tainted: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.target not in concrete and not str(node.target).startswith("*"):
                tainted.add(node)
            continue
        if node.op in ("get_attr", "output"):
            continue
        if node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRS:
            continue
        if node.op == "call_method" and node.target in _METADATA_METHODS:
            continue
        if any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
    return tainted


def _depth(graph: fx.Graph, tainted: set[fx.Node]) -> dict[fx.Node, int]:
    """Operations (structural ones not counted) between the input and each input-dependent node."""
    depth: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node not in tainted:
            continue
        ins = [depth[a] for a in node.all_input_nodes if a in depth]
        step = 0 if node.op == "placeholder" or _is(node, _STRUCTURAL) else 1
        depth[node] = (max(ins) if ins else 0) + step
    return depth


def _occurrences(consumer: fx.Node, producer: fx.Node) -> list[int]:
    """Direct positional/keyword positions of ``producer`` among ``consumer``'s arguments (-1: nested)."""
    pos = [i for i, a in enumerate(consumer.args) if a is producer]
    pos += [
        {"other": 1, "query": 0, "key": 1, "value": 2}.get(k, -1)
        for k, v in consumer.kwargs.items()
        if v is producer
    ]
    nested = producer in consumer.all_input_nodes and not pos
    if consumer.op == "output" or nested:
        return [-1]
    if _target(consumer) is torch.einsum:
        ops = consumer.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            return [1000 + i for i, a in enumerate(ops[0]) if a is producer]
    return pos


def _gateable(node: fx.Node) -> bool:
    if _is(node, _CLAMPS):
        lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        hi = node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
        if _target(node) in (torch.clamp_max, "clamp_max"):
            lo, hi = None, lo
        ok = all(isinstance(v, (int, float)) or v is None for v in (lo, hi))
        return ok and (lo is None or lo <= 0) and (hi is None or hi >= 0)
    if _is(node, {torch.pow, operator.pow, "pow"}):
        e = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
        return isinstance(e, (int, float)) and e > 0
    if _is(node, {F.hardtanh}):
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return lo <= 0 <= hi
    return _is(node, _GATEABLE)


def analyse(graph: fx.Graph, concrete: dict[str, Any]) -> Linearity:
    """Decide the detaches and rewrites for one traced graph (see the module docstring)."""
    out = Linearity()
    tainted = _tainted(graph, concrete)
    depth = _depth(graph, tainted)
    detached: dict[fx.Node, set[int]] = {}
    live: set[fx.Node] = set()
    nodes = list(graph.nodes)
    for node in reversed(nodes):
        if node.op == "output":
            live.add(node)
            continue
        if node not in tainted:
            continue
        for user in node.users:
            if user not in live:
                continue
            cut = detached.get(user, set())
            if any(p not in cut for p in _occurrences(user, node)):
                live.add(node)
                break
        if node not in live:
            continue
        ops = [(p, a) for p, a in _operands(node) if isinstance(a, fx.Node) and a in tainted]
        if _is(node, _PRODUCTS) and len(ops) >= 2:
            keep = min(ops, key=lambda pa: depth.get(pa[1], 0))
            cut = {p for p, a in ops if (p, a) != keep}
            detached.setdefault(node, set()).update(cut)
            out.detach += [(node.name, p) for p in sorted(cut)]
            out.reasons.append(f"{node.name}: product of two input-dependent factors")
        elif _is(node, _DIVISIONS) and any(p == 1 for p, _ in ops):
            detached.setdefault(node, set()).add(1)
            out.detach.append((node.name, 1))
            out.reasons.append(f"{node.name}: division by an input-dependent value")
        elif _is(node, _SDPA):
            cut = {p for p, _ in ops if p in (0, 1)}
            if cut:
                detached.setdefault(node, set()).update(cut)
                out.detach += [(node.name, p) for p in sorted(cut)]
                out.reasons.append(f"{node.name}: attention map")
    for node in nodes:
        if node not in live or node.op in ("placeholder", "output"):
            continue
        first = node.args[0] if node.args else None
        if not (isinstance(first, fx.Node) and first in tainted):
            continue
        if _is(node, set(_NORMS)):
            out.norms.append(node.name)
            out.reasons.append(f"{node.name}: {_NORMS[node.target]}")
        elif _gateable(node):
            out.gates.append(node.name)
            out.reasons.append(f"{node.name}: {_describe(node)} (gate detached)")
        elif _is(node, _NONLINEAR) or _is(node, _CLAMPS) or _is(node, {F.hardtanh}):
            out.unsupported.append(f"{node.name}: {_describe(node)}")
    return out


def _describe(node: fx.Node) -> str:
    t = _target(node)
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


# ---------------------------------------------------------------- explanation-mode forms


def gate_form(y_of: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``f(x)`` as ``x * g`` with ``g = f(x) / x`` detached (``g(0) = f(eps) / eps``, about ``f'(0)``).

    Exact for any elementwise ``f`` with ``f(0) = 0``: where ``x = 0`` the output is ``0 = f(0)``,
    elsewhere ``x * (f(x) / x)`` rounds to ``f(x)``.
    """
    tiny = torch.finfo(x.dtype).eps if x.is_floating_point() else 1e-6
    safe = torch.where(x == 0, torch.full_like(x, tiny), x)
    return x * (y_of(safe) / safe).detach()


def _gate_call(fn: Any, is_method: bool, rest: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor) -> Tensor:
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    if is_method:
        return gate_form(lambda t: getattr(t, fn.rstrip("_"))(*rest, **kwargs), x)
    return gate_form(lambda t: fn(t, *rest, **kwargs), x)


def _explain_layer_norm(
    x: Tensor,
    normalized_shape: Any,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = tuple(range(-len(tuple(normalized_shape) if not isinstance(normalized_shape, int) else (1,)), 0))
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps).detach()
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _explain_rms_norm(
    x: Tensor, normalized_shape: Any, weight: Tensor | None = None, eps: float | None = None
) -> Tensor:
    dims = tuple(range(-len(tuple(normalized_shape) if not isinstance(normalized_shape, int) else (1,)), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x / torch.sqrt(x.pow(2).mean(dims, keepdim=True) + eps).detach()
    return y if weight is None else y * weight


def _explain_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    var, mean = torch.var_mean(g, dim=-1, unbiased=False, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps).detach()).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    return y if bias is None else y + bias.view(shape)


def _explain_instance_norm(x: Tensor, running_mean: Any = None, running_var: Any = None, weight: Any = None,
                           bias: Any = None, use_input_stats: bool = True, momentum: float = 0.1,
                           eps: float = 1e-5) -> Tensor:  # fmt: skip
    if not use_input_stats:
        return F.instance_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    return _explain_group_norm(x, x.shape[1], weight, bias, eps)


def _explain_normalize(
    x: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: Any = None
) -> Tensor:
    return x / x.norm(p, dim, keepdim=True).clamp_min(eps).detach()


_NORM_FORMS: dict[str, Callable[..., Tensor]] = {
    "layer_norm": _explain_layer_norm,
    "rms_norm": _explain_rms_norm,
    "group_norm": _explain_group_norm,
    "instance_norm": _explain_instance_norm,
    "normalize": _explain_normalize,
}


def _rewrite(graph: fx.Graph, plan: Linearity) -> fx.Graph:
    """Apply ``plan`` to a copy of ``graph``: detach nodes, gate forms, norm forms."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    new_out = new.graph_copy(graph, env)
    new.output(new_out)
    by_name = {old.name: env[old] for old in graph.nodes if old in env}
    for name, pos in plan.detach:
        node = by_name[name]
        if pos >= 1000:
            ops = list(node.args[1])
            src = ops[pos - 1000]
            with new.inserting_before(node):
                ops[pos - 1000] = new.call_method("detach", (src,))
            node.args = (node.args[0], ops, *node.args[2:])
            continue
        kw = {1: "other", 0: "query"}.get(pos) if _is(node, _SDPA) or pos == 1 else None
        if pos < len(node.args):
            src = node.args[pos]
            with new.inserting_before(node):
                d = new.call_method("detach", (src,))
            args = list(node.args)
            args[pos] = d
            node.args = tuple(args)
        else:
            key = {0: "query", 1: "key"}.get(pos, kw) if _is(node, _SDPA) else "other"
            src = node.kwargs[key]
            with new.inserting_before(node):
                d = new.call_method("detach", (src,))
            node.kwargs = {**node.kwargs, key: d}
    for name in plan.gates:
        node = by_name[name]
        with new.inserting_before(node):
            g = new.call_function(
                _gate_call,
                (
                    node.target,
                    node.op == "call_method",
                    tuple(node.args[1:]),
                    dict(node.kwargs),
                    node.args[0],
                ),
            )
        node.replace_all_uses_with(g)
        new.erase_node(node)
    for name in plan.norms:
        node = by_name[name]
        with new.inserting_before(node):
            g = new.call_function(_NORM_FORMS[_NORMS[node.target]], tuple(node.args), dict(node.kwargs))
        node.replace_all_uses_with(g)
        new.erase_node(node)
    new.lint()
    return new


def linearity(module: nn.Module) -> Linearity:
    """What the module's own code needs to be dynamic linear (raises :class:`TraceError` if untraceable)."""
    graph, concrete = _trace(module)
    return analyse(graph, concrete)


# ---------------------------------------------------------------- the layer


@dataclass
class _Prepared:
    """One rewritten graph: for one pattern of the optional arguments (``concrete``)."""

    graph: fx.Graph
    concrete: dict[str, Any]
    constants: dict[str, Tensor]


class _SharedGraph:
    """The rewritten graphs of one module, one per pattern of optional arguments it was called with
    (Swin's window attention runs with and without a mask). Deep copies share them: graphs name
    attributes, they hold no weights."""

    def __init__(self) -> None:
        self.graphs: dict[tuple[tuple[str, Any], ...], _Prepared] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedGraph:
        return self


def _prepare(module: nn.Module, concrete: dict[str, Any] | None = None) -> _Prepared:
    """Trace, analyse and rewrite the module's own code for one pattern of optional arguments."""
    graph, concrete = _trace(module, concrete)
    rewritten = _rewrite(graph, analyse(graph, concrete))
    constants = {}
    for node in rewritten.nodes:  # tensors the tracer attached to the module while tracing
        if node.op == "get_attr" and str(node.target).startswith("_tensor_constant"):
            constants[node.target] = module.__dict__.pop(node.target)
    return _Prepared(rewritten, concrete, constants)


def _key(concrete: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, (type(v).__name__, v)) for k, v in concrete.items()))


class _Interpreter(fx.Interpreter):
    """Runs the rewritten graph on the live module (its current weights, children and buffers)."""

    def __init__(self, module: nn.Module, held: _Prepared, like: Tensor | None) -> None:
        super().__init__(module, garbage_collect_values=True, graph=held.graph)
        self.held = held
        self.like = like

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.held.constants:  # tensors the tracer created while tracing
            c = self.held.constants[target]
            return c.to(self.like.device) if self.like is not None else c
        return super().get_attr(target, args, kwargs)


_SUBCLASSES: dict[type, type] = {}


def _subclass(base: type[nn.Module]) -> type[nn.Module]:
    """``DynamicLinear[Base]``: the module's own class with the explanation-mode forward in front."""
    if base not in _SUBCLASSES:
        name = f"DynamicLinear[{base.__name__}]"
        _SUBCLASSES[base] = type(name, (DynamicLinear, base), {"__module__": __name__, "__qualname__": name})
    return _SUBCLASSES[base]


@register_layer(
    transfer="the module itself is kept (class switched in place to a subclass of its own): every weight, "
    "child and attribute unchanged; in explanation mode its own forward runs as rewritten by torch.fx"
)
class DynamicLinear(DetachableModule):
    """Any module whose own code is made dynamic linear in explanation mode (see the module docstring).

    Outside explanation mode the module's own ``forward`` runs unchanged (bit-identical, no cost).
    In explanation mode the torch.fx-rewritten graph runs: gates, attention maps and divisors
    detached, activations and norms in their detached-gate form. Children are not rewritten: each
    is converted by its own rule (or is dynamic linear already).
    """

    _explain_graph: _SharedGraph

    @classmethod
    def from_module(cls, module: nn.Module) -> nn.Module:
        """Take over ``module``: traced now (optional arguments at their defaults), so a module torch.fx
        cannot trace is an error at once; other argument patterns are traced when first explained."""
        if isinstance(module, DynamicLinear):
            return module
        if isinstance(module, DetachableModule):
            raise TypeError(f"{type(module).__name__} already has an explanation mode of its own")
        base = type(module)
        try:
            prepared = _prepare(module)
        except TraceError as exc:
            raise TypeError(
                f"DynamicLinear cannot rewrite {base.__name__}: torch.fx cannot trace its forward ({exc})"
            ) from None
        module.__class__ = _subclass(base)
        module.explanation = False
        module._explain_graph = _SharedGraph()
        module._explain_graph.graphs[_key(prepared.concrete)] = prepared
        return module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.explanation:
            return super().forward(*args, **kwargs)
        bound = inspect.signature(own_class(self).forward).bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(list(bound.arguments.items())[1:])  # without self
        concrete = _concrete_args(self, arguments)
        graphs = self._explain_graph.graphs
        if _key(concrete) not in graphs:
            graphs[_key(concrete)] = _prepare(self, concrete)
        held = graphs[_key(concrete)]
        values = []
        for name, value in arguments.items():
            param = inspect.signature(own_class(self).forward).parameters[name]
            if name in held.concrete:
                continue
            if param.kind is param.VAR_POSITIONAL:
                values.extend(value)
            elif param.kind is param.VAR_KEYWORD:
                if value:
                    raise RuntimeError(f"{type(self).__name__}: keyword arguments {sorted(value)} in explanation mode")
            else:
                values.append(value)
        like = next((v for v in _flat(values) if isinstance(v, Tensor)), None)
        return _Interpreter(self, held, like).run(*values)


def _flat(values: Iterable[Any]) -> Iterable[Any]:
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v
