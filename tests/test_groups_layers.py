"""Layers and networks: exact 90-degree equivariance with co-transformed sample sets (float32, 1e-5).

For an input rotated by ``torch.rot90`` (``f o a^-1``) every layer, run on the left-translated
sample set ``a S``, must give the rotated output of the original input on ``S``; invariant outputs
must agree as they are.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from surgery.groups import (
    GroupBatchNorm,
    GroupConv,
    GroupLayerNorm,
    GroupPool,
    GroupSpatialPool,
    LiftingConv,
    SirenKernel,
    equivariant_cnn,
    gl_plus,
    plain_cnn,
    se,
    sl,
    to_group_equivariant,
)
from surgery.groups.equivariance import blob_image, check_rot90, offlattice_error, rot90_matrix, rotation
from surgery.groups.layers import BlurPool2d
from surgery.groups.sampling import GroupSamples

TOL = 1e-5
SMALL = SirenKernel(width=16, depth=2)
FAMILIES = {
    "GL+": lambda: gl_plus(2, samples=6),
    "SL": lambda: sl(2, samples=6),
    "SE": lambda: se(2, samples=4),
}


def rot(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(x, k, dims=(-2, -1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def run_on(spec, samples: GroupSamples, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Set the forward's sample set (as a lifting layer would) and apply ``layer``."""
    with torch.no_grad(), spec.use(samples):
        spec.begin_forward(training=False)
        return layer(x)


def test_rot90_matrix_matches_torch() -> None:
    x = blob_image(15, None, batch=2, dtype=torch.float64)
    for k in range(4):
        torch.testing.assert_close(rot(x, k), blob_image(15, rot90_matrix(k), batch=2, dtype=torch.float64))
    torch.testing.assert_close(rotation(90.0).round(), rot90_matrix(1))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_lifting_conv_rot90(family: str, k: int) -> None:
    spec = FAMILIES[family]()
    torch.manual_seed(0)
    lift = LiftingConv(3, 5, 5, group=spec, kernel=SMALL, padding=2, bias=True).eval()
    x = torch.randn(2, 3, 12, 12)
    s = spec.draw(torch.Generator().manual_seed(k))
    y = run_on(spec, s, lift, x)
    assert y.shape == (2, 5, len(s), 12, 12)
    y_rot = run_on(spec, s.transform(rot90_matrix(k)), lift, rot(x, k))
    assert rel(y_rot, rot(y, k)) < TOL


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("separable", [False, True])
def test_group_conv_rot90(family: str, separable: bool) -> None:
    spec = FAMILIES[family]()
    torch.manual_seed(1)
    conv = GroupConv(4, 3, 5, group=spec, kernel=SMALL, separable=separable, padding=1, bias=True).eval()
    s = spec.draw(torch.Generator().manual_seed(2))
    x = torch.randn(2, 4, len(s), 11, 11)
    y = run_on(spec, s, conv, x)
    assert y.shape == (2, 3, len(s), 9, 9)
    for k in (1, 3):
        y_rot = run_on(spec, s.transform(rot90_matrix(k)), conv, rot(x, k))
        assert rel(y_rot, rot(y, k)) < TOL


def test_group_conv_permutation_bookkeeping() -> None:
    """Permuting the sample set permutes the sample axis of input and output alike."""
    spec = gl_plus(2, samples=6)
    torch.manual_seed(2)
    conv = GroupConv(3, 2, 3, group=spec, kernel=SMALL).eval()
    s = spec.draw(torch.Generator().manual_seed(0))
    perm = torch.randperm(len(s))
    sp = GroupSamples(s.g[perm], s.g_inv[perm])
    x = torch.randn(1, 3, len(s), 7, 7)
    y = run_on(spec, s, conv, x)
    yp = run_on(spec, sp, conv, x[:, :, perm])
    assert rel(yp, y[:, :, perm]) < TOL


