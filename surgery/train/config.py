"""``FinetuneConfig``: a recipe's ``finetune { ... }`` block, validated, plus command-line overrides.

The checker hands over the block as ``dict[str, Any]`` of evaluated values (``Call`` for calls, plain
Python values otherwise, ``Ramp`` objects under ``"ramps"``). Every problem raises
:class:`FinetuneConfigError` (a ``ValueError``) whose ``key`` names the offending entry, so the caller
can point at its line:col.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from surgery.lang.values import Call, Ramp
from surgery.train import components
from surgery.train.data import parse_call_string, parse_data_spec

__all__ = ["FinetuneConfig", "FinetuneConfigError"]


class FinetuneConfigError(ValueError):
    """A bad ``finetune`` entry; ``key`` is the entry's name (``"optimizer"``, ``"ramps"`` ...)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"finetune {key}: {message}")


def _did_you_mean(name: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(key: str, v: Any, minimum: int, *, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FinetuneConfigError(key, f"expected an integer, got {v!r}")
    if v < minimum:
        raise FinetuneConfigError(key, f"must be >= {minimum}, got {v}")
    return v


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return v.lower() in ("true", "yes", "on", "1")
    raise FinetuneConfigError(key, f"expected true or false, got {v!r}")


def _as_call(key: str, v: Any) -> Call:
    """A call, a bare name, or (from the command line) ``"name(k=v)"`` text."""
    if isinstance(v, Call):
        return v
    if isinstance(v, str):
        try:
            return parse_call_string(v, key)
        except ValueError as exc:
            raise FinetuneConfigError(key, str(exc)) from exc
    raise FinetuneConfigError(key, f"expected a call such as name(...), got {v!r}")


def _bind(key: str, call: Call, stub: Callable[..., None]) -> dict[str, Any]:
    try:
        bound = inspect.signature(stub).bind(*call.args, **call.kwargs)
    except TypeError as exc:
        raise FinetuneConfigError(key, f"{call.name}(...): {exc}") from exc
    bound.apply_defaults()
    return dict(bound.arguments)


# ----------------------------------------------------------------------------------------- validators


def _v_data(key: str, v: Any) -> Call | None:
    if v is None:
        return None
    try:
        return parse_data_spec(v).to_call()
    except ValueError as exc:
        raise FinetuneConfigError(key, str(exc)) from exc


def _v_optimizer(key: str, v: Any) -> Call:
    call = _as_call(key, v)
    name = call.name.lower()
    names = components.optimizer_names()
    if name not in names:
        raise FinetuneConfigError(key, f"unknown optimizer {call.name!r}{_did_you_mean(name, names)}")
    if len(call.args) > 1:
        raise FinetuneConfigError(key, f"{name}(...) takes at most one positional argument (lr)")
    kwargs = dict(call.kwargs)
    if call.args:
        if "lr" in kwargs:
            raise FinetuneConfigError(key, f"{name}(...): lr given twice")
        kwargs["lr"] = call.args[0]
    for k in ("lr", "weight_decay", "momentum", "eps"):
        if k in kwargs and kwargs[k] is not None:
            if not _is_num(kwargs[k]) or not math.isfinite(kwargs[k]) or kwargs[k] < 0:
                raise FinetuneConfigError(
                    key, f"{name}(...): {k} must be a non-negative number, got {kwargs[k]!r}"
                )
            kwargs[k] = float(kwargs[k])
    if kwargs.get("lr") == 0:
        raise FinetuneConfigError(key, f"{name}(...): lr must be > 0")
    norm = Call(name, (), kwargs)
    try:  # let timm reject unknown keywords and bad values now, not after the model is built
        components.build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], norm)
    except Exception as exc:
        raise FinetuneConfigError(key, f"{name}(...): {exc}") from exc
    return norm


def _v_schedule(key: str, v: Any) -> Call | None:
    if v is None or v is False:
        return None
    call = _as_call(key, v)
    name = call.name.lower()
    if name == "plateau":
        raise FinetuneConfigError(key, "plateau is not supported (it needs a validation metric every step)")
    if name not in components.SCHEDULES:
        raise FinetuneConfigError(
            key,
            f"unknown schedule {call.name!r}{_did_you_mean(name, components.SCHEDULES)}; "
            f"expected one of {', '.join(components.SCHEDULES)}",
        )
    if call.args:
        raise FinetuneConfigError(key, f"{name}(...) takes keyword arguments only")
    allowed = components.scheduler_params()
    for k in call.kwargs:
        if k not in allowed:
            raise FinetuneConfigError(key, f"{name}(...): unknown argument {k!r}{_did_you_mean(k, allowed)}")
    if name == "none":
        return None
    norm = Call(name, (), dict(call.kwargs))
    try:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        components.build_scheduler(opt, norm, epochs=100, updates_per_epoch=10)
    except Exception as exc:
        raise FinetuneConfigError(key, f"{name}(...): {exc}") from exc
    return norm


