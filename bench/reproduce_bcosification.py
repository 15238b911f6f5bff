"""B-cosification in miniature (Arya et al., NeurIPS 2024) on scikit-learn's digits.

For each architecture (a small timm ResNet-18 and a small timm ViT) and each seed:

1. **standard**: the timm model, randomly initialised, trained on ``digits(size=32)`` with
   cross-entropy (it plays the role of the pretrained torchvision / timm model);
2. **B-cosified**: the shipped recipe (``bcosify-resnet`` / ``bcosify``, b = 2) applied to the
   trained standard model, then fine-tuned for ``epochs`` epochs (BCE with uniform off-labels, AGC);
3. **B-cos from scratch**: the *same* recipe applied to a freshly, randomly initialised model, trained
   for the same ``epochs`` epochs (same loss, AGC; its own learning rate and warm-up).

Test accuracy is recorded after every epoch. "Epochs to match" is the first epoch at which the
B-cosified model reaches the from-scratch model's final (and best) test accuracy; the speed-up is
the from-scratch epoch count over that (the paper: 4.7x for DenseNet-121, 9x for ViT-S on ImageNet).
Localisation is the grid pointing game on ``grid_digits`` (2x2 mosaics of digits of distinct classes
at the training scale, so 64x64 images): each cell's class is explained and the share of positive
contribution inside that cell is reported (chance 0.25). B-cos models are explained with their
dynamic linear map (``W(x) x`` in explanation mode), the standard model with input x gradient (on
the normalised input as it is fed, and on raw pixels), all through ``surgery.explain.explain``.
CNNs see the whole mosaic; ViTs, as in the B-cos ViT protocol (``--striding``), are explained on
32x32 crops with stride 16 whose contribution maps are summed back.

All three models use AdamW (no weight decay for the B-cos models) with a cosine schedule and
learning rate 1e-3; the B-cos runs use BCE with uniform off-labels and AGC (0.01), as B-cos v2 and
B-cosification do; from scratch has one warm-up epoch.

Commands (the numbers in docs/benchmarks.md)::

    python bench/reproduce_bcosification.py --parts cnn          # ~15 min on 2 shared CPU cores
    python bench/reproduce_bcosification.py --parts vit
    python bench/reproduce_bcosification.py --quick              # smoke run, 2-3 min
    python bench/reproduce_bcosification.py --device cuda --seeds 0 1 2 3 4

Raw results (settings, per-seed accuracy curves, timings, localisation) go to
``bench/results/bcosification_{part}.json`` (``_quick`` for smoke runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.explain import explain
from surgery.lang.values import Call
from surgery.train import FinetuneConfig, evaluate, finetune, resolve_input_pipeline
from surgery.train.data import build_dataset
from surgery.train.loop import ExplainFn
from surgery.train.metrics import grid_pointing_game, summarize_scores

log = logging.getLogger("bench.bcosification")

RESULTS = Path(__file__).resolve().parent / "results"
NORMALIZE_INSIDE = 'recipe "normalize-inside" v1\nencode input normalize_inside\n'


@dataclass
class PartSettings:
    """One architecture's protocol. ``epochs`` is shared by the B-cosified and from-scratch runs."""

    name: str
    model: str
    model_kwargs: dict[str, Any]
    recipe: str
    recipe_params: dict[str, Any] = field(default_factory=dict)
    size: int = 32
    epochs_standard: int = 8
    epochs: int = 12
    batch_size: int = 64
    lr_standard: float = 1e-3
    lr_bcosify: float = 1e-3
    lr_scratch: float = 1e-3
    warmup_scratch: int = 1
    weight_decay_standard: float = 0.05
    agc: float = 0.01
    grid_count: int = 150
    smooths: tuple[int, ...] = (0, 3)
    gpg_window: bool = False
    steps_per_epoch: int | None = None

    def describe(self) -> str:
        kw = "&".join(f"{k}={v}" for k, v in self.model_kwargs.items())
        return f"timm:{self.model}?{kw}"


