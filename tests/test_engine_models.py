"""The engine on real model families, with the same generic recipes across all of them.

Every expectation is derived from the model itself (counts of each type, parameter names) or
written by hand in ``engine_helpers.CASES`` (first conv, classifier, stem), never taken from
``surgery.aliases``, so the tests check the aliases instead of repeating them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import (
    CASE,
    CASES,
    ModelCase,
    assert_state_equal,
    assert_unchanged,
    built,
    count_exact,
    count_subclass,
    pristine,
    probe,
    run,
    snapshot,
    type_counts,
    under,
)
from torch import nn

import surgery
from surgery.aliases import stem_parameters

GENERIC = """recipe "generic" v1
optional replace MaxPool2d with AvgPool2d
drop bias on @classifier
optional remove Dropout
optional set eps = 1e-3 on subclass nn.BatchNorm2d
insert Identity after @first_conv
freeze @stem
optional replace GELU with GELU
"""

# Function-preserving: every rule leaves the eval-mode function exactly as it was.
PRESERVING = """recipe "preserving" v1
insert Identity after @first_conv
optional remove Dropout
freeze @stem
optional replace GELU with GELU
optional replace ReLU with ReLU
expect no Dropout
expect equivalent within 0
"""


def _params() -> list[object]:
    out = []
    for c in CASES:
        marks = [pytest.mark.slow] if c.slow else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def remap(name: str, anchor: str) -> str:
    """Where a module or state-dict name lands after ``insert X after ANCHOR`` (anchor -> anchor.0)."""
    if name == anchor or name.startswith(anchor + "."):
        return anchor + ".0" + name[len(anchor) :]
    return name


# ---------------------------------------------------------------- the generic recipe


@pytest.mark.parametrize("case", _params())
def test_generic_recipe(case: ModelCase) -> None:
    model, _ = built(case.ref)
    before = pristine(case.ref)
    counts = type_counts(model)
    # a bare type name matches by class name: `GELU` is nn.GELU and timm.layers.GELU alike
    n_max, n_drop, n_gelu = (counts[t] for t in ("MaxPool2d", "Dropout", "GELU"))
    n_bn = count_subclass(model, nn.BatchNorm2d)

    p = surgery.plan(GENERIC, model)
    assert_unchanged(model, before)
    assert p.errors == []
    matched = [len(s.names) for s in p.steps]
    assert matched == [n_max, 1, n_drop, n_bn, 1, len(case.stem), n_gelu]
    assert p.steps[1].names == [case.classifier]
    assert p.steps[4].names == [case.first_conv]
    assert p.steps[5].names == list(case.stem)
    # optional rules that match nothing are warnings, never errors
    assert len(p.warnings) == sum(n == 0 for n in (n_max, n_drop, n_bn, n_gelu))

    result = surgery.apply(GENERIC, model, input_size=case.size, the_plan=p)
    assert result.verified
    new = result.model
    assert new is not model

    # ---- module counts, exact
    after = type_counts(new)
    assert after["MaxPool2d"] == after["Dropout"] == 0
    assert count_exact(new, nn.AvgPool2d) == counts["AvgPool2d"] + n_max
    assert count_exact(new, nn.Identity) == counts["Identity"] + n_drop + 1
    assert count_exact(new, nn.Sequential) == counts["Sequential"] + 1
    assert count_exact(new, nn.GELU) == n_gelu == after["GELU"]
    assert sum(after.values()) == sum(counts.values()) + 2

    # ---- the module tree, name by name
    expected: dict[str, type] = {}
    for name, m in model.named_modules():
        t = type(m)
        t = {"MaxPool2d": nn.AvgPool2d, "Dropout": nn.Identity, "GELU": nn.GELU}.get(t.__name__, t)
        expected[remap(name, case.first_conv)] = t
    expected[case.first_conv] = nn.Sequential
    expected[case.first_conv + ".1"] = nn.Identity
    assert {n: type(m) for n, m in new.named_modules()} == expected
    old_mods = dict(model.named_modules())
    for name, m in new.named_modules():
        assert m is not old_mods.get(name), f"{name} is shared with the input model"

    # ---- weights carried over exactly, by name
    old_state = model.state_dict()
    new_state = new.state_dict()
    dropped = f"{case.classifier}.bias"
    assert dropped in old_state and getattr(new.get_submodule(case.classifier), "bias", None) is None
    assert list(new_state) == [remap(k, case.first_conv) for k in old_state if k != dropped]
    for k, v in old_state.items():
        if k != dropped:
            w = new_state[remap(k, case.first_conv)]
            assert torch.equal(w, v), k
            assert w.data_ptr() != v.data_ptr() or v.numel() == 0, f"{k} shares memory with the input"

    # ---- set eps, freeze @stem
    for name, m in new.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.eps == 1e-3, name
        elif hasattr(m, "eps"):
            assert m.eps == old_mods[name].eps, name
    stem_params = set(stem_parameters(model))  # a ViT's cls_token/pos_embed: timm's stem too
    for name, prm in new.named_parameters():
        assert prm.requires_grad == (not (under(name, case.stem) or name in stem_params)), name

    # ---- class, methods and metadata intact
    assert type(new) is type(model)
    x = probe(case.size)
    if case.timm:
        assert new.pretrained_cfg == model.pretrained_cfg
        assert new.get_classifier() is new.get_submodule(case.classifier)
        with torch.no_grad():
            feats = new.eval().forward_features(x)
            assert new.forward_head(feats).shape == (2, 10)
            new.reset_classifier(5)
            assert new.forward_head(feats).shape == (2, 5)
    else:
        assert run(new, x).shape == (2, 10)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", _params())
def test_function_preserving_recipe(case: ModelCase) -> None:
    model, _ = built(case.ref)
    before = pristine(case.ref)
    result = surgery.apply(PRESERVING, model, input_size=case.size)  # `expect equivalent within 0`
    assert_unchanged(model, before)
    x = probe(case.size, seed=1)
    want = run(model, x)
    got = run(result.model, x)
    assert torch.equal(got, want)
    assert count_exact(result.model, nn.Dropout) == 0
    assert type(result.model) is type(model)
    frozen = {n for n, p in result.model.named_parameters() if not p.requires_grad}
    stem = {n for n, _ in result.model.named_parameters() if under(n, case.stem)}
    assert frozen == stem | set(stem_parameters(model))
    assert frozen  # the stem has weights


def test_torchvision_without_aliases() -> None:
    """torchvision resnet18 with explicit selectors instead of @first_conv (works around the alias bug)."""
    case = CASE["tv-resnet18"]
    model, _ = built(case.ref)
    before = pristine(case.ref)
    recipe = """recipe "tv" v1
