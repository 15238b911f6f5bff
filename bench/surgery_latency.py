"""Surgery latency: plan + apply (and, separately, verify) as a multiple of ``copy.deepcopy(model)``.

``apply`` works on a copy, so one deepcopy is the floor; the target is plan + apply <= 2x deepcopy.
Every timed operation runs once per round, rounds interleave the operations (so load from other
processes hits them alike); the table shows medians over the rounds, and each ratio is the
median of the per-round ratios (paired with the deepcopy of the same round).

    python bench/surgery_latency.py                       # both models, 7 rounds
    python bench/surgery_latency.py --models resnet50 --repeats 11 --profile /tmp/r50.prof

``--profile`` writes a cProfile of one extra plan + apply per model (``<path>.<model>``) and prints
the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

import surgery
from surgery.apply import run_checks

RECIPES: dict[str, str] = {
    "resnet50": """recipe "bench-resnet50" v1
replace Conv2d except @first_conv with BcosConv2d(b=2)
replace BatchNorm2d with BatchNormUncentered2d
drop bias on *
""",
    "vit_base_patch16_224": """recipe "bench-vit" v1
replace Linear except @classifier with BcosLinear(b=2)
replace GELU with DetachableGELU
drop bias on LayerNorm
""",
}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_model(name: str, repeats: int, profile: str | None) -> dict[str, Any]:
    torch.manual_seed(0)
    model: nn.Module = timm.create_model(name).eval()
    recipe = RECIPES[name]
    size = tuple(model.pretrained_cfg["input_size"])
    warm = surgery.apply(recipe, model, verify=False)  # imports, type-name scan, parser tables
    run_checks(warm)
    del warm
    times: dict[str, list[float]] = {"deepcopy": [], "plan": [], "plan+apply": [], "verify": []}
    counts: list[int] = []
    for i in range(repeats):
        ops = ["deepcopy", "plan", "plan+apply"]
        ops = ops[i % 3 :] + ops[: i % 3]  # rotate the order every round
        result = None
        for op in ops:
            if op == "deepcopy":
                t, _ = timed(lambda: copy.deepcopy(model))
            elif op == "plan":
                t, p = timed(lambda: surgery.plan(recipe, model))
                counts = [len(s.names) for s in p.steps]
            else:
                t, result = timed(lambda: surgery.apply(recipe, model, verify=False))
            times[op].append(t)
        assert result is not None
        t, _ = timed(lambda r=result: run_checks(r))
        times["verify"].append(t)
        result = None
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        surgery.apply(recipe, model, verify=False)
        prof.disable()
        path = f"{profile}.{name}"
        prof.dump_stats(path)
        print(f"\n## cProfile of plan + apply on {name} ({path})")
        pstats.Stats(path, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "params_m": n_params / 1e6,
        "modules_changed": sum(counts),
        "input_size": size,
        **med,
        # paired: each round's plan+apply over the same round's deepcopy (robust to load drift)
        "ratio": statistics.median(
            a / d for a, d in zip(times["plan+apply"], times["deepcopy"], strict=True)
        ),
        "verify_ratio": statistics.median(
            v / d for v, d in zip(times["verify"], times["deepcopy"], strict=True)
        ),
        "spread": {k: (min(v), max(v)) for k, v in times.items()},
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | params | modules changed | deepcopy | plan | plan+apply | ratio (target <= 2x) "
        "| verify (smoke forward @ input size) | verify / deepcopy |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"])
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f}M | {r['modules_changed']} | {r['deepcopy'] * 1e3:.0f} ms "
            f"| {r['plan'] * 1e3:.0f} ms | {r['plan+apply'] * 1e3:.0f} ms | **{r['ratio']:.2f}x** "
            f"| {r['verify'] * 1e3:.0f} ms ({size}, batch 2) | {r['verify_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", default=None, help="write cProfile stats to PATH.<model>")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench_model(m, args.repeats, args.profile) for m in args.models]
    print(
        f"\ntorch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved rounds (ratios: median of per-round ratios)\n"
    )
    print(table(rows))
    for r in rows:
        spread = ", ".join(f"{k} {lo * 1e3:.0f}-{hi * 1e3:.0f} ms" for k, (lo, hi) in r["spread"].items())
        print(f"\n{r['model']} min-max: {spread}")
    worst = max(r["ratio"] for r in rows)
    print(
        f"\nworst plan+apply / deepcopy: {worst:.2f}x ({'within' if worst <= 2 else 'ABOVE'} the 2x target)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
