"""B-cos train-step speed and peak memory: our B-cosified models vs the standard model vs official B-cos.

For each architecture three models are built, all with random weights and 1000 classes:

* ``standard``: the timm model (``resnet18``, ``resnet50``, ``vit_small_patch16_224``), fed a
  normalised 3-channel image;
* ``ours``: the same timm model through the shipped recipe with default params
  (``bcosify-resnet`` / ``bcosify-vit``: b=2, no biases, classifier reorder, logit layer), fed the
  raw image (the [x, 1-x] encoding and normalisation run inside the model);
* ``ours-plain``: the same model as ``ours`` with the hand-written backward passes switched off
  (``surgery.layers.bcos_autograd.use_fused_backward(False)``: plain autograd formulas, the
  implementation before they existed), so their gain is measured in the same run (eager only:
  compiled, both variants are the same graph);
* ``official``: the ``bcos`` package's B-cos model of that size (``bcos_final`` ResNet: B-cos convs
  with weight normalisation, ``BatchNormUncentered2d`` without bias; ``vit_final`` SimpleViT-S),
  fed the 6-channel [x, 1-x] image it expects.

A train step is forward + cross-entropy + backward + SGD(momentum) step. Timing interleaves the
models (one step of each in a rotating order per round, after warm-up), and each ratio is the median
over rounds of ``time(model) / time(standard)`` in the same round, so load from other processes
hits every model alike. ``--compile`` also runs every model through ``torch.compile`` (default
inductor) and reports compiled ratios against the compiled standard model.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; on the CPU each model
is measured in its own subprocess as the peak resident-set size sampled during the steps minus the
resident size before the first step (activations, gradients, optimizer state, allocator slack).

    python bench/bcos_speed.py --device cpu --threads 2 --batch 8 --size 128 --rounds 5
    python bench/bcos_speed.py --device cuda --batch 128 --size 224 --amp bf16 --rounds 10 --compile

Targets (the B-cosification issue): train step <= 1.1x standard on the CPU, <= 1.3x eager and
<= 1.05x compiled on the GPU, peak memory <= 1.3x.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = {
    "resnet18": ("resnet18", "bcosify-resnet"),
    "resnet50": ("resnet50", "bcosify-resnet"),
    "vit_s": ("vit_small_patch16_224", "bcosify-vit"),
}
VARIANTS = ("standard", "ours", "ours-plain", "official")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- models


def _timm(name: str, size: int) -> nn.Module:
    import timm

    kwargs = {"img_size": size} if name.startswith("vit") else {}
    return timm.create_model(name, num_classes=1000, **kwargs)


def _official(arch: str, size: int) -> nn.Module:
    """The bcos package's model with its published ImageNet config (random init)."""
    warnings.filterwarnings("ignore", module="bcos")
    if arch.startswith("resnet"):
        from bcos.models import pretrained

        return getattr(pretrained, arch)(pretrained=False)
    from bcos.experiments.ImageNet.vit_final.experiment_parameters import CONFIGS
    from bcos.models.vit import SimpleViT
    from bcos.modules import BcosConv2d, BcosLinear, LogitLayer
    from bcos.modules.common import BcosSequential

    cfg = CONFIGS["bcos_simple_vit_s_patch16_224"]["model"]
    args = {k: v for k, v in cfg["args"].items() if k != "num_classes"}
    bcos_args = cfg["bcos_args"]
    vit = SimpleViT(
        image_size=size,
        patch_size=16,
        num_classes=1000,
        dim=384,
        depth=12,
        heads=6,
        mlp_dim=1536,
        linear_layer=partial(BcosLinear, **bcos_args),
        conv2d_layer=partial(BcosConv2d, **bcos_args),
        **args,
    )
    return BcosSequential(vit, LogitLayer(logit_bias=cfg["logit_bias"]))