def test_helper_layers_rot90() -> None:
    x = torch.randn(2, 3, 4, 8, 8)
    bn = GroupBatchNorm.from_module(nn.BatchNorm2d(3)).train()
    mods = [
        GroupLayerNorm(3, affine=True),
        bn,
        GroupSpatialPool.from_module(nn.MaxPool2d(2)),
        GroupSpatialPool.from_module(nn.MaxPool2d(2), reduce="blurmax"),
        GroupSpatialPool.from_module(nn.MaxPool2d(2), reduce="blur"),
        GroupPool(over="group"),
    ]
    for m in mods:
        y = m(x)
        assert rel(m(rot(x, 1)), rot(y, 1)) < TOL
    assert GroupPool(reduce="mean")(x).shape == (2, 3)
    assert GroupPool.from_module(nn.AdaptiveAvgPool2d(1))(x).shape == (2, 3, 1, 1)
    torch.testing.assert_close(GroupPool(reduce="max")(x), x.amax(dim=(2, 3, 4)))
    assert GroupSpatialPool.from_module(nn.AvgPool2d(2))(x).shape == (2, 3, 4, 4, 4)
    assert GroupSpatialPool()(torch.randn(1, 2, 6, 6)).shape == (1, 2, 3, 3)  # 4-D passes through
    assert GroupSpatialPool(reduce="blurmax")(x).shape == (2, 3, 4, 4, 4)  # same size as max pooling
    for reduce in ("blurmax", "blur"):
        const = GroupSpatialPool(reduce=reduce)(torch.ones(1, 1, 1, 8, 8))
        torch.testing.assert_close(const, torch.ones_like(const))  # the blur is normalised
    for size in (7, 8, 9):  # the same output size as MaxPool2d(2), odd inputs too
        z = torch.randn(1, 2, 3, size, size)
        assert GroupSpatialPool(reduce="blur")(z).shape == GroupSpatialPool()(z).shape
    with pytest.raises(ValueError, match="reduce must be one of"):
        GroupSpatialPool(reduce="median")
    with pytest.raises(ValueError, match="BlurPool2d: reduce must be"):
        BlurPool2d(reduce="median")
    torch.testing.assert_close(GroupLayerNorm()(x), torch.nn.functional.layer_norm(x, x.shape[1:]))


def test_group_pool_upsampled_max() -> None:
    """``upsample=u``: the max of a bicubic interpolant, rot90-exact, nearer the continuous peak."""
    x = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64)
    pool = GroupPool(upsample=4, keep_spatial=True)
    y = pool(x)
    assert y.shape == (2, 3, 1, 1)
    for k in (1, 2, 3):
        torch.testing.assert_close(pool(rot(x, k)), y)
    assert (y.flatten(1) >= x.amax(dim=(2, 3, 4)) - 1e-12).all()  # the pixels are among the points
    torch.testing.assert_close(GroupPool(upsample=1)(x), x.amax(dim=(2, 3, 4)))
    # a Gaussian peak of width 1.5 px centred between pixel centres, peak value 1
    peaks = []
    for dx in torch.linspace(0.0, 0.5, 6):
        p = torch.arange(9, dtype=torch.float64) - 4 - dx
        bump = torch.exp(-(p[:, None] ** 2 + p[None, :] ** 2) / (2 * 1.5**2))
        peaks.append(bump)
    maps = torch.stack(peaks)[:, None, None]  # (6, 1, 1, 9, 9)
    on_pixels = (1 - GroupPool()(maps)).abs().max()
    refined = (1 - GroupPool(upsample=4)(maps)).abs().max()
    assert on_pixels > 0.09 and refined < on_pixels / 4
    assert "upsample=4" in repr(pool)
    with pytest.raises(ValueError, match="upsample applies to reduce='max', over='all'"):
        GroupPool(reduce="mean", upsample=2)
    with pytest.raises(ValueError, match="integer >= 1"):
        GroupPool(upsample=0)


def test_batchnorm_transfer() -> None:
    bn = nn.BatchNorm2d(3)
    bn.train()
    bn(torch.randn(8, 3, 5, 5) * 3 + 1)
    with torch.no_grad():
        bn.weight.mul_(2)
    g = GroupBatchNorm.from_module(bn).eval()
    torch.testing.assert_close(g.running_mean, bn.running_mean)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(g(x), bn.eval()(x))  # same statistics and affine on 4-D input