def _v_loss(key: str, v: Any) -> Call:
    call = _as_call(key, v)
    name = components.LOSS_ALIASES.get(call.name.lower(), call.name.lower())
    stubs = components.CALL_STUBS["loss"]
    if name not in stubs:
        raise FinetuneConfigError(
            key,
            f"unknown loss {call.name!r}{_did_you_mean(name, list(stubs))}; "
            f"expected one of {', '.join(stubs)}",
        )
    kw = _bind(key, Call(name, call.args, call.kwargs), stubs[name])
    if name == "bce":
        off = kw["off_label"]
        if off is None:
            off = "uniform"
        if not (off == "uniform" or (_is_num(off) and 0 <= off < 1)):
            raise FinetuneConfigError(
                key, f'bce(...): off_label must be "uniform" or a number in [0, 1), got {off!r}'
            )
        kw["off_label"] = off if off == "uniform" else float(off)
    else:
        ls = kw["label_smoothing"]
        if not _is_num(ls) or not 0 <= ls < 1:
            raise FinetuneConfigError(
                key, f"cross_entropy(...): label_smoothing must be in [0, 1), got {ls!r}"
            )
        kw["label_smoothing"] = float(ls)
    return Call(name, (), kw)


def _v_clip(key: str, v: Any) -> Call | None:
    if v is None or v is False or (isinstance(v, str) and v.lower() == "none"):
        return None
    if _is_num(v):
        v = Call("norm", (v,))
    call = _as_call(key, v)
    name = call.name.lower()
    stubs = components.CALL_STUBS["clip_grad"]
    if name not in stubs:
        raise FinetuneConfigError(
            key,
            f"unknown clipping {call.name!r}{_did_you_mean(name, list(stubs))}; "
            f"expected one of {', '.join(stubs)}",
        )
    kw = _bind(key, Call(name, call.args, call.kwargs), stubs[name])
    for k, val in kw.items():
        if k == "exclude_head":
            kw[k] = _bool(key, val)
        elif not _is_num(val) or not val > 0:
            raise FinetuneConfigError(key, f"{name}(...): {k} must be a positive number, got {val!r}")
        else:
            kw[k] = float(val)
    return Call(name, (), kw)


def _v_ramps(key: str, v: Any) -> tuple[Ramp, ...]:
    if v is None:
        return ()
    if isinstance(v, Ramp):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise FinetuneConfigError(key, f"expected a list of ramps, got {v!r}")
    seen: set[str] = set()
    out = []
    for r in v:
        if isinstance(r, dict):
            r = Ramp(**r)
        if not isinstance(r, Ramp):
            raise FinetuneConfigError(key, f"expected a ramp, got {r!r}")
        if not r.param.isidentifier():
            raise FinetuneConfigError(key, f"ramp parameter {r.param!r} is not an attribute name")
        if r.param in seen:
            raise FinetuneConfigError(key, f"parameter {r.param!r} is ramped twice")
        for what, x in (("start", r.start), ("end", r.end), ("epochs", r.epochs)):
            if not _is_num(x) or not math.isfinite(x):
                raise FinetuneConfigError(key, f"ramp {r.param}: {what} must be a finite number, got {x!r}")
        if r.epochs < 0:
            raise FinetuneConfigError(key, f"ramp {r.param}: epochs must be >= 0, got {r.epochs}")
        seen.add(r.param)
        out.append(r)
    return tuple(out)