def build(arch: str, variant: str, size: int) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(model, input transform): the transform turns a raw [0, 1] batch into what the model takes."""
    timm_name, recipe = ARCHS[arch]
    torch.manual_seed(0)
    if variant == "standard":
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return _timm(timm_name, size), lambda x: (x - mean.to(x)) / std.to(x)
    if variant in ("ours", "ours-plain"):
        import surgery

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = surgery.apply(recipe, _timm(timm_name, size), verify=False)
        return result.model, lambda x: x
    return _official(arch, size), lambda x: torch.cat([x, 1 - x], dim=1)


# ---------------------------------------------------------------- one train step


class Step:
    """Forward + cross-entropy + backward + SGD step of one model (optionally compiled, under AMP)."""

    def __init__(
        self,
        model: nn.Module,
        transform: Callable,
        device: str,
        amp: str | None,
        compile_: bool,
        plain: bool = False,
    ):
        self.plain = plain  # ours-plain: B-cos layers without the hand-written backward passes
        self.model = model.to(device).train()
        self.transform = transform
        self.device = device
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
        self.fn: Callable = torch.compile(self.model) if compile_ else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def layers(self) -> contextlib.AbstractContextManager:
        """The B-cos layer implementation this variant runs (forward and backward)."""
        if not self.plain:
            return contextlib.nullcontext()
        from surgery.layers.bcos_autograd import use_fused_backward

        return use_fused_backward(False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        ctx = (
            torch.autocast(device_type=self.device, dtype=self.amp)
            if self.amp is not None
            else contextlib.nullcontext()
        )
        with self.layers():
            with ctx:
                out = self.fn(self.transform(x))
                loss = F.cross_entropy(out.float(), y)
            loss.backward()
        self.opt.step()
        return loss.item()  # a sync point on CUDA


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _batch(batch: int, size: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return x, y


# ---------------------------------------------------------------- timing (interleaved)


def time_arch(arch: str, args: argparse.Namespace, compile_: bool) -> dict[str, Any]:
    variants = [v for v in args.variants if not (compile_ and v == "ours-plain")]  # same graph compiled
    steps = {
        v: Step(*build(arch, v, args.size), args.device, args.amp, compile_, plain=v == "ours-plain")
        for v in variants
    }
    x, y = _batch(args.batch, args.size, args.device)
    for v, step in steps.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(x, y)
        _sync(args.device)
        print(
            f"  {arch} {v}{' compiled' if compile_ else ''}: warm-up {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    if args.device == "cuda":
        for step in steps.values():
            torch.cuda.reset_peak_memory_stats()
            step(x, y)
            _sync(args.device)
            step.peak = torch.cuda.max_memory_allocated()  # type: ignore[attr-defined]
    if not compile_:
        for step in steps.values():
            with step.layers():
                step.saved = saved_activation_mib(step.model, step.transform, x)  # type: ignore[attr-defined]
    per_round: list[dict[str, float]] = []
    order = list(steps)
    for r in range(args.rounds):
        times: dict[str, float] = {}
        for v in order[r % len(order) :] + order[: r % len(order)]:
            _sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[v](x, y)
            _sync(args.device)
            times[v] = (time.perf_counter() - t0) / args.steps
        per_round.append(times)
    out: dict[str, Any] = {"arch": arch, "compiled": compile_, "variants": {}}
    for v in steps:
        ts = [t[v] for t in per_round]
        entry = {
            "step_ms": 1000 * statistics.median(ts) if ts else math.nan,
            "step_ms_all": [round(1000 * t, 2) for t in ts],
        }
        if "standard" in steps and per_round:
            entry["ratio"] = statistics.median(t[v] / t["standard"] for t in per_round)
        if args.device == "cuda":
            entry["peak_mib"] = steps[v].peak / 2**20  # type: ignore[attr-defined]
        if hasattr(steps[v], "saved"):
            entry["saved_mib"] = steps[v].saved  # type: ignore[attr-defined]
            if "standard" in steps:
                entry["saved_ratio"] = steps[v].saved / steps["standard"].saved  # type: ignore[attr-defined]
        out["variants"][v] = entry
    if args.device == "cuda" and "standard" in steps:
        for v in steps:
            out["variants"][v]["memory_ratio"] = (
                out["variants"][v]["peak_mib"] / out["variants"]["standard"]["peak_mib"]
            )
    del steps
    gc.collect()
    return out


# ---------------------------------------------------------------- memory kept for backward


def saved_activation_mib(model: nn.Module, transform: Callable, x: torch.Tensor) -> float:
    """MiB of tensors autograd keeps for the backward pass of one forward (parameters excluded).

    Walks the autograd graph from the output and counts every saved tensor's storage once. Unlike
    the resident-set size it does not depend on the allocator, so it compares models exactly; it
    is the activation part of the peak (gradients and optimizer state come on top, equal for all).
    """
    model.train()
    out = model(transform(x))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    stack, visited = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors: list[Any] = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                with contextlib.suppress(Exception):
                    val = getattr(node, attr)
                    tensors += list(val) if isinstance(val, (tuple, list)) else [val]
        with contextlib.suppress(Exception):  # custom autograd.Function: ctx.save_for_backward
            tensors += list(node.saved_tensors)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in node.next_functions)
    del out
    return sum(seen.values()) / 2**20


# ---------------------------------------------------------------- CPU peak memory (one subprocess per model)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _rss_sampler(period: float = 0.002) -> Iterator[list[int]]:
    peak = [_rss()]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(period)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], _rss())


def memory_child(arch: str, variant: str, args: argparse.Namespace) -> None:
    step = Step(*build(arch, variant, args.size), "cpu", None, False, plain=variant == "ours-plain")
    x, y = _batch(args.batch, args.size, "cpu")
    gc.collect()
    base = _rss()
    with _rss_sampler() as peak:
        for _ in range(max(2, args.steps)):
            step(x, y)
    print(json.dumps({"peak_mib": (peak[0] - base) / 2**20}))


def cpu_memory(arch: str, args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for v in args.variants:
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            arch,
            v,
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
        ]
        cmd += ["--threads", str(args.threads), "--steps", str(args.steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


# ---------------------------------------------------------------- profile


def profile_ours(arch: str, args: argparse.Namespace) -> None:
    """Where the time of one train step goes, ours vs standard (torch.profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    x, y = _batch(args.batch, args.size, args.device)
    for v in ("standard", "ours"):
        step = Step(*build(arch, v, args.size), args.device, args.amp, False)
        step(x, y)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=acts) as prof:
            step(x, y)
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(f"\n== {arch} {v}: top ops of one train step")
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows))


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on the CPU, 128 on CUDA")
    ap.add_argument("--size", type=int, default=None, help="default: 128 on the CPU, 224 on CUDA")
    ap.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (0: memory only)")
    ap.add_argument("--steps", type=int, default=2, help="train steps per model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    ap.add_argument("--compile-only", action="store_true", help="only the compiled measurement")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one step of ours vs standard and exit")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--memory-child", nargs=2, metavar=("ARCH", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.batch = args.batch or (128 if cuda else 8)
    args.size = args.size or (224 if cuda else 128)
    args.amp = None if args.amp == "none" else (args.amp or ("bf16" if cuda else None))
    torch.set_num_threads(args.threads)
    # random-init B-cos nets can produce subnormal floats; they are slow on x86 CPUs for every model alike
    torch.set_flush_denormal(True)
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.profile:
        for arch in args.archs:
            profile_ours(arch, args)
        return
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        "device": torch.cuda.get_device_name()
        if cuda
        else f"CPU, {args.threads} threads, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "batch": args.batch,
        "size": args.size,
        "amp": args.amp,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(meta))
    results: list[dict[str, Any]] = []
    for arch in args.archs:
        for compile_ in [True] if args.compile_only else [False, True] if args.compile else [False]:
            r = time_arch(arch, args, compile_)
            if not cuda and not compile_ and not args.no_memory:
                mem = cpu_memory(arch, args)
                for v, m in mem.items():
                    r["variants"][v]["peak_mib"] = m
                    r["variants"][v]["memory_ratio"] = m / mem["standard"] if "standard" in mem else math.nan
            results.append(r)
            print(json.dumps(r), flush=True)
    print(
        "\n| arch | mode | variant | step (ms) | time / standard | peak memory (MiB) | memory / standard "
        "| saved for backward (MiB) | saved / standard |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mode = "compiled" if r["compiled"] else "eager"
        for v, e in r["variants"].items():
            mem = f"{e['peak_mib']:.0f}" if "peak_mib" in e else "–"
            mr = f"{e['memory_ratio']:.2f}x" if "memory_ratio" in e else "–"
            sv = f"{e['saved_mib']:.0f}" if "saved_mib" in e else "–"
            sr = f"{e['saved_ratio']:.2f}x" if "saved_ratio" in e else "–"
            step = f"{e['step_ms']:.0f}" if e["step_ms"] == e["step_ms"] else "–"
            ratio = f"{e['ratio']:.2f}x" if e.get("ratio", math.nan) == e.get("ratio", math.nan) else "–"
            print(f"| {r['arch']} | {mode} | {v} | {step} | {ratio} | {mem} | {mr} | {sv} | {sr} |")
    meta["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
