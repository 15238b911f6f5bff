"""The ``surgery`` command as users run it: real processes (console script and ``python -m``).

Every process is started at once by one fixture (each pays the torch/timm import, so running them
side by side keeps the suite fast); each test then checks its own process: exit code, stdout as
parsed JSON field by field, stderr messages, and what is (not) left on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MODEL = "cli_models:tiny_cnn"
DEMO = """recipe "demo" v1
param b: float = 2.0

replace Conv2d except @first_conv with BcosConv2d(b=b)
replace MaxPool2d with AvgPool2d
drop bias on BatchNorm2d
"""


@dataclass
class Done:
    args: list[str]
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def surgery_cmd() -> list[str]:
    """The installed console script next to this interpreter (else on PATH), else ``python -m``."""
    here = Path(sys.executable).parent / "surgery"
    found = str(here) if here.exists() else shutil.which("surgery")
    return [found] if found else [sys.executable, "-m", "surgery.cli.app"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Done]:
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "demo.recipe").write_text(DEMO, encoding="utf-8")
    (tmp / "bad.recipe").write_text(
        'recipe "bad" v1\nreplace Conv2d with BcosConv2D(b=2)\n', encoding="utf-8"
    )
    (tmp / "messy.recipe").write_text(
        'recipe "m" v1\nreplace   Conv2d with BcosConv2d( b = 2 )\n', encoding="utf-8"
    )
    (tmp / "taken").mkdir()
    (tmp / "taken" / "keep.txt").write_text("mine", encoding="utf-8")
    script, module = surgery_cmd(), [sys.executable, "-m", "surgery.cli.app"]
    jobs = {
        "apply": [*module, "apply", "demo.recipe", MODEL, "-o", "art", "--format", "json", "--set", "b=1.5"],
        "plan": [*script, "plan", "demo.recipe", MODEL, "--format", "json"],
        "check_bad": [*script, "check", "demo.recipe", "bad.recipe"],
        "fmt_check": [*script, "fmt", "--check", "messy.recipe"],
        "diff": [*script, "diff", MODEL, f"{MODEL}?width=4"],
        "inspect": [*script, "inspect", MODEL, "--format", "json"],
        "ops": [*script, "ops", "--format", "yaml"],
        "taken": [*script, "apply", "demo.recipe", MODEL, "-o", "taken"],
    }
    drop = ("COLUMNS", "FORCE_COLOR", "NO_COLOR", "SURGERY_DEBUG")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    procs = {
        name: subprocess.Popen(
            args,
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        for name, args in jobs.items()
    }
    done = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        done[name] = Done(jobs[name], p.returncode, out, err)
    done["_tmp"] = Done([], 0, str(tmp), "")
    return done


def test_apply_python_m_json(runs: dict[str, Done]) -> None:
    r = runs["apply"]
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["schema"] == "surgery-diff/1" and d["artifact"] == "art" and d["verified"] is True
    assert d["recipe"] == {"name": "demo", "version": "v1", "file": "demo.recipe", "params": {"b": 1.5}}
    assert [(x["line"], x["changed"]) for x in d["rules"]] == [(4, 6), (5, 1), (6, 7)]
    assert d["summary"]["params"] == {"before": 3930, "after": 3826, "delta": -104}
    assert d["summary"]["biases_removed"] == {"modules": 13, "params": 104}
    conv = next(m for m in d["modules"] if m["name"] == "blocks.2.conv1")
    assert conv["type"] == {"before": "Conv2d", "after": "BcosConv2d"}
    assert conv["causes"][0]["line"] == 4 and conv["param_count"]["delta"] == -8
    art = Path(runs["_tmp"].stdout) / "art"
    assert (art / "model.safetensors").is_file() and (art / "manifest.json").is_file()


def test_plan_json(runs: dict[str, Done]) -> None:
    r = runs["plan"]
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["schema"] == "surgery-plan/1" and d["model_class"] == "TinyCNN" and d["params"] == {"b": 2.0}
    assert [(x["line"], x["count"]) for x in d["rules"]] == [(4, 6), (5, 1), (6, 7)]
    assert d["rules"][1]["matched"] == ["pool"] and d["problems"] == []


def test_check_reports_line_col(runs: dict[str, Done]) -> None:
    r = runs["check_bad"]
    assert r.code == 2
    assert "✓ demo.recipe" in r.stdout
    assert "bad.recipe:2:21: unknown layer 'BcosConv2D' (did you mean 'BcosConv2d'?)" in r.stderr
    assert "Traceback" not in r.stderr


def test_fmt_check(runs: dict[str, Done]) -> None:
    r = runs["fmt_check"]
    assert r.code == 1 and "would reformat messy.recipe" in r.stdout
    assert "replace   Conv2d" in (Path(runs["_tmp"].stdout) / "messy.recipe").read_text()


def test_diff_rich_piped_is_plain(runs: dict[str, Done]) -> None:
    r = runs["diff"]
    assert r.code == 0, r.stderr
    assert "\x1b[" not in r.stdout and "\x1b[" not in r.stderr  # piped: no colour codes
    assert f"{MODEL} → {MODEL}?width=4" in r.stdout
    assert "conv1" in r.stdout and "weight 8×3×3×3 → 4×3×3×3" in r.stdout
    assert "blocks.0-2.conv1  ×3" in r.stdout


def test_inspect_json(runs: dict[str, Done]) -> None:
    r = runs["inspect"]
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["model"] == MODEL and d["input_size"] == [3, 16, 16]
    assert d["aliases"]["pool"] == ["global_pool"]
    assert [m["name"] for m in d["modules"]][:3] == ["", "conv1", "bn1"]


def test_ops_yaml(runs: dict[str, Done]) -> None:
    import yaml

    r = runs["ops"]
    assert r.code == 0, r.stderr
    d = yaml.safe_load(r.stdout)
    assert d["schema"] == "surgery-ops/1"
    names = {e["name"] for e in d["layer"]}
    assert {"AvgPool2d", "Identity", "BcosConv2d", "BcosLinear", "ReLU", "GELU"} <= names


def test_user_errors_exit_2_without_traceback(runs: dict[str, Done]) -> None:
    tmp = Path(runs["_tmp"].stdout)
    r = runs["taken"]
    assert r.code == 2 and "taken already exists" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert [p.name for p in (tmp / "taken").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no temporary directories left
