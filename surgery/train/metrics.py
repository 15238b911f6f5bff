"""Metrics: the JSON-lines log of a run, running averages and the grid pointing game."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["MetricsLog", "grid_pointing_game", "read_metrics", "summarize_scores"]


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed and fsynced per record.

    A resumed run first drops records of epochs it is about to redo (:meth:`truncate_after`), so the
    file always matches the checkpoint it continues from.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_jsonable(record), sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_after(self, epoch: int) -> None:
        """Keep only records with ``epoch <= epoch`` (atomically rewritten)."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("epoch", 0)) <= epoch]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in kept:
                fh.write(json.dumps(r) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``; a torn last line (crash mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: corrupt metrics line") from None
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _jsonable(v.item() if v.numel() == 1 else v.tolist())
    if isinstance(v, float) and not math.isfinite(v):  # strict JSON has no NaN/Infinity
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def grid_pointing_game(
    attributions: torch.Tensor, cells: torch.Tensor, grid: int, *, smooth: int = 0
) -> torch.Tensor:
    """Grid pointing game score per image: positive attribution inside the target cell / in total.

    ``attributions``: ``B×H×W`` or ``B×C×H×W`` (summed over channels, as B-cos "contribution
    maps"); ``cells``: target cell per image, row-major in a ``grid×grid`` mosaic. ``smooth`` > 0 first
    average-pools with that odd kernel, stride 1 (B-cos uses 15). Score 0 where there is no positive
    attribution at all (B-cos v2 ``localisation.py``).
    """
    a = attributions.detach().float()
    if a.ndim == 4:
        a = a.sum(1)
    if a.ndim != 3:
        raise ValueError(f"grid_pointing_game: attributions must be B×H×W or B×C×H×W, got {tuple(a.shape)}")
    if smooth > 1:
        a = F.avg_pool2d(a[:, None], smooth, stride=1, padding=smooth // 2, count_include_pad=False)[:, 0]
    a = a.clamp(min=0)
    b, h, w = a.shape
    if h % grid or w % grid:
        raise ValueError(f"grid_pointing_game: {h}×{w} attributions do not split into a {grid}×{grid} grid")
    ch, cw = h // grid, w // grid
    per_cell = a.view(b, grid, ch, grid, cw).sum((2, 4)).reshape(b, grid * grid)
    total = per_cell.sum(1)
    target = per_cell.gather(1, cells.long().view(-1, 1).to(a.device)).squeeze(1)
    return torch.where(total > 0, target / total.clamp(min=1e-30), torch.zeros_like(total))


def summarize_scores(scores: Iterable[float] | torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean and quartiles of per-sample scores, keyed ``{prefix}``, ``{prefix}_p25`` … ``_p75``."""
    t = torch.as_tensor(list(scores) if not isinstance(scores, torch.Tensor) else scores, dtype=torch.float64)
    if t.numel() == 0:
        return {prefix: float("nan")}
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {
        prefix: float(t.mean()),
        f"{prefix}_p25": float(q[0]),
        f"{prefix}_median": float(q[1]),
        f"{prefix}_p75": float(q[2]),
    }
