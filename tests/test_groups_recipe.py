"""The shipped recipe turns the plain CNN into the paper's network through the engine, for GL+(2) and SL(2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.groups import (
    GroupConv,
    GroupLayerNorm,
    GroupPool,
    GroupSpatialPool,
    GroupSpec,
    LiftingConv,
    plain_cnn,
)
from surgery.groups.equivariance import blob_image, check_rot90

apply_mod = pytest.importorskip("surgery.apply")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "affine-equivariant.recipe"
SMALL = "siren(width=16, depth=2, w0=10)"


def recipe_text(family: str = "GL+(2)", samples: int = 4) -> str:
    text = RECIPE.read_text()
    text = text.replace("GL+(2)", family).replace("samples       = 10", f"samples       = {samples}")
    text = text.replace("grid(10)", f"grid({samples})")
    return text.replace("siren(width=60, depth=3, w0=10)", SMALL)


@pytest.mark.parametrize("family", ["GL+(2)", "SL(2)"])
def test_recipe_converts_plain_cnn(family: str) -> None:
    torch.manual_seed(0)
    base = plain_cnn(num_classes=10, width=6)
    result = apply_mod.apply(recipe_text(family), base)
    net = result.model.eval()
    assert isinstance(net.stem, LiftingConv) and isinstance(net.conv, GroupConv)
    assert isinstance(net.blocks[0].conv1, GroupConv) and isinstance(net.stem_norm, GroupLayerNorm)
    assert isinstance(net.pool, GroupSpatialPool) and isinstance(net.global_pool, GroupPool)
    spec = net.stem.group
    assert isinstance(spec, GroupSpec) and spec.family == family.split("(")[0] and spec.samples == 4
    assert all(m.group is spec for m in net.modules() if isinstance(m, (LiftingConv, GroupConv)))
    x = blob_image(40, None, batch=2)
    assert net(x).shape == (2, 10)
    assert check_rot90(net, spec, x) < 1e-5
    assert isinstance(base.stem, torch.nn.Conv2d)  # the input model is untouched


def test_shipped_recipe_parses_with_paper_settings() -> None:
    result = apply_mod.apply(RECIPE.read_text(), plain_cnn(width=4), verify=False)
    spec = result.model.stem.group
    assert spec.samples == 10 and spec.scale.sigma == pytest.approx(0.158) and spec.rotation.n == 10
    assert result.model.conv.kernel_spec.width == 60


def test_recipe_pooling_options() -> None:
    """`reduce="blurmax"` builds MaxBlurPool2d, `upsample=4` refines the invariant max; 90-degree exact."""
    from surgery.groups.layers import MaxBlurPool2d

    text = recipe_text("SL(2)").replace(
        "GroupSpatialPool(group=G)", 'GroupSpatialPool(group=G, reduce="blurmax")'
    )
    torch.manual_seed(0)
    net = apply_mod.apply(text, plain_cnn(num_classes=10, width=6), upsample=3).model.eval()
    assert isinstance(net.pool.pool, MaxBlurPool2d)
    assert net.global_pool.upsample == 3 and net.global_pool.keep_spatial
    x = blob_image(40, None, batch=2)
    assert net(x).shape == (2, 10)
    assert check_rot90(net, net.stem.group, x) < 1e-5


def test_recipe_bad_pooling_names_line() -> None:
    from surgery.errors import UserError

    text = recipe_text().replace("GroupSpatialPool(group=G)", 'GroupSpatialPool(group=G, reduce="median")')
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "median" in s)
    with pytest.raises(UserError, match=rf"{line}:\d+:.*reduce must be one of"):
        apply_mod.apply(text, plain_cnn(width=4))
    text = recipe_text().replace('reduce="max", upsample=upsample', 'reduce="mean", upsample=upsample')
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "GroupPool(" in s)
    with pytest.raises(UserError, match=rf"{line}:\d+:.*upsample applies to reduce='max'"):
        apply_mod.apply(text, plain_cnn(width=4))
    with pytest.raises(UserError, match=rf"{line}:\d+:.*integer >= 1"):
        apply_mod.apply(recipe_text(), plain_cnn(width=4), upsample=0)


def test_recipe_fitted_stencil_and_its_errors() -> None:
    """The shipped recipe fits its stencils and refines its max (params `stencil`, `upsample`); errors at line:col."""
    from surgery.errors import UserError

    torch.manual_seed(0)
    net = apply_mod.apply(recipe_text(), plain_cnn(num_classes=10, width=6)).model.eval()
    assert net.stem.stencil == "fit" and net.conv.stencil == "fit"
    assert net.global_pool.upsample == 4  # the shipped recipe's invariant max over a finer interpolant
    x = blob_image(40, None, batch=2)
    assert net(x).shape == (2, 10)
    assert check_rot90(net, net.stem.group, x) < 1e-5
    paper = apply_mod.apply(recipe_text(), plain_cnn(num_classes=10, width=6), stencil="fixed", upsample=1)
    paper = paper.model
    assert paper.stem.stencil == "fixed" and paper.blocks[0].conv1.stencil == "fixed"
    assert paper.global_pool.upsample == 1
    line = next(i for i, s in enumerate(recipe_text().splitlines(), 1) if "LiftingConv" in s)
    with pytest.raises(UserError, match=rf"{line}:\d+:.*stencil must be one of"):
        apply_mod.apply(recipe_text(), plain_cnn(width=4), stencil="huge")
    no_window = recipe_text().replace(SMALL, SMALL + ', mask="none"')
    with pytest.raises(UserError, match="compact support"):
        apply_mod.apply(no_window, plain_cnn(width=4))


def test_input_pad_keeps_content_off_the_borders() -> None:
    """``plain_cnn(input_pad=p)`` is the same network on a zero-padded input; the recipe keeps the pad."""
    torch.manual_seed(0)
    padded = plain_cnn(width=4, input_pad=3).eval()
    base = plain_cnn(width=4).eval()
    base.load_state_dict(padded.state_dict())  # the pad has no state: same keys
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(padded(x), base(torch.nn.functional.pad(x, (3, 3, 3, 3))))
    net = apply_mod.apply(recipe_text("SL(2)"), padded).model.eval()
    assert isinstance(net.pad, torch.nn.ZeroPad2d) and isinstance(net.stem, LiftingConv)
    assert check_rot90(net, net.stem.group, blob_image(32, None, batch=2)) < 1e-5
    with pytest.raises(ValueError, match="input_pad"):
        plain_cnn(width=4, input_pad=-1)


def test_recipe_with_group_batchnorm_is_equivariant() -> None:
    """`replace BatchNorm2d with GroupBatchNorm(group=G)`: running statistics copied, rot90-exact in eval."""
    from surgery.groups import GroupBatchNorm

    torch.manual_seed(0)
    text = recipe_text("SL(2)").replace("GroupLayerNorm(group=G)", "GroupBatchNorm(group=G)")
    net = apply_mod.apply(text, plain_cnn(num_classes=10, width=6, pool_norm=True)).model
    assert isinstance(net.stem_norm, GroupBatchNorm) and isinstance(net.blocks[0].norm1, GroupBatchNorm)
    net.train()
    net(torch.rand(8, 1, 32, 32))  # non-trivial running statistics
    net.eval()
    assert check_rot90(net, net.stem.group, blob_image(32, None, batch=2)) < 1e-5
