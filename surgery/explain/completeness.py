"""Completeness, measured: does a network in explanation mode compute exactly ``W(x) x + constants``?

A dynamic-linear network is linear in its input *jointly with* its additive constants (biases, the
in-model normalisation's mean, learned tokens), once the input-dependent parts of its weights are
detached. So for every module ``m`` with input ``x`` and additive constants ``c``,

    m(x) = J_x m . x + J_c m . c          (explanation mode; J the Jacobians),

and the logit is exactly the sum of the contributions of ``x`` and of each ``c``. A module for which
this fails is where completeness breaks: a gate that was not detached, an activation whose clip
is a constant nobody recorded, an attention map left in the gradient. :func:`module_residual`
measures one module (one random projection of its output: ``|<u, m(x) - J . [x, c]>| / |m(x)|``),
:func:`first_incomplete` walks the module tree from the root to the first module, in call order,
whose own code breaks it (its children all pass), so an error can name it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils import _pytree as pytree

from surgery.layers.explanation_mode import explanation_mode

__all__ = [
    "LEARNED_INPUT",
    "PROBE_RMS",
    "Completeness",
    "ModuleCheck",
    "Residual",
    "additive_constants",
    "calibrated_copy",
    "check_completeness",
    "first_incomplete",
    "generated_constants",
    "module_residual",
]

# learned inputs that ViTs add to (or concatenate with) the token stream (timm / torchvision / CLIP
# naming): position embeddings (also factorised, `pos_embed_y`, and per branch, `pos_embed_1`), class,
# register and distillation tokens
LEARNED_INPUT = re.compile(
    r"(^|\.)(\w*pos_embed\w*|\w*pos_embedding\w*|positional_embedding\w*"
    r"|(cls|class|reg|dist|register)_tokens?(_\d+)?)$"
)
# every parameter or buffer that enters a dynamic-linear network additively: the learned inputs,
# biases, BatchNorm's running mean (eval mode), FRN's TLU threshold
_ADDITIVE = re.compile(r"(^|\.)(\w*bias|running_mean|tau)$")


def additive_constants(module: nn.Module, *, recurse: bool = True) -> dict[str, Tensor]:
    """The module's additive constants by qualified name: tensors ``c`` whose share ``c . d out / d c``
    is part of the output. A module may name its own in ``explanation_constants`` (``Normalize``: the
    mean). Constants that get no gradient in explanation mode (a bias inside a detached gate) simply
    count zero. ``recurse=False``: the module's own tensors only."""
    out: dict[str, Tensor] = {}
    for mod_name, m in module.named_modules() if recurse else [("", module)]:
        own = set(getattr(type(m), "explanation_constants", ()))
        # torch's fused batch_norm has no gradient for its running mean: its share cannot be measured
        # (the check then names the BatchNorm; recipes convert it to BatchNormUncentered2d)
        fused = type(m).__module__.startswith("torch.") and isinstance(m, nn.modules.batchnorm._BatchNorm)
        for kind in (m._parameters, m._buffers):
            for n, t in kind.items():
                if t is None or not t.is_floating_point() or (fused and n == "running_mean"):
                    continue
                full = f"{mod_name}.{n}" if mod_name else n
                if n in own or _ADDITIVE.search(full) or LEARNED_INPUT.search(full):
                    out.setdefault(full, t)
    return out


def _explanation_inputs(module: nn.Module) -> list[nn.Module]:
    """Modules whose output *is* the explained input (``AddInverse``: ``[x, 1 - x]``)."""
    return [m for m in module.modules() if getattr(m, "explanation_input", False)]


def _has_float_tensor(args: Any, kwargs: Any) -> bool:
    return any(isinstance(t, Tensor) and t.is_floating_point() for t in pytree.tree_leaves((args, kwargs)))


