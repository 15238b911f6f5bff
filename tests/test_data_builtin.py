"""Built-in data sets (digits, affine-digits, grid-digits), spec parsing and the input pipeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery.lang.values import Call
from surgery.train import (
    AFFINE_REGIMES,
    GridDigitsDataset,
    InputPipeline,
    build_dataset,
    parse_data_spec,
    resolve_input_pipeline,
)
from surgery.train.data import affine_matrices


def test_digits_fixed_split_range_and_size() -> None:
    train = build_dataset(Call("digits", (), {"size": 32}), "train")
    test = build_dataset("digits(size=32)", "test")
    assert len(train) + len(test) == 1797
    assert 350 <= len(test) <= 365
    x, y = train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    assert float(train.images.max()) > 0.9
    assert sorted(set(train.labels.tolist())) == list(range(10))
    again = build_dataset("digits", "train")
    assert torch.equal(again.labels, train.labels)  # the split is fixed
    small = build_dataset(Call("digits", (), {"size": 8}), "test")
    assert small[0][0].shape == (1, 8, 8)
    # 8×8 at size 8: the original values / 16, train and test disjoint
    tr8 = build_dataset(Call("digits", (), {"size": 8}), "train").images.flatten(1)
    te8 = small.images.flatten(1)
    assert not any(bool((tr8 == row).all(1).any()) for row in te8[:40])


def test_affine_digits_train_centred_test_transformed() -> None:
    train = build_dataset(Call("affine_digits"), "train")
    x, _ = train[0]
    assert x.shape == (1, 40, 40)
    border = torch.ones(40, 40, dtype=torch.bool)
    border[10:30, 10:30] = False  # digit_size 20 centred on 40
    assert float(train.images[:, 0][:, border].abs().max()) == 0.0
    mild = build_dataset("affine-digits", "test")
    hard = build_dataset(Call("affine_digits", (), {"regime": "hard"}), "test")
    none = build_dataset(Call("affine_digits", (), {"regime": "none"}), "test")
    assert mild.images.shape == hard.images.shape == none.images.shape
    assert torch.equal(mild.labels, none.labels)
    assert float(mild.images[:, 0][:, border].sum()) > 0  # digits moved out of the centre box
    assert not torch.allclose(mild.images, hard.images)
    assert torch.equal(build_dataset("affine-digits", "test").images, mild.images)  # fixed seed
    other = build_dataset(Call("affine_digits", (), {"seed": 1}), "test")
    assert not torch.equal(other.images, mild.images)
    two = build_dataset(Call("affine_digits", (), {"copies": 2}), "test")
    assert len(two) == 2 * len(mild)
    assert float(mild.images.min()) >= 0 and float(mild.images.max()) <= 1


def test_affine_ranges_are_respected() -> None:
    import numpy as np

    for regime, r in AFFINE_REGIMES.items():
        m = affine_matrices(500, r, np.random.RandomState(0))
        assert np.all(np.abs(m[:, :, 2]) <= 2 * r.translation + 1e-12), regime
        det = np.linalg.det(m[:, :, :2])  # rotation and shear keep area; scales multiply it
        assert np.all(det >= r.scale[0] ** 2 - 1e-9) and np.all(det <= r.scale[1] ** 2 + 1e-9)
    assert AFFINE_REGIMES["mild"].rotation == 20 and AFFINE_REGIMES["hard"].rotation == 45
    assert AFFINE_REGIMES["mild"].scale == (0.8, 1.2) and AFFINE_REGIMES["hard"].scale == (0.7, 1.3)
    assert AFFINE_REGIMES["mild"].shear == 0.3 and AFFINE_REGIMES["hard"].shear == 0.5


def test_grid_digits_cells_of_distinct_classes() -> None:
    ds = build_dataset(Call("grid_digits", (), {"size": 8, "count": 6}), "test")
    assert isinstance(ds, GridDigitsDataset) and len(ds) == 6 * 4
    img, label, cell = ds[5]
    assert img.shape == (1, 16, 16) and cell == 1 and label == int(ds.cell_labels[1, 1])
    for row in ds.cell_labels:
        assert len(set(row.tolist())) == 4
    # the target cell holds a digit of the target class: compare with the digits test images
    digits = build_dataset(Call("digits", (), {"size": 8}), "test")
    patch = img[:, 0:8, 8:16]
    matches = [int(digits.labels[i]) for i in range(len(digits)) if torch.equal(digits.images[i], patch)]
    assert label in matches
    with pytest.raises(ValueError, match="grid"):
        build_dataset(Call("grid_digits", (), {"grid": 4}), "test")


@pytest.mark.parametrize(
    ("spec", "name", "kwargs"),
    [
        ("digits", "digits", {}),
        ("digits(size=16)", "digits", {"size": 16}),
        ("affine-digits", "affine_digits", {}),
        ("affine-digits(regime='hard')", "affine_digits", {"regime": "hard"}),
        ("grid-digits", "grid_digits", {}),
        ("imagefolder:/data/imgs", "imagefolder", {"path": "/data/imgs"}),
        ("mnist:/data/mnist", "mnist", {"path": "/data/mnist"}),
        ("affnist:/data/aff", "affnist", {"path": "/data/aff"}),
        (Call("imagefolder", ("/x",)), "imagefolder", {"path": "/x"}),
        (Call("affine_digits", (), {"regime": "hard"}), "affine_digits", {"regime": "hard"}),
    ],
)
def test_spec_forms(spec: object, name: str, kwargs: dict[str, object]) -> None:
    ds = parse_data_spec(spec)  # type: ignore[arg-type]
    assert ds.name == name and ds.kwargs == kwargs


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("cifar", "unknown data spec 'cifar'"),
        ("digitz", "did you mean 'digits'"),
        ("digits(size='big')", "size"),
        (Call("affine_digits", (), {"regime": "wild"}), "regime"),
        ("imagefolder:", "missing path"),
        ("digits:/x", "unknown data spec"),
        (Call("mnist"), "path"),
        ("digits(", "cannot parse"),
        ("affine_digits(regime=hard)", 'quote strings: regime="hard"'),
    ],
)
def test_bad_specs_raise_value_error(spec: object, needle: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        build_dataset(spec, "train")  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", "holdout")


def test_pipeline_from_timm_data_config() -> None:
    import timm

    model = timm.create_model("resnet18", num_classes=10)
    pipe = resolve_input_pipeline(model)
    assert pipe.channels == 3
    assert pipe.mean == pytest.approx((0.485, 0.456, 0.406))
    assert pipe.std == pytest.approx((0.229, 0.224, 0.225))
    x = torch.rand(2, 1, 8, 8)
    out = pipe(x)
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out[:, 0], (x[:, 0] - 0.485) / 0.229)


def test_pipeline_from_contract_and_first_conv() -> None:
    class AddInverseNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.cat([x, 1 - x], 1)).mean((2, 3))

    contract = {"encoding": "add_inverse", "channels": 3, "range": [0, 1], "normalize_outside": False}
    pipe = resolve_input_pipeline(AddInverseNet(), contract)
    assert pipe == InputPipeline(3, None, None, (0.0, 1.0))
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(pipe(x), x.expand(-1, 3, -1, -1))  # raw [0, 1], no mean/std
    with pytest.raises(ValueError, match="input_contract"):
        resolve_input_pipeline(AddInverseNet())  # 6 channels and no contract: refuse to guess
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    gp = resolve_input_pipeline(gray)
    assert gp.channels == 1 and gp.mean is not None and len(gp.mean) == 1
    assert gp(torch.rand(2, 3, 8, 8)).shape == (2, 1, 8, 8)
    one = resolve_input_pipeline(gray, {"channels": 1, "normalize_outside": False, "range": [-1, 1]})
    assert torch.equal(one(torch.ones(1, 1, 2, 2)), torch.ones(1, 1, 2, 2))
    assert torch.equal(one(torch.zeros(1, 1, 2, 2)), -torch.ones(1, 1, 2, 2))
