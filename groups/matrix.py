"""Batched, differentiable matrix Lie groups and their Lie algebras.

Every operation works on tensors of shape ``(..., n, n)`` (or ``(..., n+1, n+1)`` homogeneous
matrices for the affine extensions), so a whole sample set of a layer is handled in one call and
gradients flow through products, inverses, exponentials and logarithms.

Lie-algebra coordinates are always taken in an *orthonormal* basis for ``<X, Y> = tr(X^T Y)``, so
an isotropic Gaussian on the coordinates is invariant under conjugation by rotations (which keeps
sampling and 90-degree equivariance tests exact).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

__all__ = [
    "SL",
    "SO",
    "SP",
    "Affine",
    "GLPlus",
    "MatrixGroup",
    "PositiveDefinite",
    "hat",
    "skew_basis",
    "so_exp",
    "so_log",
    "sym_basis",
    "sym_eigh",
    "sym_exp",
    "sym_log",
    "sym_pow",
    "vee",
]


# ----------------------------------------------------------------------------------------------
# Orthonormal bases of the Lie algebras
# ----------------------------------------------------------------------------------------------


@cache
def _sym_basis64(n: int, traceless: bool) -> Tensor:
    mats: list[Tensor] = []
    if traceless:
        # Helmert basis of the sum-zero diagonal: orthonormal, e.g. n = 2 -> diag(1, -1)/sqrt(2)
        for k in range(1, n):
            d = torch.zeros(n, dtype=torch.float64)
            d[:k] = 1.0
            d[k] = -float(k)
            mats.append(torch.diag(d / d.norm()))
    else:
        for i in range(n):
            e = torch.zeros(n, n, dtype=torch.float64)
            e[i, i] = 1.0
            mats.append(e)
    for i in range(n):
        for j in range(i + 1, n):
            e = torch.zeros(n, n, dtype=torch.float64)
            e[i, j] = e[j, i] = 1.0 / math.sqrt(2.0)
            mats.append(e)
    return torch.stack(mats) if mats else torch.zeros(0, n, n, dtype=torch.float64)


@cache
def _skew_basis64(n: int) -> Tensor:
    mats: list[Tensor] = []
    for i in range(n):
        for j in range(i + 1, n):
            e = torch.zeros(n, n, dtype=torch.float64)
            # sign chosen so that n = 2 gives the generator of counter-clockwise rotation R(theta)
            e[j, i] = 1.0 / math.sqrt(2.0)
            e[i, j] = -1.0 / math.sqrt(2.0)
            mats.append(e)
    return torch.stack(mats) if mats else torch.zeros(0, n, n, dtype=torch.float64)


def sym_basis(n: int, traceless: bool = False, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Orthonormal basis ``(d, n, n)`` of Sym(n) (d = n(n+1)/2) or Sym_0(n) (d = n(n+1)/2 - 1)."""
    return _sym_basis64(n, traceless).to(dtype=dtype, device=device)


