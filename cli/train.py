"""``surgery finetune`` and ``surgery eval``: training and measuring artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.common import Format, FormatOption, console, fail, print_data

FINETUNE_EPILOG = """\
Examples:

```
surgery finetune out/bcos --data "digits(size=32)" --epochs 5 -o out/bcos-ft
surgery finetune out/bcos -o out/bcos-ft --resume          # continue after an interruption
torchrun --nproc-per-node 2 -m surgery.cli.app finetune out/bcos -o out/bcos-ft
```
"""

EVAL_EPILOG = """\
Examples:

```
surgery eval out/bcos-ft --data "digits(size=32)"
surgery eval out/bcos-ft --data "grid_digits(size=32)" --format json   # grid pointing game
```
"""

ArtifactArg = Annotated[
    str, typer.Argument(metavar="ARTIFACT", help="An artifact directory written by apply.")
]
DataOption = Annotated[
    str | None,
    typer.Option(
        "--data", metavar="SPEC", help="digits(size=32), affine_digits(...), imagefolder:PATH, mnist:DIR, ..."
    ),
]

DeviceOption = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda when available).")]


def finetune(
    artifact: ArtifactArg,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="The new artifact to write.")],
    data: DataOption = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the recipe's finetune block).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Per-process batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of the optimiser.")] = None,
    optimizer: Annotated[str | None, typer.Option(help='e.g. "adamw(lr=1e-3, weight_decay=0)".')] = None,
    schedule: Annotated[str | None, typer.Option(help='e.g. "cosine(warmup_epochs=1)".')] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (same seed, same result).")] = None,
    device: DeviceOption = None,
    compile_: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast on GPU.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT.run/.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output artifact.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="rich progress bars.")] = True,
) -> None:
    """Fine-tune ARTIFACT and save the result as a new artifact.

    Settings come from the recipe's `finetune { ... }` block; options given here override it.
    Checkpoints are written every epoch to `OUT.run/` (atomically, safetensors); metrics go to
    `OUT.run/metrics.jsonl`; the new artifact appears at OUT only when training has finished.
    """
    from surgery.train.artifacts import finetune_artifact

    if output.exists() and not force:
        fail(f"{output} already exists (pass --force to replace it)")
    overrides = {
        "data": data,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": optimizer,
        "schedule": schedule,
        "seed": seed,
        "device": device,
        "compile": compile_,
        "amp": amp,
    }
    try:
        out, run = finetune_artifact(
            artifact, output, resume=resume, overwrite=force, progress=progress, **overrides
        )
    except ValueError as exc:  # configuration and data-spec errors from the training code
        fail(str(exc))
        return
    con = console()
    final = ", ".join(f"{k} {v:.4g}" for k, v in run.final.items() if isinstance(v, float))
    con.print(f"[bold green]wrote[/] {out}  ({run.epochs_completed} epochs; {final})")


def eval_(
    artifact: ArtifactArg,
    data: DataOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
    split: Annotated[str, typer.Option(help="Which split to measure.")] = "test",
    device: DeviceOption = None,
    fmt: FormatOption = Format.rich,
) -> None:
    """Accuracy of ARTIFACT on a data set; on `grid_digits`, the grid pointing game of its explanations."""
    import surgery
    from surgery.train import evaluate

    if data is None:
        fail('--data is required (e.g. --data "digits(size=32)")')
    from surgery.train.distributed import DistInfo, resolve_device

    try:
        dev = resolve_device(device or "auto", DistInfo())
    except (RuntimeError, ValueError) as exc:
        fail(f"--device {device}: {exc}")
        return
    result = surgery.load(artifact)
    explain_fn = None
    if "grid" in data.replace("-", "_"):
        from surgery.explain import explain

        def explain_fn(model, images, classes):  # type: ignore[no-untyped-def]
            return explain(model, images, classes).contributions

    try:
        metrics = evaluate(
            result.model,
            data,
            split=split,
            batch_size=batch_size,
            device=dev,
            input_contract=result.contract or None,
            explain_fn=explain_fn,
        )
    except ValueError as exc:
        fail(str(exc))
        return
    if fmt is not Format.rich:
        print_data({"schema": "surgery-eval/1", "artifact": artifact, "data": data, "metrics": metrics}, fmt)
        return
    con = console()
    for k, v in metrics.items():
        con.print(f"{k:<24} {v:.4f}" if isinstance(v, float) else f"{k:<24} {v}")
