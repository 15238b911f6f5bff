"""FinetuneConfig: a finetune block's entries validated, errors naming the key, overrides."""

from __future__ import annotations

import pytest

from surgery.lang.values import Call, Ramp
from surgery.train import FinetuneConfig, FinetuneConfigError


def block(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "data": Call("digits", (), {"size": 32}),
        "epochs": 5,
        "batch_size": 64,
        "optimizer": Call("adamw", (), {"lr": 1e-3, "weight_decay": 0}),
        "schedule": Call("cosine", (), {"warmup_epochs": 0}),
        "loss": Call("bce", (), {"off_label": "uniform"}),
        "clip_grad": Call("agc", (0.01,)),
        "ramps": [Ramp("b", 1.0, 2.0, 2.0)],
    }
    base.update(kw)
    return base


def test_full_block_from_the_contract() -> None:
    cfg = FinetuneConfig.from_block(block())
    assert cfg.data == Call("digits", (), {"size": 32})
    assert cfg.epochs == 5 and cfg.batch_size == 64
    assert cfg.optimizer == Call("adamw", (), {"lr": 1e-3, "weight_decay": 0.0})
    assert cfg.schedule is not None and cfg.schedule.name == "cosine"
    assert cfg.loss == Call("bce", (), {"off_label": "uniform"})
    assert cfg.clip_grad == Call("agc", (), {"clip_factor": 0.01, "eps": 1e-3, "exclude_head": False})
    assert cfg.ramps == (Ramp("b", 1.0, 2.0, 2.0),)


def test_defaults_and_other_forms() -> None:
    cfg = FinetuneConfig.from_block({})
    assert cfg.data is None and cfg.epochs == 1 and cfg.loss.name == "cross_entropy"
    cfg = FinetuneConfig.from_block(
        {
            "data": "affine-digits",
            "loss": Call("cross_entropy", (), {"label_smoothing": 0.1}),
            "clip_grad": Call("norm", (1.0,)),
            "optimizer": Call("sgd", (0.1,), {"momentum": 0.9}),
            "schedule": "none",
        }
    )
    assert cfg.data == Call("affine_digits", (), {})
    assert cfg.loss.kwargs == {"label_smoothing": 0.1}
    assert cfg.clip_grad == Call("norm", (), {"max_norm": 1.0, "norm_type": 2.0})
    assert cfg.optimizer.kwargs["lr"] == 0.1
    assert cfg.schedule is None
    assert FinetuneConfig.from_block({"data": "imagefolder:/data/x"}).data == Call(
        "imagefolder", (), {"path": "/data/x"}
    )
    assert FinetuneConfig.from_block({"clip_grad": 0.5}).clip_grad == Call(
        "norm", (), {"max_norm": 0.5, "norm_type": 2.0}
    )


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("epochs", 0, ">= 1"),
        ("epochs", "five", "integer"),
        ("batch_size", True, "integer"),
        ("optimizer", Call("adamx", (), {"lr": 1e-3}), "did you mean 'adam"),
        ("optimizer", Call("adamw", (), {"lr": -1.0}), "lr"),
        ("optimizer", Call("adamw", (), {"bogus": 1}), "bogus"),
        ("schedule", Call("cosinee"), "did you mean 'cosine'"),
        ("schedule", Call("cosine", (), {"warmup": 1}), "warmup"),
        ("schedule", Call("plateau"), "plateau"),
        ("loss", Call("bce", (), {"off_label": "sideways"}), "off_label"),
        ("loss", Call("mse"), "unknown loss"),
        ("loss", Call("cross_entropy", (), {"smoothing": 0.1}), "smoothing"),
        ("clip_grad", Call("agc", (-1.0,)), "clip_factor"),
        ("clip_grad", Call("zap"), "unknown clipping"),
        ("data", Call("digitz"), "did you mean 'digits'"),
        ("data", Call("digits", (), {"sise": 32}), "sise"),
        ("data", "nonsense:/x", "unknown data spec"),
        ("ramps", [Ramp("b", 1, 2, -1)], "epochs"),
        ("ramps", [Ramp("b", 1, 2, 1), Ramp("b", 1, 3, 1)], "twice"),
        ("device", "warp-drive", "device"),
        ("amp", "fp16", "bf16"),
        ("optimiser", Call("adamw"), "did you mean 'optimizer'"),
    ],
)
def test_errors_name_the_key(key: str, value: object, needle: str) -> None:
    with pytest.raises(FinetuneConfigError) as err:
        FinetuneConfig.from_block({key: value})
    assert err.value.key == key
    assert isinstance(err.value, ValueError)
    assert key in str(err.value) and needle in str(err.value)


def test_override_from_command_line() -> None:
    cfg = FinetuneConfig.from_block(block())
    new = cfg.override(epochs=2, batch_size=8, lr=0.01, seed=3, device="cpu", compile=True, amp=False)
    assert (new.epochs, new.batch_size, new.seed, new.device) == (2, 8, 3, "cpu")
    assert new.compile is True and new.amp is False
    assert cfg.override(data=None).data == cfg.data  # None = not given
    assert new.optimizer.kwargs["lr"] == 0.01 and new.optimizer.kwargs["weight_decay"] == 0.0
    assert cfg.epochs == 5  # the original is untouched
    assert cfg.override(warmup_epochs=1).schedule.kwargs["warmup_epochs"] == 1  # type: ignore[union-attr]
    assert cfg.override(data="digits(size=16)").data == Call("digits", (), {"size": 16})
    assert cfg.override(optimizer="sgd(lr=0.1)").optimizer.name == "sgd"
    with pytest.raises(FinetuneConfigError) as err:
        cfg.override(epocs=3)
    assert err.value.key == "epocs" and "epochs" in str(err.value)
    with pytest.raises(FinetuneConfigError):
        cfg.override(lr=-5)


def test_dict_round_trip() -> None:
    cfg = FinetuneConfig.from_block(block())
    import json

    again = FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