def skew_basis(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Orthonormal basis ``(n(n-1)/2, n, n)`` of so(n)."""
    return _skew_basis64(n).to(dtype=dtype, device=device)


def hat(coords: Tensor, basis: Tensor) -> Tensor:
    """Coordinates ``(..., d)`` -> algebra element ``(..., n, n)``."""
    return torch.einsum("...k,kij->...ij", coords, basis.to(coords))


def vee(x: Tensor, basis: Tensor) -> Tensor:
    """Algebra element ``(..., n, n)`` -> coordinates ``(..., d)`` (orthogonal projection)."""
    return torch.einsum("...ij,kij->...k", x, basis.to(x))


# ----------------------------------------------------------------------------------------------
# Functions of symmetric matrices (one eigh, never in reduced precision)
# ----------------------------------------------------------------------------------------------


def _eigh_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def sym_eigh(s: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of symmetric ``s`` in float32 or better, autocast disabled.

    ``eigh`` in half precision is both unsupported and inaccurate, and autocast would otherwise
    downcast the surrounding matmuls of the caller.
    """
    dt = _eigh_dtype(s.dtype)
    with torch.autocast(device_type=s.device.type, enabled=False):
        s = s.to(dt)
        s = 0.5 * (s + s.transpose(-1, -2))
        evals, evecs = torch.linalg.eigh(s)
    return evals, evecs


def _sym_fn(evals: Tensor, evecs: Tensor, f) -> Tensor:
    return (evecs * f(evals).unsqueeze(-2)) @ evecs.transpose(-1, -2)


def sym_exp(x: Tensor) -> Tensor:
    """exp of a symmetric matrix: a global diffeomorphism Sym(n) -> P(n)."""
    e, v = sym_eigh(x)
    return _sym_fn(e, v, torch.exp)


def sym_log(p: Tensor) -> Tensor:
    """log of a positive-definite matrix: the inverse of :func:`sym_exp`."""
    e, v = sym_eigh(p)
    return _sym_fn(e, v, lambda t: torch.log(t.clamp_min(torch.finfo(t.dtype).tiny)))


def sym_pow(p: Tensor, power: float) -> Tensor:
    """``p ** power`` for positive-definite ``p`` (square roots, inverse square roots)."""
    e, v = sym_eigh(p)
    return _sym_fn(e, v, lambda t: t.clamp_min(torch.finfo(t.dtype).tiny) ** power)


# ----------------------------------------------------------------------------------------------
# SO(n) exponential and logarithm
# ----------------------------------------------------------------------------------------------


def so_exp(x: Tensor) -> Tensor:
    """exp: so(n) -> SO(n); closed form for n = 2, matrix_exp otherwise."""
    n = x.shape[-1]
    if n == 2:
        theta = x[..., 1, 0]
        c, s = torch.cos(theta), torch.sin(theta)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return torch.linalg.matrix_exp(x)


def so2_angle(k: Tensor) -> Tensor:
    """Angle in (-pi, pi] of rotation matrices ``(..., 2, 2)``."""
    return torch.atan2(k[..., 1, 0] - k[..., 0, 1], k[..., 0, 0] + k[..., 1, 1])


def so_log(k: Tensor) -> Tensor:
    """Principal log: SO(n) -> so(n) (rotation angles in (-pi, pi]).

    n = 2 via atan2, n = 3 via the axis-angle formula, larger n via a complex eigendecomposition
    (valid for rotations without repeated rotation angles). Defined almost everywhere: at angle
    pi the log is not unique.
    """
    n = k.shape[-1]
    if n == 1:
        return torch.zeros_like(k)
    if n == 2:
        theta = so2_angle(k)
        z = torch.zeros_like(theta)
        return torch.stack([torch.stack([z, -theta], -1), torch.stack([theta, z], -1)], -2)
    if n == 3:
        skew = 0.5 * (k - k.transpose(-1, -2))
        cos = ((k.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) * 0.5).clamp(-1.0, 1.0)
        sin = torch.linalg.vector_norm(
            torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], -1), dim=-1
        )
        theta = torch.atan2(sin, cos)
        small = theta < 1e-4
        factor = torch.where(small, 1.0 + theta**2 / 6.0, theta / torch.where(small, 1.0, sin))
        out = skew * factor[..., None, None]
        near_pi = theta > math.pi - 1e-3
        if bool(near_pi.any()):  # axis from the symmetric part: k = I + 2 a a^T - 2 I at pi
            # symmetric part = cos I + (1 - cos) a a^T: the axis is its top eigenvector
            _, evecs = torch.linalg.eigh(0.5 * (k + k.transpose(-1, -2)))
            axis = evecs[..., -1]
            sgn = torch.sign(
                (axis * torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], -1)).sum(-1)
            )
            axis = axis * torch.where(sgn == 0, torch.ones_like(sgn), sgn)[..., None]
            ax = axis * theta[..., None]
            zero = torch.zeros_like(ax[..., 0])
            a_hat = torch.stack(
                [
                    torch.stack([zero, -ax[..., 2], ax[..., 1]], -1),
                    torch.stack([ax[..., 2], zero, -ax[..., 0]], -1),
                    torch.stack([-ax[..., 1], ax[..., 0], zero], -1),
                ],
                -2,
            )
            out = torch.where(near_pi[..., None, None], a_hat, out)
        return out
    evals, evecs = torch.linalg.eig(k.to(torch.complex128 if k.dtype == torch.float64 else torch.complex64))
    logs = torch.log(evals)
    out = evecs @ torch.diag_embed(logs) @ torch.linalg.inv(evecs)
    out = out.real.to(k.dtype)
    return 0.5 * (out - out.transpose(-1, -2))


