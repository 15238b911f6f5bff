"""Model references: timm / torchvision / factories, local weight files, and the errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import TinyNet, assert_state_equal, tiny_net
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery.errors import ModelRefError
from surgery.models import load_model, load_weights_file, split_ref


def _random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with fresh random float values (so a load is visible)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        out[k] = torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v.clone()
    return out


# ---------------------------------------------------------------- options


def test_split_ref_types_values() -> None:
    head, opts = split_ref(
        "timm:vit_small_patch16_224?img_size=64&drop_rate=0.1&pretrained=false&x=none&n=abc"
    )
    assert head == "timm:vit_small_patch16_224"
    assert opts == {"img_size": 64, "drop_rate": 0.1, "pretrained": False, "x": None, "n": "abc"}
    assert type(opts["img_size"]) is int and type(opts["drop_rate"]) is float


def test_timm_with_options() -> None:
    model, base = load_model("timm:resnet18?num_classes=7&in_chans=1")
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 7
    assert model.conv1.in_channels == 1
    assert (base.kind, base.name, base.ref) == ("timm", "resnet18", "timm:resnet18?num_classes=7&in_chans=1")
    assert base.options == {"num_classes": 7, "in_chans": 1}
    assert base.input_size == (1, 224, 224)
    vit, vbase = load_model("timm:vit_small_patch16_224?img_size=64&num_classes=10")
    assert vbase.input_size == (3, 64, 64) and vit.patch_embed.img_size == (64, 64)
    with torch.no_grad():
        assert vit.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 10)


def test_timm_rejects_unknown_option() -> None:
    with pytest.raises(ModelRefError, match=r"timm:resnet18 does not accept these options.*bogus"):
        load_model("timm:resnet18?bogus=1")


def test_factory_value_error_is_a_reference_error() -> None:
    """A factory's own check of an option value is bad input (exit 2 in the CLI), not an internal error."""
    with pytest.raises(ModelRefError, match=r"plain_cnn rejects these options: input_pad must be >= 0"):
        load_model("surgery.groups.models:plain_cnn?width=4&input_pad=-1")


# ---------------------------------------------------------------- local weights


@pytest.mark.parametrize("kind", ["timm", "torchvision"])
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-wrapped"])
def test_local_weights(kind: str, fmt: str, tmp_path: Path) -> None:
    ref = f"{kind}:resnet18?num_classes=10"
    model, _ = load_model(ref)
    state = _random_state(model, seed=3)
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save({"state_dict": state} if fmt == "pt-wrapped" else state, path)
    loaded, base = load_model(f"{ref}&weights={path}")
    assert_state_equal(loaded.state_dict(), state)
    assert base.options["weights"] == str(path)
    # and through the public API: the recipe sees the loaded weights
    result = surgery.apply('recipe "w" v1\nremove MaxPool2d\n', f"{ref}&weights={path}", verify=False)
    assert torch.equal(result.model.conv1.weight, state["conv1.weight"])
    assert torch.equal(result.original.fc.bias, state["fc.bias"])


def test_torch_weights_are_loaded_without_pickle_code(tmp_path: Path) -> None:
    """``weights_only=True``: a file holding arbitrary Python objects is refused."""
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": TinyNet()}, path)  # a module object, only loadable by unpickling code
    with pytest.raises(ModelRefError, match=r"cannot read weights file .*evil\.pt"):
        load_model(f"timm:resnet18?weights={path}")
    plain = tmp_path / "plain.pt"
    torch.save({"a": 1}, plain)
    with pytest.raises(ModelRefError, match=r"does not hold a state dict of tensors"):
        load_weights_file(plain)


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    model, _ = load_model("timm:resnet18?num_classes=10")
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.raises(ModelRefError, match=r"do not fit timm:resnet18\?num_classes=5"):
        load_model(f"timm:resnet18?num_classes=5&weights={path}")


@pytest.mark.parametrize("kind", ["timm", "torchvision"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_missing_weights_file(kind: str, suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"nope{suffix}"
    with pytest.raises(ModelRefError, match=r"weights file not found: .*nope"):
        load_model(f"{kind}:resnet18?weights={path}")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_weights_file(suffix: str, tmp_path: Path) -> None:
    model, _ = load_model("timm:resnet18?num_classes=10")
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelRefError, match=r"cannot read weights file"):
        load_model(f"timm:resnet18?num_classes=10&weights={path}")
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelRefError, match=r"cannot read weights file"):
        load_model(f"timm:resnet18?num_classes=10&weights={path}")


def test_torchvision_weights_with_other_suffix(tmp_path: Path) -> None:
    with pytest.raises(ModelRefError):
        load_model(f"torchvision:resnet18?weights={tmp_path / 'w.ckpt'}")


# ---------------------------------------------------------------- factories


def test_factory_with_options() -> None:
    model, base = load_model("engine_helpers:tiny_net?width=4&num_classes=3&input_size=3x16x16")
    assert isinstance(model, TinyNet)
    assert model.head.out_features == 3 and model.features[0].out_channels == 4
    assert (base.kind, base.name) == ("factory", "engine_helpers:tiny_net")
    assert base.input_size == (3, 16, 16)
    assert_state_equal(model.state_dict(), tiny_net(width=4, num_classes=3).state_dict())  # seeded


def test_factory_with_weights(tmp_path: Path) -> None:
    state = _random_state(tiny_net(width=4), seed=5)
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    model, _ = load_model(f"engine_helpers:tiny_net?width=4&weights={path}")
    assert_state_equal(model.state_dict(), state)


@pytest.mark.parametrize(
    ("ref", "pattern"),
    [
        ("engine_helpers:tiny_nett", r"has no factory 'tiny_nett' \(did you mean 'tiny_net'\?\)"),
        ("no_such_module_xyz:make", r"cannot import 'no_such_module_xyz'"),
        ("engine_helpers:not_a_module", r"returned int, not an nn\.Module"),
        ("engine_helpers:tiny_net?depth=3", r"does not accept these options"),
    ],
)
def test_factory_errors(ref: str, pattern: str) -> None:
    with pytest.raises(ModelRefError, match=pattern):
        load_model(ref)


# ---------------------------------------------------------------- unknown names


@pytest.mark.parametrize(
    ("ref", "pattern"),
    [
        ("timm:resnet181", r"unknown timm model 'resnet181' \(did you mean 'resnet18'\?\)"),
        ("timm:vit_smal_patch16_224", r"did you mean 'vit_small_patch16_224'"),
        ("torchvision:resnt18", r"unknown torchvision model 'resnt18' \(did you mean 'resnet18'\?\)"),
        ("resnet18", r"cannot understand model reference 'resnet18'.*write timm:resnet18"),
        ("", r"empty model reference"),
        ("./no/such/dir", r"cannot understand model reference .*or an artifact directory"),
        ("./no/such:dir", r"no such artifact directory or model reference"),
    ],
)
def test_unknown_references(ref: str, pattern: str) -> None:
    with pytest.raises(ModelRefError, match=pattern):
        load_model(ref)


def test_apply_reports_bad_reference() -> None:
    with pytest.raises(ModelRefError, match="did you mean 'resnet18'"):
        surgery.apply('recipe "x" v1\nremove MaxPool2d\n', "timm:resnet1")
