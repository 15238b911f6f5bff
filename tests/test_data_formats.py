"""Readers for user data: MNIST IDX, affNIST .mat, image folders — on small files generated here."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.lang.values import Call
from surgery.train import build_dataset, read_idx


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """IDX as published by LeCun et al.: magic 0x0000 | dtype 0x08 | ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def make_mnist(
    root: Path, n_train: int = 12, n_test: int = 5, *, compress: bool = True
) -> tuple[np.ndarray, ...]:
    rng = np.random.RandomState(0)
    tr_x = rng.randint(0, 256, (n_train, 28, 28)).astype(np.uint8)
    tr_y = rng.randint(0, 10, n_train).astype(np.uint8)
    te_x = rng.randint(0, 256, (n_test, 28, 28)).astype(np.uint8)
    te_y = rng.randint(0, 10, n_test).astype(np.uint8)
    ext = ".gz" if compress else ""
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / f"train-images-idx3-ubyte{ext}", tr_x, compress=compress)
    write_idx(root / f"train-labels-idx1-ubyte{ext}", tr_y, compress=compress)
    write_idx(root / f"t10k-images-idx3-ubyte{ext}", te_x, compress=compress)
    write_idx(root / f"t10k-labels-idx1-ubyte{ext}", te_y, compress=compress)
    return tr_x, tr_y, te_x, te_y


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_reader(tmp_path: Path, compress: bool) -> None:
    tr_x, tr_y, te_x, te_y = make_mnist(tmp_path, compress=compress)
    train = build_dataset(f"mnist:{tmp_path}", "train")
    test = build_dataset(Call("mnist", (str(tmp_path),)), "test")
    assert len(train) == 12 and len(test) == 5
    x, y = train[3]
    assert x.shape == (1, 28, 28) and y == int(tr_y[3])
    assert torch.allclose(x[0], torch.from_numpy(tr_x[3]).float() / 255)
    assert test[4][1] == int(te_y[4])
    resized = build_dataset(Call("mnist", (str(tmp_path),), {"size": 32}), "test")
    assert resized[0][0].shape == (1, 32, 32)
    np.testing.assert_array_equal(read_idx(next(tmp_path.glob("t10k-images*"))), te_x)


def test_mnist_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset(f"mnist:{missing}", "train")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images"):
        build_dataset(f"mnist:{tmp_path / 'empty'}", "train")
    root = tmp_path / "bad"
    make_mnist(root, compress=False)
    img = root / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*corrupt"):
        build_dataset(f"mnist:{root}", "train")
    img.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 40)
    with pytest.raises(ValueError, match="not an IDX file"):
        build_dataset(f"mnist:{root}", "train")
    gz = root / "t10k-images-idx3-ubyte"
    gz.write_bytes(b"\x1f\x8b" + b"garbage" * 5)
    with pytest.raises(ValueError, match="t10k-images"):
        build_dataset(f"mnist:{root}", "test")
    labels = root / "t10k-labels-idx1-ubyte"
    write_idx(gz, np.zeros((5, 28, 28), np.uint8))
    write_idx(labels, np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="labels"):
        build_dataset(f"mnist:{root}", "test")


def write_affnist(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """affNIST's layout: struct ``affNISTdata`` with ``image`` 1600×N uint8 (one 40×40 image per column)."""
    import scipy.io

    n = len(images)
    one_hot = np.zeros((10, n), np.uint8)
    one_hot[labels, np.arange(n)] = 1
    scipy.io.savemat(
        str(path),
        {
            "affNISTdata": {
                "image": images.reshape(n, 1600).T.astype(np.uint8),
                "label_int": labels.astype(np.uint8)[None],
                "label_one_of_n": one_hot,
                "human_readable_label": labels.astype(np.uint8)[None],
            }
        },
        format="5",
    )


def test_affnist_mat_reader(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    rng = np.random.RandomState(1)
    imgs = np.zeros((3, 40, 40), np.uint8)
    imgs[:, 5, :] = 255  # a horizontal bar in row 5: orientation must survive
    imgs[1, :, 7] = 128
    labels = np.array([3, 1, 4])
    write_affnist(tmp_path / "test.mat", imgs, labels)
    batches = tmp_path / "training_batches"
    batches.mkdir()
    train_imgs = rng.randint(0, 256, (5, 40, 40)).astype(np.uint8)
    write_affnist(batches / "1.mat", train_imgs[:2], np.array([0, 1]))
    write_affnist(batches / "2.mat", train_imgs[2:], np.array([2, 3, 4]))
    test = build_dataset(f"affnist:{tmp_path}", "test")
    assert len(test) == 3 and [test[i][1] for i in range(3)] == [3, 1, 4]
    x, _ = test[1]
    assert x.shape == (1, 40, 40)
    x0 = test[0][0]
    assert float(x0[0, 5].min()) == 1.0 and float(x0[0, 4].max()) == 0.0
    assert float(x[0, 6, 7]) == pytest.approx(128 / 255) and float(x[0, 6, 8]) == 0.0
    train = build_dataset(Call("affnist", (str(tmp_path),)), "train")
    assert len(train) == 5 and train[4][1] == 4
    assert torch.allclose(train[3][0][0], torch.from_numpy(train_imgs[3]).float() / 255)


def test_affnist_errors(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    with pytest.raises(FileNotFoundError, match=r"test\.mat"):
        build_dataset(f"affnist:{tmp_path}", "test")
    (tmp_path / "test.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 20)
    with pytest.raises(ValueError, match=r"test\.mat"):
        build_dataset(f"affnist:{tmp_path}", "test")
    import scipy.io

    scipy.io.savemat(str(tmp_path / "test.mat"), {"other": np.zeros(3)})
    with pytest.raises(ValueError, match="affNISTdata"):
        build_dataset(f"affnist:{tmp_path}", "test")
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        build_dataset(f"affnist:{tmp_path / 'missing-dir'}", "test")


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.randint(0, 256, (20, 24, 3)).astype(np.uint8)).save(d / f"{i}.png")
    train = build_dataset(Call("imagefolder", (str(tmp_path),), {"size": 16}), "train")
    test = build_dataset(f"imagefolder:{tmp_path}", "test", data_config={"input_size": (3, 12, 12)})
    assert len(train) == 4 and train.num_classes == 2
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    assert float(x.min()) >= 0 and float(x.max()) <= 1  # normalisation is the pipeline's job
    assert test[3][0].shape == (3, 12, 12) and test[3][1] == 1
    with pytest.raises(FileNotFoundError, match="no-such"):
        build_dataset(f"imagefolder:{tmp_path / 'no-such'}", "train")
    (tmp_path / "only_train").mkdir()
    (tmp_path / "only_train" / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset(f"imagefolder:{tmp_path / 'only_train'}", "test")
