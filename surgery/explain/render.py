"""PNG rendering of explanations with PIL + numpy only (no matplotlib).

Panels, left to right: the image | the colour explanation over black | over white | the
contribution map in a symmetric blue-white-red map (matplotlib ``bwr``), clipped at the 99.5th
percentile of |contribution| (B-cos v2 ``plot_contribution_map``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from surgery.explain.core import Explanation

__all__ = ["bwr_heatmap", "explanation_panels", "save_explanation_png"]


def _to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return (
        t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float32)
    )


def bwr_heatmap(contributions: torch.Tensor | np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """(H, W) contributions -> (H, W, 3) RGB in [0, 1]: blue negative, white 0, red positive.

    Symmetric range ``+-v`` with ``v`` the ``percentile`` of |contribution| (values beyond clip).
    """
    c = _to_numpy(contributions)
    v = float(np.percentile(np.abs(c), percentile)) if c.size else 0.0
    t = np.clip(c / v, -1.0, 1.0) if v > 0 else np.zeros_like(c)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    r = 1.0 - neg
    g = 1.0 - np.maximum(pos, neg)
    b = 1.0 - pos
    return np.stack([r, g, b], axis=-1)


def _over(rgba: np.ndarray, background: float) -> np.ndarray:
    a = rgba[..., 3:4]
    return rgba[..., :3] * a + background * (1 - a)


def explanation_panels(
    image: torch.Tensor | np.ndarray, explanation: Explanation, index: int = 0, gap: int = 4
) -> np.ndarray:
    """The side-by-side panels as an (H, 4W + 3 gap, 3) float array in [0, 1].

    ``image``: (3, H, W) or (N, 3, H, W) in [0, 1] (the raw image the model saw).
    """
    img = _to_numpy(image)
    if img.ndim == 4:
        img = img[index]
    if img.shape[0] in (1, 3) and img.ndim == 3:
        img = np.transpose(img, (1, 2, 0))
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    img = np.clip(img, 0, 1)
    rgba = _to_numpy(explanation.rgba[index])
    heat = bwr_heatmap(explanation.contributions[index])
    h = img.shape[0]
    sep = np.ones((h, gap, 3), dtype=np.float32)
    panels = [img, _over(rgba, 0.0), _over(rgba, 1.0), heat]
    out: list[np.ndarray] = []
    for i, p in enumerate(panels):
        if i:
            out.append(sep)
        out.append(p.astype(np.float32))
    return np.concatenate(out, axis=1)


def save_explanation_png(
    path: str | Path,
    image: torch.Tensor | np.ndarray,
    explanation: Explanation,
    index: int = 0,
    scale: int = 1,
) -> Path:
    """Write image | explanation over black | over white | contribution map as one PNG."""
    arr = explanation_panels(image, explanation, index=index)
    pil = Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path
