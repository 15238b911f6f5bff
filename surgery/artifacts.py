"""Artifacts: a directory that rebuilds a converted model exactly, with no pickle.

``model.safetensors`` holds the weights; ``recipe.recipe`` the source recipe; ``plan.json`` the
resolved plan (params substituted, matched names, every included source); ``manifest.json`` the
base model's identity (reference, sha256 of its weights), library versions, input size and the
input contract. Loading rebuilds the base, re-applies the plan, checks that the same modules
matched, and loads the weights strictly. Writing goes to a temporary sibling directory that is
renamed into place, so a failure never leaves a half-written artifact.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from torch import nn

from surgery.apply import Result, apply
from surgery.errors import ArtifactError, UserError
from surgery.lang.checker import IncludeLoader
from surgery.lang.parser import parse
from surgery.models import BaseInfo, load_model, split_ref, weights_sha256

FORMAT = "surgery-artifact/1"
FILES = ("model.safetensors", "recipe.recipe", "plan.json", "manifest.json")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("surgery", "torch", "timm", "torchvision", "safetensors", "lark"):
        with suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


@contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False):
    """Yield a temporary directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise ArtifactError(f"{target} already exists (use overwrite=True / --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save(
    result: Result, directory: str | Path, *, overwrite: bool = False, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``result`` as an artifact directory, atomically."""
    from safetensors.torch import save_model

    directory = Path(directory)
    recipe = result.plan.recipe
    plan_data = result.plan.to_dict()
    plan_data["sources"] = recipe.sources
    base = result.base.to_dict() if result.base is not None else None
    manifest = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.name,
        "recipe_file": recipe.file,
        "params": plan_data["params"],
        "base": base,
        "base_weights_sha256": result.base_weights_sha256 or weights_sha256(result.original),
        "model_class": type(result.model).__name__,
        "input_size": list(result.input_size) if result.input_size else None,
        "input_contract": result.contract,
        "versions": _versions(),
        **(extra or {}),
    }
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        save_model(result.model, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "recipe.recipe").write_text(recipe.source, encoding="utf-8")
        write_json(tmp / "plan.json", plan_data)
        write_json(tmp / "manifest.json", manifest)
    return directory


def read_manifest(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"artifact directory not found: {d}")
    for name in FILES:
        if not (d / name).is_file():
            raise ArtifactError(f"{d} is not a complete artifact: {name} is missing")
    try:
        manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
        plan_data = json.loads((d / "plan.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{d}: corrupt manifest or plan: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{d}: not a {FORMAT} artifact")
    if not isinstance(plan_data, dict) or not isinstance(plan_data.get("rules", []), list):
        raise ArtifactError(f"{d}: corrupt plan.json: expected an object with a list of rules")
    size = manifest.get("input_size")
    if size is not None and (
        not isinstance(size, list) or not all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ArtifactError(
            f"{d}: corrupt manifest: input_size must be a list of positive ints, got {size!r}"
        )
    if not isinstance(plan_data.get("sources", {}), dict) or not isinstance(
        plan_data.get("params", {}), dict
    ):
        raise ArtifactError(f"{d}: corrupt plan.json: 'sources' and 'params' must be objects")
    return manifest, plan_data


TRUST_ENV = "SURGERY_TRUSTED_FACTORIES"
#: model factories shipped with surgery itself: trusted like timm's registry (their options are
#: plain numbers and flags from the reference's query string)
BUILTIN_FACTORIES = frozenset({"surgery.groups.models:plain_cnn"})


def _check_base(d: Path, base: Any, trust_factory: bool) -> None:
    """A base must be data, not a way to run code: factory bases need the caller's explicit trust.

    An artifact names its base as a model reference. ``timm:``/``torchvision:`` names and artifact
    directories only build registered architectures; a ``pkg.module:factory`` reference imports and
    calls Python code, so loading it from a file someone else wrote needs ``trust_factory=True`` or
    the module in ``$SURGERY_TRUSTED_FACTORIES`` (comma-separated module names, ``*`` for all);
    surgery's own factories (``BUILTIN_FACTORIES``) are trusted like the registries.
    """
    if (
        not isinstance(base, dict)
        or not isinstance(base.get("ref"), str)
        or not isinstance(base.get("kind"), str)
    ):
        raise ArtifactError(f"{d}: corrupt manifest: 'base' must be an object with 'ref' and 'kind'")
    ref, kind = base["ref"], base["kind"]
    head = ref.partition("?")[0]
    expected = {
        "timm": head.startswith("timm:"),
        "torchvision": head.startswith("torchvision:"),
        "artifact": ":" not in head,
    }
    if kind in expected:
        if not expected[kind]:
            raise ArtifactError(
                f"{d}: corrupt manifest: base kind '{kind}' does not match its reference '{ref}'"
            )
        return
    if kind != "factory":
        raise ArtifactError(f"{d}: corrupt manifest: unknown base kind '{kind}'")
    module = head.partition(":")[0]
    allowed = [m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()]
    if trust_factory or "*" in allowed or module in allowed or head in BUILTIN_FACTORIES:
        return
    raise ArtifactError(
        f"{d}: its base model is built by the Python factory '{head}'; loading it would run that code. "
        f"If you trust it, pass trust_factory=True (or set {TRUST_ENV}={module}), or pass the base model itself"
    )


def _rebuild_ref(base: dict[str, Any]) -> str:
    """The base reference without pretrained downloads or local weight paths: the artifact has the weights."""
    head, opts = split_ref(base["ref"])
    opts.pop("pretrained", None)
    opts.pop("weights", None)
    if base.get("kind") == "artifact":
        return head
    query = "&".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items())
    return head + (f"?{query}" if query else "")


def load(directory: str | Path, *, model: nn.Module | None = None, trust_factory: bool = False) -> Result:
    """Rebuild an artifact: base model, re-applied plan, weights loaded strictly.

    ``model`` may supply the base model directly. A base built by a Python factory
    (``pkg.module:factory``) is only rebuilt with ``trust_factory=True`` or when its module is
    listed in ``$SURGERY_TRUSTED_FACTORIES``: loading a file must not run arbitrary code.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_weights

    d = Path(directory)
    manifest, plan_data = read_manifest(d)
    base_data = manifest.get("base")
    base: BaseInfo | None = None
    if base_data is not None and model is None:
        _check_base(d, base_data, trust_factory)
    if model is None:
        if not base_data:
            raise ArtifactError(
                f"{d}: the base model was given as a Python object; pass it as load(dir, model=...)"
            )
        model, _ = load_model(_rebuild_ref(base_data))
    if base_data:
        base = BaseInfo(
            ref=base_data["ref"],
            kind=base_data["kind"],
            name=base_data["name"],
            options=base_data.get("options") or {},
            input_size=tuple(base_data["input_size"]) if base_data.get("input_size") else None,
        )
    sources = plan_data.get("sources") or {}
    main_file = manifest.get("recipe_file") or "recipe.recipe"
    text = sources.get(main_file) or (d / "recipe.recipe").read_text(encoding="utf-8")
    try:
        tree = parse(text, main_file)
        result = apply(
            tree,
            model,
            params=plan_data.get("params") or {},
            loader=IncludeLoader(sources),
            verify=False,
            input_size=tuple(manifest["input_size"]) if manifest.get("input_size") else None,
        )
    except UserError as exc:
        raise ArtifactError(f"{d}: the saved recipe no longer applies to its base model: {exc}") from None
    saved = {r["index"]: r["matched"] for r in plan_data.get("rules", [])}
    for index, names in result.plan.matched().items():
        if saved.get(index, names) != names:
            raise ArtifactError(
                f"{d}: the base model changed since the artifact was saved: rule {index} now matches "
                f"{len(names)} module(s), the artifact recorded {len(saved[index])}"
            )
    try:
        load_weights(result.model, str(d / "model.safetensors"), strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{d / 'model.safetensors'}: cannot load weights: {first}") from None
    result.base = base
    result.base_weights_sha256 = manifest.get("base_weights_sha256")
    result.contract = manifest.get("input_contract") or result.contract
    return result
