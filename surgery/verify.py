"""After apply: every ``expect`` of the recipe, and a smoke forward pass at the model's input size.

A failure names the module and the recipe line that produced it, so a broken rule is found
without bisecting the recipe by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from surgery import select as S
from surgery.errors import SurgeryError
from surgery.lang.checker import Rule
from surgery.ops.execute import Change, has_bias


def probe_input(
    input_size: tuple[int, ...], *, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A fixed batch of images in [0, 1] (the raw-image contract), reproducible across runs."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *input_size), generator=g, dtype=dtype)


def normalise_for_original(x: torch.Tensor, contract: dict[str, Any]) -> torch.Tensor:
    """What the original model sees for raw input ``x`` when the recipe moved normalisation inside."""
    mean, std = contract.get("mean"), contract.get("std")
    if contract.get("normalize_outside") is False and mean is not None and std is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - torch.tensor(mean, dtype=x.dtype).view(shape)) / torch.tensor(std, dtype=x.dtype).view(
            shape
        )
    return x


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if isinstance(out, dict) and out:
        return first_tensor(next(iter(out.values())))
    raise TypeError(f"model returned {type(out).__name__}, not a tensor")


@contextlib.contextmanager
def _tracking(model: nn.Module) -> Iterator[list[str]]:
    """Keeps the stack of modules whose forward is running, to name the one that fails."""
    stack: list[str] = []
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda _m, _i, n=name: stack.append(n)))
        handles.append(m.register_forward_hook(lambda _m, _i, _o: _pop(stack)))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _pop(stack: list[str]) -> None:
    if stack:
        stack.pop()


def _origin(model: nn.Module, name: str, changes: list[Change], rules: list[Rule]) -> str:
    """The rule that changed the failing module, or else the nearest change upstream of it."""
    relevant = [c for c in changes if c.action not in ("freeze", "unfreeze")]
    for c in reversed(relevant):
        if c.name == name or name.startswith(c.name + ".") or (c.name and c.name.startswith(name + ".")):
            rule = rules[c.rule]
            return f" (changed by {rule.span.file}:{rule.span.line}: {rule.text})"
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    upstream = [c for c in relevant if order.get(c.name, 1 << 30) < order.get(name, -1)]
    if upstream:
        c = max(upstream, key=lambda c: order[c.name])
        rule = rules[c.rule]
        return (
            f" (its input comes after '{c.name}', changed by {rule.span.file}:{rule.span.line}: {rule.text})"
        )
    return ""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def forward(model: nn.Module, x: torch.Tensor, changes: list[Change], rules: list[Rule]) -> torch.Tensor:
    """Run the model once; a failure names the innermost module and the rule that changed it."""
    with _tracking(model) as stack, torch.no_grad(), eval_mode(model):
        try:
            return first_tensor(model(x))
        except Exception as exc:
            where = stack[-1] if stack else ""
            mod = model.get_submodule(where) if where else model
            msg = f"smoke forward pass failed in {type(mod).__name__}{_origin(model, where, changes, rules)}: {exc}"
            raise SurgeryError(msg.splitlines()[0], module=where or "<model>") from exc


def _why_incomplete(module: nn.Module) -> str:
    """What the module's own code does that is not dynamic linear, as a hint."""
    from surgery.fx import TraceError
    from surgery.layers.dynamic_linear import DynamicLinear, linearity

    try:
        lin = linearity(module)
    except TraceError as exc:
        return f"torch.fx cannot trace its forward ({exc}), so it cannot be rewritten; give it an explanation-mode layer"
    if lin.unsupported:
        what = ", ".join(u.split(": ", 1)[-1] for u in lin.unsupported[:3])
        return f"its code applies {what} on the output path, which has no exact dynamic-linear form"
    if lin.needs_rewrite and not isinstance(module, DynamicLinear):
        what = "; ".join(r.split(": ", 1)[-1] for r in lin.reasons[:3])
        return f"its own code has {what}: `replace <it> with DynamicLinear` makes it dynamic linear"
    return "no explanation-mode form is registered for its class"


