"""finetune/evaluate on tiny models: determinism, bit-exact resume, checkpoints, ramps, losses."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery.lang.values import Call, Ramp
from surgery.train import (
    FinetuneConfig,
    FinetuneConfigError,
    UniformOffLabelsBCEWithLogitsLoss,
    evaluate,
    finetune,
    grid_pointing_game,
    latest_checkpoint,
    load_checkpoint,
    read_metrics,
    set_module_param,
)
from surgery.train import loop as loop_mod


class Scaled(nn.Module):
    """Has a ramped float attribute ``b`` (like a B-cos layer's exponent)."""

    def __init__(self) -> None:
        super().__init__()
        self.b = 1.0
        self.seen: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and (not self.seen or self.seen[-1] != self.b):
            self.seen.append(self.b)
        return x * (self.b / 2 + 0.5)


def tiny_cnn(in_ch: int = 3, *, bn: bool = True, dropout: float = 0.1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(in_ch, 8, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [
        nn.ReLU(),
        Scaled(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(16, 10),
    ]
    return nn.Sequential(*layers)


def cfg(**kw: Any) -> FinetuneConfig:
    block: dict[str, Any] = {
        "data": Call("digits", (), {"size": 8}),
        "epochs": 2,
        "batch_size": 32,
        "steps_per_epoch": 3,
        "optimizer": Call("adamw", (), {"lr": 1e-2, "weight_decay": 0.01}),
        "schedule": Call("cosine", (), {"warmup_epochs": 1}),
        "loss": Call("bce", (), {"off_label": "uniform"}),
        "clip_grad": Call("agc", (0.01,)),
        "device": "cpu",
    }
    block.update(kw)
    return FinetuneConfig.from_block(block)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fixed_seed_reproduces_and_metrics_are_logged(tmp_path: Path) -> None:
    m1, m2 = tiny_cnn(), tiny_cnn()
    r1 = finetune(m1, cfg(), tmp_path / "a", progress=False)
    r2 = finetune(m2, cfg(), tmp_path / "b", progress=False)
    assert_same(weights(m1), weights(m2))
    m3 = tiny_cnn()
    finetune(m3, cfg(seed=1), tmp_path / "c", progress=False)
    assert not torch.equal(m3[0].weight, m1[0].weight)
    recs = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2] and r1.history == recs and r1.final == recs[-1]
    for key in ("train_loss", "train_acc", "val_acc", "val_loss", "lr", "throughput", "step"):
        assert key in recs[0]
    assert recs[1]["step"] == 6 and recs[0]["val_samples"] == r2.final["val_samples"] > 300
    assert r1.epochs_completed == 2 and not r1.resumed


def test_resume_is_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = cfg(ramps=[Ramp("b", 1.0, 2.0, 2.0)])
    full = tiny_cnn()
    finetune(full, config, tmp_path / "full", progress=False)

    real_save = loop_mod.save_checkpoint

    def save_then_crash(*args: Any, **kwargs: Any) -> Path:
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated stop after the first epoch")

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_crash)
    part = tiny_cnn()
    with pytest.raises(KeyboardInterrupt):
        finetune(part, config, tmp_path / "part", progress=False)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    torch.manual_seed(1234)  # a different process state must not matter
    fresh = tiny_cnn(seed=99)  # a new process rebuilds the model; weights come from the checkpoint
    res = finetune(fresh, config, tmp_path / "part", resume=True, progress=False)
    assert res.start_epoch == 1 and res.resumed and res.epochs_completed == 2
    assert_same(weights(full), weights(fresh))
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert (ra["train_loss"], ra["val_acc"], ra["lr"]) == (rb["train_loss"], rb["val_acc"], rb["lr"])
    # resuming a finished run trains nothing and keeps the weights
    again = tiny_cnn(seed=5)
    res2 = finetune(again, config, tmp_path / "part", resume=True, progress=False)
    assert res2.history == [] and res2.epochs_completed == 2
    assert_same(weights(full), weights(again))


def test_checkpoint_layout_is_pickle_free(tmp_path: Path) -> None:
    model = tiny_cnn()
    finetune(model, cfg(epochs=2, keep_checkpoints=1), tmp_path, progress=False)
    ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "epoch-0002"
    assert sorted(p.name for p in ck.iterdir()) == ["model.safetensors", "state.json", "state.safetensors"]
    assert not (tmp_path / "checkpoints" / "epoch-0001").exists()  # pruned
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["dir"] == "epoch-0002"
    for f in (tmp_path / "checkpoints").rglob("*"):
        if f.is_file():
            assert not f.read_bytes().startswith(b"\x80"), f  # no pickle anywhere
    state = json.loads((ck / "state.json").read_text())
    assert state["epoch"] == 2 and state["global_step"] == 6
    assert state["extra"]["config"]["optimizer"]["call"] == "adamw"
    other = tiny_cnn(seed=3)
    loaded = load_checkpoint(ck, model=other)
    assert loaded["epoch"] == 2
    assert_same(weights(model), weights(other))
    # a half-written checkpoint (no state.json) and a broken pointer are skipped
    (tmp_path / "checkpoints" / "epoch-0003").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{broken")
    assert latest_checkpoint(tmp_path) == ck
    (ck / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"state\.json"):
        load_checkpoint(ck, model=other)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nowhere")


def test_fresh_run_replaces_old_checkpoints(tmp_path: Path) -> None:
    finetune(tiny_cnn(), cfg(epochs=2), tmp_path, progress=False)
    finetune(tiny_cnn(), cfg(epochs=1), tmp_path, progress=False)
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    assert latest_checkpoint(tmp_path).name == "epoch-0001"  # type: ignore[union-attr]


def test_ramp_sets_attribute_each_epoch(tmp_path: Path) -> None:
    model = tiny_cnn()
    model[0].register_buffer("b", torch.zeros(()))  # a buffer is ramped too
    res = finetune(
        model, cfg(epochs=3, ramps=[Ramp("b", 1.0, 2.0, 2.0)], eval=False), tmp_path, progress=False
    )
    assert [r["ramps"]["b"] for r in res.history] == [1.0, 1.5, 2.0]
    assert model[3].seen == [1.0, 1.5, 2.0] and float(model[0].b) == 2.0
    with pytest.raises(FinetuneConfigError) as err:
        finetune(tiny_cnn(), cfg(ramps=[Ramp("temperature", 1, 2, 1)]), tmp_path / "x", progress=False)
    assert err.value.key == "ramps" and "temperature" in str(err.value)


def test_set_module_param_kinds() -> None:
    class P(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.ones(1))
            self._t = 0.0

        @property
        def t(self) -> float:
            return self._t

        @t.setter
        def t(self, v: float) -> None:
            self._t = v

    m = nn.Sequential(P(), Scaled(), nn.Linear(2, 2))
    assert set_module_param(m, "b", 3.0) == 2
    assert float(m[0].b.detach()) == 3.0 and m[1].b == 3.0
    assert set_module_param(m, "t", 0.5) == 1 and m[0].t == 0.5
    assert set_module_param(m, "forward", 1.0) == 0  # methods are never overwritten
    assert set_module_param(m, "nothing", 1.0) == 0


def test_bce_with_uniform_off_labels() -> None:
    logits = torch.randn(4, 5)
    y = torch.tensor([0, 3, 4, 1])
    target = torch.full((4, 5), 0.2)
    target[torch.arange(4), y] = 1.0
    expected = F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(UniformOffLabelsBCEWithLogitsLoss()(logits, y), expected)
    one_hot = F.binary_cross_entropy_with_logits(logits, F.one_hot(y, 5).float())
    assert torch.allclose(UniformOffLabelsBCEWithLogitsLoss(0.0)(logits, y), one_hot)


@pytest.mark.parametrize(
    "extra",
    [
        {"loss": Call("cross_entropy", (), {"label_smoothing": 0.1}), "clip_grad": Call("norm", (1.0,))},
        {"clip_grad": Call("value", (0.1,)), "schedule": Call("step", (), {"decay_epochs": 1}), "amp": True},
        {"optimizer": Call("sgd", (0.05,), {"momentum": 0.9}), "schedule": "none", "clip_grad": None},
    ],
)
def test_other_losses_clipping_amp(tmp_path: Path, extra: dict[str, Any]) -> None:
    model = tiny_cnn()
    before = weights(model)
    res = finetune(model, cfg(epochs=1, steps_per_epoch=2, eval=False, **extra), tmp_path, progress=False)
    assert res.final["train_loss"] > 0
    assert not torch.equal(before["0.weight"], model[0].weight)


def test_input_contract_feeds_raw_rgb(tmp_path: Path) -> None:
    class AddInverseNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)
            self.inputs: list[tuple[int, float, float]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.inputs.append((x.shape[1], float(x.min()), float(x.max())))
            return self.fc(F.relu(self.conv(torch.cat([x, 1 - x], 1))).mean((2, 3)))

    model = AddInverseNet()
    contract = {"encoding": "add_inverse", "channels": 3, "range": [0, 1], "normalize_outside": False}
    res = finetune(model, cfg(epochs=1, eval=False), tmp_path, input_contract=contract, progress=False)
    assert res.input_pipeline is not None and res.input_pipeline.mean is None
    assert all(c == 3 and lo >= 0.0 and hi <= 1.0 for c, lo, hi in model.inputs)


def test_timm_model_with_grayscale_data(tmp_path: Path) -> None:
    import timm

    model = timm.create_model("resnet18", num_classes=10)
    res = finetune(
        model,
        cfg(epochs=1, steps_per_epoch=1, batch_size=8, eval=False, data="digits(size=16)"),
        tmp_path,
        progress=False,
    )
    assert res.input_pipeline is not None and res.input_pipeline.channels == 3
    assert res.input_pipeline.mean == pytest.approx((0.485, 0.456, 0.406))


def test_progress_bar_renders_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr(loop_mod, "_console", lambda: Console(file=buf, force_terminal=True, width=150))
    finetune(tiny_cnn(), cfg(epochs=1, steps_per_epoch=2, eval=False), tmp_path, progress=True)
    out = buf.getvalue()
    assert "epoch 1/1" in out and "img/s" in out and "loss" in out and "acc" in out
    buf2 = io.StringIO()
    monkeypatch.setattr(loop_mod, "_console", lambda: Console(file=buf2, force_terminal=False))
    finetune(tiny_cnn(), cfg(epochs=1, steps_per_epoch=1, eval=False), tmp_path / "b", progress=True)
    assert buf2.getvalue() == ""  # not a TTY: no bar


def test_compile_option(tmp_path: Path) -> None:
    model = tiny_cnn(dropout=0.0)
    res = finetune(
        model, cfg(epochs=1, steps_per_epoch=2, eval=False, compile="eager"), tmp_path, progress=False
    )
    assert res.final["train_loss"] > 0


def test_nan_loss_stops_before_checkpointing(tmp_path: Path) -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean((2, 3))) * float("nan")

    with pytest.raises(FloatingPointError, match="epoch 1"):
        finetune(Broken(), cfg(epochs=1, clip_grad=None), tmp_path, progress=False)
    assert latest_checkpoint(tmp_path) is None


def test_class_count_mismatch_and_missing_data(tmp_path: Path) -> None:
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with pytest.raises(ValueError, match="5 classes"):
        finetune(small, cfg(epochs=1), tmp_path, progress=False)
    with pytest.raises(FinetuneConfigError) as err:
        finetune(tiny_cnn(), FinetuneConfig(), tmp_path, progress=False)
    assert err.value.key == "data"


def test_evaluate_accuracy_and_grid_pointing_game() -> None:
    model = tiny_cnn()
    model.train()
    out = evaluate(model, "digits(size=8)", loss="bce")
    assert 0.0 <= out["accuracy"] <= 1.0 and out["samples"] > 300 and out["loss"] > 0
    assert model.training  # mode restored

    grid = Call("grid_digits", (), {"size": 8, "count": 3})
    from surgery.train import build_dataset

    ds = build_dataset(grid, "test")
    maps = torch.zeros(len(ds), 1, 16, 16)  # all attribution inside each item's target cell
    for i in range(len(ds)):
        r, c = divmod(ds[i][2], 2)
        maps[i, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = 1.0

    def perfect(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return maps[: x.shape[0]]  # one batch holds the whole set, in order

    res = evaluate(model, ds, batch_size=len(ds), explain_fn=perfect)
    assert res["grid_pointing_game"] == pytest.approx(1.0) and res["samples"] == 12

    def uniform(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3  # the model-ready input
        return torch.ones(x.shape[0], 3, 16, 16)

    res = evaluate(model, grid, explain_fn=uniform)
    assert res["grid_pointing_game"] == pytest.approx(0.25)
    assert res["grid_pointing_game_median"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="explain_fn"):
        evaluate(model, grid)


def test_grid_pointing_game_scores() -> None:
    a = torch.zeros(3, 4, 4)
    a[0, :2, :2] = 1.0  # all in cell 0
    a[1, :2, :2] = 1.0
    a[1, 2:, 2:] = 3.0  # 1/4 of the positive mass in cell 0
    a[1, 2:, :2] = -10.0  # negative evidence is ignored
    scores = grid_pointing_game(a, torch.tensor([0, 0, 1]), 2)
    assert scores.tolist() == pytest.approx([1.0, 0.25, 0.0])  # no positive mass: 0
    smooth = grid_pointing_game(a[:1], torch.tensor([0]), 2, smooth=3)
    assert 0.5 < float(smooth) < 1.0
