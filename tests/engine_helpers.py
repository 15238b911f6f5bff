"""Shared helpers for the engine tests: model table, snapshots, state-dict comparisons, a tiny factory.

Imported by the test modules as ``engine_helpers`` (pytest puts ``tests/`` on ``sys.path``), and
usable as a model reference: ``engine_helpers:tiny_net?width=8``.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery.models import BaseInfo, load_model

# ---------------------------------------------------------------- the model table


@dataclass(frozen=True)
class ModelCase:
    """A model the engine tests run on, with its metadata written out by hand (not via surgery.aliases)."""

    id: str
    ref: str
    first_conv: str
    classifier: str
    stem: tuple[str, ...]
    timm: bool = True
    slow: bool = False
    size: tuple[int, int, int] = (3, 32, 32)


CASES: tuple[ModelCase, ...] = (
    ModelCase("timm-resnet18", "timm:resnet18?num_classes=10", "conv1", "fc", ("conv1", "bn1", "maxpool")),
    ModelCase(
        "timm-resnet50",
        "timm:resnet50?num_classes=10",
        "conv1",
        "fc",
        ("conv1", "bn1", "maxpool"),
        slow=True,
    ),
    ModelCase(
        "timm-vit_small",
        "timm:vit_small_patch16_224?img_size=64&num_classes=10",
        "patch_embed.proj",
        "head",
        ("patch_embed", "norm_pre"),
        size=(3, 64, 64),
    ),
    ModelCase(
        "timm-convnext_tiny", "timm:convnext_tiny?num_classes=10", "stem.0", "head.fc", ("stem",), slow=True
    ),
    ModelCase(
        "timm-efficientnet_b0",
        "timm:efficientnet_b0?num_classes=10",
        "conv_stem",
        "classifier",
        ("conv_stem", "bn1"),
    ),
    ModelCase(
        "timm-densenet121",
        "timm:densenet121?num_classes=10",
        "features.conv0",
        "classifier",
        ("features.conv0", "features.norm0", "features.pool0"),
        slow=True,
    ),
    ModelCase(
        "tv-resnet18",
        "torchvision:resnet18?num_classes=10",
        "conv1",
        "fc",
        ("conv1", "bn1", "relu", "maxpool"),
        timm=False,
    ),
)
CASE = {c.id: c for c in CASES}


@functools.cache
def _built(ref: str) -> tuple[nn.Module, BaseInfo, Snapshot]:
    torch.manual_seed(0)
    model, base = load_model(ref)
    model.eval()
    return model, base, snapshot(model)


def built(ref: str) -> tuple[nn.Module, BaseInfo]:
    """Each model reference built once per test session (seeded, so every build is the same).

    The tests share these instances on purpose: every test checks that surgery leaves its input
    untouched (against the snapshot taken when it was built: ``pristine``), so a mutation shows up
    where it happens instead of being hidden by a fresh copy.
    """
    model, base, _ = _built(ref)
    return model, base


def pristine(ref: str) -> Snapshot:
    """The snapshot of ``built(ref)`` taken right after it was built."""
    return _built(ref)[2]


def probe(size: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *size), generator=g)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode forward without touching the model's train/eval flags for good."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for m, mode in modes.items():
            m.train(mode)


# ---------------------------------------------------------------- counting and names


def type_counts(model: nn.Module) -> Counter[str]:
    """How many modules of each exact type (by class name), the root included."""
    return Counter(type(m).__name__ for m in model.modules())


def count_exact(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


def count_subclass(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def names_of(model: nn.Module, pred: Any) -> list[str]:
    """Qualified names (module order, root excluded) of the modules for which ``pred(name, module)``."""
    return [n for n, m in model.named_modules() if n and pred(n, m)]


def under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------- snapshots: "never mutated"


@dataclass
class Snapshot:
    """Everything about a model that surgery must leave alone."""

    state: dict[str, torch.Tensor]
    tree: list[tuple[str, type]]
    grads: dict[str, bool]
    training: dict[str, bool]
    ids: dict[str, int] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)


_PLAIN = (bool, int, float, str, tuple, type(None))


def _plain_attrs(m: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, _PLAIN)}


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        tree=[(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        grads={n: p.requires_grad for n, p in model.named_parameters()},
        training={n: m.training for n, m in model.named_modules()},
        ids={n: id(m) for n, m in model.named_modules()},
        attrs={n: _plain_attrs(m) for n, m in model.named_modules()},
    )


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    """The model looks exactly as it did when ``before`` was taken: values, tree, flags, objects."""
    after = snapshot(model)
    assert after.tree == before.tree, "the module tree of the input model changed"
    assert after.ids == before.ids, "a submodule of the input model was swapped for another object"
    assert after.grads == before.grads, "requires_grad flags of the input model changed"
    assert after.training == before.training, "train/eval flags of the input model changed"
    assert after.attrs == before.attrs, "plain attributes of the input model changed"
    assert list(after.state) == list(before.state), "state-dict keys of the input model changed"
    for k, v in before.state.items():
        w = after.state[k]
        assert w.device == v.device and w.dtype == v.dtype, f"{k} moved or changed dtype"
        assert torch.equal(w, v), f"{k} of the input model changed value"


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- a small model for properties and factory refs


class MyConv(nn.Conv2d):
    """A Conv2d subclass: ``Conv2d`` does not match it, ``subclass nn.Conv2d`` does."""


class TinyNet(nn.Module):
    """A plain CNN without timm metadata: aliases fall back to heuristics."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            MyConv(w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.GELU(),
            nn.Conv2d(w, 2 * w, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.flatten(self.pool(self.features(x)))))


def tiny_net(width: int = 8, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """Factory for ``engine_helpers:tiny_net?width=8&num_classes=10``."""
    torch.manual_seed(0)
    return TinyNet(width=width, num_classes=num_classes, in_chans=in_chans)


def not_a_module(width: int = 8) -> int:
    """A factory that returns something other than a module."""
    return width


TINY_SIZE = (3, 16, 16)
