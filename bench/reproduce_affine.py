"""Affine robustness on ``affine_digits``: plain CNN vs its GL+(2) and SL(2) versions (and escnn C_N).

The affNIST protocol in miniature (Mironenco & Forre, ICLR 2024, Sec. 5): train on digits centred
on a 40x40 canvas (no augmentation), test on the same held-out digits as they are ("in-dist") and
under random affine maps in two regimes of ``surgery.train.data.AFFINE_REGIMES``: ``mild``
(rotation +-20 deg, per-axis scale 0.8-1.2, shear +-0.3, shift +-3 px) and ``hard`` (+-45 deg,
0.7-1.3, +-0.5, +-5 px). Every model gets the same budget: epochs, batch, Adam, warmup + cosine
schedule, seed.

The group networks are built the way a user builds them: ``surgery.apply`` of the shipped
``recipes/affine-equivariant.recipe`` to ``surgery.groups.models:plain_cnn``, the recipe text
adjusted for the CPU budget (samples, separable group convs, ``resample``) and for SL(2) by
substituting the group line. The plain baseline is the very model the recipe converts.

Reported per model: parameters, accuracies, training wall time, and, after training, the
off-lattice error of the logits on analytic blob images (no interpolation error):

* ``equivariance``: ``||F(f o a^-1; a S) - F(f; S)|| / ||F(f; S)||`` with the sample set
  co-transformed (``groups.equivariance.offlattice_error``), the quantity the layers are designed
  to make small; mean over the transforms of ``groups.equivariance.TRANSFORMS`` the group contains;
* ``digit equivariance``: the same on exact transforms of test digits (``digit_probes``):
  in-distribution probes, still with no interpolation error;
* ``invariance``: ``||F(f o a^-1) - F(f)|| / ||F(f)||`` with the network as deployed (fixed
  evaluation samples): what a test-time affine map actually does to the logits; defined for every
  model, the plain CNN included, over the rotation, shear and stretch transforms.

The training loop is a plain one rather than ``surgery.train.finetune``: the repo loop resolves
its input normalisation from timm's data config (ImageNet statistics for a model timm does not
know), and here every model must see exactly the same [0, 1] inputs, batches and steps.

Sample sets (group networks): by default one fixed set for training and test (``--resample
never``). ``--pool K`` trains on K fixed sets cycled step by step (set k of ``sample_set``);
``--mc K`` also evaluates with the logits / softmax averaged over sets 0 .. K-1 (test-time
Monte-Carlo estimate of the group integral), ``--mc-recal M`` with the BatchNorm statistics
re-estimated per set on M training images; ``--save`` / ``--load`` reuse trained weights for a
second evaluation. Measured (docs/benchmarks.md): MC averaging ruins a one-set network, and a
pool of 4 with MC over the pool is the only variant that raised GL+(2)'s hard-regime accuracy.

GPU: ``--device cuda --amp`` (bfloat16 autocast) with ``--steps N`` and ``--resample train`` is the
paper's protocol (samples redrawn every step); after such training the head's BatchNorm statistics
are re-estimated on the deployed fixed sample set (``--recal``, 1,024 training images by default).
``bench/gpu_session.sh`` runs the documented GPU measurements in one time-boxed session.
``--spatial-pool blurmax|blur`` (anti-aliased max / average pooling), ``--max-upsample`` (the
invariant max over a finer bicubic interpolant), ``--radius`` and ``--stencil fit`` vary the group
layers. ``--layer-errors`` (group nets) also reports where the co-transformed error arises: per
top-level layer, the error of each channel's maximum over samples and space (``layer_errors``).

escnn (optional; ``--models escnn``): a C_N-regular steerable CNN of the same shape, run from a
separate environment with escnn installed (it needs a Fortran compiler to build ``py3nj``);
skipped with a message when ``import escnn`` fails. Results of separate invocations are merged
into the JSON by model name.

Examples::

    python bench/reproduce_affine.py --quick
    python bench/reproduce_affine.py --width 16 --samples 8 --epochs 4 --threads 2
    /tmp/escnn-venv/bin/python bench/reproduce_affine.py --models escnn --width 16 --epochs 4
    python bench/reproduce_affine.py --models gl2 --epochs 6 --pool 4 --tag pool4 --mc 4 --mc-recal 512
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from surgery.groups import GroupSpec, LiftingConv, plain_cnn
from surgery.groups.equivariance import (
    TRANSFORMS,
    blob_image,
    canvas_points,
    offlattice_error,
    relative_l2,
)
from surgery.groups.sampling import Grid, GroupSamples, draw_pairs
from surgery.train.calibration import recalibrate_batchnorm
from surgery.train.data import AFFINE_REGIMES, _warp, affine_matrices, build_dataset

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "affine-equivariant.recipe"
DEFAULT_JSON = ROOT / "bench" / "results" / "affine_digits.json"
REGIMES = ("none", "mild", "hard")
MODELS = ("plain", "gl2", "sl2", "escnn")


# ------------------------------------------------------------------------------------ data


def load_split(split: str, regime: str = "none", copies: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """All of one split of ``affine_digits`` as tensors (the set is small and in memory)."""
    spec = f"affine_digits(canvas=40, digit_size=20, regime={regime!r}, copies={copies}, seed={seed})"
    ds = build_dataset(spec, split)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    return x, y


def component_splits(
    x: Tensor, y: Tensor, copies: int, regime: str = "hard"
) -> dict[str, tuple[Tensor, Tensor]]:
    """Test digits under each component of ``regime`` alone (rotation, per-axis scale, shear, shift).

    Says which part of an affine map a model is robust to: the regime's ranges with every other
    component at identity, ``copies`` maps per digit, the same seed for every component.
    """
    r = AFFINE_REGIMES[regime]
    parts = {
        "rotation": dataclasses.replace(AFFINE_REGIMES["none"], rotation=r.rotation),
        "scale": dataclasses.replace(AFFINE_REGIMES["none"], scale=r.scale),
        "shear": dataclasses.replace(AFFINE_REGIMES["none"], shear=r.shear),
        "shift": dataclasses.replace(AFFINE_REGIMES["none"], translation=r.translation),
    }
    xs, ys = x.cpu().repeat(copies, 1, 1, 1), y.cpu().repeat(copies)
    return {
        name: (
            _warp(xs, affine_matrices(len(xs), ranges, np.random.RandomState(1))).to(x.device),
            ys.to(y.device),
        )
        for name, ranges in parts.items()
    }


# ---------------------------------------------------------------------------------- models


def recipe_text(group: str, args: argparse.Namespace) -> str:
    """The shipped recipe, adjusted for the budget; SL(2) by substituting the group line."""
    text = RECIPE.read_text()
    n = args.samples
    text = re.sub(r"group G = GL\+\(2\)", "group G = SL(2)" if group == "sl2" else "group G = GL+(2)", text)
    text = re.sub(r"samples\s*=\s*\d+", f"samples       = {n}", text)
    text = re.sub(
        r"rotation\s*=\s*grid\(\d+\)", f'rotation      = grid({n})\n  resample      = "{args.resample}"', text
    )
    if args.sigma is not None:  # spread of the positive-definite factor (log singular values)
        text = re.sub(r"lognormal\(sigma=[0-9.]+\)", f"lognormal(sigma={args.sigma:g})", text)
    kernel = f"siren(width={args.inr_width}, depth=3, w0={args.w0:g})"
    if args.radius is not None:  # the kernels' spatial window (layer default 1.4)
        kernel += f", radius={args.radius:g}"
    text = text.replace("siren(width=60, depth=3, w0=10)", kernel)
    if args.spatial_pool != "max":  # anti-aliased (blurmax, blur) or mean pooling
        text = text.replace(
            "GroupSpatialPool(group=G)", f'GroupSpatialPool(group=G, reduce="{args.spatial_pool}")'
        )
    if args.group_norm == "batch":  # per-channel statistics over (B, N, H, W): no whole-map mean
        text = text.replace("GroupLayerNorm(group=G)", "GroupBatchNorm(group=G)")
    if args.separable:
        text = text.replace("GroupConv(group=G, kernel=", "GroupConv(group=G, separable=true, kernel=")
    return text


def build_plain(args: argparse.Namespace) -> nn.Module:
    return plain_cnn(width=args.width, pool_norm=args.pool_norm, input_pad=args.input_pad)


def build_group(group: str, args: argparse.Namespace) -> nn.Module:
    """``surgery.apply(recipe, plain_cnn(...))``: the recipe route, not a hand-built network."""
    from surgery import apply

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "affine-equivariant.recipe"
        path.write_text(recipe_text(group, args))
        # the recipe's `stencil` and `upsample` params (shipped defaults "fit", 4); this script
        # defaults to the paper's "fixed" and 1 so that the commands behind earlier results
        # reproduce them
        params = {"stencil": args.stencil, "upsample": args.max_upsample}
        return apply(str(path), build_plain(args), **params).model


def build_escnn(args: argparse.Namespace) -> nn.Module:
    """C_N-regular steerable CNN with the plain CNN's shape (lift, residual block, pool, conv, max)."""
    from escnn import gspaces
    from escnn import nn as enn

    gs = gspaces.rot2dOnR2(N=args.escnn_n)
    # regular fields of |C_N| channels each; default width / sqrt(N) fields, --escnn-fields to match sizes
    fields = args.escnn_fields or max(1, round(args.width / math.sqrt(args.escnn_n)))
    tin = enn.FieldType(gs, [gs.trivial_repr])
    t = enn.FieldType(gs, fields * [gs.regular_repr])

    class Block(enn.EquivariantModule):
        def __init__(self) -> None:
            super().__init__()
            self.in_type = self.out_type = t
            self.body = enn.SequentialModule(
                enn.R2Conv(t, t, 5, padding=2, bias=False),
                enn.InnerBatchNorm(t),
                enn.GELU(t) if hasattr(enn, "GELU") else enn.ELU(t),
                enn.R2Conv(t, t, 5, padding=2, bias=False),
                enn.InnerBatchNorm(t),
            )
            self.act = enn.ELU(t)

        def forward(self, x: Any) -> Any:  # escnn GeometricTensor in and out
            return self.act(x + self.body(x))

        def evaluate_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
            return input_shape

    class EscnnCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_type = tin
            self.features = enn.SequentialModule(
                enn.R2Conv(tin, t, 5, bias=False),
                enn.InnerBatchNorm(t),
                enn.ELU(t),
                Block(),
                enn.InnerBatchNorm(t),
                enn.PointwiseMaxPool2D(t, 2),
                enn.R2Conv(t, t, 5, bias=False),
                enn.InnerBatchNorm(t),
                enn.ELU(t),
                enn.GroupPooling(t),
            )
            c = fields
            self.head = nn.Sequential(
                *([nn.BatchNorm1d(c)] if args.pool_norm else []),
                nn.Linear(c, 256, bias=False),
                nn.LayerNorm(256),
                nn.GELU(),
                nn.Dropout(0.3),
                nn.Linear(256, 10),
            )

        def forward(self, x: Tensor) -> Tensor:
            y = self.features(enn.GeometricTensor(x, self.in_type)).tensor
            return self.head(y.amax((-2, -1)))

    return EscnnCNN()


