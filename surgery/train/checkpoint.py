"""Pickle-free, atomic training checkpoints.

Layout under a run directory::

    checkpoints/epoch-0003/model.safetensors   model state_dict
    checkpoints/epoch-0003/state.safetensors   optimizer/scheduler/RNG tensors
    checkpoints/epoch-0003/state.json          their structure, epoch, step, config ...
    checkpoints/latest.json                    {"epoch": 3, "dir": "epoch-0003"}

A checkpoint directory is written under a temporary name and renamed into place, then
``latest.json`` is replaced atomically, so a crash at any point leaves the previous checkpoint
usable. Nothing is pickled: tensors go to safetensors, everything else to JSON through a small
tagged encoding (tuples, non-string dict keys, NaN, numpy arrays).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "decode_state",
    "encode_state",
    "get_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "surgery.finetune.checkpoint/1"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")


# ------------------------------------------------------------------------------------------- encoding


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-ready tree of ``obj``; tensors are moved into ``tensors`` under ``prefix``-based keys."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return encode_state(obj.item(), tensors, prefix)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [encode_state(k, tensors, f"{prefix}.k{i}"), encode_state(v, tensors, f"{prefix}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {prefix!r} without pickle")


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        key = tree["__tensor__"]
        if key not in tensors:
            raise ValueError(f"checkpoint: tensor {key!r} missing from state.safetensors")
        return tensors[key]
    if "__ndarray__" in tree:
        return np.asarray(tree["__ndarray__"], dtype=tree["dtype"]).reshape(tree["shape"])
    if "__float__" in tree:
        return float(tree["__float__"])
    if "__tuple__" in tree:
        return tuple(decode_state(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in tree["__items__"]}
    return {k: decode_state(v, tensors) for k, v in tree.items()}


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if initialised) CUDA generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA only when present on both sides)."""
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in states])


# ------------------------------------------------------------------------------------------------ files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def model_state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` as independent contiguous CPU tensors (tied weights are duplicated)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    out_dir: str | Path,
    *,
    model: nn.Module,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    global_step: int = 0,
    extra: dict[str, Any] | None = None,
    keep: int = 1,
) -> Path:
    """Write ``checkpoints/epoch-NNNN`` atomically, point ``latest.json`` at it, prune old ones.

    ``epoch`` is the number of completed epochs. Returns the checkpoint directory.
    """
    ck_root = Path(out_dir) / CHECKPOINTS
    ck_root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ck_root))
    try:
        save_file(model_state_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "global_step": global_step,
            "optimizer": encode_state(optimizer.state_dict(), tensors, "optimizer") if optimizer else None,
            "scheduler": encode_state(_scheduler_state(scheduler), tensors, "scheduler")
            if scheduler
            else None,
            "rng": encode_state(get_rng_state(), tensors, "rng"),
            "extra": encode_state(extra or {}, tensors, "extra"),
            "torch_version": torch.__version__,
        }
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": "pt"})
        with open(tmp / "state.json", "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=1, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        for f in ("model.safetensors", "state.safetensors"):
            _fsync_file(tmp / f)
        final = ck_root / name
        if final.exists():  # left by an earlier run in the same directory
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ck_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json_atomic(ck_root / LATEST, {"epoch": epoch, "dir": name})
    _prune(ck_root, epoch, keep)
    return final


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    state = scheduler.state_dict()
    return {k: v for k, v in state.items() if k != "optimizer"}


def _prune(ck_root: Path, current: int, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``current``; drop later (stale) ones and temp dirs."""
    epochs = sorted(
        (int(m.group(1)), p) for p in ck_root.iterdir() if (m := _EPOCH_DIR.match(p.name)) and p.is_dir()
    )
    kept = [e for e, _ in epochs if e <= current][-max(1, keep) :]
    for e, p in epochs:
        if e not in kept:
            shutil.rmtree(p, ignore_errors=True)
    for p in ck_root.glob(".epoch-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def clear_checkpoints(out_dir: str | Path) -> None:
    """Remove every checkpoint of a run directory (a fresh, non-resumed run)."""
    ck_root = Path(out_dir) / CHECKPOINTS
    if ck_root.is_dir():
        shutil.rmtree(ck_root)


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for f in ("model.safetensors", "state.safetensors", "state.json"))


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory (or a ``checkpoints`` dir, or one checkpoint)."""
    path = Path(path)
    if _complete(path):
        return path
    ck_root = path if (path / LATEST).exists() or path.name == CHECKPOINTS else path / CHECKPOINTS
    if not ck_root.is_dir():
        return None
    pointer = ck_root / LATEST
    if pointer.exists():
        try:
            d = ck_root / json.loads(pointer.read_text(encoding="utf-8"))["dir"]
            if _complete(d):
                return d
        except (ValueError, KeyError, TypeError):
            pass  # fall back to scanning
    found = sorted(
        (int(m.group(1)), p) for p in ck_root.iterdir() if (m := _EPOCH_DIR.match(p.name)) and _complete(p)
    )
    return found[-1][1] if found else None


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load ``model.safetensors`` of a checkpoint (or the file itself) into ``model`` in place."""
    path = Path(path)
    f = path / "model.safetensors" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {f}")
    try:
        sd = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{f}: corrupt safetensors file: {exc}") from exc
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as exc:
        raise ValueError(f"{f}: weights do not fit the model: {exc}") from exc


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects; returns the decoded state.

    The returned dict has ``epoch``, ``global_step`` and ``extra`` (and the raw optimizer/scheduler
    states). Raises ``FileNotFoundError`` for a missing checkpoint, ``ValueError`` for a corrupt one.
    """
    d = Path(path)
    if not _complete(d):
        found = latest_checkpoint(d)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint at {d}")
        d = found
    try:
        raw = json.loads((d / "state.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{d / 'state.json'}: corrupt checkpoint state: {exc}") from exc
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{d}: not a {CHECKPOINT_FORMAT} checkpoint (format {raw.get('format')!r})")
    try:
        tensors = load_file(str(d / "state.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{d / 'state.safetensors'}: corrupt safetensors file: {exc}") from exc
    state = {k: decode_state(v, tensors) for k, v in raw.items()}
    if model is not None:
        load_weights(model, d)
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise ValueError(f"{d}: checkpoint has no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng"):
        set_rng_state(state["rng"])
    state["path"] = d
    return state
