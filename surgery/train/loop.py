"""The fine-tuning loop and evaluation, on a model the caller owns (trained in place).

Reproducibility: every epoch reseeds Python, numpy and torch from ``(seed, epoch, rank)`` and the
sampler reshuffles from ``(seed, epoch)``; with the model, optimiser and schedule restored from the
last checkpoint, a resumed run on CPU retraces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from surgery.lang.values import Call
from surgery.train.calibration import recalibrate_batchnorm, recalibration_batches
from surgery.train.checkpoint import clear_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from surgery.train.components import GradClipper, build_loss, build_optimizer, build_scheduler
from surgery.train.config import FinetuneConfig, FinetuneConfigError
from surgery.train.data import (
    DataSpec,
    GridDigitsDataset,
    InputPipeline,
    build_dataset,
    build_loader,
    dataset_num_classes,
    resolve_input_pipeline,
)
from surgery.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    resolve_device,
    wrap_ddp,
)
from surgery.train.metrics import MetricsLog, grid_pointing_game, summarize_scores

log = logging.getLogger("surgery.train")

__all__ = ["FinetuneResult", "evaluate", "finetune", "set_module_param"]

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``explain_fn(model, images, target_classes) -> attributions`` (``B×H×W`` or ``B×C×H×W``)."""

# keys whose change between a checkpoint and a resumed run is expected and not worth a warning
_RESUME_FREE_KEYS = {
    "epochs",
    "device",
    "compile",
    "amp",
    "num_workers",
    "eval",
    "eval_batch_size",
    "keep_checkpoints",
}


@dataclass
class FinetuneResult:
    """What a :func:`finetune` run did; ``history`` holds one metrics record per epoch run now."""

    out_dir: Path
    epochs_completed: int
    start_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    metrics_path: Path | None = None
    input_pipeline: InputPipeline | None = None

    @property
    def resumed(self) -> bool:
        return self.start_epoch > 0


# ---------------------------------------------------------------------------------------- parameters


def set_module_param(model: nn.Module, name: str, value: float) -> int:
    """Set parameter/buffer/attribute ``name`` to ``value`` on every module that has one.

    Parameters and buffers are filled in place (so optimiser references stay valid); plain attributes
    and settable properties are assigned. Returns how many modules were changed, so a ramp on a name
    no module has can be reported instead of silently doing nothing.
    """
    count = 0
    for m in model.modules():
        tensor = m._parameters.get(name) if name in m._parameters else m._buffers.get(name)
        if tensor is not None:
            with torch.no_grad():
                tensor.fill_(value)
            count += 1
            continue
        if name in m._parameters or name in m._buffers or name in m._modules:
            continue
        prop = getattr(type(m), name, None)
        if isinstance(prop, property):
            if prop.fset is not None:
                setattr(m, name, value)
                count += 1
            continue
        if name in m.__dict__ and not callable(m.__dict__[name]):
            old = m.__dict__[name]
            if isinstance(old, torch.Tensor):
                with torch.no_grad():
                    old.fill_(value)
            else:
                setattr(m, name, value)
            count += 1
    return count


# ------------------------------------------------------------------------------------------- helpers


