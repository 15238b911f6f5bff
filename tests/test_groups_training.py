"""Trainability of the group network: ``plain_cnn(pool_norm=True)`` through the recipe.

The invariant pooled features of a group network are a large common offset plus a small
image-dependent part; ``pool_norm`` (BatchNorm1d on them) is what lets a short run learn. These
tests pin the structure (the recipe leaves the BatchNorm1d alone, equivariance is unaffected) and
that a few Adam steps on a fixed sample set reduce the loss clearly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery.groups import LiftingConv, plain_cnn
from surgery.groups.equivariance import blob_image, check_rot90

apply_mod = pytest.importorskip("surgery.apply")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "affine-equivariant.recipe"


def _recipe(family: str = "GL+(2)", samples: int = 4, resample: str = "never") -> str:
    text = RECIPE.read_text().replace("GL+(2)", family)
    text = text.replace("samples       = 10", f"samples       = {samples}")
    text = text.replace("grid(10)", f'grid({samples})\n  resample      = "{resample}"')
    text = text.replace("GroupConv(group=G, kernel=", "GroupConv(group=G, separable=true, kernel=")
    return text.replace("siren(width=60, depth=3, w0=10)", "siren(width=16, depth=2, w0=10)")


def test_pool_norm_is_optional_and_kept_by_the_recipe() -> None:
    plain = plain_cnn(width=4)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    assert plain.pretrained_cfg["classifier"] == "head.4"
    normed = plain_cnn(width=4, pool_norm=True)
    assert normed.pretrained_cfg["classifier"] == "head.5"
    net = apply_mod.apply(_recipe(), normed).model
    assert isinstance(net.head[0], nn.BatchNorm1d) and isinstance(net.stem, LiftingConv)
    # one BatchNorm1d of `width` features: the parameter count grows by 2 * width only
    base = sum(p.numel() for p in apply_mod.apply(_recipe(), plain_cnn(width=4)).model.parameters())
    assert sum(p.numel() for p in net.parameters()) == base + 2 * 4


@pytest.mark.parametrize("family", ["GL+(2)", "SL(2)"])
def test_pool_norm_network_rot90(family: str) -> None:
    torch.manual_seed(0)
    net = apply_mod.apply(_recipe(family), plain_cnn(width=4, pool_norm=True)).model
    net.train()
    net(torch.rand(8, 1, 28, 28))  # non-trivial running statistics
    net.eval()
    x = blob_image(28, None, batch=2, seed=1)
    assert check_rot90(net, net.stem.group, x) < 1e-5


def test_short_training_reduces_loss() -> None:
    """30 Adam steps on 64 training digits: the loss falls below a quarter of its start (2.36 -> 0.19).

    Without ``pool_norm`` the same run ends at 1.25 (measured), so this guards the fix.
    """
    from surgery.train.data import build_dataset

    torch.manual_seed(0)
    ds = build_dataset("affine_digits(canvas=28, digit_size=16)", "train")
    x = torch.stack([ds[i][0] for i in range(64)])
    y = torch.tensor([int(ds[i][1]) for i in range(64)])
    net = apply_mod.apply(_recipe(), plain_cnn(width=4, pool_norm=True)).model.train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
