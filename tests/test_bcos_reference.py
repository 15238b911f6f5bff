"""Our layers against the official B-cos v2 package (``pip install bcos``) with identical weights.

Forward outputs and explanation-mode input gradients must agree within 1e-5 (relative to the
output scale) in float32 over a sweep of shapes, strides, groups, dilation, b and max_out.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

bcos = pytest.importorskip("bcos")
bcos_modules = pytest.importorskip("bcos.modules")
bcos_common = pytest.importorskip("bcos.common")

from surgery.explain import gradient_to_rgba  # noqa: E402
from surgery.layers import (  # noqa: E402
    AddInverse,
    BatchNormUncentered2d,
    BcosConv2d,
    BcosLinear,
    DetachableGroupNorm,
    DetachableLayerNorm,
    LogitLayer,
    PositionNorm,
    UniformOffLabelsBCEWithLogitsLoss,
)

torch.set_num_threads(2)
TOL = 1e-5
MAX_ERRORS: dict[str, float] = {}


def _compare(name: str, ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    """Outputs, and input gradients in explanation mode, agree within TOL (relative to scale)."""
    with torch.no_grad():
        y_ref = theirs(x)
        y = ours(x)
    assert y.shape == y_ref.shape
    scale = max(1.0, float(y_ref.abs().max()))
    err = float((y - y_ref).abs().max()) / scale
    r = torch.randn_like(y_ref)
    grads = []
    for m in (ours, theirs):
        xg = x.clone().requires_grad_(True)
        for sub in m.modules():
            if hasattr(sub, "set_explanation_mode"):
                sub.set_explanation_mode(True)
        (g,) = torch.autograd.grad((m(xg) * r).sum(), xg)
        for sub in m.modules():
            if hasattr(sub, "set_explanation_mode"):
                sub.set_explanation_mode(False)
        grads.append(g)
    gscale = max(1.0, float(grads[1].abs().max()))
    gerr = float((grads[0] - grads[1]).abs().max()) / gscale
    MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), err, gerr)
    assert err <= TOL, f"{name}: forward error {err:.3g}"
    assert gerr <= TOL, f"{name}: explanation-gradient error {gerr:.3g}"


CONV_SWEEP = [
    # cin, cout, k, stride, padding, dilation, groups
    (6, 8, 3, 1, 1, 1, 1),
    (6, 8, 3, 2, 1, 1, 1),
    (8, 8, 3, 1, 1, 1, 8),  # depthwise
    (8, 12, 3, 2, 1, 1, 4),
    (6, 6, 5, 2, 2, 1, 3),
    (4, 8, 7, 2, 3, 1, 1),
    (8, 4, 1, 1, 0, 1, 1),
    (8, 4, 1, 2, 0, 1, 2),
    (4, 6, 4, 2, 1, 1, 1),
    (4, 6, 2, 1, 0, 1, 2),
]


@pytest.mark.parametrize("case", CONV_SWEEP)
@pytest.mark.parametrize(("b", "max_out"), [(1.0, 1), (2.0, 1), (2.0, 2), (1.5, 1), (2.5, 3), (3.0, 1)])
def test_conv_matches_official(case: tuple, b: float, max_out: int) -> None:
    cin, cout, k, s, p, d, g = case
    torch.manual_seed(hash((case, b, max_out)) % 2**31)
    theirs = bcos_modules.BcosConv2d(cin, cout, k, s, p, d, g, b=b, max_out=max_out)
    ours = BcosConv2d(cin, cout, k, s, p, d, g, b=b, max_out=max_out, normalize_weights=True)
    with torch.no_grad():
        ours.weight.copy_(theirs.linear.weight)
    _compare("BcosConv2d", ours, theirs, torch.randn(2, cin, 11, 13))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("b", [2.0, 2.5])
def test_dilated_conv_matches_official_slow_path(groups: int, b: float) -> None:
    torch.manual_seed(groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bcos_modules.BcosConv2d(4, 6, 3, 1, 2, 2, groups, b=b)
    ours = BcosConv2d(4, 6, 3, 1, 2, 2, groups, b=b, normalize_weights=True)
    with torch.no_grad():
        ours.weight.copy_(theirs.linear.weight)
    _compare("BcosConv2d(dilated)", ours, theirs, torch.randn(2, 4, 10, 9))


@pytest.mark.parametrize(
    ("fin", "fout", "b", "max_out"),
    [(5, 7, 2.0, 1), (5, 7, 1.0, 1), (16, 3, 1.5, 2), (32, 10, 2.5, 3), (8, 8, 3.0, 1)],
)
def test_linear_matches_official(fin: int, fout: int, b: float, max_out: int) -> None:
    torch.manual_seed(fin * fout)
    theirs = bcos_modules.BcosLinear(fin, fout, b=b, max_out=max_out)
    ours = BcosLinear(fin, fout, b=b, max_out=max_out, normalize_weights=True)
    with torch.no_grad():
        ours.weight.copy_(theirs.linear.weight)
    _compare("BcosLinear", ours, theirs, torch.randn(3, 4, fin))


def _randomise_norm(official: nn.Module, ours: nn.Module) -> None:
    with torch.no_grad():
        for name, t in official.named_parameters():
            t.uniform_(0.5, 1.5) if name == "weight" else t.uniform_(-0.5, 0.5)
        for name, t in official.named_buffers():
            if name == "running_mean":
                t.uniform_(-0.5, 0.5)
            elif name == "running_var":
                t.uniform_(0.5, 2.0)
        ours.load_state_dict(official.state_dict())


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_uncentered_matches_official(training: bool, bias: bool) -> None:
    torch.manual_seed(0)
    theirs = bcos_modules.norms.uncentered_norms.BatchNormUncentered2d(6)
    ours = BatchNormUncentered2d(6)
    _randomise_norm(theirs, ours)
    if not bias:
        theirs.bias = None
        ours.bias = None
    theirs.train(training)
    ours.train(training)
    _compare("BatchNormUncentered2d", ours, theirs, torch.randn(4, 6, 5, 5) + 0.3)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def _norm_pairs() -> list[tuple[str, nn.Module, nn.Module]]:
    n = bcos_modules.norms
    return [
        ("GroupNormUncentered2d", n.GroupNormUncentered2d(3, 6), DetachableGroupNorm(3, 6, centered=False)),
        ("GNLayerNormUncentered2d", n.GNLayerNormUncentered2d(6), DetachableGroupNorm(1, 6, centered=False)),
        (
            "GNInstanceNormUncentered2d",
            n.GNInstanceNormUncentered2d(6),
            DetachableGroupNorm(6, 6, centered=False),
        ),
        ("PositionNormUncentered2d", n.PositionNormUncentered2d(6), PositionNorm(6, centered=False)),
        ("DetachableGroupNorm2d", n.DetachableGroupNorm2d(3, 6), DetachableGroupNorm(3, 6)),
        ("DetachableGNLayerNorm2d", n.DetachableGNLayerNorm2d(6), DetachableGroupNorm(1, 6)),
        ("DetachablePositionNorm2d", n.DetachablePositionNorm2d(6), PositionNorm(6)),
    ]


@pytest.mark.parametrize("idx", range(7))
def test_channel_norms_match_official(idx: int) -> None:
    torch.manual_seed(idx)
    name, theirs, ours = _norm_pairs()[idx]
    _randomise_norm(theirs, ours)
    _compare(name, ours, theirs, torch.randn(3, 6, 4, 5) + 0.2)
    theirs.bias = None
    ours.bias = None
    _compare(name, ours, theirs, torch.randn(3, 6, 4, 5) - 0.1)


def test_layernorm_matches_official() -> None:
    torch.manual_seed(0)
    theirs = bcos_modules.norms.DetachableLayerNorm(12)
    ours = DetachableLayerNorm(12)
    _randomise_norm(theirs, ours)
    _compare("DetachableLayerNorm", ours, theirs, torch.randn(2, 5, 12))


def test_logit_layer_loss_and_add_inverse_match_official() -> None:
    x = torch.randn(4, 10)
    torch.testing.assert_close(
        LogitLayer(2.0, -1.5)(x), bcos_modules.LogitLayer(logit_temperature=2.0, logit_bias=-1.5)(x)
    )
    target = torch.tensor([1, 0, 9, 3])
    for off in (None, 1e-3):
        ours = UniformOffLabelsBCEWithLogitsLoss(off_label=off)(x, target)
        theirs = bcos_modules.UniformOffLabelsBCEWithLogitsLoss(off_label=off)(x, target)
        torch.testing.assert_close(ours, theirs)
    from bcos.data.transforms import AddInverse as TheirAddInverse

    img = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(AddInverse()(img), TheirAddInverse()(img))


def test_colour_explanation_matches_official() -> None:
    torch.manual_seed(0)
    x6 = torch.cat([img := torch.rand(3, 40, 40), 1 - img])
    w6 = torch.randn(6, 40, 40)
    for smooth in (0, 15):
        theirs = torch.as_tensor(bcos_common.gradient_to_image(x6, w6, smooth=smooth))
        ours = gradient_to_rgba(x6[None], w6[None], smooth=smooth)[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_print_max_errors() -> None:
    """Summary of the worst relative error per layer (shown with ``pytest -s``)."""
    for name, err in sorted(MAX_ERRORS.items()):
        print(f"max rel. error vs official bcos  {name:28s} {err:.2e}")
    assert all(err <= TOL for err in MAX_ERRORS.values())