@pytest.mark.parametrize("family", ["GL+", "SL"])
@pytest.mark.parametrize("separable", [False, True])
def test_network_rot90(family: str, separable: bool) -> None:
    spec = FAMILIES[family]()
    torch.manual_seed(3)
    net = equivariant_cnn(spec, num_classes=5, width=6, kernel=SMALL, separable=separable).eval()
    x = blob_image(24, None, batch=3)
    for k in (1, 2):
        assert check_rot90(net, spec, x, k=k) < TOL
    # features before the invariant pooling are rotated too (residual block, pooling included)
    feats = nn.Sequential(*list(net.children())[:-3])
    s = spec.fixed()
    y = run_on(spec, s, feats, x)
    assert y.dim() == 5
    assert rel(run_on(spec, s.transform(rot90_matrix(1)), feats, rot(x, 1)), rot(y, 1)) < TOL


def test_network_not_invariant_without_cotransform() -> None:
    """Sanity check of the test itself: the rotated input on the *same* samples is not exact."""
    spec = gl_plus(2, samples=6)
    torch.manual_seed(4)
    net = equivariant_cnn(spec, num_classes=5, width=6, kernel=SMALL).eval()
    x = blob_image(24, None, batch=3)
    with torch.no_grad():
        assert rel(net(rot(x, 1)), net(x)) > 1e-3


def test_offlattice_error_small() -> None:
    spec = gl_plus(2, samples=6)
    torch.manual_seed(5)
    net = equivariant_cnn(spec, num_classes=5, width=4, kernel=SMALL).double().eval()
    err = offlattice_error(net, spec, rotation(30.0), size=28, batch=2)
    assert 1e-6 < err < 0.1


def test_conversion_structure_and_sl_swap() -> None:
    plain = plain_cnn(num_classes=10, width=8)
    assert plain(torch.randn(2, 1, 40, 40)).shape == (2, 10)
    for factory in (gl_plus, sl):
        spec = factory(2, samples=4)
        net = to_group_equivariant(copy.deepcopy(plain), spec, kernel=SMALL)
        assert isinstance(net.stem, LiftingConv) and isinstance(net.conv, GroupConv)
        assert isinstance(net.blocks[0].conv1, GroupConv) and isinstance(net.blocks[0].norm2, GroupLayerNorm)
        assert isinstance(net.pool, GroupSpatialPool) and isinstance(net.global_pool, GroupPool)
        assert net.stem.group is spec and net.conv.group is spec
        assert net.stem.padding == (0, 0) and net.blocks[0].conv1.padding == (2, 2)
        out = net.train()(torch.randn(2, 1, 40, 40))
        assert out.shape == (2, 10)
        out.sum().backward()
        assert (
            net.conv.net.head.weight.grad is not None and net.stem.net.body[0].linear.weight.grad is not None
        )


def test_parameter_counts_match_reference() -> None:
    """With the reference's raw angle input, counts equal rgenn's 339,282 (GL+) and 339,102 (SL)."""
    for factory, expected in ((gl_plus, 339_282), (sl, 339_102)):
        net = equivariant_cnn(factory(2, angle_encoding="raw"), width=40)
        assert sum(p.numel() for p in net.parameters()) == expected
    # periodic (cos, sin) input: one more input coordinate per group-conv kernel network
    net = equivariant_cnn(gl_plus(2), width=40)
    assert sum(p.numel() for p in net.parameters()) == 339_282 + 3 * 60


