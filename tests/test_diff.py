"""surgery.diff: the data model, folding, graph diffs, JSON/YAML and the plain-text rich view."""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import pytest
import yaml
from rich.console import Console
from torch import nn

import surgery
from surgery import diff
from surgery.diff import SCHEMA, clean_code, config_changes, fold_names, ranges

RECIPE = """recipe "t" v1
param b: float = 2.0
replace Conv2d except @first_conv with BcosConv2d(b=b)
replace MaxPool2d with AvgPool2d
drop bias on BatchNorm2d
rewrite call F.gelu with DetachableGELU
insert Identity before @classifier
freeze @first_conv
"""


@pytest.fixture(scope="module")
def result() -> surgery.Result:
    from cli_models import tiny_cnn

    return surgery.apply(RECIPE, tiny_cnn(), input_size=(3, 16, 16))


@pytest.fixture(scope="module")
def report(result: surgery.Result) -> diff.Report:
    return diff.compute(result.original, result.model, result.plan, before_ref="cli_models:tiny_cnn")


def by_name(report: diff.Report) -> dict[str, diff.ModuleDiff]:
    return {m.name: m for m in report.modules}


def plain(renderable: Any, width: int = 140) -> str:
    con = Console(width=width, color_system=None, force_terminal=False, record=True, file=io.StringIO())
    con.print(renderable)
    return con.export_text()


# ---------------------------------------------------------------- folding


def test_ranges() -> None:
    assert ranges([0, 1, 2]) == "0-2"
    assert ranges([3, 0, 1, 5, 6, 7]) == "0-1,3,5-7"
    assert ranges([4]) == "4"


def test_fold_names_siblings_and_keys() -> None:
    items = [(f"blocks.{i}.mlp.fc1", "A") for i in range(12)] + [("head", "A")]
    assert fold_names(items) == [("blocks.0-11.mlp.fc1", list(range(12))), ("head", [12])]
    # different keys never fold; order follows the first member
    items = [("layer1.0.conv1", "x"), ("layer1.1.conv1", "y"), ("layer1.2.conv1", "y"), ("fc", "z")]
    assert fold_names(items) == [("layer1.0.conv1", [0]), ("layer1.1-2.conv1", [1, 2]), ("fc", [3])]


def test_fold_names_picks_largest_fold_and_gaps() -> None:
    items = [("s.0.b.0", 1), ("s.0.b.1", 1), ("s.0.b.2", 1), ("s.1.b.0", 1)]
    groups = fold_names(items)
    assert groups[0] == ("s.0.b.0-2", [0, 1, 2])
    assert ("s.1.b.0", [3]) in groups
    assert fold_names([("a.0", 1), ("a.2", 1)]) == [("a.0,2", [0, 1])]
    assert fold_names([]) == []


def test_clean_code_and_config_changes() -> None:
    assert clean_code("    y = f(x);  x = None\n    return y") == "    y = f(x)\n    return y"
    assert config_changes("8, 8, kernel_size=(3, 3), b=2", "8, 8, kernel_size=(3, 3), b=1.5") == ["b=2 → 1.5"]
    assert config_changes("a=1", "a=1") == []


# ---------------------------------------------------------------- the data model


def test_modules_and_causes(report: diff.Report) -> None:
    mods = by_name(report)
    conv = mods["blocks.1.conv2"]
    assert (conv.status, conv.before, conv.after) == ("changed", "Conv2d", "BcosConv2d")
    assert [(c.line, c.action) for c in conv.causes] == [(3, "replace")]
    assert conv.causes[0].text == "replace Conv2d except @first_conv with BcosConv2d(b=b)"
    assert {p.name: (p.before, p.after) for p in conv.params} == {
        "weight": ((8, 8, 3, 3), (8, 8, 3, 3)),
        "bias": ((8,), None),
    }
    assert (conv.params_before, conv.params_after, conv.delta) == (584, 576, -8)
    assert conv.trainable is True

    bn = mods["bn1"]
    assert bn.actions == ["drop bias"] and bn.before == bn.after == "BatchNorm2d"
    assert bn.delta == -8

    frozen = mods["conv1"]
    assert frozen.actions == ["freeze"] and frozen.trainable is False and frozen.trainable_changed

    fc = mods["fc"]
    assert fc.after == "Sequential(Identity, Linear)"
    assert [(p.name, p.before, p.after) for p in fc.params] == [
        ("weight", (10, 8), (10, 8)),
        ("bias", (10,), (10,)),
    ]

    # a rewritten block does not count its children again: they are listed on their own
    block = mods["blocks.0"]
    assert block.after == "GraphModule(Block)" and block.params == [] and block.delta == 0


def test_summary(report: diff.Report, result: surgery.Result) -> None:
    s = report.summary()
    assert s["modules_changed"] == len(report.modules) == 19
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert s["params"] == {
        "before": total(result.original),
        "after": total(result.model),
        "delta": total(result.model) - total(result.original),
    }
    assert s["biases_removed"] == {"modules": 13, "params": 104}
    assert s["trainable"]["after"] == s["params"]["after"] - 224
    assert [r["modules"] for r in s["per_rule"]] == [6, 1, 7, 3, 1, 1]
    assert s["types"]["BcosConv2d"] == {"before": 0, "after": 6}
    assert s["types"]["MaxPool2d"] == {"before": 1, "after": 0}


