"""The benchmark scripts still run: each at its smallest setting, as a subprocess, results checked.

The numbers in docs/benchmarks.md come from these scripts; a script that no longer runs (an
argument renamed in the library, a moved helper) would otherwise only be found by the next person
who tries to reproduce a table. Sizes are tiny: this checks plumbing and output files, not results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run_bench(script: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_reproduce_affine_trains_saves_and_reloads(tmp_path: Path) -> None:
    """Two models train a few steps; saved weights evaluate to the same accuracies with --load."""
    common = [
        "--models", "plain", "sl2", "--width", "4", "--samples", "2", "--batch", "16", "--steps", "3",
        "--warmup", "1", "--copies", "1", "--probes", "1", "--consistency-digits", "8", "--recal", "32",
        "--spatial-pool", "blur", "--stencil", "fit", "--max-upsample", "2", "--layer-errors", "--tag", "smoke",
        "--components", "--input-pad", "2", "--group-norm", "batch",
    ]  # fmt: skip
    out = tmp_path / "res.json"
    run_bench("reproduce_affine.py", *common, "--save", str(tmp_path / "ck"), "--json", str(out))
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"plain smoke", "sl2 smoke"}
    sl2 = rows["sl2 smoke"]
    for key in ("acc_none", "acc_mild", "acc_hard", "equivariance", "digit equivariance", "invariance"):
        assert 0.0 <= sl2[key] < 10.0, key
    layers = sl2["layer errors"]
    assert {"stem", "conv", "global_pool", "head"} <= set(layers)
    assert all(0.0 <= v < 10.0 for errs in layers.values() for v in errs.values())
    assert set(sl2["hard components"]) == {"rotation", "scale", "shear", "shift"}
    assert all(0.0 <= v <= 1.0 for v in sl2["hard components"].values())
    assert (tmp_path / "ck.sl2_smoke.safetensors").exists()
    again = tmp_path / "again.json"
    run_bench("reproduce_affine.py", *common, "--load", str(tmp_path / "ck"), "--json", str(again))
    reloaded = {r["model"]: r for r in json.loads(again.read_text())["results"]}
    for name, row in rows.items():
        assert reloaded[name]["acc_none"] == pytest.approx(row["acc_none"])


def test_equivariance_error_script(tmp_path: Path) -> None:
    out = tmp_path / "eq.json"
    run_bench(
        "equivariance_error.py", "--groups", "sl2", "--configs", "ours", "fit", "--width", "4",
        "--samples", "2", "--inr-width", "8", "--size", "24", "--batch", "1", "--threads", "1",
        "--json", str(out),
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2
    for row in results:
        errors = [v for k, v in row.items() if k.startswith("rotation") or k.startswith("shear")]
        assert errors and all(0.0 <= e < 1.0 for e in errors), row


def test_groups_speed_script(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    run_bench(
        "groups_speed.py", "--group", "sl2", "--width", "4", "--samples", "2", "--inr-width", "8",
        "--batch", "2", "--size", "16", "--steps", "1", "--rounds", "1", "--warmup", "0",
        "--threads", "1", "--stencil", "fit", "--json", str(out),
    )  # fmt: skip
    res = json.loads(out.read_text())
    assert res["median_s"] and all(t > 0 for t in res["median_s"].values())


def test_groups_dispatch_script() -> None:
    out = run_bench("groups_dispatch.py", "--width", "4", "--samples", "2")
    assert "plain" in out


def test_bcos_speed_script(tmp_path: Path) -> None:
    out = tmp_path / "bcos.json"
    run_bench(
        "bcos_speed.py", "--archs", "resnet18", "--variants", "standard", "ours", "--batch", "2",
        "--size", "32", "--rounds", "1", "--steps", "1", "--warmup", "0", "--threads", "1",
        "--no-memory", "--json", str(out),
    )  # fmt: skip
    assert out.exists() and json.loads(out.read_text())
