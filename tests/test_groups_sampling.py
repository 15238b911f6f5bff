"""Samplers against their stated distributions; GroupSpec modes, registration and copying."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from surgery.groups import Grid, GroupSpec, Haar, LogNormal, Uniform, gl_plus, se, sl, so
from surgery.groups import decompositions as D
from surgery.groups import matrix as M
from surgery.groups.sampling import haar_so
from surgery.registry import REGISTRY


def ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov statistic of samples in [0, 1) against U[0, 1)."""
    u, _ = torch.sort(u.flatten().double())
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - u, u - (i - 1) / n).max())


@pytest.mark.parametrize("family,sigma", [(gl_plus, 0.158), (sl, 0.1), (gl_plus, 0.3)])
def test_lognormal_statistics(family, sigma: float) -> None:
    n = 20000
    spec = family(2, samples=n, scale=LogNormal(sigma), rotation=Uniform())
    s = spec.draw(torch.Generator().manual_seed(1))
    chart = D.PolarChart(spec.linear)
    c = chart.coords(s.g)[:, : chart.dim_p]  # coordinates of log p
    assert c.shape[-1] == (3 if family is gl_plus else 2)
    assert float(c.mean(0).abs().max()) < 4 * sigma / math.sqrt(n)
    torch.testing.assert_close(
        c.std(0), torch.full((c.shape[-1],), sigma, dtype=torch.float64), rtol=0.03, atol=0
    )
    corr = torch.corrcoef(c.T) - torch.eye(c.shape[-1], dtype=torch.float64)
    assert float(corr.abs().max()) < 0.04
    # exact inverse pairs, determinants
    eye = torch.eye(2, dtype=torch.float64)
    assert float((s.g @ s.g_inv - eye).abs().max()) < 1e-12
    if family is sl:
        assert float((s.det() - 1).abs().max()) < 1e-12
    else:  # log det = 2 * trace coordinate / sqrt(1)... log det g = tr(log p) = c00 + c11
        torch.testing.assert_close(torch.log(s.det()), c[:, 0] + c[:, 1])


def test_lognormal_mean_shifts_scale() -> None:
    s = gl_plus(2, samples=4000, scale=LogNormal(0.05, mean=0.2)).draw(torch.Generator().manual_seed(0))
    assert abs(float(torch.log(s.det()).mean()) - 0.4) < 0.01  # log det = n * mean


def test_grid_has_no_duplicated_endpoint() -> None:
    for n in (1, 4, 10):
        s = so(2, samples=n, rotation=Grid()).draw()
        theta = torch.remainder(M.so2_angle(s.g), 2 * math.pi)
        theta, _ = torch.sort(theta)
        assert theta.numel() == n
        gaps = torch.diff(torch.cat([theta, theta[:1] + 2 * math.pi]))
        torch.testing.assert_close(gaps, torch.full((n,), 2 * math.pi / n, dtype=torch.float64))
    with pytest.raises(ValueError, match="grid"):
        gl_plus(2, samples=12, rotation=Grid(10))
    # random offset: same spacing, shifted in training draws, fixed in evaluation
    spec = so(2, samples=6, rotation=Grid(random_offset=True))
    a, b = spec.draw(), spec.draw()
    assert not torch.allclose(a.g, b.g)
    torch.testing.assert_close(spec.draw(training=False).g, spec.draw(training=False).g)


def test_uniform_and_haar_so2_angles() -> None:
    gen = torch.Generator().manual_seed(0)
    for rot, lo, hi in (
        (Uniform(), -math.pi, math.pi),
        (Uniform(0.0, 1.0), 0.0, 1.0),
        (Haar(), -math.pi, math.pi),
    ):
        k = rot.sample(5000, 2, gen)
        theta = M.so2_angle(k)
        if hi - lo >= 2 * math.pi - 1e-9:
            u = torch.remainder(theta - lo, 2 * math.pi) / (2 * math.pi)
        else:
            u = (theta - lo) / (hi - lo)
        assert ks_uniform(u) < 1.63 / math.sqrt(5000)  # 1 % level