def group_spec(model: nn.Module) -> GroupSpec | None:
    for m in model.modules():
        if isinstance(m, LiftingConv):
            return m.group
    return None


@torch.no_grad()
def pooled_spread(model: nn.Module, x: Tensor) -> float:
    """Between-image std / mean of the globally pooled features (the input of the head).

    Small values mean the invariant features are a common offset plus a small image-dependent part:
    the diagnosis behind ``plain_cnn(pool_norm=True)`` (docs/groups.md, Training).
    """
    probe = copy.deepcopy(model)  # a training-mode forward would move the original's BN statistics
    seen: list[Tensor] = []
    probe.head.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    with torch.random.fork_rng():  # nor may it consume the random stream the training run uses
        probe.train()(x)
    feats = seen[0]
    return float(feats.std(0).mean() / feats.mean().abs())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sample_set(spec: GroupSpec, k: int) -> GroupSamples:
    """The k-th seeded sample set: set 0 is the spec's fixed (deployed) set, k > 0 an independent draw.

    k > 0 redraws the positive-definite factors from the seed ``spec.seed + k`` and, for a rotation
    grid, also rotates the whole grid by a seeded uniform angle: with the recipe's plain ``grid(N)``
    every set would otherwise share the same N angles, and averaging over sets would integrate over
    scale/shear only, not over the rotation part of the group.
    """
    if k == 0:
        return spec.fixed()
    gen = torch.Generator().manual_seed(int(spec.seed) + k)
    rotation = spec.rotation
    if isinstance(rotation, Grid):
        rotation = dataclasses.replace(rotation, random_offset=True)
    return draw_pairs(
        spec.n,
        spec.samples,
        scale=spec.scale,
        rotation=rotation,
        traceless=spec.traceless,
        generator=gen,
        training=True,  # the grid offset is only applied to training draws
        weighted=spec.weights == "haar",
    )