replace MaxPool2d with AvgPool2d
drop bias on @classifier
set eps = 1e-3 on subclass nn.BatchNorm2d
insert Identity after first Conv2d
freeze "conv1" | "bn1"
"""
    result = surgery.apply(recipe, model, input_size=case.size)
    assert_unchanged(model, before)
    new = result.model
    assert type(new) is type(model)
    assert isinstance(new.maxpool, nn.AvgPool2d) and new.fc.bias is None
    assert isinstance(new.conv1, nn.Sequential) and isinstance(new.conv1[1], nn.Identity)
    assert sum(type_counts(new).values()) == sum(type_counts(model).values()) + 2
    old = model.state_dict()
    for k, v in new.state_dict().items():
        assert torch.equal(v, old[k.replace("conv1.0.", "conv1.", 1) if k.startswith("conv1.0.") else k]), k
    assert {n for n, p in new.named_parameters() if not p.requires_grad} == {
        "conv1.0.weight",
        "bn1.weight",
        "bn1.bias",
    }


# ---------------------------------------------------------------- save -> load


@pytest.mark.parametrize("case", _params())
def test_save_load_round_trip(case: ModelCase, tmp_path: Path) -> None:
    result = surgery.apply(GENERIC, case.ref, input_size=case.size, verify=False)
    assert result.base is not None and result.base.ref == case.ref
    original = snapshot(result.original)
    out = surgery.save(result, tmp_path / "art")
    assert_unchanged(result.original, original)
    again = surgery.load(out)
    assert type(again.model) is type(result.model)
    assert_state_equal(result.model.state_dict(), again.model.state_dict())
    assert {n: p.requires_grad for n, p in again.model.named_parameters()} == {
        n: p.requires_grad for n, p in result.model.named_parameters()
    }
    assert [(n, type(m)) for n, m in again.model.named_modules()] == [
        (n, type(m)) for n, m in result.model.named_modules()
    ]
    assert again.plan.matched() == result.plan.matched()
    assert again.base is not None and again.base.ref == case.ref
    x = probe(case.size, seed=2)
    assert torch.equal(run(again.model, x), run(result.model, x))


# ---------------------------------------------------------------- B-cos style surgery keeps weights


@pytest.mark.parametrize("case", [CASE["timm-resnet18"], CASE["timm-vit_small"]], ids=lambda c: c.id)
def test_bcos_layers_at_b1_keep_function(case: ModelCase) -> None:
    """``BcosConv2d`` / ``BcosLinear`` at b=1 with the bias kept are the original layers exactly."""
    model, _ = built(case.ref)
    before = pristine(case.ref)
    recipe = """recipe "b1" v1
optional replace Conv2d with BcosConv2d(b=1, bias=true)
optional replace Linear with BcosLinear(b=1, bias=true)
expect no nn.Linear
expect equivalent within 1e-5
"""
    result = surgery.apply(recipe, model, input_size=case.size)
    assert_unchanged(model, before)
    n_conv, n_lin = count_exact(model, nn.Conv2d), count_exact(model, nn.Linear)
    assert [len(s.names) for s in result.plan.steps[:2]] == [n_conv, n_lin]
    old = model.state_dict()
    new = result.model.state_dict()
    assert list(new) == list(old)
    for k in old:
        assert torch.equal(new[k], old[k]), k