PARTS: dict[str, PartSettings] = {
    # ResNet-18 at half width (channels 32-256): 2.8 M parameters, ~2x faster than full width on CPU.
    "cnn": PartSettings(
        name="cnn",
        model="resnet18",
        model_kwargs={"channels": (32, 64, 128, 256), "stem_width": 32},
        recipe="bcosify-resnet",
        epochs_standard=6,
        epochs=10,
        grid_count=100,
    ),
    # ViT: 32x32 input, patch 8 (16 tokens), mean pooling without class token (B-cos SimpleViT
    # style), dynamic image size so that the 64x64 grid mosaics can be explained.
    "vit": PartSettings(
        name="vit",
        model="vit_tiny_patch16_224",
        model_kwargs={
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 128,
            "depth": 6,
            "num_heads": 4,
            "global_pool": "avg",
            "class_token": False,
            "dynamic_img_size": True,
        },
        recipe="bcosify",
        epochs_standard=8,
        epochs=10,
        grid_count=50,
        gpg_window=True,
    ),
}


# ------------------------------------------------------------------------------------------- helpers


def build_model(s: PartSettings, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(s.model, num_classes=10, **s.model_kwargs)


def data_spec(s: PartSettings) -> Call:
    return Call("digits", (), {"size": s.size})


def grid_spec(s: PartSettings) -> Call:
    return Call("grid_digits", (), {"size": s.size, "grid": 2, "count": s.grid_count, "seed": 0})


def train_config(
    s: PartSettings,
    *,
    epochs: int,
    lr: float,
    seed: int,
    device: str,
    bcos: bool,
    warmup: int = 0,
    weight_decay: float = 0.0,
) -> FinetuneConfig:
    """AdamW + cosine; B-cos runs use BCE with uniform off-labels and AGC (B-cos v2 / B-cosification)."""
    block: dict[str, Any] = {
        "data": data_spec(s),
        "epochs": epochs,
        "batch_size": s.batch_size,
        "optimizer": Call("adamw", (), {"lr": lr, "weight_decay": weight_decay}),
        "schedule": Call("cosine", (), {"warmup_epochs": warmup}),
        "loss": Call("bce", (), {"off_label": "uniform"}) if bcos else Call("cross_entropy", (), {}),
        "seed": seed,
        "device": device,
        "keep_checkpoints": 1,
    }
    if bcos and s.agc > 0:
        block["clip_grad"] = Call("agc", (), {"clip_factor": s.agc})
    if s.steps_per_epoch is not None:
        block["steps_per_epoch"] = s.steps_per_epoch
    return FinetuneConfig.from_block(block)


def contributions(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``sum_c x * d logit / d x`` in explanation mode: W(x) x for B-cos models, IxG for standard ones."""
    return explain(model, images, classes, smooth=0).contributions


def windowed_contributions(window: int, chunk: int = 512) -> ExplainFn:
    """B-cos's ViT protocol (``--striding``): explain every ``window``-sized crop (stride and padding
    ``window // 2``) at the model's own input size and sum the contribution maps back (``fold``).

    The padding is filled with each image's per-channel minimum, i.e. the black background of the
    digits in whatever normalisation the model is fed.
    """
    stride = pad = window // 2

    def fn(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        fill = images.amin(dim=(2, 3), keepdim=True)
        padded = fill.expand(n, c, h + 2 * pad, w + 2 * pad).clone()
        padded[..., pad : pad + h, pad : pad + w] = images
        cols = F.unfold(padded, window, stride=stride)  # (n, c * window², L)
        num = cols.shape[-1]
        crops = cols.transpose(1, 2).reshape(n * num, c, window, window)
        targets = classes.repeat_interleave(num)
        maps = torch.cat(
            [
                contributions(model, crops[i : i + chunk], targets[i : i + chunk])
                for i in range(0, len(crops), chunk)
            ]
        )
        maps = maps.reshape(n, num, window * window).transpose(1, 2)
        summed = F.fold(maps, (h + 2 * pad, w + 2 * pad), window, stride=stride)
        return summed[:, 0, pad : pad + h, pad : pad + w]

    return fn


class _MultiSmooth:
    """Grid pointing game at several smoothing sizes from one set of explanations."""

    def __init__(self, smooths: tuple[int, ...]) -> None:
        self.scores: dict[int, list[torch.Tensor]] = {k: [] for k in smooths}

    def __call__(
        self, attributions: torch.Tensor, cells: torch.Tensor, grid: int, *, smooth: int = 0
    ) -> torch.Tensor:
        for k, out in self.scores.items():
            out.append(grid_pointing_game(attributions, cells, grid, smooth=k).cpu())
        return self.scores[smooth][-1]


def localisation(
    model: nn.Module, s: PartSettings, contract: dict[str, Any] | None, device: str
) -> dict[str, dict[str, float]]:
    """Grid pointing game summaries (mean and quartiles) keyed ``smooth=K``."""
    ms = _MultiSmooth(s.smooths)
    evaluate(
        model,
        grid_spec(s),
        input_contract=contract,
        explain_fn=windowed_contributions(s.size) if s.gpg_window else contributions,
        localisation_fn=ms,
        smooth=s.smooths[0],
        batch_size=100,
        device=device,
    )
    out = {}
    for k, scores in ms.scores.items():
        summary = summarize_scores(torch.cat(scores), "gpg")
        out[f"smooth={k}"] = {key: round(v, 4) for key, v in summary.items()}
    return out


def completeness(model: nn.Module, s: PartSettings, contract: dict[str, Any], device: str) -> float:
    """Max |logit - contributions - constant - logit bias| / |logit - logit bias| on 32 test digits."""
    pipeline = resolve_input_pipeline(model, contract)
    ds = build_dataset(data_spec(s), "test", data_config=pipeline.data_config)
    x = pipeline(torch.stack([ds[i][0] for i in range(32)]).to(device))
    was = model.training
    model.eval()
    e = explain(model, x)
    model.train(was)
    scale = (e.explained_logits - e.logit_bias).abs().clamp(min=1e-12)
    return float((e.residual.abs() / scale).max())


def first_epoch_reaching(acc0: float | None, curve: list[float], threshold: float) -> int | None:
    """First epoch (0 = before any training) whose test accuracy is >= ``threshold``; None if never."""
    if acc0 is not None and acc0 >= threshold - 1e-9:
        return 0
    for i, a in enumerate(curve):
        if a >= threshold - 1e-9:
            return i + 1
    return None


def _ratio(num: int | None, den: int | None) -> float | None:
    if num is None or den is None:
        return None
    return math.inf if den == 0 else num / den


def run_training(
    model: nn.Module,
    config: FinetuneConfig,
    out_dir: Path,
    contract: dict[str, Any] | None,
) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    res = finetune(model, config, out_dir, input_contract=contract, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    curve = [round(float(r["val_acc"]), 4) for r in res.history]
    return {
        "curve": curve,
        "train_loss": [round(float(r["train_loss"]), 4) for r in res.history],
        "epoch_time_s": [round(float(r["epoch_time"]), 2) for r in res.history],
        "final_acc": curve[-1],
        "best_acc": max(curve),
        "best_epoch": curve.index(max(curve)) + 1,
        "train_s": round(seconds, 1),
        "train_cpu_s": round(cpu, 1),
    }


# ------------------------------------------------------------------------------------------ one seed


def run_seed(s: PartSettings, seed: int, device: str, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"seed": seed}
    input_size = (3, s.size, s.size)
    wd = workdir / f"{s.name}-seed{seed}"

    # 1. standard model
    log.info("[%s seed %d] standard %s: %d epochs", s.name, seed, s.model, s.epochs_standard)
    standard = build_model(s, seed)
    cfg = train_config(
        s,
        epochs=s.epochs_standard,
        lr=s.lr_standard,
        seed=seed,
        device=device,
        bcos=False,
        weight_decay=s.weight_decay_standard,
    )
    std = run_training(standard, cfg, wd / "standard", None)
    t0 = time.perf_counter()
    std["gpg_ixg"] = localisation(standard, s, None, device)
    std["gpg_s"] = round(time.perf_counter() - t0, 1)
    # input x gradient w.r.t. the raw [0, 1] pixels instead of the normalised input (black = 0)
    raw = surgery.apply(NORMALIZE_INSIDE, standard, input_size=input_size)
    std["gpg_ixg_raw"] = localisation(raw.model, s, raw.contract, device)
    out["standard"] = std
    standard.to("cpu")

    # 2. B-cosify the trained model and fine-tune
    log.info("[%s seed %d] %s on the trained model, fine-tune %d epochs", s.name, seed, s.recipe, s.epochs)
    t0 = time.perf_counter()
    conv = surgery.apply(s.recipe, standard, params=s.recipe_params, input_size=input_size)
    apply_s = time.perf_counter() - t0
    bcosified, contract = conv.model, conv.contract
    acc0 = evaluate(bcosified, data_spec(s), input_contract=contract, device=device)["accuracy"]
    gpg0 = localisation(bcosified, s, contract, device)
    cfg = train_config(s, epochs=s.epochs, lr=s.lr_bcosify, seed=seed, device=device, bcos=True)
    bfy = run_training(bcosified, cfg, wd / "bcosified", contract)
    bfy.update(acc_after_surgery=round(acc0, 4), apply_s=round(apply_s, 2), gpg_after_surgery=gpg0)
    t0 = time.perf_counter()
    bfy["gpg"] = localisation(bcosified, s, contract, device)
    bfy["gpg_s"] = round(time.perf_counter() - t0, 1)
    bfy["completeness_residual"] = completeness(bcosified, s, contract, device)
    out["bcosified"] = bfy

    # 3. the same recipe on a randomly initialised model, trained from scratch
    log.info("[%s seed %d] %s on a random model, train %d epochs", s.name, seed, s.recipe, s.epochs)
    random_init = build_model(s, 10_000 + seed)
    fresh = surgery.apply(s.recipe, random_init, params=s.recipe_params, input_size=input_size)
    scratch_model, scratch_contract = fresh.model, fresh.contract
    cfg = train_config(
        s, epochs=s.epochs, lr=s.lr_scratch, seed=seed, device=device, bcos=True, warmup=s.warmup_scratch
    )
    scr = run_training(scratch_model, cfg, wd / "scratch", scratch_contract)
    t0 = time.perf_counter()
    scr["gpg"] = localisation(scratch_model, s, scratch_contract, device)
    scr["gpg_s"] = round(time.perf_counter() - t0, 1)
    scr["completeness_residual"] = completeness(scratch_model, s, scratch_contract, device)
    out["scratch"] = scr

    # 4. epochs for the B-cosified model to reach the from-scratch accuracy
    out["match"] = match_metrics(s.epochs, s.epochs_standard, acc0, bfy["curve"], scr["curve"])
    shutil.rmtree(wd, ignore_errors=True)
    return out


def match_metrics(
    epochs: int, epochs_standard: int, acc0: float, bcosified: list[float], scratch: list[float]
) -> dict[str, Any]:
    """Epochs the B-cosified model needs to reach the from-scratch accuracy, and the speed-ups."""
    final, best = scratch[-1], max(scratch)
    e_final = first_epoch_reaching(acc0, bcosified, final)
    e_best = first_epoch_reaching(acc0, bcosified, best)
    scratch_first_best = first_epoch_reaching(None, scratch, best)
    # 1 percentage point below the from-scratch final accuracy (about 4 of the 359 test digits):
    # less sensitive to single test images; both curves are measured against the same threshold
    e_tol = first_epoch_reaching(acc0, bcosified, final - 0.01)
    scratch_tol = first_epoch_reaching(None, scratch, final - 0.01)
    return {
        "scratch_final_acc": final,
        "scratch_best_acc": best,
        "scratch_epochs": epochs,
        "scratch_first_epoch_at_best": scratch_first_best,
        "scratch_first_epoch_within_1pp": scratch_tol,
        "bcosified_epochs_to_scratch_final": e_final,
        "bcosified_epochs_to_scratch_best": e_best,
        "bcosified_epochs_to_within_1pp": e_tol,
        # the paper's measure: from-scratch training length / epochs the B-cosified model needs
        "speedup_vs_final": _ratio(epochs, e_final),
        # stricter: the epoch where from-scratch first reached its best / B-cosified reaching it
        "speedup_vs_best": _ratio(scratch_first_best, e_best),
        # epochs for each to come within 1 pp of the from-scratch final accuracy
        "speedup_within_1pp": _ratio(scratch_tol, e_tol),
        # also charging the standard model's training (free in the paper: downloaded weights)
        "speedup_incl_standard_training": _ratio(
            epochs, None if e_final is None else epochs_standard + e_final
        ),
    }


# ------------------------------------------------------------------------------------------ summary


def _stats(values: list[float | None]) -> dict[str, Any]:
    """Mean and std over seeds of the finite values; ``missing``: None (never reached), ``inf``: 0 epochs."""
    got = [v for v in values if v is not None and math.isfinite(v)]
    res: dict[str, Any] = {"values": values}
    if got:
        res["mean"] = round(statistics.fmean(got), 4)
        res["std"] = round(statistics.stdev(got), 4) if len(got) > 1 else 0.0
    res["missing"] = sum(v is None for v in values)
    res["inf"] = sum(v is not None and math.isinf(v) for v in values)
    return res


def summarise(seeds: list[dict[str, Any]], smooths: tuple[int, ...]) -> dict[str, Any]:
    def col(path: list[str]) -> list[Any]:
        vals = []
        for r in seeds:
            v: Any = r
            for p in path:
                v = v[p]
            vals.append(v)
        return vals

    summary: dict[str, Any] = {
        "standard_acc": _stats(col(["standard", "final_acc"])),
        "bcosified_acc_after_surgery": _stats(col(["bcosified", "acc_after_surgery"])),
        "bcosified_acc": _stats(col(["bcosified", "final_acc"])),
        "bcosified_best_acc": _stats(col(["bcosified", "best_acc"])),
        "scratch_acc": _stats(col(["scratch", "final_acc"])),
        "scratch_best_acc": _stats(col(["scratch", "best_acc"])),
        "epochs_to_scratch_final": _stats(col(["match", "bcosified_epochs_to_scratch_final"])),
        "epochs_to_scratch_best": _stats(col(["match", "bcosified_epochs_to_scratch_best"])),
        "speedup_vs_final": _stats(col(["match", "speedup_vs_final"])),
        "speedup_vs_best": _stats(col(["match", "speedup_vs_best"])),
        "epochs_to_within_1pp": _stats(col(["match", "bcosified_epochs_to_within_1pp"])),
        "scratch_epochs_to_within_1pp": _stats(col(["match", "scratch_first_epoch_within_1pp"])),
        "speedup_within_1pp": _stats(col(["match", "speedup_within_1pp"])),
        "speedup_incl_standard_training": _stats(col(["match", "speedup_incl_standard_training"])),
    }
    for k in smooths:
        key = f"smooth={k}"
        summary[f"gpg_standard_ixg_{key}"] = _stats([r["standard"]["gpg_ixg"][key]["gpg"] for r in seeds])
        summary[f"gpg_standard_ixg_raw_{key}"] = _stats(
            [r["standard"]["gpg_ixg_raw"][key]["gpg"] for r in seeds]
        )
        summary[f"gpg_bcosified_after_surgery_{key}"] = _stats(
            [r["bcosified"]["gpg_after_surgery"][key]["gpg"] for r in seeds]
        )
        summary[f"gpg_bcosified_{key}"] = _stats([r["bcosified"]["gpg"][key]["gpg"] for r in seeds])
        summary[f"gpg_scratch_{key}"] = _stats([r["scratch"]["gpg"][key]["gpg"] for r in seeds])
    for stage in ("standard", "bcosified", "scratch"):
        summary[f"{stage}_train_s"] = _stats(col([stage, "train_s"]))
        summary[f"{stage}_train_cpu_s"] = _stats(col([stage, "train_cpu_s"]))
    return summary


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "surgery": surgery.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1) + "\n")
    os.replace(tmp, path)


def print_table(part: str, summary: dict[str, Any], smooths: tuple[int, ...]) -> None:
    def f(key: str, pct: bool = True) -> str:
        st = summary[key]
        if "mean" not in st:
            return "inf (epoch 0)" if st.get("inf") else "n/a"
        m, sd = st["mean"], st["std"]
        miss = f" ({st['missing']} not reached)" if st["missing"] else ""
        miss += f" ({st['inf']} at epoch 0)" if st["inf"] else ""
        return (f"{100 * m:.1f} ± {100 * sd:.1f}" if pct else f"{m:.2f} ± {sd:.2f}") + miss

    k = f"smooth={smooths[-1]}"
    print(f"\n== {part}: mean ± std over seeds")
    print(
        f"  accuracy  standard {f('standard_acc')} | B-cosified {f('bcosified_acc')} "
        f"(after surgery {f('bcosified_acc_after_surgery')}) | B-cos from scratch {f('scratch_acc')}"
    )
    print(
        f"  epochs to scratch final acc {f('epochs_to_scratch_final', False)}; speed-up "
        f"{f('speedup_vs_final', False)} (vs best: {f('speedup_vs_best', False)}; within 1 pp: "
        f"{f('speedup_within_1pp', False)}; incl. standard "
        f"training: {f('speedup_incl_standard_training', False)})"
    )
    print(
        f"  GPG ({k})  standard IxG {f('gpg_standard_ixg_' + k)} (raw pixels "
        f"{f('gpg_standard_ixg_raw_' + k)}) | B-cosified {f('gpg_bcosified_' + k)} "
        f"(after surgery {f('gpg_bcosified_after_surgery_' + k)}) | from scratch {f('gpg_scratch_' + k)}"
    )


# --------------------------------------------------------------------------------------------- main


def _previous(path: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """An existing result file to append to; its settings must equal this run's."""
    old = json.loads(path.read_text())
    if old["settings"] != fresh["settings"]:
        diff = sorted(k for k in fresh["settings"] if old["settings"].get(k) != fresh["settings"][k])
        raise SystemExit(f"--append: {path} was run with other settings ({', '.join(diff)})")
    if "runs" not in old:  # written before runs were recorded: one run with the top-level fields
        old["runs"] = [
            {
                "command": old.pop("command", None),
                "date": old.pop("date", None),
                "environment": old.pop("environment", None),
                "seeds": [r["seed"] for r in old["seeds"]],
                "runtime_s": old.get("runtime_s", 0.0),
            }
        ]
    return old


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=["cnn", "vit"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, 1+2 epochs of 5 steps, 4 mosaics"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    ap.add_argument("--epochs", type=int, help="B-cosified and from-scratch epochs (both parts)")
    ap.add_argument("--epochs-standard", type=int, help="epochs for the standard model (both parts)")
    ap.add_argument("--lr-bcosify", type=float, help="fine-tuning learning rate (both parts)")
    ap.add_argument("--lr-scratch", type=float, help="from-scratch learning rate (both parts)")
    ap.add_argument("--grid-count", type=int, help="number of 2x2 mosaics (4 explained cells each)")
    ap.add_argument("--full-width", action="store_true", help="CNN: full-width ResNet-18 (64-512 channels)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, help="run directories (default: a temporary directory)")
    ap.add_argument(
        "--append",
        action="store_true",
        help="add the seeds to an existing result file with the same settings (seeds it has are skipped)",
    )
    ap.add_argument(
        "--resummarise",
        action="store_true",
        help="recompute the epoch matching and summary of existing result files from their curves",
    )
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds[:1] if args.quick else args.seeds
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bcosification-"))
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    if args.resummarise:
        for part in args.parts:
            path = args.out_dir / f"bcosification_{part}{'_quick' if args.quick else ''}.json"
            record = json.loads(path.read_text())
            st = record["settings"]
            for r in record["seeds"]:
                b = r["bcosified"]
                r["match"] = match_metrics(
                    st["epochs"],
                    st["epochs_standard"],
                    b["acc_after_surgery"],
                    b["curve"],
                    r["scratch"]["curve"],
                )
            record["summary"] = summarise(record["seeds"], tuple(st["smooths"]))
            write_json(path, record)
            print_table(part, record["summary"], tuple(st["smooths"]))
        return 0

    for part in args.parts:
        s = PARTS[part]
        if args.full_width and part == "cnn":
            s = replace(s, model_kwargs={})
        overrides = {
            "epochs": args.epochs,
            "epochs_standard": args.epochs_standard,
            "lr_bcosify": args.lr_bcosify,
            "lr_scratch": args.lr_scratch,
            "grid_count": args.grid_count,
        }
        s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
        if args.quick:
            s = replace(s, epochs_standard=1, epochs=2, steps_per_epoch=5, grid_count=4)
        path = args.out_dir / f"bcosification_{part}{'_quick' if args.quick else ''}.json"
        started = time.perf_counter()
        run: dict[str, Any] = {
            "command": command,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(),
            "seeds": [],
            "runtime_s": 0.0,
        }
        record: dict[str, Any] = {
            "benchmark": "B-cosification in miniature",
            "part": part,
            "model": s.describe(),
            "settings": json.loads(json.dumps(asdict(s))),
            "runs": [run],
            "seeds": [],
        }
        if args.append and path.exists():
            record = _previous(path, record)
            record["runs"].append(run)
        done = {r["seed"] for r in record["seeds"]}
        for seed in seeds:
            if seed in done:
                log.info("[%s] seed %d already in %s; skipped", part, seed, path)
                continue
            record["seeds"].append(run_seed(s, seed, args.device, workdir))
            run["seeds"].append(seed)
            record["summary"] = summarise(record["seeds"], s.smooths)
            run["runtime_s"] = round(time.perf_counter() - started, 1)
            record["runtime_s"] = round(sum(r["runtime_s"] for r in record["runs"]), 1)
            write_json(path, record)
            log.info("[%s] seed %d done (%.0f s so far); wrote %s", part, seed, record["runtime_s"], path)
        if "summary" in record:
            print_table(part, record["summary"], s.smooths)
            print(f"  runtime {record['runtime_s']:.0f} s; results in {path}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
