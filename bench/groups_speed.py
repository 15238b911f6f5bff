"""Training throughput of the group layers vs a plain CNN of the same width, in the same run.

Models (paper shape, 40x40 single-channel input, 10 classes):

* ``plain``      -- ``plain_cnn(width)``: ordinary Conv2d/BatchNorm network;
* ``group-full`` -- GL+(2) network with full group convolutions (one kernel per (o, i, offset));
* ``group-sep``  -- the same with separable group convolutions (1x1 over channels x samples,
  then a depthwise spatial kernel);
* ``group-sep/<impl>`` -- with ``--norm-impls``: the separable network with ``GroupLayerNorm``
  implemented as ``split`` (one split reduction, input dtype: the GPU default) or ``native``
  (``F.layer_norm``: the CPU default), switched per step, so both are timed in the same run.

Each timed round runs ``--steps`` optimizer steps (forward, backward, Adam) per model; rounds are
interleaved across models and the median is reported, which keeps ratios meaningful on a busy
machine. Ratios are throughputs relative to ``plain`` and of ``group-sep`` to ``group-full``.

Example (the CPU numbers in docs/groups.md)::

    python bench/groups_speed.py --width 40 --samples 10 --batch 8 --steps 1 --rounds 3 --threads 1
    python bench/groups_speed.py --width 16 --samples 8 --batch 16 --steps 2 --rounds 7 --threads 1
    python bench/groups_speed.py --device cuda --width 40 --samples 10 --batch 128 --amp [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from surgery.groups import SirenKernel, equivariant_cnn, gl_plus, plain_cnn, sl
from surgery.groups.layers import NORM_IMPL

DEFAULT_NORM_IMPL = dict(NORM_IMPL)


def make_models(args: argparse.Namespace) -> dict[str, nn.Module]:
    factory = gl_plus if args.group == "gl2" else sl
    kernel = SirenKernel(width=args.inr_width, depth=args.inr_depth)
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {"plain": plain_cnn(width=args.width)}
    if not args.skip_full:
        models["group-full"] = equivariant_cnn(
            factory(2, samples=args.samples), width=args.width, kernel=kernel, stencil=args.stencil
        )
    for impl in args.norm_impls or [None]:
        name = "group-sep" if impl is None else f"group-sep/{impl}"
        models[name] = equivariant_cnn(
            factory(2, samples=args.samples),
            width=args.width,
            kernel=kernel,
            separable=True,
            stencil=args.stencil,
        )
    return models


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(model: nn.Module, args: argparse.Namespace, device: torch.device, norm_impl: str | None = None):
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if args.compile:
        model = torch.compile(model)
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step() -> None:
        NORM_IMPL.clear()
        NORM_IMPL.update(DEFAULT_NORM_IMPL if norm_impl is None else {device.type: norm_impl})
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def profile(steps: dict, args: argparse.Namespace, device: torch.device) -> None:
    """Operator table of one train step per model (after warm-up): where the step's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, step in steps.items():
        for _ in range(max(1, args.warmup)):
            step()
        sync(device)
        with torch_profile(activities=acts) as prof:
            step()
            sync(device)
        print(f"\n### {name}\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--group", default="gl2", choices=["gl2", "sl2"])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--inr-width", type=int, default=60)
    ap.add_argument("--inr-depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=40)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (inductor)")
    ap.add_argument(
        "--norm-impls",
        nargs="+",
        choices=["split", "native"],
        help="time the separable net with each GroupLayerNorm",
    )
    ap.add_argument("--stencil", choices=["fixed", "fit"], default="fixed", help="group layers' stencil")
    ap.add_argument("--skip-full", action="store_true", help="leave out the non-separable network")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="print a profiler table of one step per model")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    models = make_models(args)
    steps = {name: step_fn(m, args, device, name.partition("/")[2] or None) for name, m in models.items()}
    if args.profile:
        profile(steps, args, device)
        return
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    thr = {name: args.batch / t for name, t in med.items()}
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {dev}; group {args.group}, width {args.width}, N = {args.samples}, batch {args.batch}, "
        f"{args.size}x{args.size}, amp={args.amp}, compile={args.compile}, stencil={args.stencil}"
    )
    print("\n| model | params | s / step (median) | images / s | throughput vs plain |")
    print("|---|---|---|---|---|")
    for name in models:
        print(
            f"| {name} | {params[name]:,} | {med[name]:.3f} | {thr[name]:.1f} | {thr[name] / thr['plain']:.3f} |"
        )
    for name in thr:
        if name.startswith("group-sep") and "group-full" in thr:
            print(f"\n{name} / group-full throughput: {thr[name] / thr['group-full']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "device": dev, "median_s": med, "params": params}, fh, indent=1)


if __name__ == "__main__":
    main()
