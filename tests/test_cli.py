"""The ``surgery`` command through typer's CliRunner: outputs, JSON fields, exit codes, bad input.

Models are the tiny factory in ``tests/cli_models.py`` (``cli_models:tiny_cnn``, 3x16x16 input);
recipes are written inline into ``tmp_path``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

import surgery
from surgery.cli.app import app

MODEL = "cli_models:tiny_cnn"
DEMO = """recipe "demo" v1
param b: float = 2.0

replace Conv2d except @first_conv with BcosConv2d(b=b)
replace MaxPool2d with AvgPool2d
drop bias on BatchNorm2d
rewrite call F.gelu with DetachableGELU
"""
COMMANDS = ("apply", "plan", "check", "fmt", "diff", "inspect", "ops")


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    path = tmp_path / "demo.recipe"
    path.write_text(DEMO, encoding="utf-8")
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- help, version


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command: str) -> None:
    r = run(command, "--help")
    assert r.exit_code == 0, r.output
    assert "Examples" in r.stdout and f"surgery {command}" in r.stdout and "--debug" in r.stdout


def test_root_help_and_version() -> None:
    r = run("--help")
    assert r.exit_code == 0 and all(c in r.stdout for c in COMMANDS) and "--install-completion" in r.stdout
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("surgery 0.1.0") and "torch" in r.stdout
    assert run().exit_code in (0, 2)  # no arguments: help


# ---------------------------------------------------------------- apply


def test_apply_saves_artifact_and_reports_json(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    r = run("apply", str(demo), MODEL, "-o", str(out), "--format", "json", "--set", "b=1.5")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["schema"] == "surgery-diff/1"
    assert d["artifact"] == str(out) and d["verified"] is True and d["dry_run"] is False
    assert d["input_size"] == [3, 16, 16]
    assert d["before"] == {"ref": MODEL, "class": "TinyCNN", "params": 3930, "trainable": 3930}
    assert d["after"]["ref"] == str(out) and d["after"]["params"] == 3826
    assert d["recipe"]["name"] == "demo" and d["recipe"]["params"] == {"b": 1.5}
    assert d["recipe"]["file"] == str(demo)
    assert [(x["line"], x["kind"], x["matched"], x["changed"]) for x in d["rules"]] == [
        (4, "replace", 6, 6),
        (5, "replace", 1, 1),
        (6, "drop_bias", 7, 7),
        (7, "rewrite", 3, 3),
    ]
    pool = next(m for m in d["modules"] if m["name"] == "pool")
    assert pool["type"] == {"before": "MaxPool2d", "after": "AvgPool2d"}
    assert pool["causes"] == [
        {
            "rule": 1,
            "file": str(demo),
            "line": 5,
            "text": "replace MaxPool2d with AvgPool2d",
            "action": "replace",
        }
    ]
    assert pool["param_count"] == {"before": 0, "after": 0, "delta": 0} and pool["trainable"] is None
    assert d["summary"]["biases_removed"] == {"modules": 13, "params": 104}
    assert d["summary"]["params"] == {"before": 3930, "after": 3826, "delta": -104}
    assert [g["modules"] for g in d["graphs"]] == [["blocks.0", "blocks.1", "blocks.2"]]
    assert d["problems"] == []
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "plan.json",
        "recipe.recipe",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["ref"] == MODEL and manifest["params"] == {"b": 1.5}


def test_apply_rich_default_output_dir_and_force(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    r = run("apply", str(demo), MODEL)
    assert r.exit_code == 0, r.stderr
    target = tmp_path / "out" / "demo-tiny_cnn"
    assert (target / "model.safetensors").is_file()
    assert "blocks.0-2.conv1" in r.stdout and "×3" in r.stdout and "saved out/demo-tiny_cnn" in r.stdout
    assert "\x1b[" not in r.stdout  # no colour when not a terminal

    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    again = run("apply", str(demo), MODEL)
    assert again.exit_code == 2
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before

    forced = run("apply", str(demo), MODEL, "--force", "--set", "b=1")
    assert forced.exit_code == 0, forced.stderr
    assert json.loads((target / "manifest.json").read_text())["params"] == {"b": 1.0}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["demo-tiny_cnn"]  # no temporary dirs left


def test_apply_existing_output_untouched(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run("apply", str(demo), MODEL, "-o", str(out))
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_apply_dry_run_writes_nothing(demo: Path, tmp_path: Path) -> None:
    r = run("apply", str(demo), MODEL, "--dry-run", "-o", str(tmp_path / "x"), "--format", "yaml", "--expand")
    assert r.exit_code == 0, r.stderr
    d = yaml.safe_load(r.stdout)
    assert d["dry_run"] is True and d["artifact"] is None and d["after"]["ref"] is None
    assert not (tmp_path / "x").exists()


def test_apply_malformed_recipe(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.recipe", 'recipe "bad" v1\nreplace Conv2d with BcosConv2D(b=2)\n')
    r = run("apply", str(bad), MODEL, "-o", str(tmp_path / "o"))
    assert r.exit_code == 2
    assert f"{bad}:2:21: unknown layer 'BcosConv2D' (did you mean 'BcosConv2d'?)" in r.stderr
    assert "^^^^" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_apply_unknown_model_and_missing_recipe(demo: Path, tmp_path: Path) -> None:
    r = run("apply", str(demo), "timm:resnet1", "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "unknown timm model 'resnet1'" in r.stderr and "resnet18" in r.stderr
    r = run("apply", str(demo), "cli_models:nope", "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "has no factory 'nope'" in r.stderr
    r = run("apply", str(tmp_path / "missing.recipe"), MODEL, "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "recipe not found" in r.stderr
    r = run("apply", str(demo), MODEL, "--input-size", "3xbig")
    assert r.exit_code == 2 and "3xbig" in r.output
    r = run("apply", str(demo), MODEL, "--set", "nope=1", "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "nope" in r.stderr
    assert not (tmp_path / "o").exists()


def test_apply_unmatched_rule_strict_and_not(tmp_path: Path) -> None:
    recipe = write(
        tmp_path,
        "u.recipe",
        'recipe "u" v1\nreplace LayerNorm with Identity\nreplace MaxPool2d with AvgPool2d\n',
    )
    r = run("apply", str(recipe), MODEL, "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and f"{recipe}:2:1: rule matches no module" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run("apply", str(recipe), MODEL, "-o", str(tmp_path / "o"), "--no-strict", "-f", "json")
    assert r.exit_code == 0, r.stderr
    assert "warning:" in r.stderr
    d = json.loads(r.stdout)
    assert d["problems"][0]["level"] == "error" and d["problems"][0]["line"] == 2
    assert (tmp_path / "o" / "plan.json").is_file()


def test_apply_failed_expectation_leaves_nothing(tmp_path: Path) -> None:
    recipe = write(
        tmp_path, "e.recipe", 'recipe "e" v1\nreplace MaxPool2d with AvgPool2d\nexpect no Conv2d\n'
    )
    r = run("apply", str(recipe), MODEL, "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and ":3:" in r.stderr
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == [recipe]


def test_internal_error_exit_1_and_debug(demo: Path) -> None:
    r = run("apply", str(demo), "cli_models:broken")
    assert r.exit_code == 1
    assert "internal error: ZeroDivisionError: a bug in the model code" in r.stderr
    assert "--debug" in r.stderr and "Traceback" not in r.stderr
    r = run("apply", str(demo), "cli_models:broken", "--debug")
    assert r.exit_code == 1 and "Traceback" in r.stderr
    r = run("--debug", "apply", str(demo), "cli_models:broken")
    assert r.exit_code == 1 and "Traceback" in r.stderr


def test_apply_artifact_as_model_and_diff(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    assert run("apply", str(demo), MODEL, "-o", str(out)).exit_code == 0
    r = run("diff", MODEL, str(out), "--format", "json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["schema"] == "surgery-diff/1" and d["rules"] == [] and d["recipe"] is None
    mods = {m["name"]: m for m in d["modules"]}
    assert mods["pool"]["type"] == {"before": "MaxPool2d", "after": "AvgPool2d"}
    assert mods["blocks.0"]["type"]["after"] == "GraphModule(Block)"
    assert mods["bn1"]["actions"] == ["params", "config"] and mods["bn1"]["param_count"]["delta"] == -8
    assert d["summary"]["params"]["delta"] == -104
    rich = run("diff", MODEL, str(out))
    assert (
        rich.exit_code == 0 and "MaxPool2d → AvgPool2d" in rich.stdout and "blocks.0-2.conv1" in rich.stdout
    )
    same = run("diff", MODEL, MODEL, "-f", "json")
    assert same.exit_code == 0 and json.loads(same.stdout)["modules"] == []
    # an artifact is a MODEL like any other
    recipe = write(tmp_path, "p.recipe", 'recipe "p" v1\nreplace AvgPool2d with Identity\n')
    r = run("plan", str(recipe), str(out), "-f", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["rules"][0]["matched"] == ["pool"]
    # ... and an artifact made from an artifact reloads on top of it
    r = run("apply", str(recipe), str(out), "-o", str(tmp_path / "b"), "-f", "json")
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["base"]["kind"] == "artifact" and manifest["base"]["ref"] == str(out)
    again = surgery.load(tmp_path / "b")
    assert (
        type(again.model.pool).__name__ == "Identity"
        and type(again.model.blocks[0].conv1).__name__ == "BcosConv2d"
    )


# ---------------------------------------------------------------- plan


def test_plan_json_and_rich(tmp_path: Path) -> None:
    recipe = write(
        tmp_path,
        "p.recipe",
        'recipe "p" v1\nreplace Conv2d except @first_conv with BcosConv2d\ndrop bias on *\n'
        'remove "blocks.0.conv1"\nreplace LayerNorm with Identity\n',
    )
    r = run("plan", str(recipe), MODEL, "--format", "json")
    assert r.exit_code == 2  # an unmatched rule is an error ...
    d = json.loads(r.stdout)  # ... after the report has been printed
    assert d["schema"] == "surgery-plan/1" and d["model"] == MODEL and d["recipe"] == "p"
    rules = d["rules"]
    assert [(x["line"], x["count"]) for x in rules] == [(2, 6), (3, 9), (4, 1), (5, 0)]
    assert rules[0]["matched"][:2] == ["blocks.0.conv1", "blocks.0.conv2"]
    levels = {(p["level"], p["line"]) for p in d["problems"]}
    assert levels == {("warning", 4), ("error", 5)}  # an overlap, an unmatched rule
    assert "1 rule matches nothing" in r.stderr

    rich = run("plan", str(recipe), MODEL, "--no-strict")
    assert rich.exit_code == 0
    assert "matches nothing" in rich.stdout and "blocks.0-2.conv1 ×3" in rich.stdout
    assert "warning:" in rich.stdout and "already changed by line 2" in rich.stdout


# ---------------------------------------------------------------- check, fmt


def test_check(demo: Path, tmp_path: Path) -> None:
    r = run("check", str(demo))
    assert r.exit_code == 0 and "✓" in r.stdout and "demo v1" in r.stdout and "b=2.0" in r.stdout
    bad = write(tmp_path, "bad.recipe", 'recipe "bad" v1\nreplace Conv2d with BcosConv2d(b="two")\n')
    r = run("check", str(demo), str(bad), "--format", "json")
    assert r.exit_code == 2
    d = json.loads(r.stdout)
    assert d["schema"] == "surgery-check/1" and d["ok"] is False
    ok, err = d["results"]
    assert ok["ok"] and ok["name"] == "demo" and ok["rules"] == 4 and ok["params"] == {"b": 2.0}
    assert err["ok"] is False and err["error"]["line"] == 2 and err["error"]["file"] == str(bad)
    assert f"{bad}:2:" in r.stderr and "^" in r.stderr
    r = run("check", str(tmp_path / "nope.recipe"))
    assert r.exit_code == 2 and "recipe not found" in r.stderr


def test_fmt_check_and_in_place(tmp_path: Path) -> None:
    messy = 'recipe "m" v1\nparam   b : float=2\nreplace   Conv2d with BcosConv2d( b = b )\n'
    path = write(tmp_path, "m.recipe", messy)
    r = run("fmt", "--check", "--diff", str(path))
    assert (
        r.exit_code == 1
        and f"would reformat {path}" in r.stdout
        and "+replace Conv2d with BcosConv2d(b=b)" in r.stdout
    )
    assert path.read_text() == messy
    r = run("fmt", str(tmp_path))
    assert r.exit_code == 0 and "1 file reformatted" in r.stderr
    formatted = path.read_text()
    assert "replace Conv2d with BcosConv2d(b=b)" in formatted
    assert run("fmt", "--check", str(path)).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.recipe"]  # no temporary file left
    r = CliRunner().invoke(app, ["fmt", "-"], input=messy)
    assert r.exit_code == 0 and r.stdout == formatted


def test_fmt_errors(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.recipe", 'recipe "b" v1\nreplace Conv2d with\n')
    r = run("fmt", str(bad), str(tmp_path / "missing.recipe"))
    assert r.exit_code == 2 and f"{bad}:" in r.stderr and "cannot read" in r.stderr
    assert bad.read_text() == 'recipe "b" v1\nreplace Conv2d with\n'


# ---------------------------------------------------------------- inspect, ops


def test_inspect() -> None:
    r = run("inspect", MODEL, "--format", "json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["schema"] == "surgery-inspect/1" and d["class"] == "TinyCNN" and d["params"] == 3930
    assert d["aliases"]["first_conv"] == ["conv1"] and d["aliases"]["classifier"] == ["fc"]
    assert d["aliases"]["stage(0)"] == ["blocks.0"]
    mods = {m["name"]: m for m in d["modules"]}
    assert mods[""]["traceable"] is True and mods["blocks.1"]["traceable"] is True
    assert mods["blocks.1.conv1"]["traceable"] is None  # a torch.nn leaf: not traced on its own
    assert mods["blocks.1"]["params"] == 1200 and mods["conv1"]["aliases"] == ["first_conv", "stem"]
    rich = run("inspect", MODEL)
    assert rich.exit_code == 0
    assert "0-2 ×3  Block" in rich.stdout and "@first_conv" in rich.stdout and "fx ✓" in rich.stdout
    assert "@stage(0-2)" in rich.stdout
    shallow = run("inspect", MODEL, "--depth", "1", "--no-trace", "--expand")
    assert (
        shallow.exit_code == 0 and "submodules (--depth)" in shallow.stdout and "fx ✓" not in shallow.stdout
    )


def test_ops() -> None:
    r = run("ops", "--format", "json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["schema"] == "surgery-ops/1" and set(d) >= {"layer", "encoding", "constructor", "group"}
    bcos = next(e for e in d["layer"] if e["name"] == "BcosConv2d")
    b = next(p for p in bcos["params"] if p["name"] == "b")
    assert b == {"name": "b", "type": "float", "required": False, "default": 2.0, "default_text": "2.0"}
    assert bcos["summary"] and bcos["transfer"]
    assert "context" not in {p["name"] for e in d["layer"] for p in e["params"]}
    assert any(e["name"] == "add_inverse" for e in d["encoding"])
    rich = run("ops", "--kind", "layer")
    assert rich.exit_code == 0 and "BcosConv2d" in rich.stdout and "b: float = 2.0" in rich.stdout
    one = run("ops", "BcosLinear")
    assert one.exit_code == 0 and "weights:" in one.stdout
    r = run("ops", "BcosLiner")
    assert r.exit_code == 2 and "did you mean 'BcosLinear'" in r.stderr