# -------------------------------------------------------------------------------- training


def autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """bfloat16 autocast with ``--amp`` (the paper trains in mixed precision), else a no-op."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp)


def sync(args: argparse.Namespace) -> None:
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()


def train(model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace) -> tuple[float, list[float]]:
    """Adam, linear warmup then cosine decay per step, seeded shuffles; returns (seconds, loss curve).

    ``--steps`` fixes the number of optimizer steps (the last epoch may be partial), else ``--epochs``
    full epochs; the loss curve has one entry per epoch.
    """
    torch.manual_seed(args.seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(y) // args.batch
    total = args.steps or steps_per_epoch * args.epochs
    epochs = math.ceil(total / steps_per_epoch)
    report_every = max(1, epochs // 20)
    warm = min(args.warmup, total)

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    curve: list[float] = []
    sync(args)
    t0 = time.perf_counter()
    step = 0
    spec = group_spec(model)
    # a pool of K fixed sample sets, cycled step by step: between one fixed set ("never", which
    # the network overfits) and a fresh set every step ("train", too slow to learn on this budget)
    pool = [sample_set(spec, k) for k in range(args.pool)] if spec is not None and args.pool > 1 else []
    for epoch in range(epochs):
        if spec is not None and args.resample_from is not None and epoch == args.resample_from:
            # curriculum: fit on one fixed sample set first (fast), then redraw every step so the
            # kernels must hold for any set (what approximate invariance at test time relies on)
            spec.resample = "train"
        perm = torch.randperm(len(y), generator=gen).to(x.device)
        running: list[Tensor] = []  # summed on the device: no host sync per step
        for b in range(min(steps_per_epoch, total - step)):
            idx = perm[b * args.batch : (b + 1) * args.batch]
            with contextlib.ExitStack() as stack:
                if pool:
                    stack.enter_context(spec.use(pool[step % len(pool)]))
                stack.enter_context(autocast(args))
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running.append(loss.detach())
            step += 1
        curve.append(float(torch.stack(running).float().mean()))
        if (epoch + 1) % report_every == 0 or epoch + 1 == epochs:
            print(
                f"  epoch {epoch + 1}/{epochs} (step {step}): loss {curve[-1]:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    sync(args)
    return time.perf_counter() - t0, curve


@torch.no_grad()
def logits(model: nn.Module, x: Tensor) -> Tensor:
    """Evaluation-mode logits in float32 (on the deployed sample set unless one is forced)."""
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model(x[i : i + 256].to(dev)).float() for i in range(0, len(x), 256)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((logits(model, x).argmax(-1).cpu() == y.cpu()).float().mean())


def _avg_acc(scores: Tensor, y: Tensor) -> float:
    """Accuracy of ``scores`` (sets, B, classes) averaged over the sample sets."""
    return float((scores.mean(0).argmax(-1) == y).float().mean())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Re-estimate every BatchNorm's running statistics on ``x`` (training images, current set).

    The pooled group features are a large set-dependent offset plus a small image-dependent part
    (docs/groups.md, Training), so the head's BatchNorm statistics belong to the sample set(s)
    they were collected on: on any other set every image lands in one class. Recomputing them on
    training images for the set in use (the one forced with ``spec.use``) is label-free test-time
    calibration (``surgery.train.calibration``, which ``surgery finetune`` runs on the deployed
    set). Returns the old buffers for ``restore_bn``.
    """
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    with torch.random.fork_rng():  # dropout in train mode must not move the run's random stream
        recalibrate_batchnorm(model, (x[i : i + 256] for i in range(0, len(x), 256)), fixed_set=False)
    model.eval()
    return saved


