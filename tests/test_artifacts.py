"""Artifacts: what is written, atomically; what loading checks; every broken artifact is an ArtifactError."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest
import timm
import torch
from engine_helpers import assert_state_equal, assert_unchanged, probe, run, snapshot, tiny_net
from safetensors import safe_open
from torch import nn

import surgery
import surgery.artifacts as A
from surgery.errors import ArtifactError
from surgery.models import load_model, weights_sha256

REF = "timm:resnet18?num_classes=10"
SIZE = (3, 32, 32)
RECIPE = """recipe "art" v1
param b: float = 2.0
replace Conv2d in @stage(4) with BcosConv2d(b=b)
drop bias on @classifier
set eps = 1e-3 on BatchNorm2d
freeze @stem
"""


@pytest.fixture(scope="module")
def result() -> surgery.Result:
    return surgery.apply(RECIPE, REF, input_size=SIZE, b=1.5)


@pytest.fixture(scope="module")
def saved(result: surgery.Result, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pristine artifact; tests that break it work on a copy (``broken``)."""
    return surgery.save(result, tmp_path_factory.mktemp("art") / "resnet18-bcos")


def broken(saved: Path, tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    edit(d)
    return d


def edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        change(m)
        (d / "manifest.json").write_text(json.dumps(m))

    return edit


# ---------------------------------------------------------------- what is written


def test_files_and_manifest(result: surgery.Result, saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == sorted(A.FILES)
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary siblings left
    m = json.loads((saved / "manifest.json").read_text())
    assert m["format"] == A.FORMAT == "surgery-artifact/1"
    assert m["base"]["ref"] == REF and m["base"]["kind"] == "timm" and m["base"]["name"] == "resnet18"
    assert m["base"]["options"] == {"num_classes": 10}
    assert m["base_weights_sha256"] == weights_sha256(result.original)
    assert m["base_weights_sha256"] != weights_sha256(result.model)
    assert m["input_size"] == list(SIZE)
    assert m["model_class"] == "ResNet" and m["recipe"] == "art"
    assert m["params"] == {"b": 1.5}  # the resolved value, not the default
    v = m["versions"]
    assert v["torch"] == version("torch") and v["safetensors"] == version("safetensors")
    assert v["timm"] == timm.__version__ and v["surgery"] == surgery.__version__ and "python" in v
    assert (saved / "recipe.recipe").read_text() == RECIPE
    plan = json.loads((saved / "plan.json").read_text())
    assert [r["matched"] for r in plan["rules"]] == [s.names for s in result.plan.steps]
    assert plan["rules"][0]["args"] == {"b": 1.5}
    assert plan["sources"] == {"<recipe>": RECIPE}


def test_weights_file_is_the_model(result: surgery.Result, saved: Path) -> None:
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": A.FORMAT}
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert sorted(stored) == sorted(result.model.state_dict())
    for k, v in result.model.state_dict().items():
        assert torch.equal(stored[k], v), k


def test_save_does_not_touch_the_result(result: surgery.Result, tmp_path: Path) -> None:
    before_model, before_original = snapshot(result.model), snapshot(result.original)
    surgery.save(result, tmp_path / "again")
    assert_unchanged(result.model, before_model)
    assert_unchanged(result.original, before_original)


# ---------------------------------------------------------------- round trip


def test_load_round_trip(result: surgery.Result, saved: Path) -> None:
    again = surgery.load(saved)
    assert type(again.model) is type(result.model)
    assert_state_equal(again.model.state_dict(), result.model.state_dict())
    assert again.model.layer4[0].conv1.b == 1.5 and again.model.bn1.eps == 1e-3
    assert [n for n, p in again.model.named_parameters() if not p.requires_grad] == [
        n for n, p in result.model.named_parameters() if not p.requires_grad
    ]
    assert again.plan.recipe.params == {"b": 1.5}
    assert again.base is not None and again.base.ref == REF
    x = probe(SIZE)
    assert torch.equal(run(again.model, x), run(result.model, x))
    # an artifact is a model reference too
    model, _ = load_model(str(saved))
    assert_state_equal(model.state_dict(), result.model.state_dict())


def test_load_with_a_given_base_model(tmp_path: Path) -> None:
    """A base given as a Python object (no reference) is saved without one; load takes it back."""
    model = tiny_net(width=4)
    r = surgery.apply(
        'recipe "t" v1\nreplace MaxPool2d with AvgPool2d\nremove Dropout\n', model, input_size=(3, 16, 16)
    )
    d = surgery.save(r, tmp_path / "tiny")
    assert json.loads((d / "manifest.json").read_text())["base"] is None
    with pytest.raises(ArtifactError, match=r"pass it as load\(dir, model=\.\.\.\)"):
        surgery.load(d)
    again = surgery.load(d, model=tiny_net(width=4))
    assert_state_equal(again.model.state_dict(), r.model.state_dict())
    assert isinstance(again.model.features[3], nn.AvgPool2d)


def test_factory_base_round_trip(tmp_path: Path) -> None:
    r = surgery.apply('recipe "t" v1\nremove Dropout\n', "engine_helpers:tiny_net?width=4&input_size=3x16x16")
    d = surgery.save(r, tmp_path / "tiny")
    again = surgery.load(d)
    assert again.input_size == (3, 16, 16)
    assert_state_equal(again.model.state_dict(), r.model.state_dict())


def test_artifact_of_an_artifact(saved: Path, tmp_path: Path) -> None:
    r2 = surgery.apply('recipe "two" v1\nset momentum = 0.5 on BatchNorm2d\n', str(saved), input_size=SIZE)
    assert r2.model.bn1.eps == 1e-3  # the first recipe's edit is in the model
    d = surgery.save(r2, tmp_path / "two")
    again = surgery.load(d)
    assert again.model.bn1.eps == 1e-3 and again.model.bn1.momentum == 0.5


# ---------------------------------------------------------------- atomic writes


def test_failure_in_the_middle_leaves_nothing(
    result: surgery.Result, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = A.write_json

    def failing(path: Path, data: object) -> None:
        if path.name == "manifest.json":
            assert (path.parent / "model.safetensors").is_file()  # the weights were already written
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(A, "write_json", failing)
    with pytest.raises(OSError, match="disk full"):
        surgery.save(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_not_overwritten(
    result: surgery.Result, saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=rf"{target} already exists.*overwrite=True"):
        surgery.save(result, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    # a failed overwrite keeps the old directory
    monkeypatch.setattr(A, "write_json", lambda path, data: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        surgery.save(result, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    monkeypatch.undo()
    surgery.save(result, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(A.FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert_state_equal(surgery.load(target).model.state_dict(), result.model.state_dict())


# ---------------------------------------------------------------- broken artifacts


def test_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=rf"artifact directory not found: {tmp_path / 'nope'}"):
        surgery.load(tmp_path / "nope")


@pytest.mark.parametrize("name", A.FILES)
def test_incomplete_artifact(saved: Path, tmp_path: Path, name: str) -> None:
    d = broken(saved, tmp_path, lambda d: (d / name).unlink())
    with pytest.raises(ArtifactError, match=rf"{d} is not a complete artifact: {name} is missing"):
        surgery.load(d)


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _garbage_header(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\xff" * 64)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (_truncate, r"model\.safetensors: cannot load weights"),
        (_garbage_header, r"model\.safetensors: cannot load weights"),
        (lambda d: (d / "manifest.json").write_text('{"format": '), r"corrupt manifest or plan"),
        (lambda d: (d / "plan.json").write_text("not json"), r"corrupt manifest or plan"),
        (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe"), r"corrupt manifest or plan"),
        (edit_manifest(lambda m: m.update(format="other/9")), r"not a surgery-artifact/1 artifact"),
    ],
    ids=[
        "truncated-weights",
        "garbage-weights",
        "broken-manifest",
        "broken-plan",
        "binary-manifest",
        "format",
    ],
)
def test_corrupt_artifact(saved: Path, tmp_path: Path, edit: Callable[[Path], None], pattern: str) -> None:
    d = broken(saved, tmp_path, edit)
    with pytest.raises(ArtifactError, match=pattern) as info:
        surgery.load(d)
    assert str(d) in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: (d / "plan.json").write_text("[]"),
        edit_manifest(lambda m: m["base"].pop("ref")),
        edit_manifest(lambda m: m.update(base="timm:resnet18")),
    ],
    ids=["plan-not-an-object", "base-without-ref", "base-not-an-object"],
)
def test_malformed_artifact_is_an_artifact_error(
    saved: Path, tmp_path: Path, edit: Callable[[Path], None]
) -> None:
    d = broken(saved, tmp_path, edit)
    with pytest.raises(ArtifactError):
        surgery.load(d)


# ---------------------------------------------------------------- the base changed


def test_base_with_different_num_classes(saved: Path, tmp_path: Path) -> None:
    d = broken(saved, tmp_path, edit_manifest(lambda m: m["base"].update(ref="timm:resnet18?num_classes=5")))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: cannot load weights") as info:
        surgery.load(d)
    assert str(d) in str(info.value)
    five, _ = load_model("timm:resnet18?num_classes=5")
    with pytest.raises(ArtifactError, match=r"cannot load weights"):
        surgery.load(saved, model=five)


def test_base_with_different_architecture(saved: Path, tmp_path: Path) -> None:
    d = broken(saved, tmp_path, edit_manifest(lambda m: m["base"].update(ref="timm:resnet34?num_classes=10")))
    with pytest.raises(
        ArtifactError, match=r"base model changed since the artifact was saved: rule 0"
    ) as info:
        surgery.load(d)
    assert str(d) in str(info.value)
    gone = broken(
        saved, tmp_path / "x", edit_manifest(lambda m: m["base"].update(ref="timm:vit_tiny_patch16_224"))
    )
    with pytest.raises(ArtifactError, match=r"the saved recipe no longer applies to its base model"):
        surgery.load(gone)


def test_loading_never_calls_arbitrary_code(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = broken(
        saved,
        tmp_path,
        edit_manifest(lambda m: m["base"].update(ref=f"os:system?command=touch%20{marker}", kind="factory")),
    )
    with pytest.raises(ArtifactError):
        surgery.load(d)
    assert not marker.exists()


def test_builtin_factory_is_trusted_others_are_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """surgery's own model factory loads without trust; a user's factory still needs it."""
    monkeypatch.delenv(A.TRUST_ENV, raising=False)
    r = surgery.apply('recipe "t" v1\nremove Dropout\n', "surgery.groups.models:plain_cnn?width=4")
    again = surgery.load(surgery.save(r, tmp_path / "builtin"))
    assert_state_equal(again.model.state_dict(), r.model.state_dict())
    r = surgery.apply('recipe "t" v1\nremove Dropout\n', "engine_helpers:tiny_net?width=4&input_size=3x16x16")
    d = surgery.save(r, tmp_path / "user")
    with pytest.raises(ArtifactError, match="trust_factory=True"):
        surgery.load(d)
