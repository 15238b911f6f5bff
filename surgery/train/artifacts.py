"""Fine-tuning and evaluation at the artifact level: what ``surgery finetune`` and ``surgery eval`` run.

An artifact is loaded (base rebuilt, plan re-applied, weights loaded), trained with the recipe's
``finetune`` block overridden by the caller's options, and saved as a new artifact: same recipe,
plan and base identity, new weights, and the training settings recorded in the manifest. Epoch
checkpoints live in a run directory beside the output (``OUT.run/``), so ``resume`` survives an
interruption while the artifact itself is still written atomically, once, at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.apply import Result
from surgery.artifacts import load, save
from surgery.train.config import FinetuneConfig
from surgery.train.loop import FinetuneResult, evaluate, finetune


def run_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.run"


def config_for(result: Result, **overrides: Any) -> FinetuneConfig:
    """The recipe's ``finetune`` block (if any) with command-line style overrides applied."""
    block = {k: v for k, v in (result.plan.recipe.finetune or {}).items() if k != "__own__"}
    return FinetuneConfig.from_block(block).override(**overrides)


def finetune_artifact(
    artifact: str | Path | Result,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> tuple[Path, FinetuneResult]:
    """Fine-tune an artifact (or an apply ``Result``) and save the result as a new artifact at ``out``."""
    from surgery.errors import ArtifactError

    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists (use --force to replace it)")
    result = load(artifact) if not isinstance(artifact, Result) else artifact
    source = str(artifact) if not isinstance(artifact, Result) else None
    config = config_for(result, **overrides)
    run = finetune(
        result.model,
        config,
        run_dir_for(out),
        resume=resume,
        input_contract=result.contract or None,
        progress=progress,
    )
    extra = {
        "finetune": {
            "config": config.to_dict(),
            "from": source,
            "final": run.final,
            "epochs": run.epochs_completed,
        }
    }
    result.model.to("cpu")
    save(result, out, overwrite=overwrite, extra=extra)
    return out, run


def evaluate_artifact(artifact: str | Path | Result, data: Any, **kwargs: Any) -> dict[str, float]:
    """Accuracy of an artifact on a data spec, fed the way its input contract says."""
    result = load(artifact) if not isinstance(artifact, Result) else artifact
    return evaluate(result.model, data, input_contract=result.contract or None, **kwargs)