def restore_bn(model: nn.Module, saved: dict[str, Tensor]) -> None:
    model.load_state_dict(saved, strict=False)


@torch.no_grad()
def mc_accuracies(
    model: nn.Module, data: dict[str, tuple[Tensor, Tensor]], mc: int, pool: int, recal: int
) -> dict[str, Any]:
    """Test-time Monte-Carlo averaging over sample sets ``0 .. mc-1`` (``sample_set``), per regime.

    A group conv is equivariant only for co-transformed samples; one fixed set makes the deployed
    network a function of that set. Averaging over independent sets approximates the integral
    over the group that makes the pooled output invariant. Reports the accuracy of the averaged
    logits and of the averaged softmax for the first K = 1, 2, 4, ... sets; for a network trained
    on a pool of ``pool`` sets (sets ``0 .. pool-1``) also the average over sets it never saw
    (``pool .. mc-1``) and over its pool only. ``recal > 0``: BatchNorm statistics re-estimated
    per set on that many training images (``recalibrate_bn``); keys then start with ``mc recal``.
    """
    spec = group_spec(model)
    assert spec is not None
    out: dict[str, Any] = {}
    ks = sorted({k for k in (1, 2, 4, 8, mc) if k <= mc})
    name = "mc recal" if recal else "mc"
    per_set: dict[str, list[Tensor]] = {r: [] for r in REGIMES}
    for k in range(mc):
        with spec.use(sample_set(spec, k)):
            saved = recalibrate_bn(model, data["train"][0][:recal]) if recal else None
            for regime in REGIMES:
                per_set[regime].append(logits(model, data[regime][0]))
            if saved is not None:
                restore_bn(model, saved)
    for regime in REGIMES:
        y = data[regime][1]
        z = torch.stack(per_set[regime])  # (mc, B, classes)
        p = z.softmax(-1)
        out[f"{name} logits {regime}"] = {str(k): _avg_acc(z[:k], y) for k in ks}
        out[f"{name} softmax {regime}"] = {str(k): _avg_acc(p[:k], y) for k in ks}
        out[f"{name} single-set acc {regime}"] = [_avg_acc(zk[None], y) for zk in z]
        if 1 < pool < mc:
            out[f"{name} logits {regime} train pool"] = _avg_acc(z[:pool], y)
            out[f"{name} logits {regime} unseen sets"] = _avg_acc(z[pool:], y)
    return out


