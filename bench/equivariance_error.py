"""Off-lattice equivariance error of the affine-equivariant network (relative L2 of logits).

For each transformation ``a`` (30-degree rotation, shear, anisotropic stretch, isotropic scale)
the network is run on the analytically transformed input ``f o a^-1`` with the co-transformed
sample set ``a S`` and compared with ``F(f; S)``: ``||F(f o a^-1; a S) - F(f; S)|| / ||F(f; S)||``.
Inputs are sums of Gaussian blobs (no interpolation error). Also reported: the 90-degree error
(exact up to rounding) and the change of logits under an independent re-draw of the samples.

Configurations: ``ours`` (cosine window of radius 1.4, 2x2 anti-aliased kernels, periodic angle
input, scaled SIREN) and ``reference`` (the rgenn discretisation: sigmoid window, one kernel point
per pixel, raw angle, standard SIREN); the others isolate one ingredient each.

``--train-steps N`` first trains each network for N Adam steps on sklearn's 8x8 digits rendered
analytically at 40x40 (no download needed), then measures again, and reports accuracy on held-out
digits, untransformed and under random affine maps (a small affNIST). ``--weights PATH`` loads a
state dict instead (one group/config only; safetensors, or a torch file read with
``weights_only=True``).

Example (the numbers in docs/groups.md)::

    python bench/equivariance_error.py --groups gl2 sl2 --configs ours reference --width 40 --batch 4 \
        --init-seeds 0 1 2
    python bench/equivariance_error.py --groups so2 --samples 1 --width 8 \
        --configs r1.0 ours r1.8 no-window --train-steps 200 --batch 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time

import torch
from torch import nn

from surgery.groups import Grid, SirenKernel, equivariant_cnn, gl_plus, plain_cnn, sl, so
from surgery.groups.equivariance import (
    TRANSFORMS,
    blob_image,
    canvas_points,
    check_rot90,
    offlattice_error,
    resampling_error,
    rotation,
)
from surgery.models import load_weights_file

CONFIGS = {
    "ours": dict(mask="cosine", antialias=2, angle_encoding="periodic", radius=1.4, scaled=True),
    "reference": dict(mask="smooth", antialias=1, angle_encoding="raw", radius=1.0, scaled=False),
    "cosine-only": dict(mask="cosine", antialias=1, angle_encoding="periodic", radius=1.4, scaled=True),
    "antialias-only": dict(mask="smooth", antialias=2, angle_encoding="periodic", radius=1.0, scaled=True),
    "r1.0": dict(mask="cosine", antialias=2, angle_encoding="periodic", radius=1.0, scaled=True),
    "r1.8": dict(mask="cosine", antialias=2, angle_encoding="periodic", radius=1.8, scaled=True),
    "no-window": dict(mask="none", antialias=2, angle_encoding="periodic", radius=1.0, scaled=True),
    "fit": dict(
        mask="cosine", antialias=2, angle_encoding="periodic", radius=1.4, scaled=True, stencil="fit"
    ),
    "r1.0-fit": dict(
        mask="cosine", antialias=2, angle_encoding="periodic", radius=1.0, scaled=True, stencil="fit"
    ),
}
GROUPS = {"gl2": gl_plus, "sl2": sl, "so2": so}


def build(group: str, config: str, args: argparse.Namespace, seed: int = 0) -> tuple[nn.Module, object]:
    cfg = CONFIGS[config]
    spec = GROUPS[group](2, samples=args.samples, angle_encoding=cfg["angle_encoding"])
    if group == "so2" and args.samples == 1:
        spec.rotation = Grid(1)  # N = 1: the trivial group, a plain CNN with SIREN kernels
    torch.manual_seed(seed)
    kernel = SirenKernel(width=args.inr_width, depth=args.inr_depth, w0=args.w0, scaled=cfg["scaled"])
    net = equivariant_cnn(
        spec,
        width=args.width,
        kernel=kernel,
        separable=args.separable,
        mask=cfg["mask"],
        antialias=cfg["antialias"],
        radius=cfg["radius"],
        stencil=cfg.get("stencil", "fixed"),
    )
    return net, spec


def measure(net: nn.Module, spec, group: str, args: argparse.Namespace) -> dict[str, float]:
    net = net.to(torch.float64).eval()
    out: dict[str, float] = {}
    for name, a in TRANSFORMS.items():
        if group == "sl2" and abs(float(torch.linalg.det(a)) - 1.0) > 1e-9:
            continue  # an isotropic scale is not in SL(2)
        if group == "so2" and not torch.allclose(a @ a.T, torch.eye(2, dtype=a.dtype)):
            continue  # only rotations are in SO(2)
        out[name] = offlattice_error(net, spec, a, size=args.size, batch=args.batch, seed=args.seed)
    x = blob_image(args.size, None, batch=args.batch, seed=args.seed, dtype=torch.float64)
    out["rotation 90deg"] = check_rot90(net, spec, x)
    out["resampling"] = resampling_error(net, spec, size=args.size, batch=args.batch, seed=args.seed)
    return out


# ------------------------------------------------------------------------------ quick training


def render_digits(
    images: torch.Tensor, a: torch.Tensor | None, size: int = 40, pitch: float = 3.0, sigma: float = 1.3
) -> torch.Tensor:
    """8x8 digits as sums of Gaussians (one per digit pixel) evaluated at ``a^-1 p``: exact transforms.

    ``a`` is one ``(2, 2)`` map or a batch ``(M, 2, 2)``.
    """
    m = images.shape[0]
    v = images.reshape(m, 64).double() / 16.0
    idx = torch.arange(8, dtype=torch.float64) - 3.5
    cy, cx = torch.meshgrid(idx * pitch, idx * pitch, indexing="ij")
    centres = torch.stack([cx, cy], -1).reshape(64, 2)
    p = canvas_points(size)
    out = torch.empty(m, size * size, dtype=torch.float64)
    for s in range(0, m, 256):
        pa = p.expand(min(256, m - s), -1, -1)
        if a is not None:
            ai = torch.linalg.inv(a if a.dim() == 2 else a[s : s + 256])
            pa = pa @ (ai.transpose(-1, -2) if ai.dim() == 3 else ai.T)
        d2 = ((pa[:, :, None] - centres[None, None]) ** 2).sum(-1)  # (b, P, 64)
        out[s : s + pa.shape[0]] = (torch.exp(-0.5 * d2 / sigma**2) * v[s : s + 256, None]).sum(-1)
    return (out / 1.2).clamp(max=1.0).reshape(m, 1, size, size).float() * 2 - 1


def random_affine(m: int, gen: torch.Generator) -> torch.Tensor:
    """affNIST-like maps: rotation +-20 deg, scale 0.8-1.2, shear +-0.2 (uniform)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(m, generator=gen, dtype=torch.float64)  # noqa: E731
    t, s, sh = u(-20, 20), u(0.8, 1.2), u(-0.2, 0.2)
    mats = []
    for i in range(m):
        shear = torch.tensor([[1.0, float(sh[i])], [0.0, 1.0]], dtype=torch.float64)
        mats.append(float(s[i]) * rotation(float(t[i])) @ shear)
    return torch.stack(mats)


