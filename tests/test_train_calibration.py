"""BatchNorm recalibration on the deployed sample set for group networks trained with redrawn samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from surgery.groups import plain_cnn
from surgery.lang.values import Call
from surgery.train import FinetuneConfig, finetune, read_metrics
from surgery.train import loop as loop_mod
from surgery.train.calibration import recalibrate_batchnorm, recalibration_batches, redrawing_specs

apply_mod = pytest.importorskip("surgery.apply")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "affine-equivariant.recipe"


def group_net(resample: str = "train", seed: int = 0) -> nn.Module:
    text = RECIPE.read_text().replace("samples       = 10", "samples       = 2")
    text = text.replace("grid(10)", f'grid(2)\n  resample      = "{resample}"')
    text = text.replace("GroupConv(group=G, kernel=", "GroupConv(group=G, separable=true, kernel=")
    text = text.replace("siren(width=60, depth=3, w0=10)", "siren(width=8, depth=2, w0=10)")
    torch.manual_seed(seed)
    return apply_mod.apply(text, plain_cnn(width=3, pool_norm=True), verify=False).model


def test_which_models_are_recalibrated() -> None:
    net = group_net()
    assert len(redrawing_specs(net)) == 1
    assert recalibration_batches(net, None) == 8
    assert recalibration_batches(net, 3) == 3 and recalibration_batches(net, 0) == 0
    assert recalibration_batches(group_net("never"), None) == 0  # trained and deployed on one set
    assert recalibration_batches(plain_cnn(width=3), None) == 0  # no group samples at all


def test_statistics_are_those_of_the_fixed_set() -> None:
    net = group_net()
    x = torch.rand(16, 1, 24, 24)
    net.train()
    net(x)  # running statistics from a random training draw
    spec = redrawing_specs(net)[0]
    seen: list[torch.Tensor] = []
    hook = net.head[0].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    with torch.no_grad(), spec.use(spec.fixed()):
        net(x)
    hook.remove()
    expected = seen[0]
    net.eval()
    assert recalibrate_batchnorm(net, [x]) == 16
    assert not net.training  # mode restored
    bn = net.head[0]
    torch.testing.assert_close(bn.running_mean, expected.mean(0))
    torch.testing.assert_close(bn.running_var, expected.var(0, unbiased=True))
    assert bn.momentum == 0.1  # restored after the cumulative average
    assert recalibrate_batchnorm(net, []) == 0  # nothing to learn from: statistics kept
    torch.testing.assert_close(bn.running_mean, expected.mean(0))


def cfg(**kw: Any) -> FinetuneConfig:
    block: dict[str, Any] = {
        "data": Call("affine_digits", (), {"canvas": 24, "digit_size": 12, "regime": "none"}),
        "epochs": 2,
        "batch_size": 16,
        "steps_per_epoch": 2,
        "optimizer": Call("adam", (), {"lr": 2e-3}),
        "device": "cpu",
        "recalibrate_bn": 2,
        "eval_batch_size": 128,
    }
    block.update(kw)
    return FinetuneConfig.from_block(block)


def test_finetune_recalibrates_and_resumes_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = group_net()
    res = finetune(full, cfg(), tmp_path / "full", progress=False)
    assert [r["bn_recalibration_images"] for r in res.history] == [32, 32]

    real_save = loop_mod.save_checkpoint

    def save_then_crash(*args: Any, **kwargs: Any) -> Path:
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated stop after the first epoch")

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(group_net(), cfg(), tmp_path / "part", progress=False)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    torch.manual_seed(1234)
    fresh = group_net(seed=7)
    finetune(fresh, cfg(), tmp_path / "part", resume=True, progress=False)
    a, b = full.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = read_metrics(tmp_path / "full" / "metrics.jsonl")
    mb = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [(r["train_loss"], r["val_acc"]) for r in ma] == [(r["train_loss"], r["val_acc"]) for r in mb]


def test_finetune_without_recalibration(tmp_path: Path) -> None:
    res = finetune(group_net(), cfg(recalibrate_bn=0, epochs=1), tmp_path, progress=False)
    assert "bn_recalibration_images" not in res.history[0]