def _v_device(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise FinetuneConfigError(key, f"expected a device name such as 'cpu', 'cuda' or 'auto', got {v!r}")
    if v == "auto":
        return v
    try:
        torch.device(v)
    except (RuntimeError, ValueError) as exc:
        raise FinetuneConfigError(key, f"bad device {v!r}: {exc}") from exc
    return v


def _v_compile(key: str, v: Any) -> bool | str:
    if isinstance(v, str) and v.lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return v  # a torch.compile backend name, e.g. "inductor", "eager", "aot_eager"
    return _bool(key, v)


def _v_amp(key: str, v: Any) -> bool | str:
    if isinstance(v, str) and v.lower() in ("auto", "bf16", "bfloat16"):
        return "auto" if v.lower() == "auto" else True
    if isinstance(v, str) and v.lower() in ("fp16", "float16"):
        raise FinetuneConfigError(key, "only bf16 autocast is supported (fp16 would need loss scaling)")
    return _bool(key, v)


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "data": _v_data,
    "eval_data": _v_data,
    "epochs": lambda k, v: _int(k, v, 1),
    "batch_size": lambda k, v: _int(k, v, 1),
    "eval_batch_size": lambda k, v: _int(k, v, 1, optional=True),
    "optimizer": _v_optimizer,
    "schedule": _v_schedule,
    "loss": _v_loss,
    "clip_grad": _v_clip,
    "ramps": _v_ramps,
    "seed": lambda k, v: _int(k, v, 0),
    "device": _v_device,
    "compile": _v_compile,
    "amp": _v_amp,
    "num_workers": lambda k, v: _int(k, v, 0, optional=True),
    "steps_per_epoch": lambda k, v: _int(k, v, 1, optional=True),
    "eval": _bool,
    "keep_checkpoints": lambda k, v: _int(k, v, 1),
    "recalibrate_bn": lambda k, v: _int(k, v, 0, optional=True),
    "deterministic": _bool,
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything :func:`surgery.train.finetune` needs; build it with :meth:`from_block`.

    ``batch_size`` is per process (per GPU under torchrun), as in timm and B-cos. ``data`` may be left
    out of the block and given on the command line; :func:`finetune` refuses to run without it.
    """

    data: Call | None = None
    eval_data: Call | None = None  # test split of ``data`` when None
    epochs: int = 1
    batch_size: int = 64
    eval_batch_size: int | None = None  # 2×batch_size when None
    optimizer: Call = field(default_factory=lambda: Call("adamw", (), {"lr": 1e-3, "weight_decay": 0.0}))
    schedule: Call | None = field(default_factory=lambda: Call("cosine", (), {"warmup_epochs": 0}))
    loss: Call = field(default_factory=lambda: Call("cross_entropy", (), {"label_smoothing": 0.0}))
    clip_grad: Call | None = None
    ramps: tuple[Ramp, ...] = ()
    seed: int = 0
    device: str = "auto"
    compile: bool | str = False
    amp: bool | str = "auto"  # "auto": bf16 autocast on CUDA only
    num_workers: int | None = None  # 0 for in-memory sets, a few for image folders, when None
    steps_per_epoch: int | None = None  # cap on optimiser steps per epoch (smoke runs)
    eval: bool = True  # evaluate on the test split after every epoch
    keep_checkpoints: int = 1
    # batches to re-estimate BatchNorm statistics on after every epoch, on the deployed group sample
    # set (surgery.train.calibration); None: 8 for models that redraw group samples, else 0
    recalibrate_bn: int | None = None
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU bit-exactness)

    KEYS = tuple(_VALIDATORS)

    @classmethod
    def from_block(cls, entries: dict[str, Any]) -> FinetuneConfig:
        """Validate a ``finetune`` block's entries (see the module docstring for the value forms)."""
        if not isinstance(entries, dict):
            raise FinetuneConfigError(
                "finetune", f"expected a block of entries, got {type(entries).__name__}"
            )
        values: dict[str, Any] = {}
        for key, value in entries.items():
            if key not in _VALIDATORS:
                raise FinetuneConfigError(
                    key, f"unknown key{_did_you_mean(key, cls.KEYS)}; expected one of {', '.join(cls.KEYS)}"
                )
            values[key] = _VALIDATORS[key](key, value)
        return cls(**values)

    def override(self, **options: Any) -> FinetuneConfig:
        """A copy with command-line options applied; ``None`` means "not given" and is skipped.

        Besides every block key: ``lr``, ``weight_decay`` and ``momentum`` edit the optimiser call,
        ``warmup_epochs`` and ``min_lr`` the schedule call.
        """
        cfg = self
        for key, value in options.items():
            if value is None:
                continue
            if key in ("lr", "weight_decay", "momentum"):
                opt = cfg.optimizer
                cfg = dataclasses.replace(
                    cfg, optimizer=_v_optimizer(key, Call(opt.name, (), {**opt.kwargs, key: value}))
                )
            elif key in ("warmup_epochs", "min_lr"):
                if cfg.schedule is None:
                    raise FinetuneConfigError(key, "there is no schedule to change (schedule = none)")
                sch = cfg.schedule
                cfg = dataclasses.replace(
                    cfg, schedule=_v_schedule(key, Call(sch.name, (), {**sch.kwargs, key: value}))
                )
            elif key in _VALIDATORS:
                cfg = dataclasses.replace(cfg, **{key: _VALIDATORS[key](key, value)})
            else:
                options_ = [*self.KEYS, "lr", "weight_decay", "momentum", "warmup_epochs", "min_lr"]
                raise FinetuneConfigError(key, f"unknown option{_did_you_mean(key, options_)}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (calls as ``{"call": name, "args": [...], "kwargs": {...}}``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _encode(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Inverse of :meth:`to_dict` (re-validated)."""
        return cls.from_block({k: _decode(v) for k, v in d.items()})


def _encode(v: Any) -> Any:
    if isinstance(v, Call):
        return {
            "call": v.name,
            "args": [_encode(a) for a in v.args],
            "kwargs": {k: _encode(x) for k, x in v.kwargs.items()},
        }
    if isinstance(v, Ramp):
        return {"ramp": v.param, "start": v.start, "end": v.end, "epochs": v.epochs}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict) and "call" in v:
        return Call(
            v["call"],
            tuple(_decode(a) for a in v.get("args", [])),
            {k: _decode(x) for k, x in v.get("kwargs", {}).items()},
        )
    if isinstance(v, dict) and "ramp" in v:
        return Ramp(v["ramp"], v["start"], v["end"], v["epochs"])
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v
