"""B-cosification coverage over timm and torchvision: for how many architectures does the recipe work,
and explain *completely*?

Over a seeded sample of ``timm.list_models()`` (or every torchvision classification model with
``--torchvision``; random init, ``num_classes=10``), each model goes through: create -> plan
(strict) -> apply -> verify (every ``expect`` but ``expect complete``, + smoke forward) -> one
training step (forward + backward in train mode, finite loss and gradients) -> completeness. A
model *runs* when every stage up to the training step succeeds; it is *complete* when, on a float64
copy whose BatchNorm statistics are re-estimated on the probe batch (random-init B-cos networks
shrink their activations to nothing otherwise), no module's own code breaks completeness
(:func:`surgery.explain.completeness.check_completeness`, what ``expect complete`` runs) and the
explanation's residual is at most 1e-6 of the explained logit (``Explanation.relative_residual``;
the float32 figure is recorded too); it is *input dependent* when its output depends on the image.
A model passes when all three hold. Weights that timm initialises to exactly zero (the heads of
MLP-Mixer, ResMLP, gMLP, Hiera) are re-drawn (normal, std 0.02) first, since a zero head makes
every model's output independent of its input. Nothing is skipped silently: a model that cannot
be created, or that is too large for the CPU budget (``--max-params``), is *excluded* with its
reason; every failure records its stage and the first line of its error, normalised (numbers,
names and shapes blanked) so that failures group into classes; incomplete models record the
modules that break completeness, by class.

The input is the model's own size, shrunk where the model allows it: sizes 64, 96, 128 are tried
in turn (with ``img_size=`` for models that take it, e.g. ViTs) and the first at which the
*original* model runs is used; otherwise the model's ``pretrained_cfg`` size.

For passing models it also reports the function-preservation error at ``b=1, keep_bias=true,
keep_maxpool=true, logit_layer=false, reorder=false`` (relative to the logit scale): the part of
the conversion that should be exact (``--no-b1`` skips it).

Each model runs in a worker subprocess with a timeout (a hung or crashed model is a failure, the
worker is restarted). Results go to a JSON file that ``--resume`` continues and ``--report``
turns into the tables of docs/benchmarks.md:

    nohup python bench/timm_coverage.py --sample 240 --seed 1 --timeout-per-model 400 \
        --out bench/results/timm_coverage.json > /tmp/coverage.log 2>&1 &
    python bench/timm_coverage.py --torchvision --out bench/results/torchvision_coverage.json
    python bench/timm_coverage.py --report --out bench/results/timm_coverage.json
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

DEFAULT_OUT = "bench/results/timm_coverage.json"
SIZES = (64, 96, 128)
OOM = re.compile(r"can't allocate memory|out of memory|MemoryError|Cannot allocate memory", re.I)
B1_PARAMS = {
    "b": 1.0,
    "keep_bias": True,
    "keep_maxpool": True,
    "logit_layer": False,
    "reorder": False,
    "check_complete": False,
}
COMPLETE_TOL = 1e-6  # float64 relative residual of the explained logit


# ---------------------------------------------------------------- failure reasons


def normalise_reason(message: str) -> str:
    """First line of an error with the model-specific parts blanked, so failures group by cause."""
    line = (message.strip().splitlines() or [""])[0]
    line = re.sub(r"^(<shipped>/)?[\w./-]+\.recipe:\d+:\d+: ", "", line)  # recipe position
    line = re.sub(r"<shipped>/bcosify\.recipe:\d+", "bcosify.recipe:L", line)
    line = re.sub(r"module '[^']*'", "module '…'", line)
    line = re.sub(r"'[\w.]*\.(\d+)[\w.]*'", "'…'", line)
    line = re.sub(r"\[[\d, ]+\]", "[…]", line)
    line = re.sub(r"\([\d, ]+\)", "(…)", line)
    line = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", line)
    line = re.sub(r"\s+", " ", line)
    return line[:220]


# ---------------------------------------------------------------- the worker (one model at a time)


def _accepts_img_size(name: str, family: str) -> bool:
    """Whether the constructor takes ``img_size`` (tried on the meta device: no memory, no init)."""
    if family != "timm":
        return False
    try:
        _create(name, family, 64, meta=True)
    except Exception:
        return False
    return True


def _create(name: str, family: str, size: int | None, meta: bool = False) -> Any:
    import torch

    kwargs: dict[str, Any] = {"num_classes": 10}
    if size is not None:
        kwargs["img_size"] = size
    if family == "torchvision":
        import torchvision

        def make() -> Any:
            return torchvision.models.get_model(name, **kwargs)
    else:
        import timm

        def make() -> Any:
            return timm.create_model(name, **kwargs)

    if meta:
        with torch.device("meta"):
            return make()
    return make()


def _pick_size(name: str, family: str) -> tuple[Any, tuple[int, int, int], str]:
    """The original model at the smallest size it runs at (64/96/128 or its own), and how it was made."""
    import torch

    tried: list[str] = []
    with_img = _accepts_img_size(name, family)
    for s in SIZES:
        for pass_size in (True, False) if with_img else (False,):
            try:
                torch.manual_seed(0)
                model = _create(name, family, s if pass_size else None)
                model.eval()
                with torch.no_grad():
                    model(torch.rand(1, 3, s, s))
                return model, (3, s, s), f"img_size={s}" if pass_size else f"input {s}"
            except Exception as exc:  # the model does not run at this size
                tried.append(
                    f"{s}{'+img_size' if pass_size else ''}: {str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__}"
                )
    torch.manual_seed(0)
    model = _create(name, family, None)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    return model, size, "native"  # type: ignore[return-value]


def redraw_zero_weights(model: Any) -> list[str]:
    """Weights initialised to exactly zero (timm's MLP-Mixer / ResMLP / gMLP / Hiera heads) re-drawn
    from N(0, 0.02): with a zero head the output depends on no input, before or after conversion."""
    import torch

    from surgery.explain.completeness import LEARNED_INPUT

    names = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("weight") and p.dim() >= 2 and not LEARNED_INPUT.search(n) and not p.any():
                p.normal_(0.0, 0.02)
                names.append(n)
    return names


def completeness(result: Any, size: tuple[int, ...]) -> dict[str, Any]:
    """Float64 proof and residuals of the converted model on a BN-calibrated copy (see the docstring)."""
    import collections

    import torch

    from surgery.explain import explain
    from surgery.explain.completeness import calibrated_copy, check_completeness
    from surgery.verify import probe_input

    x = probe_input(size, dtype=torch.float64)
    work = calibrated_copy(result.model, (x,))
    report = check_completeness(work, (x,), tol=COMPLETE_TOL)
    e64 = explain(work, x)
    work32 = calibrated_copy(result.model, (x.float(),), dtype=torch.float32)
    e32 = explain(work32, x.float())
    logits = e64.logits
    spread = (logits[0] - logits[1]).abs().max().item()
    dependent = report.input_dependent and spread > 1e-12 * max(logits.abs().max().item(), 1e-300)
    return {
        "residual64": e64.relative_residual.max().item(),
        "residual32": e32.relative_residual.max().item(),
        "module_worst": report.worst,
        "modules_checked": report.checked,
        "incomplete": dict(collections.Counter(c.cls for c in report.culprits)),
        "first_incomplete": report.first.describe() if report.first else None,
        "input_dependent": bool(dependent),
        "complete": not report.culprits and e64.relative_residual.max().item() <= COMPLETE_TOL,
    }


def run_one(name: str, family: str, recipe: str, max_params: float, check_b1: bool) -> dict[str, Any]:
    """Every stage for one model; the first failing stage and its error are recorded."""
    import torch

    import surgery
    from surgery.apply import run_checks
    from surgery.verify import normalise_for_original

    torch.manual_seed(0)
    res: dict[str, Any] = {"name": name, "family": family, "status": "fail", "stage": "create"}
    t0 = time.perf_counter()
    try:
        meta = _create(name, family, None, meta=True)
        params = sum(p.numel() for p in meta.parameters())
        res["params_m"] = round(params / 1e6, 2)
        del meta
        if params > max_params:
            res.update(
                status="excluded",
                reason=f"too large for the CPU run ({params / 1e6:.0f}M params > {max_params / 1e6:.0f}M)",
            )
            return res
        model, size, how = _pick_size(name, family)
        res["input_size"] = list(size)
        res["size_from"] = how
        res["redrawn"] = redraw_zero_weights(model)
    except Exception as exc:
        res.update(status="excluded", reason="cannot be created: " + _first_line(exc))
        return res
    stage = "plan"
    runs = {"check_complete": False}  # completeness is its own stage below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = surgery.plan(recipe, model, params=runs)
            p.raise_for_errors()
            res["warnings"] = len(p.warnings)
            stage = "apply"
            result = surgery.apply(recipe, model, params=runs, the_plan=p, verify=False, input_size=size)
            res["changes"] = len(p.changes)
            stage = "verify"
            run_checks(result)
            stage = "train_step"
            conv = result.model.train()
            x = torch.rand(2, *size)
            out = conv(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = out.float().pow(2).mean()
            loss.backward()
            if not torch.isfinite(loss):
                raise FloatingPointError("loss is not finite")
            bad = [
                n
                for n, q in conv.named_parameters()
                if q.grad is not None and not torch.isfinite(q.grad).all()
            ]
            if bad:
                raise FloatingPointError(f"non-finite gradient in {bad[0]}")
            conv.zero_grad(set_to_none=True)
            res["runs"] = True
            stage = "completeness"
            res.update(completeness(result, size))
            res["stage"] = "completeness"
            if not res["complete"]:
                res["reason"] = "incomplete: " + ", ".join(
                    sorted(res["incomplete"]) or ["model-level residual"]
                )
            elif not res["input_dependent"]:
                res["reason"] = "output does not depend on the input"
            else:
                res["status"], res["stage"] = "pass", None
            if check_b1:
                stage = "b1_check"
                r1 = surgery.apply(recipe, model, params=B1_PARAMS, verify=False, input_size=size)
                x = torch.rand(2, *size)
                with torch.no_grad():
                    a = r1.model.eval()(x)
                    o = r1.original.eval()(normalise_for_original(x, r1.contract))
                a = a[0] if isinstance(a, (tuple, list)) else a
                o = o[0] if isinstance(o, (tuple, list)) else o
                err = (a.double() - o.double()).abs().max().item()
                res["b1_rel_error"] = err / max(o.double().abs().max().item(), 1e-12)
    except Exception as exc:
        if res.get("runs") and stage == "b1_check":  # the b=1 check is informational
            res["b1_error"] = _first_line(exc)
        else:
            res["stage"] = stage
            res["error"] = _first_line(exc)
            res["reason"] = normalise_reason(res["error"])
            res["where"] = traceback.extract_tb(exc.__traceback__)[-1].filename.split("site-packages/")[-1]
    finally:
        res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def worker(recipe: str, max_params: float, check_b1: bool, threads: int, max_memory_gb: float) -> None:
    """Reads model names from stdin, writes one JSON line per model to stdout."""
    import resource

    import torch

    # a model that needs more memory fails with an allocation error (recorded as excluded) instead of
    # waking the OOM killer on a shared machine; RLIMIT_DATA covers malloc and anonymous mmaps
    limit = int(max_memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    torch.set_num_threads(threads)
    # random-init B-cos networks at b=2 shrink activations layer by layer (eval mode, running_var=1):
    # deep ones reach subnormal floats, which make oneDNN convolutions ~100x slower on x86
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        family, _, bare = name.rpartition(":")
        res = run_one(bare, family or "timm", recipe, max_params, check_b1)
        res["name"] = name
        if res["status"] != "pass" and OOM.search(res.get("error", "") + res.get("reason", "")):
            res.update(
                status="excluded",
                reason=f"exceeds the CPU memory budget ({max_memory_gb:g} GB) at stage {res['stage']}",
            )
        sys.stdout.write("@@RESULT " + json.dumps(res) + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------- the driver


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--recipe",
            args.recipe,
            "--max-params",
            str(args.max_params),
            "--threads",
            str(args.threads),
        ]
        if args.no_b1:
            cmd.append("--no-b1")
        cmd += ["--max-memory-gb", str(args.max_memory_gb)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def run(self, name: str, timeout: float) -> dict[str, Any]:
        import selectors

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                self.kill()
                return {
                    "name": name,
                    "status": "fail",
                    "stage": "timeout",
                    "error": f"no result within {timeout:.0f} s",
                    "reason": f"timeout (> {timeout:.0f} s per model)",
                }
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                return {
                    "name": name,
                    "status": "fail",
                    "stage": "crash",
                    "error": f"worker died (exit code {code})",
                    "reason": "worker process died (out of memory or a native crash)",
                }
            if line.startswith("@@RESULT "):
                return json.loads(line[len("@@RESULT ") :])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None


def sample_models(n: int, seed: int) -> list[str]:
    import timm

    names = sorted(timm.list_models())
    return random.Random(seed).sample(names, min(n, len(names)))


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"meta": {}, "results": []}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(results)
    excluded = [r for r in results if r["status"] == "excluded"]
    passed = [r for r in results if r["status"] == "pass"]
    failed = [r for r in results if r["status"] == "fail"]
    considered = n - len(excluded)
    runs = [r for r in results if r.get("runs")]
    complete = [r for r in runs if r.get("complete")]
    dependent = [r for r in runs if r.get("input_dependent")]
    classes: collections.Counter[tuple[str, str]] = collections.Counter(
        (r.get("stage") or "", r.get("reason") or "") for r in failed
    )
    incomplete: collections.Counter[str] = collections.Counter()
    for r in runs:
        for k in r.get("incomplete") or {}:
            incomplete[k] += 1
    return {
        "sampled": n,
        "excluded": len(excluded),
        "considered": considered,
        "runs": len(runs),
        "complete": len(complete),
        "input_dependent": len(dependent),
        "passed": len(passed),
        "failed": len(failed),
        "coverage": len(passed) / considered if considered else math.nan,
        "coverage_of_sample": len(passed) / n if n else math.nan,
        "incomplete_by_class": incomplete.most_common(),
        "failure_classes": [
            {
                "stage": s,
                "reason": r,
                "count": c,
                "models": [
                    x["name"] for x in failed if (x.get("stage") or "", x.get("reason") or "") == (s, r)
                ],
            }
            for (s, r), c in classes.most_common()
        ],
        "exclusions": collections.Counter(r.get("reason", "") for r in excluded).most_common(),
    }


def report(path: Path) -> None:
    """Markdown for docs/benchmarks.md from a results file."""
    data = load_results(path)
    res = data["results"]
    s = summarise(res)
    meta = data.get("meta", {})
    print(f"Command: `{meta.get('command', '')}`  ")
    print(
        f"timm {meta.get('timm')}, torch {meta.get('torch')}, seed {meta.get('seed')}, {meta.get('date', '')}\n"
    )
    c = s["considered"]
    print("| | models | of those that fit the CPU |\n|---|---:|---:|")
    print(f"| sampled | {s['sampled']} | |\n| excluded | {s['excluded']} | |\n| considered | {c} | |")
    for key, label in (("runs", "run (apply, verify, train step)"), ("complete", "explain completely"),
                       ("input_dependent", "output depends on the input"), ("passed", "**pass** (all three)")):  # fmt: skip
        print(f"| {label} | {s[key]} | {100 * s[key] / c:.1f}% |" if c else f"| {label} | {s[key]} | |")
    print("\n| stage | reason (normalised first line) | models | examples |\n|---|---|---:|---|")
    for fc in s["failure_classes"]:
        ex = ", ".join(fc["models"][:4]) + (" …" if fc["count"] > 4 else "")
        print(f"| {fc['stage']} | {fc['reason'].replace('|', '/')} | {fc['count']} | {ex} |")
    if s["incomplete_by_class"]:
        print(
            "\nModules that break completeness, by class (models): "
            + ", ".join(f"`{k}` ({v})" for k, v in s["incomplete_by_class"])
        )
    print("\nExcluded:\n")
    for reason, count in s["exclusions"]:
        names = [r["name"] for r in res if r["status"] == "excluded" and r.get("reason") == reason]
        print(f"- {count} × {reason}: {', '.join(names[:6])}{' …' if len(names) > 6 else ''}")
    runs = [r for r in res if r.get("runs")]
    r64 = [r["residual64"] for r in runs if r.get("residual64") is not None]
    r32 = [r["residual32"] for r in runs if r.get("residual32") is not None and r.get("complete")]
    if r64:
        print(
            f"\nExplanation residual (relative to the explained logit), complete models: float64 max "
            f"{max((r['residual64'] for r in runs if r.get('complete')), default=math.nan):.1e}, "
            f"float32 median {sorted(r32)[len(r32) // 2] if r32 else math.nan:.1e}, max {max(r32, default=math.nan):.1e}."
        )
    redrawn = [r["name"] for r in res if r.get("redrawn")]
    if redrawn:
        print(f"\nZero-initialised weights re-drawn before conversion: {', '.join(redrawn)}.")
    errs = [r["b1_rel_error"] for r in res if r.get("b1_rel_error") is not None]
    if errs:
        passing = {r["name"] for r in res if r["status"] == "pass"}
        exact = sum(r["b1_rel_error"] <= 1e-4 for r in res if r["name"] in passing and "b1_rel_error" in r)
        measured = sum(1 for r in res if r["name"] in passing and "b1_rel_error" in r)
        print(
            f"\nFunction preservation at b=1 (biases kept, no reorder, no max->avg pool): {exact} / {measured} "
            "passing models within 1e-4 relative."
        )
        worst = sorted(
            (r for r in res if r.get("b1_rel_error") is not None), key=lambda r: -r["b1_rel_error"]
        )[:12]
        print(
            "Largest: "
            + ", ".join(f"{r['name']} {r['b1_rel_error']:.2g}" for r in worst if r["b1_rel_error"] > 1e-4)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="bcosify", help="shipped recipe name or path (default: bcosify)")
    ap.add_argument("--sample", type=int, default=220, help="how many timm architectures to sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="*", help="run these models instead of a sample")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many models (of the sample)")
    ap.add_argument("--timeout-per-model", type=float, default=240.0)
    ap.add_argument("--max-params", type=float, default=250e6, help="exclude larger models (CPU memory/time)")
    ap.add_argument("--max-memory-gb", type=float, default=10.0, help="per-worker memory limit (RLIMIT_DATA)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (1: robust on a shared machine)"
    )
    ap.add_argument("--no-b1", action="store_true", help="skip the b=1 function-preservation measurement")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--resume", action="store_true", help="keep results already in --out, run the rest")
    ap.add_argument("--rerun-failed", action="store_true", help="with --resume: run failed models again")
    ap.add_argument(
        "--torchvision", action="store_true", help="every torchvision classification model instead of timm's"
    )
    ap.add_argument("--report", action="store_true", help="print the markdown summary of --out and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.recipe, args.max_params, not args.no_b1, args.threads, args.max_memory_gb)
        return
    out = Path(args.out)
    if args.report:
        report(out)
        return
    import timm
    import torch

    if args.torchvision:
        import torchvision

        names = ["torchvision:" + n for n in torchvision.models.list_models(module=torchvision.models)]
    else:
        names = args.models or sample_models(args.sample, args.seed)
    if args.limit is not None:
        names = names[: args.limit]
    data = load_results(out) if args.resume else {"meta": {}, "results": []}
    if args.rerun_failed:
        data["results"] = [r for r in data["results"] if r["status"] != "fail"]
    done = {r["name"] for r in data["results"]}
    data["meta"] = {
        "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        "recipe": args.recipe,
        "seed": args.seed,
        "sample": len(names),
        "timm": timm.__version__,
        "torchvision": __import__("torchvision").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    w = Worker(args)
    for i, name in enumerate(names):
        if name in done:
            continue
        if not w.alive():
            w = Worker(args)
        r = w.run(name, args.timeout_per_model)
        if r.get("stage") in ("timeout", "crash"):
            w = Worker(args)
        data["results"].append(r)
        data["summary"] = {k: v for k, v in summarise(data["results"]).items() if k != "failure_classes"}
        out.write_text(json.dumps(data, indent=1))
        extra = r.get("reason") or (
            f"b1 {r['b1_rel_error']:.1e}" if r.get("b1_rel_error") is not None else ""
        )
        print(
            f"[{i + 1}/{len(names)}] {name}: {r['status']} {r.get('stage') or ''} {extra} ({r.get('seconds', '?')} s)",
            flush=True,
        )
    w.kill()
    s = summarise(data["results"])
    print(f"coverage {s['passed']}/{s['considered']} = {100 * s['coverage']:.1f}% ({s['excluded']} excluded)")


if __name__ == "__main__":
    main()
