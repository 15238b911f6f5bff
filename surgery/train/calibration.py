"""BatchNorm statistics of networks that draw group samples: re-estimated on the deployed sample set.

A group network trained with ``resample = "train"`` sees a fresh Monte-Carlo sample set at every
step but is evaluated and deployed on one fixed set. Its BatchNorm running statistics are an average
over the training sets, and the pooled group features carry a large set-dependent offset, so those
statistics do not fit the fixed set: measured on affine-digits, a GL+(2) network loses 7 points of
accuracy to this (docs/benchmarks.md, Reproduction 2 on a GPU). Recomputing them on training images
with the fixed set in place is label-free and cheap (a few forward passes), and the fine-tuning loop
does it after every epoch for such models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from surgery.groups.spec import GroupSpec

DEFAULT_BATCHES = 8


def redrawing_specs(model: nn.Module) -> list[GroupSpec]:
    """Group specs of ``model`` whose training forwards draw fresh sample sets (``resample="train"``)."""
    specs: dict[int, GroupSpec] = {}
    for m in model.modules():
        spec = getattr(m, "group", None)
        if isinstance(spec, GroupSpec) and spec.resample == "train":
            specs[id(spec)] = spec
    return list(specs.values())


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibration_batches(model: nn.Module, setting: int | None) -> int:
    """Batches to recalibrate on: ``setting`` if given, else ``DEFAULT_BATCHES`` when needed, else 0."""
    if setting is not None:
        return setting
    needed = any(m.track_running_stats for m in batchnorms(model)) and bool(redrawing_specs(model))
    return DEFAULT_BATCHES if needed else 0


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor], *, fixed_set: bool = True) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them from ``batches`` (model inputs).

    The forwards run in training mode (batch statistics, cumulative average over the batches) on the
    fixed evaluation sample set of every redrawing group spec (``fixed_set=False``: on whatever set
    the caller forces with ``spec.use``). The caller keeps the random stream intact (dropout runs in
    training mode). Returns the number of images seen; with none, the statistics are left as they were.
    """
    bns = [m for m in batchnorms(model) if m.track_running_stats]
    batches = iter(batches)
    first = next(batches, None)
    if not bns or first is None:
        return 0
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts alike
    model.train()
    seen = 0
    try:
        with contextlib.ExitStack() as stack:
            for spec in redrawing_specs(model) if fixed_set else ():
                stack.enter_context(spec.use(spec.fixed()))
            for x in (first, *batches):
                model(x)
                seen += len(x)
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return seen