def test_from_module_geometry_and_errors() -> None:
    spec = gl_plus(2, samples=4)
    conv = nn.Conv2d(3, 7, 3, stride=2, padding=1, dilation=1, bias=True)
    lift = LiftingConv.from_module(conv, group=spec, kernel=SMALL)
    assert (lift.in_channels, lift.out_channels, lift.kernel_size, lift.stride) == (3, 7, 3, (2, 2))
    assert lift.bias is not None
    assert lift(torch.randn(1, 3, 9, 9)).shape == (1, 7, 4, 5, 5)
    with pytest.raises(NotImplementedError, match="groups"):
        GroupConv.from_module(nn.Conv2d(4, 4, 3, groups=2), group=spec)
    with pytest.raises(TypeError):
        GroupConv.from_module(nn.Linear(3, 3), group=spec)
    with pytest.raises(TypeError, match="GroupSpec"):
        LiftingConv.from_module(conv, group="GL+(2)")
    fresh = gl_plus(2, samples=4)
    gconv = GroupConv(3, 3, 3, group=fresh, kernel=SMALL)
    with pytest.raises(RuntimeError, match="LiftingConv"):
        gconv(torch.randn(1, 3, 4, 5, 5))
    fresh.begin_forward(training=False)
    with pytest.raises(RuntimeError, match="samples"):
        gconv(torch.randn(1, 3, 5, 5, 5))


def test_eval_kernel_cache_tracks_parameters() -> None:
    spec = gl_plus(2, samples=4)
    torch.manual_seed(6)
    net = equivariant_cnn(spec, num_classes=3, width=4, kernel=SMALL).eval()
    x = blob_image(24, None, batch=2)
    with torch.no_grad():
        a, b = net(x), net(x)
        torch.testing.assert_close(a, b)
        net.conv.net.head.weight.add_(0.1)
        c = net(x)
    assert not torch.allclose(a, c)
    with torch.no_grad():
        net.conv.net.head.weight.sub_(0.1)
        torch.testing.assert_close(net(x), a)


def test_training_step_and_autocast() -> None:
    spec = sl(2, samples=4)
    torch.manual_seed(7)
    net = equivariant_cnn(spec, num_classes=3, width=4, kernel=SMALL, separable=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = blob_image(24, None, batch=4), torch.tensor([0, 1, 2, 0])
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = net.eval()(x)
    assert torch.isfinite(out).all()
    clone = copy.deepcopy(net)
    assert clone.stem.group is clone.conv.group and clone.stem.group is not spec
    torch.testing.assert_close(clone(x), net(x))


def test_siren_weight_scale_and_antialias_stencil() -> None:
    from surgery.groups.kernels import Siren
    from surgery.groups.layers import stencil

    torch.manual_seed(8)
    net = Siren(2, 2000, width=60, depth=3, w0=10.0, fan_in=50)
    with torch.no_grad():
        out = net(torch.rand(256, 2) * 2 - 1)
    assert 0.5 / 50 < float(out.var()) < 2.0 / 50  # produced weights have variance ~ 1 / fan_in
    st = stencil(5, 2)
    assert st.shape == (25, 4, 2)
    torch.testing.assert_close(st.mean(1)[12], torch.zeros(2, dtype=torch.float64))  # centre cell
    torch.testing.assert_close(
        st.mean(1)[0], torch.tensor([-0.8, -0.8], dtype=torch.float64)
    )  # as affine_grid
    rotated = st.reshape(-1, 2) @ rot90_matrix(1).T
    d = torch.cdist(rotated, st.reshape(-1, 2), compute_mode="donot_use_mm_for_euclid_dist")
    assert d.min(1).values.max() < 1e-12  # symmetric sub-point set


def test_importance_weighted_network_rot90() -> None:
    spec = gl_plus(2, samples=6, weights="haar")
    torch.manual_seed(9)
    net = equivariant_cnn(spec, num_classes=4, width=4, kernel=SMALL).eval()
    assert spec.fixed().weights is not None
    assert check_rot90(net, spec, blob_image(24, None, batch=2)) < TOL


def test_scaled_siren_is_the_same_function() -> None:
    """``scaled`` only re-parametrises (w0 folded into the sine layers, 1/sqrt(fan_in) at run time)."""
    from surgery.groups.kernels import Siren
    from surgery.groups.layers import spatial_window

    x = torch.rand(64, 3) * 2 - 1
    torch.manual_seed(10)
    plain = Siren(3, 12, width=20, depth=3, w0=10.0, fan_in=40, scaled=False)
    torch.manual_seed(10)
    scaled = Siren(3, 12, width=20, depth=3, w0=10.0, fan_in=40, scaled=True)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), plain(x), rtol=1e-4, atol=1e-5)
    assert float(scaled.head.weight.detach().abs().max()) > 5 * float(plain.head.weight.detach().abs().max())
    r = torch.tensor([0.0, 0.7, 1.39, 1.41])
    torch.testing.assert_close(spatial_window(r, "cosine", 1.4)[[0, 3]], torch.tensor([1.0, 0.0]))
    assert 0 < float(spatial_window(r, "cosine", 1.4)[2]) < 1e-3