def test_haar_so3() -> None:
    r = haar_so(20000, 3, torch.Generator().manual_seed(0))
    assert bool(M.SO(3).contains(r).all())
    assert float(r.mean(0).abs().max()) < 0.03  # E[R] = 0
    cos = (r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    # angle density (1 - cos t) / pi on [0, pi]: E[cos t] = -1/2, CDF F(t) = (t - sin t) / pi
    assert abs(float(cos.mean()) + 0.5) < 0.02
    t = torch.arccos(cos.clamp(-1, 1))
    assert ks_uniform((t - torch.sin(t)) / math.pi) < 1.63 / math.sqrt(20000)


def test_importance_weights() -> None:
    spec = gl_plus(2, samples=64, scale=LogNormal(0.3), weights="haar")
    s = spec.draw(torch.Generator().manual_seed(0))
    assert s.weights is not None and bool((s.weights > 0).all())
    torch.testing.assert_close(s.weights.mean(), torch.tensor(1.0, dtype=torch.float64))
    x_p = s.meta["log_p"]
    c = D.PolarChart(spec.linear).coords(s.g)[:, :3]
    logw = D.log_haar_density_p(x_p) - LogNormal(0.3).log_prob(c)
    torch.testing.assert_close(torch.log(s.weights) - logw, (torch.log(s.weights) - logw)[:1].expand(64))


def test_sampling_modes_and_determinism() -> None:
    a, b = gl_plus(2, seed=5), gl_plus(2, seed=5)
    torch.testing.assert_close(a.fixed().g, b.fixed().g)
    assert not torch.allclose(a.fixed().g, gl_plus(2, seed=6).fixed().g)
    ev1, ev2 = a.begin_forward(training=False), a.begin_forward(training=False)
    torch.testing.assert_close(ev1.g, ev2.g)
    assert a.current() is ev2
    t1, t2 = a.begin_forward(training=True), a.begin_forward(training=True)
    assert not torch.allclose(t1.g, t2.g)
    always = gl_plus(2, resample="always")
    assert not torch.allclose(always.begin_forward(training=False).g, always.begin_forward(training=False).g)
    never = gl_plus(2, resample="never")
    torch.testing.assert_close(never.begin_forward(training=True).g, never.begin_forward(training=True).g)
    forced = a.draw()
    with a.use(forced):
        assert a.begin_forward(training=True).g is forced.g
    assert a.begin_forward(training=False).g is not forced.g


def test_spec_copy_and_pickle() -> None:
    spec = sl(2, samples=6)
    spec.begin_forward(training=False)
    clone = copy.deepcopy(spec)
    torch.testing.assert_close(clone.fixed().g, spec.fixed().g)
    back = pickle.loads(pickle.dumps(spec))
    assert isinstance(back, GroupSpec) and back.samples == 6
    with pytest.raises(RuntimeError, match="no sample set"):
        back.current()


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="polar"):
        gl_plus(2, decomposition="iwasawa")
    with pytest.raises(ValueError):
        GroupSpec("SO", M.SO(2), scale=LogNormal())
    with pytest.raises(ValueError):
        gl_plus(3, rotation=Grid())
    with pytest.raises(ValueError):
        LogNormal(-1.0)
    with pytest.raises(ValueError):
        gl_plus(2, resample="sometimes")
    assert gl_plus(3).draw().g.shape == (10, 3, 3)  # Haar rotations by default for n > 2


def test_kernel_coords_encodings() -> None:
    rel = gl_plus(2).draw(torch.Generator().manual_seed(0)).g
    for enc, dim in (("periodic", 5), ("raw", 4), ("normalized", 4)):
        spec = gl_plus(2, angle_encoding=enc)
        c = spec.kernel_coords(rel)
        assert c.shape == (10, dim) and spec.coord_dim == dim
    assert sl(2).coord_dim == 4 and so(2).coord_dim == 2 and se(2, angle_encoding="raw").coord_dim == 1
    ident = torch.eye(2, dtype=torch.float64)[None]
    torch.testing.assert_close(
        gl_plus(2).kernel_coords(ident), torch.tensor([[0.0, 0, 0, 1, 0]], dtype=torch.float64)
    )
    raw = gl_plus(2, angle_encoding="raw").kernel_coords(ident + 1e-12 * torch.tensor([[[0.0, 1], [-1, 0]]]))
    assert float(raw[0, -1]) == 0.0  # -0 snapped: no jump to 2 pi at the identity


def test_registered_entries() -> None:
    names = set(REGISTRY.names("group"))
    assert {"GL+", "SL", "SO", "Aff", "SAff", "SE"} <= names
    assert {"lognormal", "grid", "uniform", "haar", "siren"} <= set(REGISTRY.names("constructor"))
    assert {
        "LiftingConv",
        "GroupConv",
        "GroupPool",
        "GroupLayerNorm",
        "GroupBatchNorm",
        "GroupSpatialPool",
    } <= set(REGISTRY.names("layer"))
    entry = REGISTRY.get("group", "GL+")
    assert entry.returns is GroupSpec
    assert {"decomposition", "samples", "scale", "rotation"} <= set(entry.params)
    spec = entry.target(2, decomposition="polar", samples=10, scale=LogNormal(sigma=0.1), rotation=Grid(10))
    assert isinstance(spec, GroupSpec) and spec.samples == 10 and spec.scale.sigma == 0.1
    lift = REGISTRY.get("layer", "LiftingConv")
    assert lift.params["group"].annotation is GroupSpec and lift.params["group"].required
    assert "re-initialised" in lift.transfer
    grid = REGISTRY.get("constructor", "grid")
    assert grid.target(10) == Grid(10) and grid.returns is Grid
    aff = REGISTRY.get("group", "Aff").target(2)
    assert aff.affine and aff.group.dim == 6 and REGISTRY.get("group", "SAff").target(2).group.dim == 5
