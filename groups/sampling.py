"""Monte-Carlo sample sets for the polar factors, drawn as exact inverse pairs.

A sample is ``g = p k`` with ``p = exp(X)``, X drawn on the symmetric part (log-normal law on
P(n)), and ``k`` from SO(n) (grid, uniform angle or Haar). Its inverse is formed in closed form,
``g^-1 = k^T exp(-X)``, not by ``torch.linalg.inv``, so ``g g^-1 = I`` to rounding.

The invariant measure on P(n) has infinite mass and cannot be sampled; the log-normal law is the
paper's substitute, which makes equivariance approximate. ``importance_weights`` re-weights a
draw towards the invariant measure (self-normalised, mean one), which removes the bias of the
Gaussian shape inside the sampled region but cannot undo the truncation to that region.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from surgery.registry import register_constructor

from .decompositions import log_haar_density_p
from .matrix import skew_basis, so_exp, sym_basis, sym_eigh

__all__ = ["Grid", "GroupSamples", "Haar", "LogNormal", "Uniform", "haar_so", "importance_weights"]


@register_constructor("lognormal")
@dataclass(frozen=True)
class LogNormal:
    """Log-normal law on the positive-definite factor: ``log p ~ N(mean * I, sigma^2)``.

    ``sigma`` is the standard deviation of each coordinate of ``log p`` in an orthonormal basis of
    Sym(n) (GL+) or Sym_0(n) (SL), i.e. roughly the spread of the log singular values. The
    reference code's ``--spd_bounds 0.1`` (variance of ``log(g g^T)``) is ``sigma = sqrt(0.1) / 2``
    ~ 0.158. ``mean`` shifts the log of the isotropic scale (GL+ only).
    """

    sigma: float = 0.158
    mean: float = 0.0

    def __post_init__(self) -> None:
        if not (self.sigma >= 0.0 and math.isfinite(self.sigma)):
            raise ValueError(f"lognormal: sigma must be finite and >= 0, got {self.sigma}")

    def sample_coords(self, num: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
        """Chart coordinates ``(num, dim)`` (float64) of ``log p``, before any mean shift."""
        return torch.randn(num, dim, generator=generator, dtype=torch.float64) * self.sigma

    def log_prob(self, coords: Tensor) -> Tensor:
        """Log density of the (un-shifted) coordinates, relative to Lebesgue measure."""
        if self.sigma == 0:
            return torch.zeros(coords.shape[:-1], dtype=coords.dtype, device=coords.device)
        d = coords.shape[-1]
        return -0.5 * (coords / self.sigma).pow(2).sum(-1) - d * math.log(self.sigma * math.sqrt(2 * math.pi))


@register_constructor("grid")
@dataclass(frozen=True)
class Grid:
    """Equally spaced rotation angles ``offset + 2 pi i / n``, i < n: no duplicated endpoint.

    (The reference ``linspace(-pi, pi, n)`` repeats +-pi, leaving n - 1 distinct angles.)
    ``n = None`` uses the group's ``samples``. ``random_offset`` rotates the whole grid by one
    uniform angle per draw (training only), so the layers see every orientation over time.
    SO(2) only.
    """

    n: int | None = None
    offset: float = 0.0
    random_offset: bool = False

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ValueError(f"grid: n must be >= 1, got {self.n}")

    def sample(
        self, num: int, dim: int, generator: torch.Generator | None = None, *, training: bool = True
    ) -> Tensor:
        if dim != 2:
            raise ValueError("grid(...) rotations exist for SO(2) only; use haar() for SO(n), n > 2")
        if self.n is not None and self.n != num:
            raise ValueError(f"grid({self.n}) has {self.n} angles but the group draws {num} samples")
        theta = self.offset + 2.0 * math.pi * torch.arange(num, dtype=torch.float64) / num
        if self.random_offset and training:
            theta = theta + 2.0 * math.pi * torch.rand((), generator=generator, dtype=torch.float64)
        return _rot2(theta)


@register_constructor("uniform")
@dataclass(frozen=True)
class Uniform:
    """Rotation angles ``theta ~ U[low, high)`` (independent draws). SO(2) only."""

    low: float = -math.pi
    high: float = math.pi

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"uniform: need high > low, got [{self.low}, {self.high})")

    def sample(
        self, num: int, dim: int, generator: torch.Generator | None = None, *, training: bool = True
    ) -> Tensor:
        if dim != 2:
            raise ValueError("uniform(...) angles exist for SO(2) only; use haar() for SO(n), n > 2")
        theta = self.low + (self.high - self.low) * torch.rand(num, generator=generator, dtype=torch.float64)
        return _rot2(theta)


@register_constructor("haar")
@dataclass(frozen=True)
class Haar:
    """Haar (uniform) measure on SO(n): QR of a Gaussian matrix with signs fixed (any n)."""

    def sample(
        self, num: int, dim: int, generator: torch.Generator | None = None, *, training: bool = True
    ) -> Tensor:
        return haar_so(num, dim, generator)


def _rot2(theta: Tensor) -> Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def haar_so(num: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``num`` Haar-distributed rotations ``(num, n, n)`` in float64 (Mezzadri's QR recipe)."""
    if n == 1:
        return torch.ones(num, 1, 1, dtype=torch.float64)
    a = torch.randn(num, n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    q = q * d.unsqueeze(-2)
    neg = torch.linalg.det(q) < 0
    q[neg, :, 0] = -q[neg, :, 0]
    return q


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host-to-device copy that does not wait for the device (pinned staging buffer on CUDA)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class GroupSamples:
    """A sample set ``{g_i}`` with exact inverses and optional importance weights.

    ``g``/``g_inv`` are ``(N, n, n)`` (float64 by default: kernel coordinates are computed from them
    in double precision and only then cast to the layer's dtype). ``weights`` ``(N,)`` or None.
    Quantities that depend on the samples alone (kernel geometry) are memoised per set with
    ``derived``: computed once per forward for all layers, on the host, then moved.
    """

    g: Tensor
    g_inv: Tensor
    weights: Tensor | None = None
    meta: dict = field(default_factory=dict)
    _host: GroupSamples | None = field(default=None, repr=False, compare=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.g.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None) -> GroupSamples:
        dev = self.g.device if device is None else torch.device(device)
        w = None if self.weights is None else to_device(self.weights, dev).to(dtype=dtype)
        # a device copy remembers its float64 CPU origin, where ``derived`` computes the geometry
        host = self._host or (self if self.g.device.type == "cpu" and dtype is None else None)
        host = None if dev.type == "cpu" else host
        g, g_inv = (to_device(t, dev).to(dtype=dtype) for t in (self.g, self.g_inv))
        return GroupSamples(g, g_inv, w, dict(self.meta), host)

    def transform(self, a: Tensor) -> GroupSamples:
        """Left translate by ``a``: ``(a g, g^-1 a^-1)`` (co-transform for an input ``f o a^-1``)."""
        a = a.to(self.g)
        a_inv = torch.linalg.inv(a)
        return GroupSamples(a @ self.g, self.g_inv @ a_inv, self.weights, dict(self.meta))

    def det(self) -> Tensor:
        return torch.linalg.det(self.g)

    def host(self) -> GroupSamples:
        """The CPU copy this set was moved from (made once if there is none)."""
        if self.g.device.type == "cpu":
            return self
        if self._host is None:
            self._host = self.to("cpu")
        return self._host

    def derived(
        self, key: Hashable, compute: Callable[[GroupSamples], tuple[Tensor, ...]], *, on_host: bool = False
    ) -> tuple[Tensor, ...]:
        """``compute(host set)`` memoised under ``key``, on this set's device (``on_host``: on the CPU).

        ``compute`` runs once per set and key on the CPU copy (float64, no autograd), so layers
        sharing a geometry share one computation, and a GPU runs none of the small float64
        linear algebra (``eigh``) of the kernel coordinates: one non-blocking copy per result.
        """
        memo_key = (key, on_host)
        hit = self._memo.get(memo_key)
        return hit if hit is not None else self._derive(memo_key, compute)

    @torch.compiler.disable
    def _derive(
        self, memo_key: tuple, compute: Callable[[GroupSamples], tuple[Tensor, ...]]
    ) -> tuple[Tensor, ...]:
        # eager even under torch.compile (host float64 linear algebra, pinned copies), and plain
        # tensors even inside inference_mode: the memo of a fixed set outlives the call
        key, on_host = memo_key
        with torch.inference_mode(False), torch.no_grad():
            host = self.host()
            base = host._memo.get((key, True))
            if base is None:
                base = host._memo[(key, True)] = tuple(compute(host))
            hit = base if on_host or host is self else tuple(to_device(t, self.g.device) for t in base)
        self._memo[memo_key] = hit
        return hit


def importance_weights(x_p: Tensor, coords: Tensor, law: LogNormal) -> Tensor:
    """Self-normalised weights ``w_i ~ mu_P(X_i) / q(X_i)`` (mean one) towards the invariant measure.

    ``x_p`` ``(N, n, n)`` are the drawn ``log p`` and ``coords`` their un-shifted chart coordinates.
    """
    logw = log_haar_density_p(x_p) - law.log_prob(coords)
    return torch.softmax(logw, dim=-1) * logw.shape[-1]


def draw_pairs(
    n: int,
    num: int,
    *,
    scale: LogNormal | None,
    rotation: Grid | Uniform | Haar | None,
    traceless: bool,
    generator: torch.Generator | None = None,
    training: bool = True,
    weighted: bool = False,
) -> GroupSamples:
    """Draw ``g_i = exp(X_i) k_i`` and ``g_i^-1 = k_i^T exp(-X_i)`` (i-th P draw with i-th rotation)."""
    eye = torch.eye(n, dtype=torch.float64).expand(num, n, n)
    p, p_inv, weights = eye, eye, None
    x_p = torch.zeros(num, n, n, dtype=torch.float64)
    if scale is not None:
        basis = sym_basis(n, traceless, dtype=torch.float64)
        coords = scale.sample_coords(num, basis.shape[0], generator)
        x_p = torch.einsum("bk,kij->bij", coords, basis)
        if scale.mean and not traceless:
            x_p = x_p + scale.mean * torch.eye(n, dtype=torch.float64)
        e, v = sym_eigh(x_p)
        vt = v.transpose(-1, -2)
        p = (v * torch.exp(e).unsqueeze(-2)) @ vt
        p_inv = (v * torch.exp(-e).unsqueeze(-2)) @ vt
        if weighted:
            weights = importance_weights(x_p, coords, scale)
    k = eye if rotation is None else rotation.sample(num, n, generator, training=training)
    g = p @ k
    g_inv = k.transpose(-1, -2) @ p_inv
    return GroupSamples(g.contiguous(), g_inv.contiguous(), weights, {"log_p": x_p, "k": k})


def so_element(coords: Tensor) -> Tensor:
    """SO(n) element from orthonormal so(n) coordinates (helper for tests and docs)."""
    n = round((1 + math.sqrt(1 + 8 * coords.shape[-1])) / 2)
    return so_exp(torch.einsum("...k,kij->...ij", coords, skew_basis(n, dtype=coords.dtype)))