def test_sample_geometry_is_shared_and_computed_once() -> None:
    """Layers of one forward share the set's geometry: one computation per key, none per layer."""
    spec = gl_plus(2, samples=4)
    torch.manual_seed(9)
    net = equivariant_cnn(spec, num_classes=3, width=4, kernel=SMALL, separable=True)
    calls: list = []
    original = GroupSamples.derived

    def counting(self, key, compute, **kw):
        def run(host):
            calls.append(key)
            return compute(host)

        return original(self, key, run, **kw)

    x = blob_image(24, None, batch=2)
    GroupSamples.derived = counting
    try:
        net.train()(x)
    finally:
        GroupSamples.derived = original
    assert len(calls) == len(set(calls))  # one spatial geometry per (stencil, window), not per layer
    n_group_convs = sum(isinstance(m, GroupConv) for m in net.modules())
    assert n_group_convs >= 3 and sum(k[0] == "group" for k in calls) == 1
    # the memo does not change results: a fresh set with the same matrices gives the same output
    s = spec.fixed()
    twin = GroupSamples(s.g.clone(), s.g_inv.clone(), s.weights)
    with torch.no_grad():
        with spec.use(s):
            a = net.eval()(x)
        with spec.use(twin):
            torch.testing.assert_close(net(x), a)


