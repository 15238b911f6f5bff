"""Localisation metric: the grid pointing game (B-cos v2 ``interpretability/analyses/localisation.py``).

Images of different classes are tiled into a grid; explaining the class of one cell, a good
explanation puts its positive evidence in that cell. Score = share of the positive contribution
inside the target cell (1/cells is chance level).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["grid_pointing_game"]


def grid_pointing_game(
    contributions: torch.Tensor | np.ndarray,
    grid: tuple[int, int] = (2, 2),
    target_cell: int | tuple[int, int] = 0,
    *,
    smooth: int = 0,
) -> float:
    """Share of positive contribution inside ``target_cell`` of a ``grid`` (rows, cols) tiling.

    ``contributions``: (H, W) map (e.g. ``Explanation.contributions[i]``). ``target_cell``: a
    (row, col) pair or a row-major index. ``smooth``: optional box filter (stride 1) applied before
    clamping at 0; the reference evaluation uses 15. Cell borders are ``round(k H / rows)``; 0 if
    there is no positive contribution at all.
    """
    c = torch.as_tensor(np.asarray(contributions) if isinstance(contributions, np.ndarray) else contributions)
    c = c.detach().double()
    if c.dim() != 2:
        raise ValueError(f"expected an (H, W) contribution map, got shape {tuple(c.shape)}")
    rows, cols = grid
    if isinstance(target_cell, int):
        if not 0 <= target_cell < rows * cols:
            raise ValueError(f"target_cell {target_cell} outside a {rows}x{cols} grid")
        r, k = divmod(target_cell, cols)
    else:
        r, k = target_cell
        if not (0 <= r < rows and 0 <= k < cols):
            raise ValueError(f"target_cell {target_cell} outside a {rows}x{cols} grid")
    if smooth:
        c = F.avg_pool2d(c[None, None], smooth, stride=1, padding=(smooth - 1) // 2)[0, 0]
    pos = c.clamp(min=0)
    total = float(pos.sum())
    if total <= 0:
        return 0.0
    h, w = pos.shape
    r0, r1 = round(r * h / rows), round((r + 1) * h / rows)
    c0, c1 = round(k * w / cols), round((k + 1) * w / cols)
    return float(pos[r0:r1, c0:c1].sum()) / total