def check_complete(
    rule: Rule, model: nn.Module, probe: torch.Tensor, changes: list[Change], rules: list[Rule]
) -> None:
    """``expect complete``: every module that matters is dynamic linear in explanation mode (float64)."""
    from surgery.explain.completeness import calibrated_copy, check_completeness

    tol = rule.details["tolerance"]
    inputs = (probe.double(),)
    work = calibrated_copy(model, inputs)
    report = check_completeness(work, inputs, tol=tol)
    bad = report.first
    if bad is not None:
        more = f" ({len(report.culprits) - 1} more modules after it)" if len(report.culprits) > 1 else ""
        where = f"'{bad.name}'" if bad.name else "the model's own forward"
        raise SurgeryError(
            f"expectation failed: explanations are not complete: {where} ({bad.cls}) is not dynamic linear "
            f"in explanation mode: {bad.relative:.2g} of its output is unexplained{more}"
            f"{_origin(model, bad.name, changes, rules)}; {_why_incomplete(work.get_submodule(bad.name))}",
            module=bad.name or "<model>",
            span=rule.span,
        )
    if report.model > tol:
        raise SurgeryError(
            f"expectation failed: explanations are not complete: the logits differ from the sum of the "
            f"contributions by {report.model:.2g} (relative; tolerance {tol:g}) though every module passes",
            span=rule.span,
        )


def check_expectations(
    rules: list[Rule],
    model: nn.Module,
    *,
    output: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    probe: torch.Tensor | None = None,
    changes: list[Change] | None = None,
) -> None:
    """Evaluate every ``expect``; raise on the first that fails, at its recipe line."""
    ctx = S.MatchContext(model)
    for rule in rules:
        if rule.kind == "expect_none":
            hits = rule.selector.match(ctx)  # type: ignore[union-attr]
            if hits:
                shown = ", ".join(f"{n} ({type(ctx.modules[n]).__name__})" for n in hits[:5])
                more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
                raise SurgeryError(
                    f"expectation failed: {len(hits)} module(s) still match: {shown}{more}",
                    module=hits[0],
                    span=rule.span,
                )
        elif rule.kind == "expect_no_bias":
            pool = rule.selector.match(ctx) if rule.selector is not None else [n for n in ctx.modules]
            left = [n for n in pool if has_bias(ctx.modules[n])]
            if left:
                raise SurgeryError(
                    f"expectation failed: {len(left)} module(s) still have a bias: {', '.join(n or '<model>' for n in left[:5])}",
                    module=left[0] or "<model>",
                    span=rule.span,
                )
        elif rule.kind == "expect_count":
            n = len(rule.selector.match(ctx))  # type: ignore[union-attr]
            if not S.compare(n, rule.details["op"], rule.details["value"]):
                raise SurgeryError(
                    f"expectation failed: count is {n}, expected {rule.details['op']} {rule.details['value']}",
                    span=rule.span,
                )
        elif rule.kind == "expect_shape" and output is not None:
            want = rule.details["shape"]
            got = list(output.shape)
            ok = len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got, strict=True))
            if not ok:
                shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
                raise SurgeryError(
                    f"expectation failed: output shape is {got}, expected {shown}", span=rule.span
                )
        elif rule.kind == "expect_complete" and probe is not None:
            check_complete(rule, model, probe, changes or [], rules)
        elif rule.kind == "expect_equivalent" and output is not None and reference is not None:
            tol = rule.details["tolerance"]
            if output.shape != reference.shape:
                raise SurgeryError(
                    f"expectation failed: output shape {list(output.shape)} differs from the original's {list(reference.shape)}",
                    span=rule.span,
                )
            err = (output.double() - reference.double()).abs().max().item()
            scale = reference.double().abs().max().item()
            if err > tol * max(1.0, scale):
                raise SurgeryError(
                    f"expectation failed: outputs differ from the original by {err:.3g} (tolerance {tol:g}, relative to {scale:.3g})",
                    span=rule.span,
                )