# ----------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------


class MatrixGroup:
    """A linear Lie group of ``n x n`` matrices with batched operations.

    Subclasses fix membership, the Lie algebra (``algebra_basis``) and, where it is global,
    ``exp``/``log``.
    """

    name: str = "G"

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"{self.name}: dimension must be >= 1, got {n}")
        self.n = n

    # structure
    @property
    def matrix_size(self) -> int:
        return self.n

    @property
    def dim(self) -> int:
        """Dimension of the Lie group (number of Lie-algebra coordinates)."""
        return self.algebra_basis().shape[0]

    def algebra_basis(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        raise NotImplementedError

    def identity(self, *batch: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        m = self.matrix_size
        return torch.eye(m, dtype=dtype, device=device).expand(*batch, m, m).clone()

    @staticmethod
    def mul(a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    def inv(self, g: Tensor) -> Tensor:
        return torch.linalg.inv(g)

    @staticmethod
    def det(g: Tensor) -> Tensor:
        return torch.linalg.det(g)

    def act(self, g: Tensor, x: Tensor) -> Tensor:
        """Action on coordinates: ``g (..., n, n)`` on points ``x (..., n)``."""
        return (g @ x.unsqueeze(-1)).squeeze(-1)

    def contains(self, g: Tensor, atol: float = 1e-5) -> Tensor:
        raise NotImplementedError

    def exp(self, x: Tensor) -> Tensor:
        return torch.linalg.matrix_exp(x)

    def log(self, g: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name}({self.n}): exp is not surjective; use the polar chart")

    def hat(self, coords: Tensor) -> Tensor:
        return hat(coords, self.algebra_basis(coords.dtype, coords.device))

    def vee(self, x: Tensor) -> Tensor:
        return vee(x, self.algebra_basis(x.dtype, x.device))

    def __repr__(self) -> str:
        return f"{self.name}({self.n})"


class GLPlus(MatrixGroup):
    """GL+(n): invertible matrices with positive determinant (identity component of GL(n))."""

    name = "GL+"

    def algebra_basis(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        return torch.cat(
            [sym_basis(self.n, dtype=dtype, device=device), skew_basis(self.n, dtype=dtype, device=device)]
        )

    def contains(self, g: Tensor, atol: float = 1e-5) -> Tensor:
        return self.det(g) > atol

    def log(self, g: Tensor) -> Tensor:
        raise NotImplementedError("GL+(n): exp is not surjective (n >= 2); use decompositions.xi_inv")


class SL(MatrixGroup):
    """SL(n): determinant one."""

    name = "SL"

    def algebra_basis(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        return torch.cat(
            [
                sym_basis(self.n, True, dtype=dtype, device=device),
                skew_basis(self.n, dtype=dtype, device=device),
            ]
        )

    def contains(self, g: Tensor, atol: float = 1e-5) -> Tensor:
        return (self.det(g) - 1.0).abs() < atol

    def log(self, g: Tensor) -> Tensor:
        raise NotImplementedError("SL(n): exp is not surjective (n >= 2); use decompositions.xi_inv")


class SO(MatrixGroup):
    """SO(n): rotations; the compact factor K of the polar decomposition."""

    name = "SO"

    def algebra_basis(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        return skew_basis(self.n, dtype=dtype, device=device)

    def inv(self, g: Tensor) -> Tensor:
        return g.transpose(-1, -2)

    def contains(self, g: Tensor, atol: float = 1e-5) -> Tensor:
        eye = torch.eye(self.n, dtype=g.dtype, device=g.device)
        orth = (g.transpose(-1, -2) @ g - eye).abs().amax(dim=(-1, -2)) < atol
        return orth & ((self.det(g) - 1.0).abs() < atol)

    def exp(self, x: Tensor) -> Tensor:
        return so_exp(x)

    def log(self, g: Tensor) -> Tensor:
        return so_log(g)


class PositiveDefinite(MatrixGroup):
    """P(n): symmetric positive-definite matrices, the non-compact polar factor of GL+(n).

    Not a group under matrix multiplication (a product of SPD matrices need not be symmetric):
    it is the symmetric space GL+(n)/SO(n), acted on by ``a . s = a s a^T``. ``mul`` is that
    action; ``exp``/``log`` are global diffeomorphisms with Sym(n).
    """

    name = "P"
    traceless = False

    def algebra_basis(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        return sym_basis(self.n, self.traceless, dtype=dtype, device=device)

    @staticmethod
    def mul(a: Tensor, b: Tensor) -> Tensor:
        """Congruence action ``a . b = a b a^T`` (the GL+(n)-action preserving P(n))."""
        return a @ b @ a.transpose(-1, -2)

    def inv(self, g: Tensor) -> Tensor:
        return sym_pow(g, -1.0)

    def contains(self, g: Tensor, atol: float = 1e-5) -> Tensor:
        sym = (g - g.transpose(-1, -2)).abs().amax(dim=(-1, -2)) < atol
        pos = torch.linalg.eigvalsh(0.5 * (g + g.transpose(-1, -2))).amin(-1) > 0
        ok = sym & pos
        if self.traceless:
            ok = ok & ((self.det(g) - 1.0).abs() < atol)
        return ok

    def exp(self, x: Tensor) -> Tensor:
        return sym_exp(x)

    def log(self, g: Tensor) -> Tensor:
        return sym_log(g)


class SP(PositiveDefinite):
    """SP(n): positive-definite matrices of determinant one, the polar factor of SL(n)."""

    name = "SP"
    traceless = True


class Affine(MatrixGroup):
    """R^n x| H as homogeneous ``(n+1) x (n+1)`` matrices ``[[A, t], [0, 1]]``.

    Product ``(t, A)(s, B) = (t + A s, A B)``, inverse ``(-A^-1 t, A^-1)``; left Haar measure
    ``|det A|^-1 dt dmu_H(A)``. In the layers translations are handled by ordinary convolution,
    so only the linear part ``H`` is sampled.
    """

    name = "Aff"

    def __init__(self, linear: MatrixGroup) -> None:
        super().__init__(linear.n)
        self.linear = linear

    @property
    def matrix_size(self) -> int:
        return self.n + 1

    def algebra_basis(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        n = self.n
        lin = self.linear.algebra_basis(dtype, device)
        lin_h = torch.zeros(lin.shape[0], n + 1, n + 1, dtype=dtype, device=device)
        lin_h[:, :n, :n] = lin
        tr = torch.zeros(n, n + 1, n + 1, dtype=dtype, device=device)
        for i in range(n):
            tr[i, i, n] = 1.0
        return torch.cat([tr, lin_h])

    @staticmethod
    def make(t: Tensor, a: Tensor) -> Tensor:
        """Homogeneous matrix from translation ``(..., n)`` and linear part ``(..., n, n)``."""
        n = a.shape[-1]
        out = torch.zeros(*a.shape[:-2], n + 1, n + 1, dtype=a.dtype, device=a.device)
        out[..., :n, :n] = a
        out[..., :n, n] = t
        out[..., n, n] = 1.0
        return out

    @staticmethod
    def split(g: Tensor) -> tuple[Tensor, Tensor]:
        n = g.shape[-1] - 1
        return g[..., :n, n], g[..., :n, :n]

    def inv(self, g: Tensor) -> Tensor:
        t, a = self.split(g)
        ai = self.linear.inv(a)
        return self.make(-(ai @ t.unsqueeze(-1)).squeeze(-1), ai)

    def det(self, g: Tensor) -> Tensor:  # type: ignore[override]
        return torch.linalg.det(g[..., : self.n, : self.n])

    def act(self, g: Tensor, x: Tensor) -> Tensor:
        t, a = self.split(g)
        return (a @ x.unsqueeze(-1)).squeeze(-1) + t

    def contains(self, g: Tensor, atol: float = 1e-5) -> Tensor:
        n = self.n
        last = torch.zeros(n + 1, dtype=g.dtype, device=g.device)
        last[n] = 1.0
        ok = (g[..., n, :] - last).abs().amax(-1) < atol
        return ok & self.linear.contains(g[..., :n, :n], atol)

    def log(self, g: Tensor) -> Tensor:
        raise NotImplementedError("affine groups: use the chart of the linear part")

    def __repr__(self) -> str:
        return f"R^{self.n} x| {self.linear!r}"
