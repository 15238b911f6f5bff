"""Polar decomposition, the global chart xi and the Haar measure in decomposed form.

exp: gl(n) -> GL+(n) and sl(n) -> SL(n) are not surjective (e.g. diag(-2, -1/2) in SL(2) is no
exponential), so kernels cannot be parametrised on the Lie algebra through exp. The polar
(global Cartan) decomposition G = P K, K = SO(n), P = P(n) or SP(n), gives instead the global chart

    xi(X_p + X_k) = exp(X_p) exp(X_k),    xi^-1(g) = 1/2 log(g g^T) + Log_K((g g^T)^-1/2 g),

a diffeomorphism on the P factor (exp: Sym(n) -> P(n) is global) and almost everywhere on K.
One ``eigh`` of ``g g^T`` yields both ``log p`` and ``p^-1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .matrix import (
    SL,
    SO,
    MatrixGroup,
    PositiveDefinite,
    skew_basis,
    so_exp,
    so_log,
    sym_basis,
    sym_eigh,
    vee,
)

__all__ = [
    "PolarChart",
    "log_haar_density",
    "log_haar_density_p",
    "polar",
    "polar_inverse_parts",
    "xi",
    "xi_inv",
]


def polar(g: Tensor) -> tuple[Tensor, Tensor]:
    """Left polar decomposition ``g = p k``: ``p = (g g^T)^1/2`` positive definite, ``k`` in SO(n)."""
    e, v = sym_eigh(g @ g.transpose(-1, -2))
    root = e.clamp_min(torch.finfo(e.dtype).tiny).sqrt()
    vt = v.transpose(-1, -2)
    p = (v * root.unsqueeze(-2)) @ vt
    p_inv = (v * (1.0 / root).unsqueeze(-2)) @ vt
    k = p_inv @ g.to(p_inv.dtype)
    return p.to(g.dtype), k.to(g.dtype)


def polar_inverse_parts(g: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p, k)`` of ``g = p k`` from a single eigh of ``g g^T`` (float32 or better)."""
    e, v = sym_eigh(g @ g.transpose(-1, -2))
    e = e.clamp_min(torch.finfo(e.dtype).tiny)
    vt = v.transpose(-1, -2)
    log_p = (v * (0.5 * torch.log(e)).unsqueeze(-2)) @ vt
    p_inv = (v * e.rsqrt().unsqueeze(-2)) @ vt
    k = p_inv @ g.to(p_inv.dtype)
    return log_p, k


def xi(x_p: Tensor, x_k: Tensor) -> Tensor:
    """Global chart ``xi(X_p + X_k) = exp(X_p) exp(X_k)`` (X_p symmetric, X_k skew)."""
    e, v = sym_eigh(x_p)
    p = (v * torch.exp(e).unsqueeze(-2)) @ v.transpose(-1, -2)
    return p.to(x_p.dtype) @ so_exp(x_k)