# ----------------------------------------------------------------------------- equivariance


def _in_group(name: str, a: Tensor, group: str) -> bool:
    if group == "sl2":
        return abs(float(torch.linalg.det(a)) - 1.0) < 1e-9
    return True


@torch.no_grad()
def equivariance_errors(model: nn.Module, group: str, args: argparse.Namespace) -> dict[str, float]:
    """Co-transformed-samples error (group nets) and as-deployed invariance error (all nets).

    float64 where the model converts (ours); escnn's modules stay float32 (its kernel bases do not
    follow ``.to(float64)``), enough for errors of a few percent.
    """
    dtype = torch.float32 if group == "escnn" else torch.float64
    model = model.to(dtype).eval()
    out: dict[str, float] = {}
    spec = group_spec(model)
    if spec is not None:
        errs = {
            k: offlattice_error(model, spec, a, size=40, batch=args.probes, seed=0)
            for k, a in TRANSFORMS.items()
            if _in_group(k, a, group)
        }
        out.update({f"equivariance {k}": v for k, v in errs.items()})
        out["equivariance"] = statistics.fmean(errs.values())
        probe = functools.partial(digit_probes, args.probes * 4)
        errs = {
            k: offlattice_error(model, spec, a, probe=probe, dtype=dtype)
            for k, a in TRANSFORMS.items()
            if _in_group(k, a, group)
        }
        out.update({f"digit equivariance {k}": v for k, v in errs.items()})
        out["digit equivariance"] = statistics.fmean(errs.values())
    inv = {}
    dev = next(model.parameters()).device
    x = blob_image(40, None, batch=args.probes, seed=0, dtype=dtype).to(dev)
    y = model(x)
    for k, a in TRANSFORMS.items():
        if k == "scale 1.2":
            continue  # not volume-preserving: compared on the transforms every model sees alike
        inv[k] = relative_l2(model(blob_image(40, a, batch=args.probes, seed=0, dtype=dtype).to(dev)), y)
    out.update({f"invariance {k}": v for k, v in inv.items()})
    out["invariance"] = statistics.fmean(inv.values())
    model.to(torch.float32)
    return out


@torch.no_grad()
def layer_errors(model: nn.Module, group: str, n_digits: int = 64) -> dict[str, dict[str, float]]:
    """Co-transformed error of each top-level layer's invariant summary, per transform.

    The summary of a group feature map ``(B, C, N, H, W)`` is each channel's maximum over samples
    and space, invariant in the continuum once the sample set is co-transformed (any other output:
    its flattened values). Reported as the relative L2 over the digit probes, raw and after
    subtracting the mean over images ("centred": the image-dependent part, which is what the head's
    BatchNorm passes on). Localises where an off-lattice map first changes what the head sees.
    """
    model = model.to(torch.float64).eval()
    spec = group_spec(model)
    assert spec is not None, "layer errors need a group network"
    outputs: dict[str, Tensor] = {}
    hooks = [
        mod.register_forward_hook(lambda _m, _i, o, n=name: outputs.__setitem__(n, o.detach()))
        for name, mod in model.named_children()
        if not isinstance(mod, nn.Flatten)
    ]

    def summaries(x: Tensor, s: GroupSamples) -> dict[str, Tensor]:
        outputs.clear()
        with spec.use(s):
            model(x)
        return {k: v.amax(dim=(2, 3, 4)) if v.dim() == 5 else v.flatten(1) for k, v in outputs.items()}

    s = spec.fixed()
    base = summaries(digit_probes(n_digits, None), s)
    out: dict[str, dict[str, float]] = {}
    try:
        for k, a in TRANSFORMS.items():
            if not _in_group(k, a, group):
                continue
            moved = summaries(digit_probes(n_digits, a), s.transform(a))
            for layer, ref in base.items():
                centred = relative_l2(moved[layer] - moved[layer].mean(0), ref - ref.mean(0))
                out.setdefault(layer, {})[f"{k} raw"] = relative_l2(moved[layer], ref)
                out[layer][f"{k} centred"] = centred
    finally:
        for h in hooks:
            h.remove()
        model.to(torch.float32)
    return out


