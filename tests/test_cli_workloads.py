"""``surgery finetune``, ``eval`` and ``explain`` through the CLI, on a tiny model and built-in data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from surgery.cli.app import app

RECIPE = """recipe "tiny-bcos" v1
param b: float = 2.0
encode input add_inverse
replace Conv2d with BcosConv2d(b=b)
replace BatchNorm2d with BatchNormUncentered2d
replace MaxPool2d with AvgPool2d
replace @pool with Identity
replace @classifier with BcosPooledHead(b=b)
optional remove Flatten
drop bias on *
finetune {
  data = digits(size=16)
  epochs = 1
  batch_size = 64
  optimizer = adamw(lr=3e-3)
}
"""
MODEL = "tiny_models:tiny_cnn?num_classes=10&input_size=3x16x16&width=16"
runner = CliRunner()


def _artifact(tmp_path: Path) -> Path:
    torch.manual_seed(0)  # the base model's init: not left to whatever ran before
    (tmp_path / "r.recipe").write_text(RECIPE)
    out = tmp_path / "art"
    res = runner.invoke(app, ["apply", str(tmp_path / "r.recipe"), MODEL, "-o", str(out), "-f", "json"])
    assert res.exit_code == 0, res.output
    return out


def test_finetune_eval_explain(tmp_path: Path) -> None:
    art = _artifact(tmp_path)
    tuned = tmp_path / "tuned"
    res = runner.invoke(
        app, ["finetune", str(art), "-o", str(tuned), "--epochs", "3", "--lr", "1e-2", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert (tuned / "model.safetensors").is_file()
    assert (tmp_path / "tuned.run" / "metrics.jsonl").is_file()

    res = runner.invoke(app, ["eval", str(tuned), "--data", "digits(size=16)", "-f", "json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)["metrics"]
    assert 0.2 < metrics["accuracy"] <= 1.0

    img = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8")).save(img)
    res = runner.invoke(app, ["explain", str(tuned), str(img), "-o", str(tmp_path / "exp"), "--target", "3"])
    assert res.exit_code == 0, res.output
    png = tmp_path / "exp" / "digit-explanation.png"
    assert png.is_file()
    assert Image.open(png).size[0] >= 3 * 16  # image | explanations | contributions side by side
    assert "class 3" in res.stdout


def test_bad_inputs_exit_2(tmp_path: Path) -> None:
    art = _artifact(tmp_path)
    res = runner.invoke(app, ["finetune", str(art), "-o", str(art)])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["finetune", str(art), "-o", str(tmp_path / "x"), "--data", "nodata(size=3)"])
    assert res.exit_code == 2 and "nodata" in res.output
    assert not (tmp_path / "x").exists()
    res = runner.invoke(app, ["explain", str(art), str(tmp_path / "missing.png"), "-o", str(tmp_path / "e")])
    assert res.exit_code == 2 and "image not found" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--data", "digits"])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(app, ["eval", str(art), "--data", "digits", "--device", "gpu9"])
    assert res.exit_code == 2 and "--device gpu9" in res.output


def test_demo_runs_end_to_end_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """The README's main job, at a tiny size: every stage writes what it promises."""
    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "--model", "resnet10t", "--epochs", "1", "--size", "16", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "demo.json").read_text())
    for key in ("accuracy_standard", "accuracy_after_surgery", "accuracy_bcos_finetuned"):
        assert 0.0 <= summary[key] <= 1.0
    assert (out / "bcos" / "manifest.json").is_file() and (out / "bcos-finetuned" / "manifest.json").is_file()
    pngs = sorted((out / "explanations").glob("*.png"))
    assert len(pngs) == 4 and all(Image.open(p).size[0] > 4 * 16 for p in pngs)
    assert "BcosConv2d" in res.output  # the structural diff was shown

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
