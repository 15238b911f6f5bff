"""The checker's meaning of a recipe: params, overrides, lets, includes, groups, finetune blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.errors import RecipeError, SurgeryError
from surgery.lang.values import Call, Ramp

H = 'recipe "t" v1\n'


def test_params_defaults_api_and_set_overrides() -> None:
    text = H + 'param b: float = 2.0\nparam n: int = 3\nparam on: bool = false\nparam s: str = "x"\n'
    assert surgery.check(text).params == {"b": 2.0, "n": 3, "on": False, "s": "x"}
    assert surgery.check(text, params={"b": 1}).params["b"] == 1.0
    got = surgery.check(text, overrides=["b=1.5", "n=7", "on=true", "s=hello"]).params
    assert got == {"b": 1.5, "n": 7, "on": True, "s": "hello"}
    with pytest.raises(RecipeError, match="param 'n' expects int"):
        surgery.check(text, params={"n": 1.5})


def test_param_values_flow_into_layer_arguments() -> None:
    checked = surgery.check(H + "param b: float = 2.0\nreplace Conv2d with BcosConv2d(b=b * 0.5 + 1)\n")
    assert checked.rules[0].args == {"b": 2.0}
    assert checked.rules[0].entry.name == "BcosConv2d"


def test_let_names_a_selector_and_is_inlined() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    text = H + "let convs = Conv2d where kernel_size == 3\nfreeze convs\n"
    plan = surgery.plan(text, model)
    assert plan.matched() == {0: ["0"]}


def test_include_passes_params_and_splices_rules(tmp_path: Path) -> None:
    (tmp_path / "base.recipe").write_text(H + "param m: float = 0.1\nset momentum = m on BatchNorm2d\n")
    (tmp_path / "main.recipe").write_text(
        H + 'param b: float = 0.5\ninclude "base.recipe"(m=b)\nfreeze Conv2d\n'
    )
    checked = surgery.check(surgery.parse_file(tmp_path / "main.recipe"))
    assert [r.kind for r in checked.rules] == ["set", "freeze"]
    assert checked.rules[0].details["value"] == 0.5
    assert checked.rules[0].span.file.endswith("base.recipe")
    assert len(checked.sources) == 2
    with pytest.raises(RecipeError, match="has no param 'mm'") as info:
        (tmp_path / "bad.recipe").write_text(H + 'include "base.recipe"(mm=1)\n')
        surgery.check(surgery.parse_file(tmp_path / "bad.recipe"))
    assert info.value.span.line == 2


def test_finetune_block_values() -> None:
    text = H + (
        "param b: float = 2.0\nfinetune {\n  data = digits(size=32)\n  epochs = 3\n"
        "  optimizer = adamw(lr=1e-3, weight_decay=0)\n  ramp b from 1 to b over 2 epochs\n}\n"
    )
    ft = surgery.check(text).finetune
    assert ft["data"] == Call("digits", (), {"size": 32})
    assert ft["optimizer"] == Call("adamw", (), {"lr": 1e-3, "weight_decay": 0})
    assert ft["epochs"] == 3
    assert ft["ramps"] == [Ramp("b", 1.0, 2.0, 2.0)]


def test_group_block_builds_the_group_for_layers() -> None:
    text = H + "group G = SL(2) {\n  samples = 4\n}\nreplace Conv2d with GroupConv(group=G)\n"
    checked = surgery.check(text)
    assert "G" in checked.groups
    assert checked.rules[0].args["group"] is checked.groups["G"]


class CallsGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = CallsGelu()
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def test_rewrite_call_uses_fx_on_the_smallest_enclosing_module() -> None:
    model = Net()
    result = surgery.apply(H + "rewrite call F.gelu with DetachableGELU\n", model, input_size=(4,))
    assert result.plan.matched() == {0: ["block"]}
    assert type(result.model) is Net  # the model keeps its class; only `block` is a GraphModule
    assert isinstance(result.model.block, torch.fx.GraphModule)
    assert any(type(m).__name__ == "DetachableGELU" for m in result.model.block.modules())
    x = torch.randn(3, 4)
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=1e-6)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in model.modules())  # input untouched


def test_rewrite_call_that_matches_nothing_names_the_rule() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RecipeError, match=r"no module's code calls F\.gelu") as info:
        surgery.apply(H + "rewrite call F.gelu with DetachableGELU\n", model, input_size=(2,))
    assert info.value.span.line == 2


def test_failed_expectation_names_module_and_line() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(SurgeryError) as info:
        surgery.apply(H + "freeze ReLU\nexpect no Conv2d\n", model, input_size=(3, 8, 8))
    assert info.value.module == "0"
    assert info.value.span.line == 3
    assert "still match: 0 (Conv2d)" in str(info.value)


def test_broken_forward_names_module_and_rule() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(SurgeryError) as info:
        surgery.apply(H + "remove Flatten\n", model, input_size=(3, 8, 8))
    assert info.value.module == "2"
    message = str(info.value)
    assert "smoke forward pass failed in Linear" in message
    assert "changed by <recipe>:2: remove Flatten" in message


def test_conditions_select_rules_by_param() -> None:
    text = H + (
        "param keep_bias: bool = false\nparam b: float = 2.0\n"
        "drop bias on * if not keep_bias\n"
        "replace Conv2d with BcosConv2d(b=b) if b > 1 and not keep_bias\n"
        "remove ReLU if keep_bias or b == 0\n"
    )
    assert [r.kind for r in surgery.check(text).rules] == ["drop_bias", "replace"]
    assert [r.kind for r in surgery.check(text, params={"keep_bias": True}).rules] == ["remove"]
    assert [r.kind for r in surgery.check(text, overrides=["b=0"]).rules] == ["drop_bias", "remove"]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    # a rule switched off by its condition is not "unmatched": it is not part of the recipe
    assert surgery.plan(text, model, params={"keep_bias": True}).matched() == {0: ["1"]}