def xi_inv(g: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse chart: ``(X_p, X_k) = (1/2 log(g g^T), Log_K((g g^T)^-1/2 g))``."""
    log_p, k = polar_inverse_parts(g)
    return log_p.to(g.dtype), so_log(k).to(g.dtype)


def log_haar_density_p(x_p: Tensor) -> Tensor:
    """Log density of the invariant measure on P(n) (or SP(n)) in the chart coordinate ``X_p = log p``.

    With ``lambda`` the eigenvalues of ``X_p``, relative to Lebesgue measure on Sym(n):
    ``prod_{i<j} sinh|l_i - l_j| / |l_i - l_j|`` (up to a constant; equal to one at the identity).
    Derivation: ``ds`` of ``s = p^2 = exp(2 X_p)`` has Jacobian
    ``prod_i e^{t_i} prod_{i<j} (e^{t_i} - e^{t_j}) / (t_i - t_j)`` and the invariant measure is
    ``det(s)^{-(n+1)/2} ds``; the exponentials cancel.
    """
    lam, _ = sym_eigh(x_p)
    n = lam.shape[-1]
    out = torch.zeros(lam.shape[:-1], dtype=lam.dtype, device=lam.device)
    for i in range(n):
        for j in range(i + 1, n):
            d = (lam[..., i] - lam[..., j]).abs()
            # log(sinh d / d) = d + log((1 - e^{-2d}) / (2d)); series below 1e-4 for accuracy
            small = d < 1e-4
            ds = torch.where(small, torch.ones_like(d), d)
            val = ds + torch.log(-torch.expm1(-2.0 * ds) / (2.0 * ds))
            out = out + torch.where(small, d * d / 6.0, val)
    return out


def _log_haar_density_k(x_k: Tensor) -> Tensor:
    """Log density of Haar measure on SO(n) in exponential coordinates (n <= 3), relative to Lebesgue."""
    n = x_k.shape[-1]
    if n <= 2:
        return torch.zeros(x_k.shape[:-2], dtype=x_k.dtype, device=x_k.device)
    if n == 3:
        # ||X||_F = sqrt(2) theta; density 2 (1 - cos theta) / theta^2
        theta = torch.linalg.matrix_norm(x_k) / math.sqrt(2.0)
        small = theta < 1e-4
        ts = torch.where(small, torch.ones_like(theta), theta)
        val = torch.log(4.0 * torch.sin(0.5 * ts) ** 2 / ts**2)  # 2 (1 - cos) / t^2 without cancellation
        return torch.where(small, -(theta**2) / 12.0, val)
    raise NotImplementedError("Haar density on SO(n) in exponential coordinates: n <= 3 only")


def log_haar_density(x_p: Tensor, x_k: Tensor) -> Tensor:
    """Haar measure of GL+(n)/SL(n) in polar form: ``dmu_G(p k) = dmu_P(p) dmu_K(k)`` in chart coordinates."""
    return log_haar_density_p(x_p) + _log_haar_density_k(x_k)


class PolarChart:
    """``xi`` in orthonormal coordinates of p (+) k, for GL+(n), SL(n) or SO(n).

    ``coords(g)`` -> ``(..., dim_p + dim_k)``; ``element(c)`` is its inverse. The P part uses the
    orthonormal basis of Sym(n) (GL+) or Sym_0(n) (SL); SO(n) has no P part.
    """

    def __init__(self, group: MatrixGroup) -> None:
        self.group = group
        self.n = group.n
        self.traceless = isinstance(group, SL) or (isinstance(group, PositiveDefinite) and group.traceless)
        self.has_p = not isinstance(group, SO)
        self.has_k = not isinstance(group, PositiveDefinite)

    @property
    def dim_p(self) -> int:
        if not self.has_p:
            return 0
        return self.n * (self.n + 1) // 2 - (1 if self.traceless else 0)

    @property
    def dim_k(self) -> int:
        return self.n * (self.n - 1) // 2 if self.has_k else 0

    @property
    def dim(self) -> int:
        return self.dim_p + self.dim_k

    def p_basis(self, dtype: torch.dtype, device=None) -> Tensor:
        return sym_basis(self.n, self.traceless, dtype=dtype, device=device)

    def k_basis(self, dtype: torch.dtype, device=None) -> Tensor:
        return skew_basis(self.n, dtype=dtype, device=device)

    def split(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p, k)`` of ``g = p k``."""
        if not self.has_p:
            zero = torch.zeros_like(g)
            return zero, g
        log_p, k = polar_inverse_parts(g)
        return log_p.to(g.dtype), k.to(g.dtype)

    def coords(self, g: Tensor) -> Tensor:
        log_p, k = self.split(g)
        parts = []
        if self.has_p:
            parts.append(vee(log_p, self.p_basis(g.dtype, g.device)))
        if self.has_k:
            parts.append(vee(so_log(k), self.k_basis(g.dtype, g.device)))
        return torch.cat(parts, -1)

    def element(self, c: Tensor) -> Tensor:
        n = self.n
        x_p = torch.zeros(*c.shape[:-1], n, n, dtype=c.dtype, device=c.device)
        x_k = torch.zeros_like(x_p)
        if self.has_p:
            x_p = torch.einsum("...k,kij->...ij", c[..., : self.dim_p], self.p_basis(c.dtype, c.device))
        if self.has_k:
            x_k = torch.einsum("...k,kij->...ij", c[..., self.dim_p :], self.k_basis(c.dtype, c.device))
        if not self.has_p:
            return so_exp(x_k)
        return xi(x_p, x_k)

    def log_haar_density(self, c: Tensor) -> Tensor:
        """Haar density (up to a constant) at chart coordinates ``c``, relative to Lebesgue on ``c``."""
        n = self.n
        out = torch.zeros(c.shape[:-1], dtype=c.dtype, device=c.device)
        if self.has_p:
            x_p = torch.einsum("...k,kij->...ij", c[..., : self.dim_p], self.p_basis(c.dtype, c.device))
            out = out + log_haar_density_p(x_p)
        if self.has_k and n == 3:
            x_k = torch.einsum("...k,kij->...ij", c[..., self.dim_p :], self.k_basis(c.dtype, c.device))
            out = out + _log_haar_density_k(x_k)
        return out
