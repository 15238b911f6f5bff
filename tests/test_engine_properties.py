"""Engine properties: the input is never mutated (hypothesis), strictness, and selector semantics.

Selector expectations are hand-written selections over ``named_modules`` (what a user would write
in Python), compared with what the planner matched.
"""

from __future__ import annotations

import re

import pytest
import torch
from engine_helpers import (
    CASE,
    TINY_SIZE,
    MyConv,
    assert_unchanged,
    built,
    names_of,
    pristine,
    probe,
    run,
    snapshot,
    tiny_net,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import surgery
from surgery.errors import RecipeError, SurgeryError, UserError

R18 = CASE["timm-resnet18"].ref
VIT = CASE["timm-vit_small"].ref
EFF = CASE["timm-efficientnet_b0"].ref


def recipe(*lines: str) -> str:
    return 'recipe "t" v1\n' + "\n".join(lines) + "\n"


def selections(model: nn.Module, *selectors: str) -> list[list[str]]:
    """What each selector matches, planned as ``optional freeze SEL`` (freeze never changes the tree)."""
    p = surgery.plan(recipe(*(f"optional freeze {s}" for s in selectors)), model)
    assert [s.rule.kind for s in p.steps] == ["freeze"] * len(selectors)
    return [s.names for s in p.steps]


# ---------------------------------------------------------------- never mutated (property)

STATEMENTS = (
    "replace MaxPool2d with AvgPool2d",
    "replace ReLU with GELU",
    "replace GELU with DetachableGELU",
    "replace Conv2d with BcosConv2d(b=2)",
    "replace subclass nn.Conv2d except first Conv2d with BcosConv2d(b=1, bias=true)",
    "replace Linear with BcosLinear(b=2)",
    "replace BatchNorm2d with BatchNormUncentered2d",
    "replace BatchNorm2d with BatchNorm2d(eps=0.01)",
    "drop bias on *",
    "drop bias on Linear | BatchNorm2d",
    "remove Dropout",
    "remove BatchNorm2d in @stage(1)",
    "insert Identity after Conv2d",
    "insert Dropout(p=0.5) before @classifier",
    "set eps = 1e-3 on subclass nn.BatchNorm2d",
    "set p = 0.1 on Dropout",
    "set b = 1.5 on BcosConv2d | BcosLinear",
    "freeze first Conv2d",
    'freeze "features.*"',
    "freeze *",
    "unfreeze @classifier",
    "encode input add_inverse",
    "expect no MaxPool2d",
    "expect count Conv2d >= 1",
)


def _mutable_input(frozen_head: bool, train: bool) -> nn.Module:
    m = tiny_net(width=4)
    if frozen_head:
        m.head.weight.requires_grad_(False)
    return m.train(train)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    picks=st.lists(st.sampled_from(STATEMENTS), min_size=1, max_size=6),
    frozen_head=st.booleans(),
    train=st.booleans(),
)
def test_input_never_mutated(picks: list[str], frozen_head: bool, train: bool) -> None:
    model = _mutable_input(frozen_head, train)
    before = snapshot(model)
    text = recipe(*(f"optional {s}" if not s.startswith("expect") else s for s in picks))
    try:
        p = surgery.plan(text, model)
    except UserError:
        assert_unchanged(model, before)
        return
    assert_unchanged(model, before)
    error: Exception | None = None
    try:
        surgery.apply(text, model, input_size=TINY_SIZE, the_plan=p)
    except Exception as exc:  # checked below, after the input is checked
        error = exc
    assert_unchanged(model, before)
    assert error is None or isinstance(error, UserError), f"{type(error).__name__}: {error}"


@pytest.mark.parametrize("ref", [R18, VIT], ids=["resnet18", "vit_small"])
def test_input_never_mutated_timm(ref: str) -> None:
    """The heavy statements once each on timm models (the shared instances; see ``built``)."""
    model, _ = built(ref)
    before = pristine(ref)
    text = recipe(
        "optional encode input add_inverse",
        "optional replace Conv2d except @first_conv with BcosConv2d(b=2)",
        "optional replace BatchNorm2d with BatchNormUncentered2d",
        "optional replace Linear except @classifier with BcosLinear(b=2)",
        "optional replace GELU with DetachableGELU",
        "optional replace LayerNorm with DetachableLayerNorm",
        "optional drop bias on *",
        "freeze @stem",
        "optional set eps = 1e-3 on subclass nn.BatchNorm2d",
    )
    p = surgery.plan(text, model)
    assert_unchanged(model, before)
    size = (3, 64, 64) if ref == VIT else (3, 32, 32)
    surgery.apply(text, model, input_size=size, the_plan=p)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- strictness


