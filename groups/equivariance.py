"""Measuring equivariance of sampled group networks.

A Monte-Carlo layer is equivariant *with co-transformed sample sets*: for an input transformed by
``a`` (``f' = f o a^-1``) the network must be run on the left-translated samples ``a S``. Then

* lattice-preserving ``a`` (90-degree rotations): ``F(f'; a S) = rot(F(f; S))`` to rounding;
* any other ``a``: invariant outputs (logits) agree up to the discretisation error, which
  :func:`offlattice_error` reports as a relative L2 of logits.

Images for off-lattice tests are analytic (a sum of Gaussian blobs evaluated at ``a^-1 p``), so no
interpolation error enters the measurement. Coordinates are (x = column, y = row), y pointing
down, as the layers' kernel stencil.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .sampling import GroupSamples
from .spec import GroupSpec

__all__ = [
    "TRANSFORMS",
    "blob_image",
    "check_rot90",
    "offlattice_error",
    "relative_l2",
    "rot90_matrix",
    "rotation",
]


def relative_l2(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` over the whole tensor."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rotation(degrees: float) -> Tensor:
    """Counter-clockwise (as displayed, y down) rotation by ``degrees`` in (x, y) coordinates."""
    t = math.radians(degrees)
    # y points down, so the displayed counter-clockwise turn is R(-t) in (x, y)
    return torch.tensor([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]], dtype=torch.float64)


def rot90_matrix(k: int = 1) -> Tensor:
    """The ``a`` with ``torch.rot90(img, k, dims=(-2, -1)) == img o a^-1`` in (x, y) coordinates."""
    return torch.linalg.matrix_power(rotation(90.0).round(), k % 4)


TRANSFORMS: dict[str, Tensor] = {
    "rotation 30deg": rotation(30.0),
    "shear 0.3": torch.tensor([[1.0, 0.3], [0.0, 1.0]], dtype=torch.float64),
    "stretch 1.2": torch.tensor([[1.2, 0.0], [0.0, 1 / 1.2]], dtype=torch.float64),
    "scale 1.2": torch.tensor([[1.2, 0.0], [0.0, 1.2]], dtype=torch.float64),
}


def canvas_points(size: int, a: Tensor | None = None, *, density: int = 1) -> Tensor:
    """``(n * n, 2)`` pixel centres as (x = column, y = row) about the canvas centre, float64.

    With ``a``: the points ``a^-1 p``, where an analytic image ``f`` must be evaluated to give exact
    samples of ``f o a^-1`` (no interpolation). ``density = d``: ``d x d`` points per pixel, the
    centres of its sub-cells (``n = d * size``), for the same canvas on a finer grid.
    """
    c = (size - 1) / 2.0
    sub = (torch.arange(density, dtype=torch.float64) + 0.5) / density - 0.5
    ax = ((torch.arange(size, dtype=torch.float64) - c)[:, None] + sub).reshape(-1)
    ys, xs = torch.meshgrid(ax, ax, indexing="ij")
    p = torch.stack([xs, ys], -1).reshape(-1, 2)
    return p if a is None else p @ torch.linalg.inv(a.to(torch.float64)).T


def blob_image(
    size: int,
    a: Tensor | None = None,
    *,
    batch: int = 4,
    blobs: int = 4,
    sigma: tuple[float, float] = (2.0, 3.0),
    spread: float = 0.22,
    seed: int = 0,
    density: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(batch, 1, n, n)`` images ``f(a^-1 p)``, ``f`` a sum of Gaussian blobs (analytic).

    Blob centres are within ``spread * size`` of the image centre, widths in ``sigma`` pixels;
    ``density = d`` samples the same images ``d x d`` times per pixel (``n = d * size``).
    """
    gen = torch.Generator().manual_seed(seed)
    centres = (torch.rand(batch, blobs, 2, generator=gen, dtype=torch.float64) * 2 - 1) * spread * size
    widths = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(batch, blobs, generator=gen, dtype=torch.float64)
    amps = 0.5 + 0.5 * torch.rand(batch, blobs, generator=gen, dtype=torch.float64)
    p = canvas_points(size, a, density=density)
    d2 = ((p[None, None] - centres[:, :, None]) ** 2).sum(-1)  # (B, blobs, P)
    img = (amps[..., None] * torch.exp(-0.5 * d2 / widths[..., None] ** 2)).sum(1)
    n = size * density
    return img.clamp(max=1.0).reshape(batch, 1, n, n).to(dtype)


def _forward(model: nn.Module, group: GroupSpec, x: Tensor, samples: GroupSamples) -> Tensor:
    """``model(x)`` on ``samples``, with ``x`` moved to the model's device (probes are made on CPU)."""
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    if param is not None:
        x = x.to(param.device)
    with torch.no_grad(), group.use(samples):
        return model(x)


def check_rot90(
    model: nn.Module | Callable[[Tensor], Tensor],
    group: GroupSpec,
    x: Tensor,
    *,
    k: int = 1,
    samples: GroupSamples | None = None,
    output: str = "auto",
) -> float:
    """Relative error between ``F(rot90(x); a S)`` and ``rot90(F(x; S))`` (``F(x; S)`` if invariant).

    ``output="auto"`` rotates outputs with >= 2 trailing spatial dims of size > 1, compares others as is.
    """
    s = samples if samples is not None else group.fixed()
    a = rot90_matrix(k)
    y = _forward(model, group, x, s)
    y_rot = _forward(model, group, torch.rot90(x, k, dims=(-2, -1)), s.transform(a))
    spatial = y.dim() >= 4 and y.shape[-1] > 1 and y.shape[-2] > 1
    if output == "spatial" or (output == "auto" and spatial):
        y = torch.rot90(y, k, dims=(-2, -1))
    return relative_l2(y_rot, y)


def offlattice_error(
    model: nn.Module,
    group: GroupSpec,
    a: Tensor,
    *,
    size: int = 40,
    batch: int = 8,
    samples: GroupSamples | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    probe: Callable[[Tensor | None], Tensor] | None = None,
) -> float:
    """Relative L2 between logits ``F(f o a^-1; a S)`` and ``F(f; S)`` on analytic blob images.

    ``probe(a)`` replaces the blobs: it must return exact samples of ``f o a^-1`` (``f`` for None).
    """
    s = samples if samples is not None else group.fixed()
    if probe is None:
        x = blob_image(size, None, batch=batch, seed=seed, dtype=dtype)
        xa = blob_image(size, a, batch=batch, seed=seed, dtype=dtype)
    else:
        x, xa = probe(None).to(dtype), probe(a).to(dtype)
    y = _forward(model, group, x, s)
    ya = _forward(model, group, xa, s.transform(a))
    return relative_l2(ya, y)


def resampling_error(
    model: nn.Module,
    group: GroupSpec,
    *,
    size: int = 40,
    batch: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Relative L2 between logits of the same input under two independent sample sets."""
    x = blob_image(size, None, batch=batch, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    s1, s2 = group.draw(gen), group.draw(gen)
    return relative_l2(_forward(model, group, x, s2), _forward(model, group, x, s1))
