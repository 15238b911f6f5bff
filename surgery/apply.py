"""Plan -> new model: the plan replayed on a copy (the input is never mutated), then verified."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery.aliases import pretrained_cfg
from surgery.errors import SurgeryError
from surgery.lang.checker import IncludeLoader
from surgery.models import BaseInfo, load_model
from surgery.ops.execute import EXECUTORS, RunState
from surgery.plan import Plan, plan
from surgery.verify import check_expectations, forward, normalise_for_original, probe_input


@dataclass
class Result:
    """What ``apply`` returns: the new model, the plan that made it, and where its base came from."""

    model: nn.Module
    plan: Plan
    base: BaseInfo | None
    original: nn.Module
    contract: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, ...] | None = None
    verified: bool = False
    base_weights_sha256: str | None = None  # known when loaded from an artifact


def input_size_of(
    model: nn.Module, base: BaseInfo | None, given: tuple[int, ...] | None
) -> tuple[int, ...] | None:
    if given:
        return tuple(given)
    if base is not None and base.input_size:
        return tuple(base.input_size)
    cfg = pretrained_cfg(model)
    return tuple(cfg["input_size"]) if cfg.get("input_size") else None


def apply(
    recipe: Any,
    model: nn.Module | str,
    *,
    params: dict[str, Any] | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    strict: bool = True,
    verify: bool = True,
    input_size: tuple[int, ...] | None = None,
    loader: IncludeLoader | None = None,
    the_plan: Plan | None = None,
    **kw_params: Any,
) -> Result:
    """Apply ``recipe`` to a copy of ``model`` (a module or a model reference such as ``timm:resnet18``).

    Recipe params come as ``params={...}`` or keyword arguments (``apply(r, m, b=1.0)``), or as
    ``--set`` strings in ``overrides``. With ``strict`` a rule that matches nothing is an error;
    otherwise a warning. ``verify`` checks every ``expect`` and runs a smoke forward pass.
    """
    base: BaseInfo | None = None
    if isinstance(model, str):
        model, base = load_model(model)
    all_params = {**(params or {}), **kw_params}
    p = the_plan or plan(recipe, model, params=all_params, overrides=overrides, loader=loader)
    if strict:
        p.raise_for_errors()
    work = copy.deepcopy(model)
    state = RunState(meta=False)
    for step in p.steps:
        if step.rule.kind.startswith("expect"):
            continue
        if not step.names and step.rule.kind != "encode":
            continue
        EXECUTORS[step.rule.kind](work, step.rule, step.names, state)
    size = input_size_of(model, base, input_size)
    result = Result(model=work, plan=p, base=base, original=model, contract=state.contract, input_size=size)
    if verify:
        run_checks(result)
    return result


def run_checks(result: Result) -> None:
    """Every ``expect`` plus the smoke forward (and the equivalence probe when the recipe asks for it)."""
    rules = result.plan.recipe.rules
    output = reference = x = None
    if result.input_size is not None:
        x = probe_input(result.input_size)
        output = forward(result.model, x, result.plan.changes, rules)
        if any(r.kind == "expect_equivalent" for r in rules):
            reference = forward(result.original, normalise_for_original(x, result.contract), [], rules)
    elif any(r.kind in ("expect_shape", "expect_equivalent", "expect_complete") for r in rules):
        raise SurgeryError("the model's input size is unknown; pass input_size (CLI: --input-size 3x224x224)")
    check_expectations(
        rules, result.model, output=output, reference=reference, probe=x, changes=result.plan.changes
    )
    result.verified = True


def function_preserved(result: Result, *, tol: float = 1e-4, seed: int = 0) -> float:
    """Largest absolute logit difference between original and converted on a probe batch."""
    if result.input_size is None:
        raise SurgeryError("the model's input size is unknown")
    x = probe_input(result.input_size, seed=seed)
    with torch.no_grad():
        a = forward(result.model, x, [], [])
        b = forward(result.original, normalise_for_original(x, result.contract), [], [])
    return (a - b).abs().max().item()
