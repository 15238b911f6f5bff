"""Group axioms, polar decomposition, the global chart xi and the Haar density (float64, random batches)."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.groups import decompositions as D
from surgery.groups import matrix as M

torch.set_default_dtype(torch.float32)
ATOL = 1e-10


def rand_glplus(b: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(b, n, n, generator=gen, dtype=torch.float64) + 0.5 * torch.eye(n, dtype=torch.float64)
    det = torch.linalg.det(g)
    g[det < 0, :, 0] *= -1  # flip a column: positive determinant
    return g


def rand_sl(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = rand_glplus(b, n, seed)
    return g / torch.linalg.det(g).abs().pow(1.0 / n)[:, None, None]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_bases_orthonormal(n: int) -> None:
    for basis in (
        M.sym_basis(n, dtype=torch.float64),
        M.sym_basis(n, True, dtype=torch.float64),
        M.skew_basis(n),
    ):
        basis = basis.to(torch.float64)
        gram = torch.einsum("aij,bij->ab", basis, basis)
        torch.testing.assert_close(gram, torch.eye(basis.shape[0], dtype=torch.float64))
    assert M.sym_basis(n, True).diagonal(dim1=-2, dim2=-1).sum(-1).abs().max() < 1e-7
    assert M.GLPlus(n).dim == n * n and M.SL(n).dim == n * n - 1 and M.SO(n).dim == n * (n - 1) // 2
    assert M.PositiveDefinite(n).dim == n * (n + 1) // 2 and M.SP(n).dim == n * (n + 1) // 2 - 1


@pytest.mark.parametrize(
    "group,maker", [(M.GLPlus(3), rand_glplus), (M.SL(3), rand_sl), (M.GLPlus(2), rand_glplus)]
)
def test_group_axioms(group: M.MatrixGroup, maker) -> None:
    a, b, c = maker(16, group.n, 1), maker(16, group.n, 2), maker(16, group.n, 3)
    for g in (a, b, group.mul(a, b)):
        assert bool(group.contains(g).all())
    torch.testing.assert_close(group.mul(group.mul(a, b), c), group.mul(a, group.mul(b, c)))
    e = group.identity(16, dtype=torch.float64)
    torch.testing.assert_close(group.mul(a, e), a)
    torch.testing.assert_close(group.mul(a, group.inv(a)), e)
    torch.testing.assert_close(group.det(group.mul(a, b)), group.det(a) * group.det(b))
    x = torch.randn(16, group.n, dtype=torch.float64)
    torch.testing.assert_close(group.act(group.mul(a, b), x), group.act(a, group.act(b, x)))


def test_so_exp_log_and_membership() -> None:
    for n in (2, 3):
        so = M.SO(n)
        c = torch.randn(64, so.dim, dtype=torch.float64)
        c = c / c.norm(dim=-1, keepdim=True).clamp_min(1.0) * 2.5  # angles < pi: principal log
        r = so.exp(so.hat(c))
        assert bool(so.contains(r).all())
        torch.testing.assert_close(so.vee(so.log(r)), c)
        torch.testing.assert_close(so.inv(r), torch.linalg.inv(r))
    # rotation by exactly pi about an axis (n = 3): log recovers a valid generator
    axis = torch.tensor([[0.0, 0.6, 0.8]], dtype=torch.float64)
    x = M.SO(3).hat(axis * math.pi * math.sqrt(2.0))
    r = torch.linalg.matrix_exp(x)
    torch.testing.assert_close(torch.linalg.matrix_exp(M.so_log(r)), r)


def test_positive_definite_factors() -> None:
    for group in (M.PositiveDefinite(3), M.SP(3)):
        c = 0.7 * torch.randn(32, group.dim, dtype=torch.float64)
        p = group.exp(group.hat(c))
        assert bool(group.contains(p).all())
        torch.testing.assert_close(group.vee(group.log(p)), c)
        torch.testing.assert_close(group.inv(p) @ p, torch.eye(3, dtype=torch.float64).expand(32, 3, 3))
        a = rand_glplus(32, 3)
        assert bool(M.PositiveDefinite(3).contains(group.mul(a, p)).all())  # congruence action stays in P
    assert bool(
        (torch.linalg.det(M.SP(3).exp(M.SP(3).hat(torch.randn(8, 5, dtype=torch.float64)))) - 1).abs().max()
        < 1e-10
    )


def test_affine_extension() -> None:
    aff = M.Affine(M.GLPlus(2))
    t = torch.randn(8, 2, dtype=torch.float64)
    a = aff.make(t, rand_glplus(8, 2, 4))
    b = aff.make(torch.randn(8, 2, dtype=torch.float64), rand_glplus(8, 2, 5))
    x = torch.randn(8, 2, dtype=torch.float64)
    assert bool(aff.contains(a).all()) and aff.dim == 6 and M.Affine(M.SL(2)).dim == 5
    torch.testing.assert_close(aff.act(aff.mul(a, b), x), aff.act(a, aff.act(b, x)))
    torch.testing.assert_close(aff.act(aff.inv(a), aff.act(a, x)), x)
    torch.testing.assert_close(aff.inv(a), torch.linalg.inv(a))
    torch.testing.assert_close(aff.det(a), torch.linalg.det(a[:, :2, :2]))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("maker", [rand_glplus, rand_sl])
def test_polar_and_chart_round_trip(n: int, maker) -> None:
    g = maker(64, n, 7)
    p, k = D.polar(g)
    torch.testing.assert_close(p @ k, g)
    assert bool(M.PositiveDefinite(n).contains(p).all()) and bool(M.SO(n).contains(k).all())
    torch.testing.assert_close(torch.linalg.det(p), torch.linalg.det(g))
    x_p, x_k = D.xi_inv(g)
    torch.testing.assert_close(x_p, x_p.transpose(-1, -2))
    torch.testing.assert_close(x_k, -x_k.transpose(-1, -2))
    torch.testing.assert_close(D.xi(x_p, x_k), g)  # xi(xi^-1(g)) == g
    group = M.GLPlus(n) if maker is rand_glplus else M.SL(n)
    chart = D.PolarChart(group)
    c = chart.coords(g)
    assert c.shape[-1] == group.dim
    torch.testing.assert_close(chart.element(c), g)
    torch.testing.assert_close(chart.coords(chart.element(c)), c)
    if maker is rand_sl:
        assert float(x_p.diagonal(dim1=-2, dim2=-1).sum(-1).abs().max()) < 1e-10


def test_chart_reaches_non_exponentials() -> None:
    """diag(-2, -1/2) in SL(2) is not exp of anything in sl(2), but xi reaches it."""
    g = torch.tensor([[[-2.0, 0.0], [0.0, -0.5]]], dtype=torch.float64)
    chart = D.PolarChart(M.SL(2))
    torch.testing.assert_close(chart.element(chart.coords(g)), g)


def test_chart_is_differentiable() -> None:
    g = rand_glplus(3, 2, 11).requires_grad_(True)
    chart = D.PolarChart(M.GLPlus(2))
    assert torch.autograd.gradcheck(lambda x: chart.coords(x), (g,))
    c = torch.randn(3, 4, dtype=torch.float64, requires_grad=True) * 0.3
    c = c.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: chart.element(x), (c,))


def test_eigh_stays_float32_under_autocast() -> None:
    g = rand_glplus(4, 2).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_p, _ = D.xi_inv(g)
        e, _ = M.sym_eigh(g.bfloat16() @ g.bfloat16().transpose(-1, -2))
    assert x_p.dtype == torch.float32 and e.dtype == torch.float32


@pytest.mark.parametrize("n,traceless", [(2, False), (3, False), (2, True), (3, True)])
def test_haar_density_matches_invariant_measure(n: int, traceless: bool) -> None:
    """Chart density == Riemannian volume of the invariant metric tr(s^-1 ds s^-1 ds), up to a constant.

    For P(n) that volume is det(s)^-(n+1)/2 ds; for SP(n) (a totally geodesic slice) it is the
    invariant measure of SL(n)/SO(n). s = p^2 = exp(2 X), X = hat(c).
    """
    basis = M.sym_basis(n, traceless, dtype=torch.float64)

    def s_of(c: torch.Tensor) -> torch.Tensor:
        return M.sym_exp(2.0 * M.hat(c, basis))

    gen = torch.Generator().manual_seed(3)
    vals = []
    for _ in range(5):
        c = 0.6 * torch.randn(basis.shape[0], generator=gen, dtype=torch.float64)
        s = s_of(c)
        ds = torch.autograd.functional.jacobian(s_of, c).permute(2, 0, 1)  # (d, n, n)
        si = torch.linalg.inv(s)
        a = si @ ds
        metric = torch.einsum("aij,bji->ab", a, a)
        vals.append(float(0.5 * torch.logdet(metric) - D.log_haar_density_p(M.hat(c, basis))))
    assert max(vals) - min(vals) < 1e-8


def test_so3_haar_density_normalised() -> None:
    """Haar density on SO(3) in exponential coordinates integrates like the uniform measure on angles."""
    theta = torch.linspace(1e-6, math.pi, 20001, dtype=torch.float64)
    dens = torch.exp(
        D._log_haar_density_k(M.SO(3).hat(torch.stack([theta * math.sqrt(2), 0 * theta, 0 * theta], -1)))
    )
    # in polar coordinates of the 3-D exponential coordinates: 4 pi theta^2 dens(theta) dtheta ~ (1 - cos) dtheta
    ratio = theta**2 * dens / (2 * torch.sin(theta / 2) ** 2)
    assert float(ratio.max() - ratio.min()) < 1e-6