@contextmanager
def generated_constants(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """While ``model`` runs, route every floating output of a submodule called without a floating
    tensor argument (a generated encoding: XCiT's ``PositionalEncodingFourier(B, H, W)``) through a
    leaf, collected by name (``name#k`` for its k-th call). Such an output is a constant of the
    explanation like a bias: its share is ``c . d out / d c``. That the code receiving it is linear
    in it is what the per-module check of that code proves (there it is a child's output)."""
    found: dict[str, Tensor] = {}
    names = {id(m): n for n, m in reversed(list(model.named_modules())) if n}
    running: list[bool] = []  # per running submodule: whether it generates (no floating input)

    def pre(_m: nn.Module, args: Any, kwargs: Any) -> None:
        running.append(not _has_float_tensor(args, kwargs))

    def post(m: nn.Module, _inp: Any, out: Any) -> Any:
        generates = running.pop()
        if not generates or any(running):  # only the outermost generating call
            return out
        base = names[id(m)]

        def to_leaf(t: Any) -> Any:
            if not (isinstance(t, Tensor) and t.is_floating_point()):
                return t
            leaf = t.detach().requires_grad_(True)
            k = sum(1 for n in found if n == base or n.startswith(f"{base}#"))
            found[base if k == 0 else f"{base}#{k}"] = leaf
            return leaf.clone()

        return pytree.tree_map(to_leaf, out)

    mods = [m for n, m in model.named_modules() if n]
    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in mods]
    handles += [m.register_forward_hook(post) for m in mods]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _leaves(
    module: nn.Module,
    inputs: list[Tensor],
    offsets: list[Tensor],
    children: dict[str, list[Tensor]] | None,
    cut: bool = True,
    fed: dict[str, list[Tensor]] | None = None,
) -> Iterator[None]:
    """While the module runs, route through leaves: each explanation-input module's first output
    (into ``inputs``), each fixed offset a module adds (``explanation_offset``, the LogitLayer's bias;
    into ``offsets``) and, with ``children``, every output of every submodule the module's own code
    calls (by relative name; a child, or a module inside a ModuleList the code indexes): cut from
    that submodule (``cut``), or as an added zero whose gradient tells whether it matters. With
    ``fed``, the inputs the module's own code feeds to those submodules are collected too."""
    seen: set[int] = set()
    running: list[str] = []  # submodules whose forward is running (the outermost is the one called)

    def enter(name: str) -> Any:
        def hook(_m: nn.Module, args: Any, kwargs: Any) -> None:
            if not running and fed is not None:
                for t in pytree.tree_leaves((args, kwargs)):
                    if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad:
                        fed.setdefault(name, []).append(t)
            running.append(name)

        return hook

    def encoded(m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        if id(m) in seen:
            return out
        seen.add(id(m))
        leaf = out.detach().requires_grad_(True)
        inputs.append(leaf)
        return leaf.clone()

    def offset(m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        value = m.explanation_offset
        if value is None or not isinstance(out, Tensor):
            return out
        leaf = torch.tensor(float(value), dtype=out.dtype, device=out.device, requires_grad=True)
        offsets.append(leaf)
        return (out - float(value)) + leaf

    def child_output(name: str) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
            running.pop()
            if running:  # called by another submodule, not by the module's own code
                return out

            def to_leaf(t: Any) -> Any:
                if not (isinstance(t, Tensor) and t.is_floating_point()):
                    return t
                if cut:  # the child's output as an independent input of the module's own code
                    leaf = t.detach().requires_grad_(True)
                    children.setdefault(name, []).append(leaf)  # type: ignore[union-attr]
                    return leaf.clone()  # a later in-place op must not hit the leaf
                zero = torch.zeros_like(t, requires_grad=True)  # its gradient: does the child matter?
                children.setdefault(name, []).append(zero)  # type: ignore[union-attr]
                return t + zero

            return pytree.tree_map(to_leaf, out)

        return hook

    handles = []
    if children is None:
        handles += [m.register_forward_hook(encoded) for m in _explanation_inputs(module)]
        scope = list(module.modules())
    else:
        subs = [(n, m) for n, m in module.named_modules() if n]
        handles += [m.register_forward_pre_hook(enter(n), with_kwargs=True) for n, m in subs]
        handles += [m.register_forward_hook(child_output(n)) for n, m in subs]
        scope = [module]
    handles += [m.register_forward_hook(offset) for m in scope if hasattr(type(m), "explanation_offset")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class ModuleCheck:
    """One module's own code in explanation mode (``relative``: residual / output norm)."""

    name: str
    cls: str
    relative: float

    def describe(self) -> str:
        where = f"'{self.name}'" if self.name else "the model itself"
        return f"{where} ({self.cls}) leaves {self.relative:.2g} of its output unexplained"


@dataclass
class Residual:
    """What :func:`module_residual` measured."""

    relative: float
    input_dependent: bool
    live_children: set[str]


PROBE_RMS = 3.0
"""Inputs of each module are scaled to this RMS for its check: completeness is scale free, but a
clip at 6 or a saturating gate only shows where values reach it (random-init B-cos networks shrink)."""


_MEASURABLE = 1e-200  # output norms below this (float64 underflow territory) are not measured


def _at_probe_scale(t: Tensor) -> Tensor:
    rms = t.detach().double().pow(2).mean().sqrt()
    return t * (PROBE_RMS / rms).to(t.dtype) if rms > 0 else t


def module_residual(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    own_code: bool = False,
) -> Residual:
    """Relative completeness residual of ``module(*args, **kwargs)`` in explanation mode.

    Finite floating tensors among the arguments are the inputs, the module's
    :func:`additive_constants` and offsets the constants; one backward of a random projection ``u``
    of the output gives ``|<u, out> - sum <grad, leaf>| / |out|``. With ``own_code`` only the
    module's own code is measured: its inputs are scaled to :data:`PROBE_RMS`, every output of a
    direct child is a further input, and what the own code computes is checked both where it leaves
    the module and where it enters a child; a first pass finds ``live_children``, the children whose
    outputs reach the module's output at all (one inside a detached gate does not, and what it is
    fed is not checked).
    """
    live: set[str] = set()
    if own_code:
        _, _, reach = _measure(module, args, kwargs or {}, seed=seed, own_code=True, cut=False)
        live = {n for n, grads in reach.items() if any(g is not None for g in grads)}
    relative, dependent, _ = _measure(
        module, args, kwargs or {}, seed=seed, own_code=own_code, cut=True, live=live
    )
    return Residual(relative, dependent, live)


def _measure(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    seed: int,
    own_code: bool,
    cut: bool,
    live: set[str] | None = None,
) -> tuple[float, bool, dict[str, list[Tensor | None]]]:
    """One forward and backward of :func:`module_residual`: (relative residual, input dependent,
    the gradients reaching each child's outputs)."""
    flat, spec = pytree.tree_flatten((args, kwargs))

    def leaf(t: Any) -> Any:
        if not (isinstance(t, Tensor) and t.is_floating_point() and bool(torch.isfinite(t).all())):
            return t
        t = t.detach()
        return (_at_probe_scale(t) if own_code else t).clone().requires_grad_(True)

    leaves = [leaf(t) for t in flat]
    inputs = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
    call_args, call_kwargs = pytree.tree_unflatten(
        [t.clone() if isinstance(t, Tensor) and t.requires_grad else t for t in leaves], spec
    )
    constants = additive_constants(module, recurse=not own_code)
    frozen = [c for c in constants.values() if not c.requires_grad]
    for c in frozen:
        c.requires_grad_(True)
    encoded: list[Tensor] = []
    offsets: list[Tensor] = []
    children: dict[str, list[Tensor]] | None = {} if own_code else None
    fed: dict[str, list[Tensor]] | None = {} if own_code and cut else None
    try:
        with (
            torch.enable_grad(),
            explanation_mode(module),
            _leaves(module, encoded, offsets, children, cut, fed),
            generated_constants(module) if children is None else nullcontext({}) as generated,
        ):
            out = module(*call_args, **call_kwargs)
            outs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]
            outs += [t for n, ts in (fed or {}).items() if n in (live or ()) for t in ts]
            if not outs or not any(o.requires_grad for o in outs):
                return 0.0, False, {}
            g = torch.Generator().manual_seed(seed)
            total = sum(
                (torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) * o).sum()
                for o in outs
            )
            child_leaves = [(n, t) for n, ts in (children or {}).items() for t in ts]
            wrt = inputs + encoded + [t for _, t in child_leaves] + list(constants.values()) + offsets
            wrt += list(generated.values())
            grads = torch.autograd.grad(total, wrt, allow_unused=True)
    finally:
        for c in frozen:
            c.requires_grad_(False)
    n_in = len(inputs) + len(encoded)
    reach: dict[str, list[Tensor | None]] = {}
    for (n, _), gr in zip(child_leaves, grads[n_in : n_in + len(child_leaves)], strict=True):
        reach.setdefault(n, []).append(gr)
    explained = sum(
        ((gr * t.detach()).sum() for gr, t in zip(grads, wrt, strict=True) if gr is not None),
        torch.zeros((), dtype=total.dtype),
    )
    residual = float(abs(total.detach() - explained))
    norm = float(torch.sqrt(sum(o.detach().double().pow(2).sum() for o in outs)))
    dependent = any(gr is not None and bool(gr.abs().max() > 0) for gr in grads[:n_in])
    if norm < _MEASURABLE:  # an output that underflowed: nothing to measure
        return 0.0, dependent, reach
    return residual / norm, dependent, reach


Calls = dict[str, tuple[int, tuple[Any, ...], dict[str, Any]]]


def _record_calls(model: nn.Module, inputs: tuple[Any, ...]) -> Calls:
    """Each module's first call in explanation mode: (call order, args, kwargs), inputs cloned."""
    calls: Calls = {}
    handles = []

    def clone(v: Any) -> Any:
        return v.detach().clone() if isinstance(v, Tensor) else v

    def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = names[id(m)]
        if name not in calls:
            calls[name] = (len(calls), pytree.tree_map(clone, args), pytree.tree_map(clone, kwargs))

    names = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name)
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad(), explanation_mode(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


@dataclass
class Completeness:
    """Completeness of a whole model in explanation mode, proven module by module.

    A network is complete when the own code of every module that matters is dynamic linear in its
    inputs and its children's outputs: then, by the chain rule, so is the whole. ``model``: the
    relative residual of the whole model on the probe; ``culprits``: modules whose own code breaks
    completeness and whose output reaches the model's output with a gradient, in call order;
    ``worst``: their largest residual (0 when there are none); ``input_dependent``: whether the
    model's output depends on its input at all; ``checked``: how many modules ran and were checked.
    """

    model: float
    worst: float
    culprits: list[ModuleCheck]
    input_dependent: bool
    checked: int

    @property
    def first(self) -> ModuleCheck | None:
        return self.culprits[0] if self.culprits else None


def calibrated_copy(
    model: nn.Module, inputs: tuple[Any, ...], dtype: torch.dtype = torch.float64
) -> nn.Module:
    """A ``dtype`` copy of ``model`` in eval mode whose BatchNorm statistics are re-estimated on
    ``inputs``, so that activations keep their scale through the network.

    A random-init B-cos network at ``b = 2`` shrinks every activation by the layer's ``|cos|``
    (about 1/sqrt(fan-in)), and BatchNorm in eval mode with fresh statistics does not undo it: deep
    ones underflow to exactly zero even in float64, and nothing can be measured. Completeness is a
    property of the structure, not of the statistics, so it is checked on this copy; the model
    itself is not touched.
    """
    work = copy.deepcopy(model).to(dtype).eval()
    norms = [m for m in work.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration passes
            m.train()
        with torch.no_grad():
            work(*[t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs])
        work.eval()
    return work


def check_completeness(model: nn.Module, inputs: tuple[Any, ...], *, tol: float = 1e-6) -> Completeness:
    """Check the own code of every module that runs (see :class:`Completeness`); ``tol`` is relative."""
    calls = _record_calls(model, inputs)
    modules = dict(model.named_modules())
    live = {""}
    culprits = []
    for name in sorted(calls, key=lambda n: calls[n][0]):
        if name not in live:
            continue  # inside a detached gate, or called by a module that is not live
        m = modules[name]
        _, args, kwargs = calls[name]
        if getattr(m, "explanation_input", False) or (name and not _has_float_tensor(args, kwargs)):
            continue  # the explained input itself, or a generated constant (see generated_constants)
        r = module_residual(m, args, kwargs, own_code=True)
        prefix = f"{name}." if name else ""
        live |= {prefix + c for c in r.live_children}
        if r.relative > tol:
            culprits.append(ModuleCheck(name, type(m).__name__, r.relative))
    whole = module_residual(model, inputs)
    worst = max((c.relative for c in culprits), default=0.0)
    checked = sum(1 for n in calls if n in live)
    return Completeness(whole.relative, worst, culprits, whole.input_dependent, checked)


def first_incomplete(model: nn.Module, inputs: tuple[Any, ...], *, tol: float = 1e-6) -> ModuleCheck | None:
    """The first module, in call order, whose own code breaks completeness (None: complete)."""
    return check_completeness(model, inputs, tol=tol).first
