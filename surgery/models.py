"""Model references: where a base model comes from, and enough about it to rebuild it.

- ``timm:NAME`` (random init), ``timm:NAME?pretrained=true`` (timm's own loader),
  ``timm:NAME?weights=PATH`` (a local safetensors file, or a ``torch.load(weights_only=True)`` file),
  and any ``timm.create_model`` keyword: ``timm:resnet18?num_classes=10&in_chans=1``;
- ``torchvision:NAME`` with the same options (``weights=PATH`` or torchvision weight names);
- ``package.module:factory?kw=value`` calls a factory of the user's own code;
- a directory saved by ``surgery.save`` (an artifact).
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import nn

from surgery.errors import ModelRefError, with_hint

WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar"}


@dataclass
class BaseInfo:
    """The identity of a base model: how to rebuild it and what its weights were."""

    ref: str
    kind: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "kind": self.kind,
            "name": self.name,
            "options": self.options,
            "input_size": list(self.input_size) if self.input_size else None,
        }


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_ref(ref: str) -> tuple[str, dict[str, Any]]:
    head, _, query = ref.partition("?")
    return head, {k: _value(v) for k, v in parse_qsl(query, keep_blank_values=True)}


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file loaded with ``weights_only=True`` (no pickle code)."""
    p = Path(path)
    if not p.is_file():
        raise ModelRefError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelRefError(f"cannot read weights file {p}: {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelRefError(f"weights file {p} does not hold a state dict of tensors")
    return obj


def _load_state(model: nn.Module, path: str, ref: str) -> None:
    state = load_weights_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelRefError(f"weights in {path} do not fit {ref}: {first}") from None


def _timm(name: str, opts: dict[str, Any], ref: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    import timm

    weights = opts.pop("weights", None)
    if not timm.is_model(name):
        raise ModelRefError(with_hint(f"unknown timm model '{name}'", name, timm.list_models()))
    try:
        model = timm.create_model(name, **opts)
    except TypeError as exc:
        raise ModelRefError(f"timm:{name} does not accept these options: {exc}") from None
    except (RuntimeError, OSError) as exc:
        raise ModelRefError(f"cannot create timm:{name}: {exc}") from None
    if weights:
        _load_state(model, str(weights), ref)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = tuple(cfg["input_size"]) if cfg.get("input_size") else None
    if size is not None and "in_chans" in opts:
        size = (int(opts["in_chans"]), *size[1:])
    if size is not None and "img_size" in opts:
        s = opts["img_size"]
        size = (size[0], *(s if isinstance(s, (tuple, list)) else (s, s)))
    return model, size


def _torchvision(name: str, opts: dict[str, Any], ref: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    try:
        import torchvision.models as tvm
    except ImportError:
        raise ModelRefError("torchvision is not installed") from None
    weights = opts.pop("weights", None)
    local = isinstance(weights, str) and (
        "/" in weights or Path(weights).exists() or Path(weights).suffix.lower() in WEIGHT_SUFFIXES
    )
    if name not in tvm.list_models():
        raise ModelRefError(with_hint(f"unknown torchvision model '{name}'", name, tvm.list_models()))
    try:
        model = tvm.get_model(name, weights=None if local else weights, **opts)
    except (ValueError, KeyError) as exc:
        raise ModelRefError(f"torchvision:{name}: unknown weights '{weights}' ({exc})") from None
    except TypeError as exc:
        raise ModelRefError(f"torchvision:{name} does not accept these options: {exc}") from None
    if local:
        _load_state(model, str(weights), ref)
    return model, (3, 224, 224)


def _factory(target: str, opts: dict[str, Any], ref: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    mod_name, _, fn_name = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelRefError(f"cannot import '{mod_name}' for model reference '{ref}': {exc}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        names = [n for n in dir(mod) if not n.startswith("_")]
        raise ModelRefError(with_hint(f"'{mod_name}' has no factory '{fn_name}'", fn_name, names))
    weights = opts.pop("weights", None)
    input_size = opts.pop("input_size", None)
    try:
        model = fn(**opts)
    except TypeError as exc:
        raise ModelRefError(f"{target} does not accept these options: {exc}") from None
    except ValueError as exc:  # a factory's own check of an option's value: the user's input
        raise ModelRefError(f"{target} rejects these options: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelRefError(f"{target} returned {type(model).__name__}, not an nn.Module")
    if weights:
        _load_state(model, str(weights), ref)
    size = None
    if isinstance(input_size, str):
        size = tuple(int(s) for s in input_size.split("x"))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if size is None and isinstance(cfg, dict) and cfg.get("input_size"):
        size = tuple(cfg["input_size"])
    return model, size


def load_model(ref: str) -> tuple[nn.Module, BaseInfo]:
    """Build the model a reference names. Raises ``ModelRefError`` with a clear message otherwise."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelRefError("empty model reference")
    head, opts = split_ref(ref.strip())
    if Path(head).is_dir():
        from surgery.artifacts import load

        result = load(head)
        size = result.input_size or (result.base.input_size if result.base else None)
        # the artifact is the new model's base: re-loading re-applies only the new recipe on top
        name = Path(head).resolve().name
        return result.model, BaseInfo(ref=head, kind="artifact", name=name, input_size=size)
    kind, sep, name = head.partition(":")
    if not sep:
        hint = " (a timm model? write timm:" + head + ")" if _is_timm_name(head) else ""
        raise ModelRefError(
            f"cannot understand model reference '{ref}': use timm:NAME, torchvision:NAME, "
            f"package.module:factory or an artifact directory{hint}"
        )
    builders = {"timm": _timm, "torchvision": _torchvision}
    if kind in builders:
        model, size = builders[kind](name, dict(opts), ref)
    else:
        if "/" in head or not kind.replace(".", "").replace("_", "").isalnum():
            raise ModelRefError(f"no such artifact directory or model reference: '{ref}'")
        model, size = _factory(head, dict(opts), ref)
        kind, name = "factory", head
    return model, BaseInfo(ref=ref, kind=kind, name=name, options=opts, input_size=size)


def _is_timm_name(name: str) -> bool:
    try:
        import timm

        return bool(timm.is_model(name))
    except Exception:
        return False


def weights_sha256(model: nn.Module) -> str:
    """A hash of the model's state dict: names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