def test_unmatched_rule_is_an_error_at_its_line_and_column() -> None:
    model, _ = built(R18)
    text = recipe("replace MaxPool2d with AvgPool2d", "", "  remove Dropout  # no dropout in resnet18")
    with pytest.raises(RecipeError) as info:
        surgery.apply(text, model)
    err = info.value
    assert (err.line, err.column) == (4, 3)
    assert "matches no module" in err.message and "optional" in err.message
    assert str(err).startswith("<recipe>:4:3: ")
    assert "remove Dropout" in str(err)  # the source line is shown
    # the plan records it without raising
    p = surgery.plan(text, model)
    assert [(e.level, e.rule.span.line) for e in p.problems] == [("error", 4)]
    assert p.steps[1].names == []


def test_unmatched_rule_near_hints() -> None:
    model, _ = built(R18)
    with pytest.raises(RecipeError, match=r"did you mean 'layer1\.0\.conv2'"):
        surgery.apply(recipe('remove "layer1.0.conv3"'), model)
    with pytest.raises(RecipeError, match=r"none has a bias"):
        surgery.apply(recipe("drop bias on Conv2d"), model)  # resnet convs have no bias
    with pytest.raises(RecipeError, match=r"none has an attribute 'p'"):
        surgery.apply(recipe("set p = 0.5 on Conv2d"), model)
    with pytest.raises(RecipeError, match=r"and 1 more unmatched rule"):
        surgery.apply(recipe("remove Dropout", "remove GELU"), model)


def test_optional_and_non_strict_unmatched_rules_are_warnings() -> None:
    model, _ = built(R18)
    before = pristine(R18)
    p = surgery.plan(recipe("optional remove Dropout", "remove MaxPool2d"), model)
    assert p.errors == [] and [w.rule.span.line for w in p.warnings] == [2]
    result = surgery.apply(recipe("optional remove Dropout", "remove MaxPool2d"), model, verify=False)
    assert isinstance(result.model.maxpool, nn.Identity)
    lax = surgery.apply(recipe("remove Dropout", "remove MaxPool2d"), model, strict=False, verify=False)
    assert [p.level for p in lax.plan.problems] == ["error"]
    assert isinstance(lax.model.maxpool, nn.Identity)
    assert_unchanged(model, before)


def test_overlapping_rules_give_a_warning() -> None:
    model, _ = built(R18)
    text = recipe(
        "replace Conv2d in @stage(1) with BcosConv2d(b=2)",
        'remove "layer1.0.conv1" | "layer2.0.conv1"',
        "replace MaxPool2d with AvgPool2d",
    )
    p = surgery.plan(text, model)
    assert p.errors == []
    assert len(p.warnings) == 1
    w = p.warnings[0]
    assert w.rule.span.line == 3 and "'layer1.0.conv1'" in w.message and "line 2" in w.message
    result = surgery.apply(text, model, verify=False, the_plan=p)
    assert isinstance(result.model.layer1[0].conv1, nn.Identity)  # the later rule wins
    assert type(result.model.layer1[0].conv2).__name__ == "BcosConv2d"
    # non-structural rules on the same module are not overlaps
    q = surgery.plan(
        recipe("freeze Conv2d", "set eps = 0.1 on BatchNorm2d", "drop bias on BatchNorm2d"), model
    )
    assert q.warnings == []


def test_unknown_stage_names_the_rule() -> None:
    model, _ = built(R18)
    with pytest.raises(SurgeryError, match=r"@stage\(9\) does not exist.*stages: 1, 2, 3, 4") as info:
        surgery.plan(recipe("freeze Conv2d in @stage(9)"), model)
    assert info.value.span is not None and info.value.span.line == 2


def test_plan_to_dict_lists_matched_names() -> None:
    model, _ = built(R18)
    p = surgery.plan(
        recipe("param b: float = 2.0", "replace Conv2d in @stage(4) with BcosConv2d(b=b)"), model
    )
    d = p.to_dict()
    assert d["params"] == {"b": 2.0} and d["model_class"] == "ResNet"
    (rule,) = d["rules"]
    assert rule["matched"] == p.steps[0].names and rule["count"] == 5
    assert (rule["line"], rule["column"], rule["layer"], rule["args"]) == (3, 1, "BcosConv2d", {"b": 2.0})


