"""Explanations: completeness, plain-model input x gradient, rendering, grid pointing game."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from surgery.explain import Explanation, explain, grid_pointing_game, save_explanation_png
from surgery.layers import (
    BatchNormUncentered2d,
    BcosConv2d,
    BcosLinear,
    BcosPooledHead,
    BcosTokenHead,
    DetachableAttention,
    DetachableGELU,
    DetachableLayerNorm,
    LogitLayer,
)
from surgery.ops.encodings import EncodeContext, add_inverse

torch.set_num_threads(2)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def setmod(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def drop_biases(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            m.bias = None


def bcos_cnn(zero_mean: bool = False, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A bias-free B-cosified CNN (b=2) with the add_inverse encoding and a logit bias."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 12, 3, 1, 1, groups=4),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(12, 5),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    add_inverse(model, EncodeContext("0", MEAN, STD), zero_mean=zero_mean)
    model[0].conv = BcosConv2d.from_module(model[0].conv, b=2.0)
    model[4] = BcosConv2d.from_module(model[4], b=2.0)
    model[1] = BatchNormUncentered2d.from_module(model[1])
    model[5] = BatchNormUncentered2d.from_module(model[5])
    model[3] = nn.AvgPool2d(3, 2, 1)
    model[8] = BcosPooledHead.from_module(model[8], b=2.0)
    model.append(LogitLayer.from_module(model[8]))
    drop_biases(model)
    with torch.no_grad():  # keep activations O(1) through the contracting b=2 layers
        for m in (model[0].conv, model[4], model[8]):
            m.weight.mul_(4.0)
    return model.to(dtype).eval()


def bcos_vit(dtype: torch.dtype = torch.float64) -> nn.Module:
    """test_vit without class token / position embedding, B-cosified and bias-free: fully dynamic linear."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "test_vit",
        num_classes=4,
        img_size=32,
        class_token=False,
        pos_embed="none",
        global_pool="avg",
        fc_norm=False,
    )
    add_inverse(vit, EncodeContext("patch_embed.proj", (0.5,) * 3, (0.5,) * 3))
    vit.patch_embed.proj.conv = BcosConv2d.from_module(vit.patch_embed.proj.conv, b=2.0)
    for name, m in list(vit.named_modules()):
        if name.endswith(("attn.proj", "mlp.fc1", "mlp.fc2")):
            setmod(vit, name, BcosLinear.from_module(m, b=2.0))
        elif isinstance(m, nn.LayerNorm):
            setmod(vit, name, DetachableLayerNorm.from_module(m))
        elif isinstance(m, nn.GELU):
            setmod(vit, name, DetachableGELU.from_module(m))
        elif type(m).__name__ == "Attention":
            setmod(vit, name, DetachableAttention.from_module(m))
    vit.global_pool = ""
    vit.head = BcosTokenHead.from_module(vit.head, b=2.0, num_prefix_tokens=0)
    drop_biases(vit)
    return vit.to(dtype).eval()


def _assert_complete(e: Explanation, rel: float) -> None:
    logits = e.explained_logits
    total = e.contributions.flatten(1).sum(1) + e.constant + e.logit_bias
    scale = torch.maximum(logits.abs(), (logits - e.logit_bias).abs())
    assert float(((logits - total).abs() / scale).max()) <= rel
    assert float((e.residual.abs() / scale).max()) <= rel


@pytest.mark.parametrize("zero_mean", [False, True])
def test_completeness_float64(zero_mean: bool) -> None:
    model = bcos_cnn(zero_mean)
    x = torch.rand(3, 3, 20, 20, dtype=torch.float64)
    e = explain(model, x)
    assert e.inputs.shape == (3, 6, 20, 20) and e.weights.shape == (3, 6, 20, 20)
    torch.testing.assert_close(
        e.inputs[:, :3] + e.inputs[:, 3:], torch.ones(3, 3, 20, 20, dtype=torch.float64)
    )
    assert e.logit_bias == pytest.approx(-math.log(4))
    _assert_complete(e, 1e-10)
    if zero_mean:
        assert float(e.constant.abs().max()) == 0.0
    else:
        dynamic = (e.explained_logits - e.logit_bias).abs()
        assert float((e.constant.abs() / dynamic).min()) > 1e-3  # the documented constant term is real