def digit_probes(n: int, a: Tensor | None, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The first ``n`` test digits of ``affine_digits`` as exact samples of ``f o a^-1``.

    A training-style image is a continuous function: the bilinear interpolant of the 8x8 digit over
    a 20x20 square centred on the 40x40 canvas, zero outside. Sampling that function at ``a^-1 p``
    (``grid_sample`` on the 8x8 source) transforms it with no second interpolation, so the
    co-transformed error on these probes measures the network, as the blob probes do, but on
    in-distribution images. ``a=None`` reproduces the data set's images (tested to 3e-7).
    """
    from surgery.train.data import _digits_arrays, _digits_split

    x8, _ = _digits_arrays()
    img8 = torch.from_numpy(x8[_digits_split()["test"][:n]] / 16.0)[:, None].to(torch.float64)
    canvas, digit = 40, 20
    off = (canvas - digit) // 2 - (canvas - 1) / 2.0  # the square's first pixel centre, from the centre
    # coordinates normalised over the digit square, as grid_sample(align_corners=False) reads them
    uv = (canvas_points(canvas, a) - off + 0.5) / digit * 2 - 1
    grid = uv.reshape(1, canvas, canvas, 2).expand(len(img8), -1, -1, -1)
    out = F.grid_sample(img8, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (uv.abs() <= 1).all(-1).reshape(1, 1, canvas, canvas)
    return (out * inside).clamp(0, 1).to(dtype)


def warp(x: Tensor, a: Tensor) -> Tensor:
    """``f o a^-1`` about the canvas centre (bilinear), ``a`` acting on (x = column, y = row): the
    data set's own warp (``affine_digits`` test images) with no translation."""
    forward = np.zeros((len(x), 2, 3))
    forward[:, :, :2] = a.to(torch.float64).numpy()
    return _warp(x, forward)


@torch.no_grad()
def digit_consistency(model: nn.Module, group: str, x: Tensor) -> dict[str, float]:
    """Prediction agreement between a digit and its transformed copy, per transform, in percent.

    Unlike the relative L2 of logits this does not depend on how the logits are scaled (a trained
    head divides the pooled features by their small between-image spread): ``agree`` compares
    ``argmax F(f o a^-1)`` with ``argmax F(f)`` as deployed (every model); ``agree co-transformed``
    runs the transformed digit on the co-transformed sample set ``a S`` (group networks).
    """
    model = model.float().eval()
    spec = group_spec(model)
    x = x.to(next(model.parameters()).device)
    base = model(x).argmax(-1)
    out: dict[str, list[float]] = {"agree": [], "agree co-transformed": []}
    for k, a in TRANSFORMS.items():
        if k == "scale 1.2" or not _in_group(k, a, group):
            continue
        xa = warp(x, a.float())
        out["agree"].append(float((model(xa).argmax(-1) == base).float().mean()))
        if spec is not None:
            s = spec.fixed()
            with spec.use(s):
                ref = model(x).argmax(-1)
            with spec.use(s.transform(a)):
                out["agree co-transformed"].append(float((model(xa).argmax(-1) == ref).float().mean()))
    return {k: statistics.fmean(v) for k, v in out.items() if v}


# ------------------------------------------------------------------------------------- main


def run_model(
    name: str, data: dict[str, tuple[Tensor, Tensor]], args: argparse.Namespace
) -> dict[str, Any] | None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if name == "plain":
        model = build_plain(args)
    elif name in ("gl2", "sl2"):
        model = build_group(name, args)
    else:
        try:
            model = build_escnn(args)
        except ImportError as exc:
            print(f"escnn: skipped ({exc}); install escnn in a separate environment to run it")
            return None
    tag = args.tag or (f"pool{args.pool}" if args.pool > 1 and name in ("gl2", "sl2") else "")
    label = name + (f" {tag}" if tag else "")  # a variant must not overwrite the documented row
    row: dict[str, Any] = {"model": label, "params": n_params(model)}
    if args.pool > 1 and name in ("gl2", "sl2"):
        row["train sample sets"] = args.pool
    print(f"{name}: {row['params']:,} parameters", flush=True)
    model.to(device)
    row["init pooled spread"] = pooled_spread(model, data["train"][0][:64])
    at_init = equivariance_errors(model, name, args)
    row.update(
        {
            f"init {k}": v
            for k, v in at_init.items()
            if k in ("equivariance", "digit equivariance", "invariance")
        }
    )
    if args.load:  # evaluate saved weights (same arguments) instead of training again
        load_model(model, f"{args.load}.{label.replace(' ', '_')}.safetensors", device=str(device))
    else:
        secs, curve = train(model, *data["train"], args)
        row.update(train_s=round(secs, 1), loss_curve=[round(v, 4) for v in curve])
    spec = group_spec(model)
    if spec is not None and args.recal and args.resample != "never":
        # trained on many sample sets, deployed on one: the BatchNorm statistics collected over
        # all training sets do not fit the fixed evaluation set's features (docs/groups.md)
        with autocast(args):
            row["acc_none before recal"] = accuracy(model, *data["none"])
        with spec.use(spec.fixed()):
            recalibrate_bn(model, data["train"][0][: args.recal])
        row["recal images"] = args.recal
    with autocast(args):
        row["train_acc"] = accuracy(model, *data["train"])
        for regime in REGIMES:
            row[f"acc_{regime}"] = accuracy(model, *data[regime])
        if args.components:
            parts = component_splits(*data["none"], args.copies)
            row["hard components"] = {k: accuracy(model, *xy) for k, xy in parts.items()}
            print(
                "  hard regime, one component at a time:",
                {k: f"{100 * v:.1f} %" for k, v in row["hard components"].items()},
                flush=True,
            )
    if args.save and not args.load:
        save_model(model, f"{args.save}.{label.replace(' ', '_')}.safetensors")
    if args.mc > 1 and name in ("gl2", "sl2"):
        t0 = time.perf_counter()
        row.update(mc_accuracies(model, data, args.mc, args.pool, args.mc_recal))
        row["mc recal_s" if args.mc_recal else "mc_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in row.items() if k.startswith("mc")}), flush=True)
    t0 = time.perf_counter()
    row.update(equivariance_errors(model, name, args))
    row.update(digit_consistency(model, name, data["none"][0][: args.consistency_digits]))
    if args.layer_errors and spec is not None:
        row["layer errors"] = layer_errors(model, name)
        for layer, errs in row["layer errors"].items():
            centred = {
                k.removesuffix(" centred"): f"{100 * v:.0f} %" for k, v in errs.items() if "centred" in k
            }
            print(f"  {layer:12s} centred max error: {centred}", flush=True)
    row["measure_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}), flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | in-dist acc | mild OOD | hard OOD | equivariance err, init → trained "
        "| on digits | invariance err, init → trained | agreement co-transformed / as deployed | train time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(r: dict[str, Any], k: str) -> str:
        return f"{100 * r[k]:.1f} %" if k in r else "–"

    for r in rows:
        eq = f"{pct(r, 'init equivariance')} → {pct(r, 'equivariance')}"
        eq_digits = f"{pct(r, 'init digit equivariance')} → {pct(r, 'digit equivariance')}"
        inv = f"{pct(r, 'init invariance')} → {pct(r, 'invariance')}"
        agree = f"{pct(r, 'agree co-transformed')} / {pct(r, 'agree')}"
        lines.append(
            f"| {r['model']} | {r['params']:,} | {100 * r['acc_none']:.1f} % | {100 * r['acc_mild']:.1f} % "
            f"| {100 * r['acc_hard']:.1f} % | {eq} | {eq_digits} | {inv} | {agree} | {r.get('train_s', float('nan')):.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["plain", "gl2", "sl2"], choices=MODELS)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8, help="group samples N (rotation grid of N angles)")
    ap.add_argument("--inr-width", type=int, default=60)
    ap.add_argument("--w0", type=float, default=10.0)
    ap.add_argument(
        "--sigma", type=float, default=None, help="lognormal sigma of the P factor (recipe: 0.158)"
    )
    ap.add_argument("--separable", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--stencil",
        choices=["fixed", "fit"],
        default="fixed",
        help='the recipe\'s stencil param: "fixed" (the conv\'s k x k, as the paper) or "fit" (grown per '
        "sample set to hold every kernel window; the shipped recipe's default)",
    )
    ap.add_argument(
        "--radius", type=float, default=None, help="kernel window radius of the group layers (default 1.4)"
    )
    ap.add_argument(
        "--spatial-pool",
        default="max",
        choices=["max", "mean", "blurmax", "blur"],
        help="the group nets' 2x2 spatial pooling (blurmax / blur: anti-aliased max / average pooling)",
    )
    ap.add_argument(
        "--group-norm",
        default="layer",
        choices=["layer", "batch"],
        help="what the recipe puts for BatchNorm2d: GroupLayerNorm (whole-map statistics per image, as "
        "the paper) or GroupBatchNorm (per-channel running statistics)",
    )
    ap.add_argument(
        "--max-upsample",
        type=int,
        default=1,
        help="the recipe's upsample param: invariant max over a bicubic interpolant this many times finer "
        "(1: over pixels, as the paper; the shipped recipe's default is 4)",
    )
    ap.add_argument(
        "--resample",
        default="never",
        choices=["train", "always", "never"],
        help="group sample sets: 'never' trains and tests on one fixed set (fast training), "
        "'train' redraws them every training step as the paper does",
    )
    ap.add_argument(
        "--resample-from",
        type=int,
        default=None,
        help="epoch (0-based) from which group samples are redrawn every training step",
    )
    ap.add_argument(
        "--pool",
        type=int,
        default=1,
        help="train on a pool of this many fixed sample sets, cycled step by step (1: --resample decides)",
    )
    ap.add_argument(
        "--mc",
        type=int,
        default=0,
        help="also evaluate with logits / softmax averaged over this many sample sets (test-time MC)",
    )
    ap.add_argument(
        "--mc-recal",
        type=int,
        default=0,
        help="with --mc: re-estimate BatchNorm statistics per sample set on this many training images",
    )
    ap.add_argument(
        "--load", default=None, help="evaluate weights saved with --save LOAD instead of training"
    )
    ap.add_argument(
        "--tag", default="", help="suffix of the model name in the results (default with --pool K: poolK)"
    )
    ap.add_argument("--save", default=None, help="save trained weights to SAVE.<model>.safetensors")
    ap.add_argument(
        "--recal",
        type=int,
        default=1024,
        help="group nets trained on redrawn sample sets: re-estimate BatchNorm statistics on the "
        "fixed evaluation set from this many training images before testing (0: keep the trained ones)",
    )
    ap.add_argument("--pool-norm", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--input-pad",
        type=int,
        default=0,
        help="zeros the plain CNN (and so its group versions) adds around its input",
    )
    ap.add_argument("--escnn-n", type=int, default=8, help="C_N of the escnn peer")
    ap.add_argument("--escnn-fields", type=int, default=None, help="regular fields per escnn layer")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; the data set lives on it whole")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast for training and accuracy")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    ap.add_argument("--copies", type=int, default=2, help="transformed copies of each test digit per regime")
    ap.add_argument("--probes", type=int, default=4, help="blob images for the equivariance errors")
    ap.add_argument(
        "--consistency-digits", type=int, default=128, help="test digits for the prediction-agreement check"
    )
    ap.add_argument(
        "--components",
        action="store_true",
        help="also the accuracy under each component of the hard regime alone (rotation, scale, shear, shift)",
    )
    ap.add_argument(
        "--layer-errors",
        action="store_true",
        help="group nets: per-layer co-transformed error of the channels' invariant maxima",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 epoch, width 8, N = 4: a smoke run")
    ap.add_argument("--json", default=None, help=f"results file (default {DEFAULT_JSON}; none with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.width, args.samples, args.copies, args.probes = 1, 8, 4, 1, 2
        args.consistency_digits = 32
    torch.set_num_threads(args.threads)
    assert set(REGIMES) <= set(AFFINE_REGIMES)

    data = {"train": load_split("train")}
    for regime in REGIMES:
        data[regime] = load_split("test", regime, copies=1 if regime == "none" else args.copies)
    data = {k: (x.to(args.device), y.to(args.device)) for k, (x, y) in data.items()}
    print(
        f"affine_digits: {len(data['train'][1])} train, {len(data['none'][1])} test "
        f"(x{args.copies} transformed per OOD regime)",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    for m in args.models:
        row = run_model(m, data, args)
        if row is not None:
            rows.append(row)
            if not (args.json is None and args.quick):
                save_rows([row], args)  # after every model: a run cut short keeps what it finished
    print()
    print(table(rows))


def save_rows(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Merge ``rows`` into the results file by model name (atomic replace)."""
    path = Path(args.json or DEFAULT_JSON)
    old: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    merged = {r["model"]: r for r in old.get("results", [])}
    for r in rows:  # new keys update a model's row; keys from earlier invocations are kept
        merged[r["model"]] = {**merged.get(r["model"], {}), **r}
    meta = {
        "args": vars(args),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "amp": args.amp,
    }
    runs = old.get("runs", {})
    for r in rows:
        runs[r["model"] + (" (eval)" if args.load else "")] = meta
    order = [m for m in MODELS if m in merged] + sorted(m for m in merged if m not in MODELS)
    out = {"results": [merged[m] for m in order], "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