# ---------------------------------------------------------------- selector semantics


def _convs(m: nn.Module) -> list[str]:
    return names_of(m, lambda n, x: type(x) is nn.Conv2d)


def test_selectors_on_resnet18() -> None:
    model, _ = built(R18)
    every = names_of(model, lambda n, m: True)
    convs = _convs(model)
    downsample = [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    cases: list[tuple[str, list[str]]] = [
        ("Conv2d in @stage(2)", [n for n in convs if n.startswith("layer2.")]),
        ("first Conv2d", ["conv1"]),
        ("last Linear", ["fc"]),
        ("last Conv2d", ["layer4.1.conv2"]),
        ('"layer1.*.conv?"', [f"layer1.{i}.conv{j}" for i in (0, 1) for j in (1, 2)]),
        ('"layer1.*"', ["layer1.0", "layer1.1"]),  # `*` is one name segment
        ('"**.conv1"', [n for n in every if n == "conv1" or n.endswith(".conv1")]),
        ('"layer4.**"', [n for n in every if n.startswith("layer4.")]),  # `**` any number
        ('"layer*.0.downsample.0"', downsample),
        (r're"layer1\.\d+\.bn\d"', [f"layer1.{i}.bn{j}" for i in (0, 1) for j in (1, 2)]),
        ('re"layer1"', ["layer1"]),  # full match, not a prefix
        ("Conv2d where kernel_size == 1 and groups == 1", downsample),
        ("Conv2d where stride == 2", [n for n in convs if model.get_submodule(n).stride == (2, 2)]),
        ("Conv2d where not kernel_size == 3", ["conv1", *downsample]),
        ("Conv2d where kernel_size == 1 or kernel_size == 7", ["conv1", *downsample]),
        ("Conv2d where kernel_size == [3, 3] and kernel_size == 1", []),
        ("subclass nn.Conv2d", convs),
        ("nn.Conv2d", convs),
        ("Conv2d except @first_conv", convs[1:]),
        ('Conv2d & "layer4.**"', [n for n in convs if n.startswith("layer4.")]),
        (
            'BatchNorm2d | ReLU in "layer1"',  # `in` binds to its atom
            names_of(
                model,
                lambda n, m: (
                    isinstance(m, nn.BatchNorm2d) or (isinstance(m, nn.ReLU) and n.startswith("layer1."))
                ),
            ),
        ),
        (
            '(BatchNorm2d | ReLU) in "layer1"',
            names_of(
                model, lambda n, m: isinstance(m, (nn.BatchNorm2d, nn.ReLU)) and n.startswith("layer1.")
            ),
        ),
        ("first Conv2d in @stage(3)", ["layer3.0.conv1"]),
        (
            "Conv2d except Conv2d in @stage(4) except @first_conv",
            [n for n in convs[1:] if not n.startswith("layer4.")],
        ),
        ("*", every),
        ("@stage(2)", ["layer2.0", "layer2.1"]),
        ("@classifier | @pool", ["global_pool", "fc"]),
    ]
    got = selections(model, *(sel for sel, _ in cases))
    for (sel, want), g in zip(cases, got, strict=True):
        assert g == want, sel
    assert len(got[0]) == 5  # layer2: 2 blocks x 2 convs + the downsample conv


def test_predicate_compares_with_a_list() -> None:
    model, _ = built(R18)
    (got,) = selections(model, "Conv2d where kernel_size == [1, 1]")
    assert got == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]


def test_subclass_and_exact_types() -> None:
    model = tiny_net()
    got = selections(
        model, "Conv2d", "subclass nn.Conv2d", "MyConv", "nn.Conv2d", "subclass Conv2d", "@first_conv"
    )
    plain = ["features.0", "features.7"]
    assert got[0] == plain and got[3] == plain
    assert got[1] == got[4] == ["features.0", "features.4", "features.7"]
    assert got[2] == ["features.4"] and isinstance(model.features[4], MyConv)


def test_first_conv_heuristic_on_plain_model() -> None:
    assert selections(tiny_net(), "@first_conv") == [["features.0"]]