def test_completeness_float32() -> None:
    model = bcos_cnn(dtype=torch.float32)
    e = explain(model, torch.rand(2, 3, 20, 20))
    _assert_complete(e, 1e-4)


def test_completeness_bcos_vit_float64() -> None:
    vit = bcos_vit()
    e = explain(vit, torch.rand(2, 3, 32, 32, dtype=torch.float64), target=[1, 3])
    assert e.target.tolist() == [1, 3]
    _assert_complete(e, 1e-10)


def test_explain_batch_equals_single_and_targets() -> None:
    model = bcos_cnn()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    both = explain(model, x, target=2)
    one = explain(model, x[1:], target=torch.tensor([2]))
    torch.testing.assert_close(both.weights[1:], one.weights)
    torch.testing.assert_close(both.rgba[1:], one.rgba)
    assert both.target.tolist() == [2, 2]
    pred = explain(model, x)
    assert pred.target.tolist() == pred.logits.argmax(1).tolist()
    assert not any(getattr(m, "explanation", False) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_plain_model_is_input_times_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    model.eval()
    x = torch.rand(2, 3, 12, 12)
    e = explain(model, x, target=0)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)
    torch.testing.assert_close(e.weights, g)
    torch.testing.assert_close(e.contributions, (x * g).sum(1))
    assert e.rgba.shape == (2, 12, 12, 4)
    assert float(e.rgba.min()) >= 0.0 and float(e.rgba.max()) <= 1.0


def test_rgba_colour_semantics() -> None:
    model = bcos_cnn()
    e = explain(model, torch.rand(1, 3, 24, 24, dtype=torch.float64))
    rgba = e.rgba[0]
    assert rgba.shape == (24, 24, 4)
    assert float(rgba.min()) >= 0.0 and float(rgba.max()) <= 1.0
    assert float(rgba[..., 3].max()) == pytest.approx(1.0)  # alpha clipped at the 99.5 percentile


def test_save_png(tmp_path: Path) -> None:
    model = bcos_cnn(dtype=torch.float32)
    x = torch.rand(2, 3, 20, 20)
    e = explain(model, x)
    path = save_explanation_png(tmp_path / "sub" / "e.png", x, e, index=1)
    img = np.asarray(Image.open(path))
    assert img.shape == (20, 4 * 20 + 3 * 4, 3)
    heat = img[:, -20:]
    c = e.contributions[1].numpy()
    i, j = np.unravel_index(np.argmax(c), c.shape)
    assert heat[i, j, 0] == 255 and heat[i, j, 2] < 255  # strongest positive pixel is red
    i, j = np.unravel_index(np.argmin(c), c.shape)
    if c[i, j] < 0:
        assert heat[i, j, 2] == 255 and heat[i, j, 0] < 255  # most negative pixel is blue


def test_grid_pointing_game() -> None:
    c = torch.zeros(8, 8)
    c[4:, :4] = 1.0  # bottom-left cell
    c[:4, :4] = -5.0  # negative evidence is ignored
    assert grid_pointing_game(c, (2, 2), (1, 0)) == pytest.approx(1.0)
    assert grid_pointing_game(c, (2, 2), 2) == pytest.approx(1.0)
    assert grid_pointing_game(c, (2, 2), 0) == 0.0
    assert grid_pointing_game(torch.ones(9, 9), (3, 3), 4) == pytest.approx(1 / 9)
    assert grid_pointing_game(-torch.ones(4, 4), (2, 2), 0) == 0.0
    assert grid_pointing_game(c.numpy(), (2, 2), (1, 0), smooth=3) < 1.0
    with pytest.raises(ValueError):
        grid_pointing_game(c, (2, 2), 4)


def test_grid_pointing_game_on_an_explanation() -> None:
    """Input x gradient of a positive model on a 2x2 grid with one non-black cell points at that cell."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, :16, 16:] = torch.rand(1, 3, 16, 16)
    e = explain(model.eval(), x, target=0)
    assert grid_pointing_game(e.contributions[0], (2, 2), (0, 1)) == pytest.approx(1.0)