def _seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Seed every generator from ``(seed, epoch, rank)``; returns the data-loader seed."""
    s = np.random.SeedSequence([seed, epoch, rank]).generate_state(3)
    torch.manual_seed(int(s[0]))
    np.random.seed(int(s[1]))
    random.seed(int(s[2]))
    return int(s[0]) ^ 0x5EED


def _amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if amp else None


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"finetune: the model must return B×classes logits, got {shape}")
    return out


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


class _Bar:
    """A rich progress bar (loss, accuracy, throughput, ETA); a no-op when disabled or not a TTY."""

    def __init__(self, enabled: bool) -> None:
        self.progress = None
        self.task = None
        if not enabled:
            return
        console = _console()
        if not console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}  {task.fields[ips]:.0f} img/s"
            ),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )

    @property
    def enabled(self) -> bool:
        return self.progress is not None

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start(self, description: str, total: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(description, total=total, loss=float("nan"), acc=0.0, ips=0.0)

    def update(self, **fields: float) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, **fields)


def _check_classes(logits: torch.Tensor, ds: Dataset, y: torch.Tensor) -> None:
    n_model = logits.shape[1]
    n_data = dataset_num_classes(ds) or int(y.max()) + 1
    if n_data > n_model:
        raise ValueError(
            f"finetune: the model outputs {n_model} classes but the data has {n_data}; "
            "give the model a matching classifier (e.g. timm num_classes=...)"
        )


# ---------------------------------------------------------------------------------------------- epochs


def _train_epoch(
    *,
    train_model: nn.Module,
    model: nn.Module,
    loader: DataLoader,
    steps: int,
    pipeline: InputPipeline,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    clipper: GradClipper | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    info: DistInfo,
    bar: _Bar,
    global_step: int,
    check_classes: bool,
) -> tuple[dict[str, float], int]:
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if i >= steps:
            break
        x = pipeline(batch[0].to(device, non_blocking=True))
        y = batch[1].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = _logits(train_model(x))
        if check_classes and i == 0:
            _check_classes(logits, loader.dataset, y)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clipper is not None:
            clipper(model)
        optimizer.step()
        global_step += 1
        if scheduler is not None:
            scheduler.step_update(num_updates=global_step)
        n = int(y.shape[0])
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == y).sum().double()
        count += n
        if bar.enabled:
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.update(
                loss=float(loss_sum) / count,
                acc=float(correct) / count,
                ips=count * info.world_size / elapsed,
            )
    totals = all_reduce_sum(
        torch.stack([loss_sum, correct, torch.tensor(float(count), device=device, dtype=torch.float64)]), info
    )
    elapsed = time.perf_counter() - t0
    n_total = max(float(totals[2]), 1.0)
    return {
        "train_loss": float(totals[0]) / n_total,
        "train_acc": float(totals[1]) / n_total,
        "train_samples": int(totals[2]),
        "throughput": float(totals[2]) / max(elapsed, 1e-9),
        "epoch_time": elapsed,
    }, global_step


def _recalibrate_bn(
    model: nn.Module,
    loader: DataLoader,
    batches: int,
    pipeline: InputPipeline,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> int:
    """BatchNorm statistics on the deployed group sample set from the same ``batches`` every epoch.

    The random stream is forked so that recalibrating changes nothing else about the run (resume
    stays bit-for-bit).
    """
    loader.sampler.set_epoch(0)
    loader.generator.manual_seed(0)
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None),
    ):
        inputs = (pipeline(b[0].to(device, non_blocking=True)) for b in itertools.islice(loader, batches))
        return recalibrate_batchnorm(model, inputs)


@torch.no_grad()
def _eval_classification(
    model: nn.Module,
    loader: DataLoader,
    pipeline: InputPipeline,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    loss_fn: nn.Module | None,
    info: DistInfo,
    max_batches: int | None = None,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = pipeline(batch[0].to(device, non_blocking=True))
            y = batch[1].to(device, non_blocking=True)
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
            ):
                logits = _logits(model(x)).float()
            if loss_fn is not None:
                loss_sum += loss_fn(logits, y).double() * y.shape[0]
            correct += (logits.argmax(1) == y).sum().double()
            count += y.shape[0]
    finally:
        model.train(was_training)
    totals = all_reduce_sum(torch.stack([loss_sum, correct, count]), info)
    n = max(float(totals[2]), 1.0)
    out = {"accuracy": float(totals[1]) / n, "samples": int(totals[2])}
    if loss_fn is not None:
        out["loss"] = float(totals[0]) / n
    return out


# -------------------------------------------------------------------------------------------- finetune


def finetune(
    model: nn.Module,
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    input_contract: dict[str, Any] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``model`` in place as ``config`` says; checkpoint and log metrics under ``out_dir``.

    Writes ``out_dir/metrics.jsonl`` (one record per epoch) and an atomic checkpoint per epoch
    (``out_dir/checkpoints``). ``resume=True`` continues from the newest checkpoint there (or starts
    afresh with a warning if there is none); without it earlier checkpoints and metrics are replaced.
    The model is moved to the training device and left there, in the train/eval mode it came in.
    Under torchrun each process calls this; rank 0 writes, ``batch_size`` is per process.
    """
    if config.data is None:
        raise FinetuneConfigError(
            "data", "no data set: write `data = digits(size=32)` (or similar) or pass --data"
        )
    out_dir = Path(out_dir)
    info = init_distributed(config.device)
    device = resolve_device(config.device, info)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.to(device)

    pipeline = resolve_input_pipeline(model, input_contract)
    train_ds = build_dataset(config.data, "train", data_config=pipeline.data_config)
    if len(train_ds) == 0:
        raise ValueError(f"finetune: the training split of {config.data.name} is empty")
    eval_ds = (
        build_dataset(config.eval_data or config.data, "test", data_config=pipeline.data_config)
        if config.eval
        else None
    )
    if isinstance(train_ds, GridDigitsDataset):
        raise FinetuneConfigError("data", "grid_digits is for the localisation metric, not for training")
    if isinstance(eval_ds, GridDigitsDataset):
        log.warning("finetune: grid_digits measures localisation; use evaluate(..., explain_fn=...)")
        eval_ds = None

    loss_fn = build_loss(config.loss).to(device)
    clipper = GradClipper(config.clip_grad) if config.clip_grad is not None else None
    pin = device.type == "cuda"
    loader = build_loader(
        train_ds,
        config.batch_size,
        train=True,
        seed=config.seed,
        num_workers=config.num_workers,
        info=info,
        pin_memory=pin,
    )
    sampler = loader.sampler
    steps = len(loader) if config.steps_per_epoch is None else min(len(loader), config.steps_per_epoch)
    eval_loader = None
    if eval_ds is not None:
        eval_loader = build_loader(
            eval_ds,
            config.eval_batch_size or 2 * config.batch_size,
            train=False,
            num_workers=config.num_workers,
            info=info,
            pin_memory=pin,
        )

    recal_batches = recalibration_batches(model, config.recalibrate_bn)
    recal_loader = (
        build_loader(
            train_ds,
            config.batch_size,
            train=True,
            seed=config.seed + 1,
            num_workers=config.num_workers,
            info=info,
            pin_memory=pin,
        )
        if recal_batches
        else None
    )

    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config.schedule, epochs=config.epochs, updates_per_epoch=steps)
    for r in config.ramps:
        if set_module_param(model, r.param, r.value_at(0)) == 0:
            raise FinetuneConfigError(
                "ramps", f"no module of the model has a parameter or attribute {r.param!r}"
            )

    metrics = MetricsLog(out_dir / "metrics.jsonl")
    start_epoch, global_step, ckpt = 0, 0, None
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            log.warning("resume: no checkpoint in %s; starting from scratch", out_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        _warn_config_drift(state.get("extra", {}).get("config"), config)
        log.info("resumed from %s (epoch %d, step %d)", ckpt, start_epoch, global_step)
    barrier(info)
    if info.is_main:
        if ckpt is not None:
            metrics.truncate_after(start_epoch)
        else:
            if (out_dir / "checkpoints").exists() or metrics.path.exists():
                log.warning(
                    "%s: replacing checkpoints and metrics of an earlier run (use resume to continue)",
                    out_dir,
                )
            metrics.clear()
            clear_checkpoints(out_dir)
    barrier(info)

    train_model = wrap_ddp(model, info, device)
    if config.compile:
        backend = config.compile if isinstance(config.compile, str) else "inductor"
        train_model = torch.compile(train_model, backend=backend)
    amp_dtype = _amp_dtype(config.amp, device)

    history: list[dict[str, Any]] = []
    last_ckpt = ckpt
    with _Bar(progress and info.is_main) as bar:
        for epoch in range(start_epoch, config.epochs):
            loader.generator.manual_seed(_seed_epoch(config.seed, epoch, info.rank))
            sampler.set_epoch(epoch)
            ramp_values = {r.param: r.value_at(epoch) for r in config.ramps}
            for p, v in ramp_values.items():
                set_module_param(model, p, v)
            bar.start(f"epoch {epoch + 1}/{config.epochs}", steps)
            stats, global_step = _train_epoch(
                train_model=train_model,
                model=model,
                loader=loader,
                steps=steps,
                pipeline=pipeline,
                loss_fn=loss_fn,
                optimizer=optimizer,
                scheduler=scheduler,
                clipper=clipper,
                device=device,
                amp_dtype=amp_dtype,
                info=info,
                bar=bar,
                global_step=global_step,
                check_classes=epoch == start_epoch,
            )
            if not np.isfinite(stats["train_loss"]):
                raise FloatingPointError(
                    f"finetune: training loss is {stats['train_loss']} in epoch {epoch + 1}; "
                    f"the last good checkpoint is {last_ckpt}"
                )
            lr = float(optimizer.param_groups[0]["lr"])
            if scheduler is not None:
                scheduler.step(epoch + 1)
            record: dict[str, Any] = {"epoch": epoch + 1, "step": global_step, "lr": lr, **stats}
            if ramp_values:
                record["ramps"] = ramp_values
            if recal_loader is not None:
                record["bn_recalibration_images"] = _recalibrate_bn(
                    model, recal_loader, recal_batches, pipeline, device, amp_dtype
                )
            if eval_loader is not None:
                ev = _eval_classification(model, eval_loader, pipeline, device, amp_dtype, loss_fn, info)
                record.update(
                    {"val_loss": ev["loss"], "val_acc": ev["accuracy"], "val_samples": ev["samples"]}
                )
            if info.is_main:
                metrics.append(record)
                last_ckpt = save_checkpoint(
                    out_dir,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    epoch=epoch + 1,
                    global_step=global_step,
                    extra={"config": config.to_dict(), "metrics": record, "input": pipeline.describe()},
                    keep=config.keep_checkpoints,
                )
            barrier(info)
            history.append(record)
            log.info(
                "epoch %d/%d: loss %.4f acc %.4f%s (%.0f img/s)",
                epoch + 1,
                config.epochs,
                stats["train_loss"],
                stats["train_acc"],
                f" val_acc {record['val_acc']:.4f}" if "val_acc" in record else "",
                stats["throughput"],
            )
    model.train(was_training)
    records = metrics.records() if info.is_main else history
    return FinetuneResult(
        out_dir=out_dir,
        epochs_completed=max(start_epoch, config.epochs if history else start_epoch),
        start_epoch=start_epoch,
        history=history,
        final=records[-1] if records else {},
        checkpoint=latest_checkpoint(out_dir) if info.is_main else last_ckpt,
        metrics_path=metrics.path,
        input_pipeline=pipeline,
    )


def _warn_config_drift(saved: dict[str, Any] | None, config: FinetuneConfig) -> None:
    if not saved:
        return
    now = config.to_dict()
    changed = sorted(k for k in now if k not in _RESUME_FREE_KEYS and saved.get(k) != now[k])
    if changed:
        log.warning("resume: settings differ from the checkpoint's: %s", ", ".join(changed))


# -------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    data_spec: str | Call | DataSpec | Dataset,
    *,
    split: str = "test",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    input_contract: dict[str, Any] | None = None,
    loss: Call | str | None = None,
    explain_fn: ExplainFn | None = None,
    localisation_fn: Callable[..., torch.Tensor] = grid_pointing_game,
    smooth: int = 0,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Accuracy (and mean loss if ``loss`` is given) of ``model`` on a data spec's ``split``.

    On ``grid_digits`` data, pass ``explain_fn(model, images, classes) -> attributions``: each mosaic
    cell's class is explained and scored by ``localisation_fn(attributions, cells, grid, smooth=...)``
    (default: the grid pointing game), reported as ``grid_pointing_game`` (mean) with quartiles.
    The model is left in the mode it came in, on its device.
    """
    if device is None:
        p = next(iter(model.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    model.to(dev)
    pipeline = resolve_input_pipeline(model, input_contract)
    ds = (
        data_spec
        if isinstance(data_spec, Dataset)
        else build_dataset(data_spec, split, data_config=pipeline.data_config)
    )
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    info = DistInfo()
    if isinstance(ds, GridDigitsDataset) or getattr(ds, "grid", None):
        if explain_fn is None:
            raise ValueError(
                "evaluate: grid data measures localisation; pass explain_fn(model, images, classes)"
            )
        return _eval_localisation(
            model, loader, pipeline, dev, explain_fn, localisation_fn, int(ds.grid), smooth, max_batches
        )
    from surgery.train.config import _v_loss

    loss_fn = build_loss(_v_loss("loss", loss)).to(dev) if loss is not None else None
    return _eval_classification(model, loader, pipeline, dev, None, loss_fn, info, max_batches)


def _eval_localisation(
    model: nn.Module,
    loader: DataLoader,
    pipeline: InputPipeline,
    device: torch.device,
    explain_fn: ExplainFn,
    localisation_fn: Callable[..., torch.Tensor],
    grid: int,
    smooth: int,
    max_batches: int | None,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    scores: list[torch.Tensor] = []
    try:
        for i, (x, y, cell) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = pipeline(x.to(device))
            attributions = explain_fn(model, x, y.to(device))
            scores.append(localisation_fn(attributions, cell, grid, smooth=smooth).detach().cpu())
    finally:
        model.train(was_training)
    s = torch.cat(scores) if scores else torch.zeros(0)
    return {**summarize_scores(s, "grid_pointing_game"), "samples": int(s.numel())}
