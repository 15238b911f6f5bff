"""The end-to-end job on built-in data: what ``surgery demo`` runs (and the README's first command).

standard timm CNN trained on scikit-learn's digits -> shipped B-cosify recipe -> diff in the
terminal -> short fine-tune -> accuracy -> explanation images on disk. Everything it writes goes
under one output directory, and every intermediate step is an ordinary artifact or checkpoint that
the other commands accept.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from surgery.lang.values import Call


@dataclass
class DemoSettings:
    model: str = "resnet18"
    recipe: str = "bcosify-resnet"
    size: int = 32
    epochs_standard: int = 3
    epochs_bcos: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    images: int = 4
    progress: bool = True


@dataclass
class DemoResult:
    out: Path
    accuracy_standard: float
    accuracy_converted: float
    accuracy_bcos: float
    explanations: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "accuracy_standard": self.accuracy_standard,
            "accuracy_after_surgery": self.accuracy_converted,
            "accuracy_bcos_finetuned": self.accuracy_bcos,
            "explanations": [str(p) for p in self.explanations],
            "seconds": round(self.seconds, 1),
        }


def run_demo(
    out: str | Path, settings: DemoSettings | None = None, console: Console | None = None
) -> DemoResult:
    """Run the whole job into ``out`` (which must not exist yet)."""
    import timm
    from safetensors.torch import save_model

    import surgery
    from surgery import diff
    from surgery.errors import ArtifactError
    from surgery.explain import explain, save_explanation_png
    from surgery.train import FinetuneConfig, build_dataset, evaluate, finetune, resolve_input_pipeline
    from surgery.train.artifacts import evaluate_artifact, finetune_artifact

    s = settings or DemoSettings()
    con = console or Console()
    out = Path(out)
    if out.exists():
        raise ArtifactError(f"{out} already exists; choose another --output or remove it")
    out.mkdir(parents=True)
    start = time.perf_counter()
    data = Call("digits", (), {"size": s.size})

    def config(epochs: int) -> FinetuneConfig:
        return FinetuneConfig.from_block(
            {
                "data": data,
                "epochs": epochs,
                "batch_size": s.batch_size,
                "optimizer": Call("adamw", (), {"lr": s.lr, "weight_decay": 0.0}),
                "schedule": Call("cosine", (), {"warmup_epochs": 0}),
                "seed": s.seed,
            }
        )

    con.rule(f"[bold]1. a standard timm {s.model} on digits ({s.size}x{s.size})")
    torch.manual_seed(s.seed)
    standard = timm.create_model(s.model, num_classes=10)
    finetune(standard, config(s.epochs_standard), out / "standard.run", progress=s.progress)
    acc_std = evaluate(standard, data)["accuracy"]
    weights = out / "standard.safetensors"
    save_model(standard, str(weights))
    con.print(f"standard {s.model}: test accuracy [bold]{acc_std:.3f}[/]")

    con.rule(f"[bold]2. surgery apply {s.recipe}")
    ref = f"timm:{s.model}?num_classes=10&weights={weights}"
    result = surgery.apply(s.recipe, ref, input_size=(3, s.size, s.size))
    diff.render(diff.compute(result.original, result.model, result.plan, before_ref=ref), con)
    artifact = surgery.save(result, out / "bcos")
    acc_conv = evaluate_artifact(artifact, data)["accuracy"]
    con.print(
        f"right after surgery (B=2, no biases, before fine-tuning): test accuracy [bold]{acc_conv:.3f}[/]"
    )

    con.rule("[bold]3. surgery finetune")
    tuned, _ = finetune_artifact(
        artifact,
        out / "bcos-finetuned",
        progress=s.progress,
        data=data,
        epochs=s.epochs_bcos,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=s.seed,
    )
    acc_bcos = evaluate_artifact(tuned, data)["accuracy"]
    con.print(f"B-cosified {s.model} after {s.epochs_bcos} epochs: test accuracy [bold]{acc_bcos:.3f}[/]")

    con.rule("[bold]4. surgery explain")
    loaded = surgery.load(tuned)
    model = loaded.model.eval()
    pipeline = resolve_input_pipeline(model, loaded.contract or None)
    test = build_dataset(data, "test", data_config=pipeline.data_config)
    images = pipeline(torch.stack([test[i][0] for i in range(s.images)]))
    exp = explain(model, images)
    paths = []
    for i in range(s.images):
        p = save_explanation_png(out / "explanations" / f"digit-{i}.png", images[i], exp, index=i, scale=4)
        paths.append(p)
    res = exp.residual.abs().max().item()
    con.print(
        f"wrote {len(paths)} explanations to {out / 'explanations'} (max completeness residual {res:.2e})"
    )

    result_data = DemoResult(out, acc_std, acc_conv, acc_bcos, paths, time.perf_counter() - start)
    (out / "demo.json").write_text(json.dumps(result_data.to_dict(), indent=2) + "\n")
    con.rule(f"[bold]done in {result_data.seconds:.0f} s")
    return result_data
