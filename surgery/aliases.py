"""``@first_conv``, ``@classifier``, ``@pool``, ``@stem``, ``@stage(n)``, ``@model``: model metadata as selectors.

timm models describe themselves (``pretrained_cfg``, ``group_matcher``, ``feature_info``); other
models get documented heuristics, so a recipe written for one family keeps working on another.
Every alias resolves to qualified module names of the model it is asked about.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from surgery.errors import SurgeryError

POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)


def pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return dict(cfg) if isinstance(cfg, dict) else {}


def _existing(model: nn.Module, names: list[str]) -> list[str]:
    """The non-empty names that exist in the model (an empty name would be the model itself)."""
    modules = dict(model.named_modules())
    return [n for n in names if n and n in modules]


def first_conv(model: nn.Module) -> list[str]:
    """timm's ``pretrained_cfg['first_conv']``; otherwise the first Conv2d (or Linear) in module order.

    timm names several first layers where more than one conv sees the image (CrossViT's two patch
    embeddings, FastViT's MobileOne stem branches): all of them are returned, since an input encoding
    applied to only one would leave the others fed an unencoded, unnormalised image.
    """
    cfg = pretrained_cfg(model).get("first_conv")
    names = [cfg] if isinstance(cfg, str) else list(cfg) if isinstance(cfg, (tuple, list)) else []
    named = _existing(model, [str(n) for n in names if n])
    if named:
        return named
    for kinds in ((nn.Conv1d, nn.Conv2d, nn.Conv3d), (nn.Linear,)):
        for name, m in model.named_modules():
            if isinstance(m, kinds):
                return [name]
    return []


def classifier(model: nn.Module) -> list[str]:
    """timm's ``pretrained_cfg['classifier']`` (one name or several); else ``get_classifier()``; else the last Linear."""
    cfg = pretrained_cfg(model).get("classifier")
    names = [cfg] if isinstance(cfg, str) else list(cfg or [])
    found = _existing(model, [str(n) for n in names])
    if found:
        return found
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # a model whose get_classifier needs arguments or state
            head = None
        if isinstance(head, nn.Module):
            for name, m in model.named_modules():
                if m is head and name:
                    return [name]
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return last[-1:]


def pool(model: nn.Module) -> list[str]:
    """The global pooling before the classifier: a module named ``global_pool``; else the last adaptive pool."""
    named = [n for n, _ in model.named_modules() if n == "global_pool" or n.endswith(".global_pool")]
    if named:
        return named[-1:]
    pools = [n for n, m in model.named_modules() if isinstance(m, POOL_TYPES)]
    return pools[-1:]


def _matcher(model: nn.Module) -> dict[str, Any]:
    gm = getattr(model, "group_matcher", None)
    if not callable(gm):
        return {}
    try:
        out = gm(coarse=False)
    except Exception:  # not every model's matcher takes `coarse`
        try:
            out = gm()
        except Exception:
            return {}
    return out if isinstance(out, dict) else {}


def _patterns(spec: Any) -> list[str]:
    if isinstance(spec, str):
        return [spec]
    out = []
    for item in spec or []:
        out.append(item[0] if isinstance(item, (tuple, list)) else item)
    return [p for p in out if isinstance(p, str)]


def _topmost(names: list[str]) -> list[str]:
    kept: list[str] = []
    for n in names:
        if not any(n.startswith(k + ".") for k in kept):
            kept.append(n)
    return kept


def stem(model: nn.Module) -> list[str]:
    """timm's ``group_matcher()['stem']``; else the modules before the first stage."""
    pats = [re.compile(p) for p in _patterns(_matcher(model).get("stem"))]
    names = [n for n, _ in model.named_modules() if n]
    if pats:
        hits = _topmost([n for n in names if any(p.match(n) for p in pats)])
        if hits:
            return hits
    found = stages(model)
    if not found:
        return first_conv(model)
    start = found[min(found)][0]
    order = {n: i for i, n in enumerate(names)}
    return _topmost([n for n in names if order[n] < order[start] and not start.startswith(n + ".")])


def stem_parameters(model: nn.Module) -> list[str]:
    """Parameters the model holds directly that timm counts as stem (ViT ``cls_token``, ``pos_embed``...).

    A module selector cannot name them (they belong to the root module), so ``freeze @stem`` adds them.
    """
    pats = [re.compile(p) for p in _patterns(_matcher(model).get("stem"))]
    return [n for n, _ in model.named_parameters(recurse=False) if any(p.match(n) for p in pats)]


def stages(model: nn.Module) -> dict[int, list[str]]:
    """Stage number -> top-most module names of that stage."""
    names = [n for n, _ in model.named_modules() if n]
    stages: dict[int, list[str]] = {}
    for pat in _patterns(_matcher(model).get("blocks")):
        rx = re.compile(pat)
        if rx.groups < 1:
            continue
        for n in names:
            m = rx.match(n)
            if m and m.group(1) is not None and m.end() == len(n):
                stages.setdefault(int(m.group(1)), []).append(n)
    if stages:
        return {k: _topmost(v) for k, v in sorted(stages.items())}
    info = getattr(model, "feature_info", None)
    mods = dict(model.named_modules())
    if isinstance(info, list) and info and all(isinstance(i, dict) for i in info):
        return {i: [d["module"]] for i, d in enumerate(info) if d.get("module") in mods}
    # Fallback 1: numbered sibling containers (torchvision resnet: layer1..layer4).
    for name, m in model.named_modules():
        numbered: dict[str, dict[int, str]] = {}
        for child, sub in m.named_children():
            hit = re.fullmatch(r"([A-Za-z_]+?)(\d+)", child)
            if hit and len(sub._modules) > 0:
                prefix = f"{name}." if name else ""
                numbered.setdefault(hit.group(1), {})[int(hit.group(2))] = prefix + child
        best = max(numbered.values(), key=len, default={})
        if len(best) >= 2:
            return {k: [v] for k, v in sorted(best.items())}
    # Fallback 2: the children of the first container holding several blocks.
    for name, m in model.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 2:
            prefix = f"{name}." if name else ""
            return {i: [prefix + k] for i, (k, _) in enumerate(m.named_children())}
    return {}


def stage(model: nn.Module, n: int) -> list[str]:
    """Stage ``n`` as the model numbers it (timm ``group_matcher`` block ids: resnet ``layer2`` is stage 2)."""
    found = stages(model)
    if n not in found:
        have = ", ".join(str(k) for k in found) or "none"
        raise SurgeryError(f"@stage({n}) does not exist in this model (stages: {have})")
    return found[n]


def model_root(model: nn.Module) -> list[str]:
    return [""]


def nonlinear(model: nn.Module) -> list[str]:
    """Modules whose own forward code is not dynamic linear in explanation mode (torch.fx analysis).

    A product of two input-dependent factors (gates, attention), a division by an input-dependent
    value (norms), a norm function or an elementwise activation with a constant clip in the
    module's own code: what ``DynamicLinear`` rewrites. Modules with an explanation mode of their
    own, modules torch.fx cannot trace and the model itself are not included.
    """
    from surgery.fx import TraceError
    from surgery.layers.dynamic_linear import linearity
    from surgery.layers.explanation_mode import DetachableModule

    found = []
    for name, m in model.named_modules():
        if not name or isinstance(m, DetachableModule):
            continue
        try:
            if linearity(m).needs_rewrite:
                found.append(name)
        except TraceError:
            continue
    return found


ALIASES: dict[str, tuple[int, Callable[..., list[str]], str]] = {
    "first_conv": (0, first_conv, "the first convolution (or patch embedding)"),
    "classifier": (0, classifier, "the classification head"),
    "pool": (0, pool, "the global pooling before the classifier"),
    "stem": (0, stem, "the stem modules"),
    "stage": (1, stage, "stage n, numbered as the model numbers its blocks"),
    "model": (0, model_root, "the model itself (for `set`)"),
    "nonlinear": (0, nonlinear, "modules whose own code is not dynamic linear in explanation mode"),
}


# aliases that describe a property rather than a part every model has: empty is an answer, not an error
MAY_BE_EMPTY = {"nonlinear"}


def resolve(model: nn.Module, name: str, args: tuple[Any, ...]) -> list[str]:
    _arity, fn, _ = ALIASES[name]
    names = fn(model, *args)
    if not names and name not in MAY_BE_EMPTY:
        raise SurgeryError(f"@{name} does not resolve to any module of {type(model).__name__}")
    return names