def test_timm_metadata_aliases() -> None:
    eff, _ = built(EFF)
    bn_sub, bn_exact = selections(eff, "subclass nn.BatchNorm2d", "BatchNorm2d")
    assert bn_sub == names_of(eff, lambda n, m: isinstance(m, nn.BatchNorm2d))
    assert bn_sub and bn_exact == []  # timm's BatchNormAct2d is a subclass, not a BatchNorm2d
    vit, _ = built(VIT)
    qkv, attn_lin, stage3, stem, first = selections(
        vit, r're"blocks\.\d+\.attn\.qkv"', 'Linear in "blocks.*.attn"', "@stage(3)", "@stem", "@first_conv"
    )
    assert qkv == [f"blocks.{i}.attn.qkv" for i in range(12)]
    assert attn_lin == [f"blocks.{i}.attn.{k}" for i in range(12) for k in ("qkv", "proj")]
    assert stage3 == ["blocks.3"] and first == ["patch_embed.proj"]
    assert stem == ["patch_embed", "norm_pre"]


def test_stage_heuristic_on_torchvision_resnet() -> None:
    model, _ = built(CASE["tv-resnet18"].ref)
    (got,) = selections(model, "Conv2d in @stage(2)")
    assert got == [n for n in _convs(model) if n.startswith("layer2.")]


def test_later_rules_see_earlier_rules() -> None:
    """Rules run in order on the planned model: a later rule matches what an earlier one built."""
    model, _ = built(R18)
    text = recipe(
        "replace Conv2d except @first_conv with BcosConv2d(b=2)",
        "set b = 1.5 on BcosConv2d in @stage(4)",
        "optional replace Conv2d with Identity",
    )
    p = surgery.plan(text, model)
    assert p.steps[0].names == _convs(model)[1:]
    assert p.steps[1].names == [n for n in _convs(model) if n.startswith("layer4.")]
    assert p.steps[2].names == ["conv1"]
    result = surgery.apply(text, model, verify=False, the_plan=p)  # no conv1: the model no longer runs
    assert result.model.layer4[0].conv1.b == 1.5 and result.model.layer3[0].conv1.b == 2.0
    assert isinstance(result.model.conv1, nn.Identity)
    assert_unchanged(model, pristine(R18))


def test_replace_keeps_frozen_weights_frozen() -> None:
    """Weights carried into a replacement keep ``requires_grad`` (freeze, or a frozen input model)."""
    model, _ = built(R18)
    text = recipe(
        "freeze @stem",
        "replace Conv2d with BcosConv2d(b=1)",
        "replace BatchNorm2d with BatchNormUncentered2d",
        "replace Linear with BcosLinear(b=1)",
    )
    result = surgery.apply(text, model, verify=False)
    frozen = {n for n, p in result.model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1.weight", "bn1.weight", "bn1.bias"}
    cold = tiny_net(width=4).requires_grad_(False)
    before = snapshot(cold)
    again = surgery.apply(text.replace("freeze @stem\n", ""), cold, verify=False)
    assert not any(p.requires_grad for p in again.model.parameters())
    assert_unchanged(cold, before)


def test_replace_norm_with_builtin_norm() -> None:
    """Built-in norm factories carry weights and stats (planning runs them on meta tensors too)."""
    model, _ = built(R18)
    result = surgery.apply(recipe("replace BatchNorm2d with BatchNorm2d(eps=0.01)"), model, verify=False)
    assert result.model.bn1.eps == 0.01
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(result.model.bn1, k), getattr(model.bn1, k)), k
    assert_unchanged(model, pristine(R18))


def test_apply_does_not_rematch() -> None:
    """``apply`` replays the plan's names: a plan made on one model drives the copy of that model."""
    model = tiny_net()
    p = surgery.plan(recipe('remove "features.1"'), model)
    p.steps[0].names = ["features.5"]  # applying uses the recorded names, not the selector
    result = surgery.apply(recipe('remove "features.1"'), model, the_plan=p, verify=False)
    assert isinstance(result.model.features[5], nn.Identity)
    assert isinstance(result.model.features[1], nn.BatchNorm2d)


def test_tiny_net_output_unchanged_by_preserving_recipe() -> None:
    model = tiny_net().eval()
    result = surgery.apply(
        recipe("remove Dropout", "insert Identity before Linear", "expect equivalent within 0"),
        model,
        input_size=TINY_SIZE,
    )
    x = probe(TINY_SIZE)
    assert torch.equal(run(result.model, x), run(model, x))
    assert re.fullmatch(r"Sequential\(Identity, Linear\)", result.plan.changes[-1].after)
