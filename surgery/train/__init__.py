"""Fine-tuning and built-in data for surgery, at the ``nn.Module`` level.

A recipe's ``finetune { ... }`` block becomes a :class:`FinetuneConfig` (``from_block``), command-line
options apply through ``config.override(...)``, and :func:`finetune` trains the caller's model in
place with atomic, pickle-free checkpoints and a ``metrics.jsonl`` log. :func:`evaluate` measures
accuracy, or localisation on ``grid_digits`` with a pluggable explainer. See ``docs/training.md``.
"""

from surgery.train.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint
from surgery.train.components import (
    UniformOffLabelsBCEWithLogitsLoss,
    build_loss,
    build_optimizer,
    build_scheduler,
)
from surgery.train.config import FinetuneConfig, FinetuneConfigError
from surgery.train.data import (
    AFFINE_REGIMES,
    DATASETS,
    DataSpec,
    GridDigitsDataset,
    InputPipeline,
    build_dataset,
    build_loader,
    parse_data_spec,
    read_idx,
    resolve_input_pipeline,
)
from surgery.train.distributed import DistInfo, cleanup_distributed, init_distributed
from surgery.train.loop import FinetuneResult, evaluate, finetune, set_module_param
from surgery.train.metrics import grid_pointing_game, read_metrics

__all__ = [
    "AFFINE_REGIMES",
    "DATASETS",
    "DataSpec",
    "DistInfo",
    "FinetuneConfig",
    "FinetuneConfigError",
    "FinetuneResult",
    "GridDigitsDataset",
    "InputPipeline",
    "UniformOffLabelsBCEWithLogitsLoss",
    "build_dataset",
    "build_loader",
    "build_loss",
    "build_optimizer",
    "build_scheduler",
    "cleanup_distributed",
    "evaluate",
    "finetune",
    "grid_pointing_game",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights",
    "parse_data_spec",
    "read_idx",
    "read_metrics",
    "resolve_input_pipeline",
    "save_checkpoint",
    "set_module_param",
]