def digits_data(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images)
    y = torch.tensor(d.target)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    tr, te = perm[:1400], perm[1400:]
    return {
        "x_train": render_digits(x[tr], None, size),
        "y_train": y[tr],
        "x_test": render_digits(x[te], None, size),
        "x_test_aff": render_digits(x[te], random_affine(len(te), gen), size),
        "y_test": y[te],
    }


def train(
    net: nn.Module, data: dict[str, torch.Tensor], steps: int, batch: int = 32, lr: float = 2e-3
) -> float:
    net = net.float().train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    n = data["x_train"].shape[0]
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        loss = nn.functional.cross_entropy(net(data["x_train"][idx]), data["y_train"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net = net.float().eval()
    pred = torch.cat([net(x[i : i + 128]).argmax(-1) for i in range(0, len(y), 128)])
    return float((pred == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", nargs="+", default=["gl2", "sl2"], choices=list(GROUPS))
    ap.add_argument("--configs", nargs="+", default=["ours", "reference"], choices=list(CONFIGS))
    ap.add_argument("--width", type=int, default=40)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--inr-width", type=int, default=60)
    ap.add_argument("--inr-depth", type=int, default=3)
    ap.add_argument("--w0", type=float, default=10.0)
    ap.add_argument("--separable", action="store_true")
    ap.add_argument("--size", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4, help="number of probe images")
    ap.add_argument("--seed", type=int, default=0, help="probe images")
    ap.add_argument("--init-seeds", type=int, nargs="+", default=[0], help="network initialisations")
    ap.add_argument("--train-steps", type=int, default=0, help="quick training on rendered sklearn digits")
    ap.add_argument("--weights", default=None, help="state dict to load (safetensors; one group and config)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results: list[dict] = []
    data = digits_data(args.size) if args.train_steps else None
    if data is not None:
        plain = plain_cnn(width=args.width)
        torch.manual_seed(0)
        secs = train(plain, data, args.train_steps)
        results.append(
            {
                "group": "plain",
                "config": "-",
                "stage": "trained",
                "train_s": secs,
                "acc": accuracy(plain, data["x_test"], data["y_test"]),
                "acc_affine": accuracy(plain, data["x_test_aff"], data["y_test"]),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    for group, config, init_seed in itertools.product(args.groups, args.configs, args.init_seeds):
        net, spec = build(group, config, args, seed=init_seed)
        if args.weights:
            net.load_state_dict(load_weights_file(args.weights))
        t0 = time.perf_counter()
        row = {
            "group": group,
            "config": config,
            "stage": "loaded" if args.weights else "init",
            "seed": init_seed,
        }
        row.update(measure(net, spec, group, args))
        row["measure_s"] = time.perf_counter() - t0
        results.append(row)
        print(json.dumps(row), flush=True)
        if data is not None:
            secs = train(net, data, args.train_steps)
            row = {
                "group": group,
                "config": config,
                "stage": "trained",
                "seed": init_seed,
                "train_s": secs,
            }
            row["acc"] = accuracy(net, data["x_test"], data["y_test"])
            row["acc_affine"] = accuracy(net, data["x_test_aff"], data["y_test"])
            row.update(measure(net, spec, group, args))
            results.append(row)
            print(json.dumps(row), flush=True)

    keys = [
        k
        for k in (*TRANSFORMS, "rotation 90deg", "resampling", "acc", "acc_affine")
        if any(k in r for r in results)
    ]
    print(f"\nmean over {len(args.init_seeds)} initialisation(s) (max in brackets when several)")
    print("\n| group | config | stage | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 3))
    rows: dict[tuple, list[dict]] = {}
    for r in results:
        rows.setdefault((r["group"], r["config"], r["stage"]), []).append(r)
    for (group, config, stage), rs in rows.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rs if k in r]
            if not vals:
                cells.append("-")
                continue
            mean, top = statistics.fmean(vals), max(vals)
            fmt = (lambda v: f"{100 * v:.2f}%") if mean >= 1e-4 else (lambda v: f"{v:.1e}")
            cells.append(
                fmt(mean) + (f" ({fmt(top)})" if len(vals) > 1 and k not in ("acc", "acc_affine") else "")
            )
        print(f"| {group} | {config} | {stage} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    if any(math.isnan(v) for r in results for v in r.values() if isinstance(v, float)):
        raise SystemExit("NaN in results")


if __name__ == "__main__":
    main()