def test_graph_diffs_for_rewrite_and_insert(report: diff.Report) -> None:
    graphs = {g.modules[0]: g for g in report.graphs}
    rewrite = graphs["blocks.0"]
    assert rewrite.modules == ["blocks.0", "blocks.1", "blocks.2"] and rewrite.label == "blocks.0-2"
    text = "\n".join(rewrite.unified())
    assert "-    gelu = torch._C._nn.gelu(bn1)" in text
    assert "+    rewritten_gelu_0 = self.rewritten_gelu_0(bn1)" in text
    assert "= None" not in text
    insert = graphs[""]
    assert any(line.startswith("+") and 'fc, "0"' in line for line in insert.unified())


def test_to_dict_json_yaml(report: diff.Report) -> None:
    d = report.to_dict()
    assert list(d) == [
        "schema", "before", "after", "recipe", "rules", "modules", "groups", "graphs", "summary", "problems",
    ]  # fmt: skip
    assert d["schema"] == SCHEMA == "surgery-diff/1"
    assert d["before"]["ref"] == "cli_models:tiny_cnn" and d["before"]["class"] == "TinyCNN"
    assert d["recipe"] == {"name": "t", "version": "v1", "file": "<recipe>", "params": {"b": 2.0}}
    assert d["rules"][0] == {
        "index": 0, "kind": "replace", "file": "<recipe>", "line": 3, "column": 1,
        "text": "replace Conv2d except @first_conv with BcosConv2d(b=b)", "optional": False,
        "matched": 6, "changed": 6,
    }  # fmt: skip
    m = next(m for m in d["modules"] if m["name"] == "blocks.0.conv1")
    assert m["type"] == {"before": "Conv2d", "after": "BcosConv2d"}
    assert m["params"] == [{"name": "weight", "before": [8, 8, 3, 3], "after": [8, 8, 3, 3]},
                           {"name": "bias", "before": [8], "after": None}]  # fmt: skip
    assert m["param_count"] == {"before": 584, "after": 576, "delta": -8}
    assert m["causes"][0]["line"] == 3 and m["trainable"] is True and m["config"]["changes"]
    assert {
        "label": "blocks.0-2.conv1",
        "count": 3,
        "modules": ["blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1"],
    } in d["groups"]
    assert d["graphs"][0]["diff"].startswith("--- blocks.0 (before)")
    assert json.loads(report.to_json()) == d
    assert yaml.safe_load(report.to_yaml()) == d


def test_strict_off_problems_are_reported() -> None:
    from cli_models import tiny_cnn

    r = surgery.apply(
        'recipe "p" v1\nreplace LayerNorm with Identity\ndrop bias on *\n', tiny_cnn(), strict=False
    )
    d = diff.compute(r.original, r.model, r.plan).to_dict()
    assert d["problems"][0]["level"] == "error" and d["problems"][0]["line"] == 2
    assert d["rules"][0]["changed"] == 0


# ---------------------------------------------------------------- structural diff (no plan)


def test_structural_diff(result: surgery.Result) -> None:
    rep = diff.compute(result.original, result.model, before_ref="a", after_ref="b")
    mods = by_name(rep)
    assert rep.rules == [] and rep.recipe is None
    assert mods["blocks.0"].before == "Block" and mods["blocks.0"].after == "GraphModule(Block)"
    assert mods["blocks.2.conv1"].after == "BcosConv2d"
    assert mods["bn1"].actions == ["params", "config"] and mods["bn1"].delta == -8
    assert mods["conv1"].actions == ["trainable"] and mods["conv1"].trainable is False
    assert mods["fc"].after == "Sequential"
    assert "fc.0" not in mods  # covered by fc, which changed type
    none = diff.compute(result.original, copy.deepcopy(result.original))
    assert none.modules == [] and none.summary()["params"]["delta"] == 0


def test_added_and_removed_modules() -> None:
    a = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    b = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    mods = by_name(diff.compute(a, b))
    assert mods["2"].status == "added" and mods["2"].params_after == 4
    mods = by_name(diff.compute(b, a))
    assert mods["2"].status == "removed" and mods["2"].delta == -4


# ---------------------------------------------------------------- rich view


def test_render_folded_and_expanded(report: diff.Report) -> None:
    text = plain(diff.renderable(report))
    assert "line 3" in text and "replace Conv2d except @first_conv with BcosConv2d(b=b)" in text
    assert "blocks.0-2.conv1" in text and "×3" in text and "Conv2d → BcosConv2d" in text
    assert "−bias 8" in text and "biases removed  13 modules, 104 parameters" in text
    assert "graph blocks.0-2" in text and "+    rewritten_gelu_0" in text
    assert "frozen" in text
    assert "\x1b[" not in text
    expanded = plain(diff.renderable(report, expand=True))
    assert "blocks.1.conv1" in expanded and "blocks.0-2.conv1" not in expanded


def test_render_structural() -> None:
    a = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    b = nn.Sequential(nn.Linear(2, 3, bias=False), nn.GELU())
    text = plain(diff.renderable(diff.compute(a, b, before_ref="A", after_ref="B")))
    assert "A → B" in text and "ReLU → GELU" in text and "−bias 3" in text


def test_freeze_stem_reports_model_level_parameters() -> None:
    """On a ViT, `freeze @stem` also freezes cls_token/pos_embed; the diff lists them as parameters."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5)
    result = surgery.apply('recipe "f" v1\nfreeze @stem\n', model, input_size=(3, 32, 32))
    assert not result.model.cls_token.requires_grad and not result.model.pos_embed.requires_grad
    assert model.cls_token.requires_grad  # the input model is untouched
    rows = by_name(diff.compute(result.original, result.model, result.plan))
    assert rows["cls_token"].before == rows["cls_token"].after == "Parameter"
    assert (rows["pos_embed"].trainable_before, rows["pos_embed"].trainable_after) == (17 * 192, 0)
    text = plain(diff.renderable(diff.compute(result.original, result.model, result.plan)))
    assert "cls_token" in text and "frozen" in text