def test_fixed_set_geometry_survives_inference_mode() -> None:
    """A fixed set's memo first filled under inference_mode is still usable for training."""
    spec = sl(2, samples=4, resample="never")
    torch.manual_seed(10)
    net = equivariant_cnn(spec, num_classes=3, width=4, kernel=SMALL)
    x = blob_image(24, None, batch=2)
    with torch.inference_mode():
        net.eval()(x)
    loss = net.train()(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_whole_map_norm_matches_layer_norm() -> None:
    """The split-reduction norm (GPU default) is LayerNorm over (C, N, H, W), gradients included."""
    from surgery.groups.layers import NORM_IMPL, _WholeMapNorm, whole_map_norm

    torch.manual_seed(11)
    x = (torch.randn(2, 3, 4, 5, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _WholeMapNorm.apply(t, 1e-5), (x,))
    ref = nn.functional.layer_norm(x, x.shape[1:], eps=1e-5)
    torch.testing.assert_close(_WholeMapNorm.apply(x, 1e-5), ref)
    g = torch.randn_like(ref)
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    yb = _WholeMapNorm.apply(xb, 1e-5)
    (db,) = torch.autograd.grad(yb, xb, g.to(torch.bfloat16))
    (dref,) = torch.autograd.grad(ref, x, g)
    assert yb.dtype == torch.bfloat16 and rel(yb.double(), ref) < 1e-2 and rel(db.double(), dref) < 1e-2
    # both implementations keep bf16 under autocast (no float32 round trip) and agree
    old = dict(NORM_IMPL)
    try:
        outs = []
        for impl in ("native", "split"):
            NORM_IMPL["cpu"] = impl
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(whole_map_norm(xb.detach()))
            assert outs[-1].dtype == torch.bfloat16
        assert rel(outs[0].double(), outs[1].double()) < 1e-2
    finally:
        NORM_IMPL.clear()
        NORM_IMPL.update(old)


@pytest.mark.parametrize("separable", [False, True])
def test_fitted_stencil_grows_with_the_samples(separable: bool) -> None:
    """`stencil="fit"` holds every window: larger samples, larger K; same output; rot90-exact."""
    from surgery.groups.layers import spatial_window, stencil

    spec = gl_plus(2, samples=4)
    torch.manual_seed(12)
    lift = LiftingConv(2, 3, 5, group=spec, kernel=SMALL, padding=2, stencil="fit").eval()
    conv = GroupConv(3, 3, 5, group=spec, kernel=SMALL, padding=2, separable=separable, stencil="fit").eval()
    s = spec.draw(torch.Generator().manual_seed(3))
    sizes = {}
    for scale in (0.8, 1.0, 1.5):
        big = s.transform(scale * torch.eye(2, dtype=torch.float64))
        k_size = lift._stencil_size(big)
        sizes[scale] = k_size
        # nothing of any window lies outside the K x K stencil (checked on a wider one)
        wide = torch.einsum("nij,psj->npsi", big.g_inv, stencil(5, 2, size=k_size + 4))
        on = (
            (spatial_window(wide.norm(dim=-1), "cosine", 1.4) > 0).any(-1).any(0).view(k_size + 4, k_size + 4)
        )
        assert not on[[0, 1, -2, -1]].any() and not on[:, [0, 1, -2, -1]].any()
    assert sizes[0.8] <= sizes[1.0] < sizes[1.5] and sizes[1.0] > 5  # radius 1.4 overhangs a 5x5 stencil
    x = torch.randn(2, 2, 13, 13)
    y = run_on(spec, s, nn.Sequential(lift, conv), x)
    assert y.shape == (2, 3, 4, 13, 13)
    for k in (1, 2):
        y_rot = run_on(spec, s.transform(rot90_matrix(k)), nn.Sequential(lift, conv), rot(x, k))
        assert rel(y_rot, rot(y, k)) < TOL
    with pytest.raises(ValueError, match="compact support"):
        LiftingConv(1, 1, 5, group=spec, mask="smooth", stencil="fit")


def test_kernels_are_generated_outside_autocast() -> None:
    """Under bf16 autocast the SIREN kernels are still float32 and equal to the plain ones."""
    spec = gl_plus(2, samples=4)
    torch.manual_seed(13)
    conv = GroupConv(3, 3, 5, group=spec, kernel=SMALL, separable=True)
    lift = LiftingConv(1, 3, 5, group=spec, kernel=SMALL)
    s = spec.fixed()
    for layer in (lift, conv):
        ref = layer.weight(s)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer.weight(s)
        for a, b in zip(
            ref if isinstance(ref, tuple) else (ref,), low if isinstance(low, tuple) else (low,), strict=True
        ):
            assert b.dtype == torch.float32
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["GL+", "SL"])
def test_lifting_off_lattice_error_vanishes_under_refinement(family: str) -> None:
    """A 30-degree rotation or a shear is equivariant in the continuum, not only on the lattice.

    The same kernel network sampled on a 3x finer grid (stencil k = 15 over the same normalised
    extent) of a 3x finer image: the co-transformed error of the lifting output (its per-sample
    maxima and mean magnitudes over space) must fall several-fold, i.e. what remains at 1x is the
    discretisation, not the layer. A wrong co-transformation would leave the error where it is.
    """
    spec = FAMILIES[family]()
    torch.manual_seed(0)
    coarse = LiftingConv(1, 4, 5, group=spec, kernel=SMALL, padding=2, stencil="fit").double()
    fine = copy.deepcopy(coarse)
    fine.group, fine.kernel_size, fine.padding = spec, 15, (6, 6)  # deepcopy would copy the spec
    s = spec.fixed()
    for a in (rotation(30.0), torch.tensor([[1.0, 0.3], [0.0, 1.0]], dtype=torch.float64)):
        errors = []
        for layer, density in ((coarse, 1), (fine, 3)):
            probe = functools.partial(blob_image, 32, batch=2, blobs=3, sigma=(1.0, 2.0), density=density)
            y = run_on(spec, s, layer, probe(None, dtype=torch.float64))
            ya = run_on(spec, s.transform(a), layer, probe(a, dtype=torch.float64))
            errors.append(
                (
                    rel(ya.amax(dim=(-2, -1)), y.amax(dim=(-2, -1))),
                    rel(ya.abs().mean((-2, -1)), y.abs().mean((-2, -1))),
                )
            )
        (max1, mean1), (max3, mean3) = errors
        assert max1 > 1e-3 and max3 < max1 / 4 and mean3 < mean1 / 10, errors
