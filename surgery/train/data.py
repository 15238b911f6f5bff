"""Built-in data sets, file-format readers and the input pipeline that feeds a model.

Every data set yields ``(image, label)`` with ``image`` a float tensor ``C×H×W`` in ``[0, 1]`` and
native channels (1 for digits/MNIST); ``grid_digits`` yields ``(image, label, cell)``. What the model
needs on top (channel expansion, mean/std) is applied per batch on the device by an
:class:`InputPipeline`, so the same data set serves a plain timm model and a B-cos model that
normalises internally.

Specs name a data set either as a recipe call (``digits(size=32)``, ``imagefolder("/data/x")``) or as
a string (``"digits"``, ``"affine-digits"``, ``"imagefolder:/data/x"``, ``"mnist:/data/mnist"``,
``"digits(size=32)"``).
"""

from __future__ import annotations

import ast
import difflib
import functools
import gzip
import inspect
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from surgery.lang.values import Call

log = logging.getLogger("surgery.train")

__all__ = [
    "AFFINE_REGIMES",
    "DATASETS",
    "AffineRanges",
    "ArrayImageDataset",
    "DataSpec",
    "GridDigitsDataset",
    "InputPipeline",
    "affine_matrices",
    "build_dataset",
    "build_loader",
    "parse_data_spec",
    "read_idx",
    "resolve_input_pipeline",
]


# --------------------------------------------------------------------------------------------- datasets


class ArrayImageDataset(Dataset):
    """Images held in one tensor (uint8 or float) with integer labels; ``scale`` maps them to [0, 1].

    Keeping MNIST-sized sets as uint8 and converting per item saves 4x memory.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        scale: float = 1.0,
        size: int | None = None,
        num_classes: int | None = None,
        name: str = "",
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"{name or 'dataset'}: images must be N×C×H×W, got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{name or 'dataset'}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.scale = scale
        self.size = size
        self.name = name
        self.num_classes = num_classes if num_classes is not None else int(self.labels.max()) + 1

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i].float()
        if self.scale != 1.0:
            img = img * self.scale
        if self.size is not None and tuple(img.shape[-2:]) != (self.size, self.size):
            img = F.interpolate(img[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[
                0
            ]
        return img, int(self.labels[i])


class GridDigitsDataset(Dataset):
    """``grid×grid`` mosaics of digits of distinct classes, one item per (mosaic, cell).

    Item ``i`` is ``(image, label of the target cell, cell index)`` with cells numbered row-major; the
    grid pointing game explains ``label`` and measures the share of positive attribution in ``cell``.
    """

    def __init__(
        self, grids: torch.Tensor, cell_labels: torch.Tensor, grid: int, num_classes: int = 10
    ) -> None:
        self.grids = grids
        self.cell_labels = cell_labels.long()
        self.grid = grid
        self.num_classes = num_classes

    @property
    def channels(self) -> int:
        return int(self.grids.shape[1])

    def __len__(self) -> int:
        return len(self.grids) * self.grid * self.grid

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        g, cell = divmod(i, self.grid * self.grid)
        return self.grids[g], int(self.cell_labels[g, cell]), cell


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits (1797 images, values 0..16); no download involved."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_split() -> dict[str, np.ndarray]:
    """Fixed stratified 80/20 split (legacy ``RandomState``: stable across numpy versions)."""
    _, y = _digits_arrays()
    rs = np.random.RandomState(DIGITS_SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        idx = rs.permutation(np.flatnonzero(y == c))
        n_test = round(len(idx) * DIGITS_TEST_FRACTION)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def _split_name(split: str, spec: str) -> str:
    s = split.lower()
    if s in ("train", "training"):
        return "train"
    if s in ("test", "val", "valid", "validation", "eval"):
        return "test"
    raise ValueError(f"{spec}: unknown split {split!r}; expected 'train' or 'test'")


def _digit_images(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits_arrays()
    idx = _digits_split()[split]
    imgs = torch.from_numpy(x[idx] / 16.0)[:, None]
    if size != 8:
        imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
    return imgs.clamp_(0.0, 1.0).contiguous(), torch.from_numpy(y[idx])


def _digits(split: str, *, size: int = 32) -> Dataset:
    """scikit-learn's handwritten digits upsampled (bilinear) to ``size``×``size``, values in [0, 1]."""
    _check_int("digits", "size", size, 4)
    imgs, labels = _digit_images(_split_name(split, "digits"), size)
    return ArrayImageDataset(imgs, labels, num_classes=10, name="digits")


@dataclass(frozen=True)
class AffineRanges:
    """Ranges of the random affine maps of one ``affine_digits`` test regime.

    ``rotation``: degrees, uniform in ±rotation; ``scale``: per-axis factors, each uniform in the
    range (independent x and y, as in affNIST); ``shear``: x-shear factor ``x' = x + s·y``, uniform in
    ±shear; ``translation``: fraction of the canvas side, uniform in ±translation per axis.
    """

    rotation: float
    scale: tuple[float, float]
    shear: float
    translation: float


AFFINE_REGIMES: dict[str, AffineRanges] = {
    "none": AffineRanges(0.0, (1.0, 1.0), 0.0, 0.0),
    # ±20°, scale 0.8–1.2, shear ±0.3, shift ±3 px on a 40-px canvas
    "mild": AffineRanges(20.0, (0.8, 1.2), 0.3, 0.075),
    # ±45°, scale 0.7–1.3, shear ±0.5, shift ±5 px on a 40-px canvas
    "hard": AffineRanges(45.0, (0.7, 1.3), 0.5, 0.125),
}


def affine_matrices(n: int, ranges: AffineRanges, rng: np.random.RandomState) -> np.ndarray:
    """``n`` forward affine maps ``[A | t]`` (2×3, normalised canvas coordinates in [-1, 1])."""
    ang = np.deg2rad(rng.uniform(-ranges.rotation, ranges.rotation, n))
    sx = rng.uniform(ranges.scale[0], ranges.scale[1], n)
    sy = rng.uniform(ranges.scale[0], ranges.scale[1], n)
    sh = rng.uniform(-ranges.shear, ranges.shear, n)
    # translation as a fraction of the side = 2·fraction in normalised [-1, 1] units
    tx = rng.uniform(-ranges.translation, ranges.translation, n) * 2.0
    ty = rng.uniform(-ranges.translation, ranges.translation, n) * 2.0
    out = np.zeros((n, 2, 3))
    for i in range(n):
        rot = np.array([[math.cos(ang[i]), -math.sin(ang[i])], [math.sin(ang[i]), math.cos(ang[i])]])
        shear = np.array([[1.0, sh[i]], [0.0, 1.0]])
        scale = np.diag([sx[i], sy[i]])
        out[i, :, :2] = rot @ shear @ scale
        out[i, :, 2] = (tx[i], ty[i])
    return out


def _warp(images: torch.Tensor, forward: np.ndarray) -> torch.Tensor:
    """Apply forward maps to images: ``grid_sample`` needs the inverse (output → input) map."""
    a = forward[:, :, :2]
    t = forward[:, :, 2:]
    inv = np.linalg.inv(a)
    theta = torch.from_numpy(np.concatenate([inv, -inv @ t], axis=2)).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(
        0, 1
    )


def _affine_digits(
    split: str,
    *,
    canvas: int = 40,
    digit_size: int = 20,
    regime: str = "mild",
    seed: int = 0,
    copies: int = 1,
) -> Dataset:
    """The affNIST protocol in miniature: train on centred digits, test on random affine copies.

    Training images: each digit upsampled to ``digit_size`` and centred on a ``canvas``-sized black
    square (no augmentation). Test images: ``copies`` transformed versions of every test digit, maps
    drawn from ``AFFINE_REGIMES[regime]`` with ``numpy.random.RandomState(seed)``.
    """
    spec = "affine_digits"
    _check_int(spec, "canvas", canvas, 8)
    _check_int(spec, "digit_size", digit_size, 4)
    _check_int(spec, "seed", seed, 0)
    _check_int(spec, "copies", copies, 1)
    if digit_size > canvas:
        raise ValueError(f"{spec}: digit_size={digit_size} is larger than canvas={canvas}")
    if regime not in AFFINE_REGIMES:
        raise ValueError(f"{spec}: unknown regime {regime!r}; expected one of {sorted(AFFINE_REGIMES)}")
    which = _split_name(split, spec)
    imgs, labels = _digit_images(which, digit_size)
    lo = (canvas - digit_size) // 2
    out = torch.zeros(len(imgs), 1, canvas, canvas)
    out[:, :, lo : lo + digit_size, lo : lo + digit_size] = imgs
    if which == "test" and regime != "none":
        rng = np.random.RandomState(seed)
        out = out.repeat(copies, 1, 1, 1)
        labels = labels.repeat(copies)
        out = _warp(out, affine_matrices(len(out), AFFINE_REGIMES[regime], rng))
    return ArrayImageDataset(out.contiguous(), labels, num_classes=10, name=spec)


def _grid_digits(split: str, *, size: int = 32, grid: int = 2, count: int = 100, seed: int = 0) -> Dataset:
    """``count`` mosaics of ``grid×grid`` digits of distinct classes (each cell ``size`` px)."""
    spec = "grid_digits"
    _check_int(spec, "size", size, 4)
    _check_int(spec, "count", count, 1)
    _check_int(spec, "seed", seed, 0)
    _check_int(spec, "grid", grid, 1)
    if grid * grid > 10:
        raise ValueError(f"{spec}: grid={grid} needs {grid * grid} distinct classes but digits has 10")
    imgs, labels = _digit_images(_split_name(split, spec), size)
    by_class = [np.flatnonzero(labels.numpy() == c) for c in range(10)]
    rng = np.random.RandomState(seed)
    grids = torch.zeros(count, 1, grid * size, grid * size)
    cell_labels = torch.zeros(count, grid * grid, dtype=torch.long)
    for g in range(count):
        classes = rng.choice(10, size=grid * grid, replace=False)
        for cell, c in enumerate(classes):
            r, q = divmod(cell, grid)
            img = imgs[by_class[c][rng.randint(len(by_class[c]))]]
            grids[g, :, r * size : (r + 1) * size, q * size : (q + 1) * size] = img
            cell_labels[g, cell] = int(c)
    return GridDigitsDataset(grids, cell_labels, grid)


def _existing_dir(spec: str, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{spec}: directory not found: {p}")
    if not p.is_dir():
        raise FileNotFoundError(f"{spec}: not a directory: {p}")
    return p


def _imagefolder(
    split: str, *, path: str, size: int | None = None, data_config: dict[str, Any] | None = None
) -> Dataset:
    """A torchvision ``ImageFolder`` (``PATH/train``, ``PATH/val`` or ``PATH/test``, else ``PATH``).

    Resizing/cropping follows timm's data config of the model (``input_size``, ``interpolation``,
    ``crop_pct``; train split with timm's standard training augmentation), but normalisation is left to
    the :class:`InputPipeline` so images stay in [0, 1] here.
    """
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    spec = f"imagefolder:{path}"
    root = _existing_dir(spec, path)
    which = _split_name(split, spec)
    names = ("train", "training") if which == "train" else ("val", "validation", "test")
    sub = next((root / n for n in names if (root / n).is_dir()), None)
    if sub is None:
        if any((root / n).is_dir() for n in ("train", "val", "validation", "test")):
            raise FileNotFoundError(f"{spec}: no {'/'.join(names)} directory for split {split!r} in {root}")
        log.warning("%s: no train/val sub-directories; using %s for split %r", spec, root, split)
        sub = root
    cfg = dict(data_config or {})
    if size is not None:
        cfg["input_size"] = (3, size, size)
    input_size = cfg.get("input_size", (3, 224, 224))
    transform = create_transform(
        input_size=tuple(input_size),
        is_training=which == "train",
        interpolation=cfg.get("interpolation", "bilinear"),
        crop_pct=cfg.get("crop_pct"),
        crop_mode=cfg.get("crop_mode"),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    try:
        ds = ImageFolder(str(sub), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:  # torchvision: "Couldn't find any class folder"
        raise FileNotFoundError(f"{spec}: {exc}") from exc
    ds.num_classes = len(ds.classes)  # type: ignore[attr-defined]
    return ds


_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzip-compressed or not (detected by its magic bytes)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip file: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: corrupt IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: corrupt IDX file: dims {dims} need {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, prefix: str, kind: str, ndim: int) -> Path:
    pat = re.compile(rf"^{prefix}-{kind}[-.]idx{ndim}-ubyte(\.gz)?$")
    for d in (root, root / "raw", root / "MNIST" / "raw"):
        if d.is_dir():
            hits = sorted(p for p in d.iterdir() if pat.match(p.name))
            if hits:
                return hits[0]
    raise FileNotFoundError(f"mnist:{root}: no {prefix}-{kind}-idx{ndim}-ubyte[.gz] file in {root}")


def _mnist(split: str, *, path: str, size: int | None = None) -> Dataset:
    """MNIST-format IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-…``): also Fashion-MNIST, KMNIST."""
    spec = f"mnist:{path}"
    root = _existing_dir(spec, path)
    if size is not None:
        _check_int(spec, "size", size, 4)
    prefix = "train" if _split_name(split, spec) == "train" else "t10k"
    img_path, lab_path = _find_idx(root, prefix, "images", 3), _find_idx(root, prefix, "labels", 1)
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3:
        raise ValueError(f"{img_path}: expected a 3-d IDX array of images, got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{lab_path}: expected {len(images)} labels, got shape {labels.shape}")
    scale = 1 / 255 if images.dtype == np.uint8 else 1.0
    return ArrayImageDataset(
        torch.from_numpy(images.copy())[:, None],
        torch.from_numpy(labels.astype(np.int64)),
        scale=scale,
        size=size,
        num_classes=max(10, int(labels.max()) + 1) if len(labels) else 10,
        name=spec,
    )


_AFFNIST_FILES = {
    "train": (
        "training.mat",
        "training_and_validation.mat",
        "training_batches",
        "training_and_validation_batches",
    ),
    "test": ("test.mat", "test_batches"),
}


def _load_mat_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        import scipy.io
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"{path}: reading affNIST .mat files needs scipy (pip install scipy)", name="scipy"
        ) from exc
    try:
        mat = scipy.io.loadmat(str(path), simplify_cells=True)
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5)
        raise ValueError(
            f"{path}: unsupported .mat version (need MATLAB v5, as affNIST ships): {exc}"
        ) from exc
    except Exception as exc:  # scipy raises several types for truncated/garbled files
        raise ValueError(f"{path}: corrupt .mat file: {exc}") from exc
    data = mat.get("affNISTdata")
    if not isinstance(data, dict) or "image" not in data or "label_int" not in data:
        raise ValueError(f"{path}: no affNISTdata struct with 'image' and 'label_int' fields")
    image = np.asarray(data["image"])
    labels = np.atleast_1d(np.asarray(data["label_int"])).reshape(-1)
    if image.ndim == 1:  # a single image squeezed to 1600
        image = image[:, None]
    if image.ndim != 2 or image.shape[0] != 1600:
        raise ValueError(f"{path}: affNIST 'image' must be 1600×N (40×40 per column), got {image.shape}")
    if image.shape[1] != len(labels):
        raise ValueError(f"{path}: {image.shape[1]} images but {len(labels)} labels")
    return image.T.reshape(-1, 40, 40).astype(np.uint8), labels.astype(np.int64)


def _affnist(split: str, *, path: str, size: int | None = None) -> Dataset:
    """affNIST ``.mat`` files (``training.mat``/``test.mat`` or ``*_batches/N.mat``), 40×40 uint8."""
    spec = f"affnist:{path}"
    root = _existing_dir(spec, path)
    if size is not None:
        _check_int(spec, "size", size, 4)
    which = _split_name(split, spec)
    files: list[Path] = []
    for name in _AFFNIST_FILES[which]:
        p = root / name
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(p.glob("*.mat"), key=lambda q: (len(q.stem), q.stem))
        if files:
            break
    if not files:
        raise FileNotFoundError(f"{spec}: none of {', '.join(_AFFNIST_FILES[which])} found in {root}")
    parts = [_load_mat_images(f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ArrayImageDataset(
        torch.from_numpy(images)[:, None],
        torch.from_numpy(labels),
        scale=1 / 255,
        size=size,
        num_classes=10,
        name=spec,
    )


def _check_int(spec: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{spec}: {name} must be an integer >= {minimum}, got {value!r}")


# ------------------------------------------------------------------------------------------------ specs

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "affine_digits": _affine_digits,
    "grid_digits": _grid_digits,
    "imagefolder": _imagefolder,
    "mnist": _mnist,
    "affnist": _affnist,
}
"""Data set builders by canonical name: ``builder(split, **kwargs) -> Dataset``."""

_PATH_DATASETS = {"imagefolder", "mnist", "affnist"}
_INTERNAL_KWARGS = {"data_config"}


@dataclass(frozen=True)
class DataSpec:
    """A validated data-set reference: canonical name and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_call(self) -> Call:
        return Call(self.name, (), dict(self.kwargs))

    def __str__(self) -> str:
        if self.name in _PATH_DATASETS and set(self.kwargs) == {"path"}:
            return f"{self.name}:{self.kwargs['path']}"
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.kwargs.items()))))


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def parse_call_string(text: str, what: str = "value") -> Call:
    """Parse ``name`` or ``name(arg, key=literal, ...)`` from a command line into a :class:`Call`.

    Only Python literals are accepted as arguments (``ast.literal_eval``), never expressions.
    """
    text = text.strip()
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"cannot parse {what} {text!r}: {exc.msg}") from exc
    if isinstance(node, ast.Name):
        return Call(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except ValueError as exc:
            bare = [(kw.arg, kw.value.id) for kw in node.keywords if isinstance(kw.value, ast.Name)]
            hint = f' (quote strings: {bare[0][0]}="{bare[0][1]}")' if bare else ""
            raise ValueError(f"{what} {text!r}: arguments must be literals{hint}") from exc
        if any(kw.arg is None for kw in node.keywords):
            raise ValueError(f"{what} {text!r}: **kwargs is not allowed")
        return Call(node.func.id, args, kwargs)
    raise ValueError(f"cannot parse {what} {text!r}: expected NAME or NAME(args)")


def parse_data_spec(spec: str | Call | DataSpec) -> DataSpec:
    """Validate a data spec (name and argument names/types), without touching any file."""
    if isinstance(spec, DataSpec):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        head, sep, rest = text.partition(":")
        if sep and _canonical(head) in _PATH_DATASETS and "(" not in head:
            if not rest:
                raise ValueError(f"data spec {spec!r}: missing path after '{head}:'")
            call = Call(_canonical(head), (), {"path": rest})
        elif sep and re.fullmatch(r"[A-Za-z_][\w-]*", head.strip()):
            raise ValueError(
                f"unknown data spec {spec!r}: only {', '.join(sorted(_PATH_DATASETS))} take a ':PATH'"
            )
        elif re.fullmatch(r"[A-Za-z_][\w-]*", text):
            call = Call(_canonical(text))
        else:
            m = re.fullmatch(r"([A-Za-z_][\w-]*)\s*(\(.*\))", text, flags=re.S)
            call = parse_call_string(_canonical(m.group(1)) + m.group(2) if m else text, "data spec")
    elif isinstance(spec, Call):
        call = spec
    else:
        raise ValueError(f"data spec must be a string or a call, got {type(spec).__name__}")
    name = _canonical(call.name)
    builder = DATASETS.get(name)
    if builder is None:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown data spec {call.name!r}{hint}; expected one of {', '.join(DATASETS)}")
    sig = inspect.signature(builder)
    params = [p for p in list(sig.parameters.values())[1:] if p.name not in _INTERNAL_KWARGS]
    bound_sig = sig.replace(parameters=[p.replace(kind=p.POSITIONAL_OR_KEYWORD) for p in params])
    try:
        bound = bound_sig.bind(*call.args, **call.kwargs)
    except TypeError as exc:
        raise ValueError(f"data spec {call.name}(...): {exc}") from exc
    kwargs = dict(bound.arguments)
    if name in _PATH_DATASETS:
        path = kwargs.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"data spec {call.name}: path must be a non-empty string, got {path!r}")
    for key in ("size", "canvas", "digit_size", "grid", "count", "seed", "copies"):
        if key in kwargs and kwargs[key] is not None:
            _check_int(f"data spec {call.name}", key, kwargs[key], 0)
    if "regime" in kwargs and kwargs["regime"] not in AFFINE_REGIMES:
        raise ValueError(
            f"data spec {call.name}: unknown regime {kwargs['regime']!r}; "
            f"expected one of {sorted(AFFINE_REGIMES)}"
        )
    return DataSpec(name, kwargs)


def build_dataset(
    spec: str | Call | DataSpec, split: str, *, data_config: dict[str, Any] | None = None
) -> Dataset:
    """Build the ``split`` ("train"/"test") of a data spec.

    ``data_config`` (timm's ``resolve_data_config`` of the model) sizes ``imagefolder`` images; the
    built-in digit sets take their size from the spec.
    """
    ds = parse_data_spec(spec)
    builder = DATASETS[ds.name]
    kwargs = dict(ds.kwargs)
    if "data_config" in inspect.signature(builder).parameters:
        kwargs["data_config"] = data_config
    return builder(split, **kwargs)


def build_loader(
    ds: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_workers: int | None = None,
    info: Any = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader the way :func:`surgery.train.finetune` builds them.

    Training: a seeded per-epoch shuffle sharded over ranks (call ``loader.sampler.set_epoch(e)``),
    dropping a ragged last batch when there is more than one batch. Evaluation: this rank's shard,
    in order, unpadded. ``num_workers=None``: 0 for in-memory sets, a few processes otherwise.
    """
    from surgery.train.distributed import DistInfo, ShardSampler, train_sampler

    info = info or DistInfo()
    if num_workers is None:
        in_memory = isinstance(ds, (ArrayImageDataset, GridDigitsDataset))
        num_workers = 0 if in_memory else max(0, min(8, (os.cpu_count() or 1) // max(1, info.world_size) - 1))
    if train:
        sampler: Any = train_sampler(ds, info, seed=seed)
        drop_last = len(sampler) > batch_size
    else:
        sampler, drop_last = ShardSampler(len(ds), info), False
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )


def dataset_num_classes(ds: Dataset) -> int | None:
    """Number of classes a data set declares (``num_classes`` attribute), if any."""
    n = getattr(ds, "num_classes", None)
    return int(n) if n is not None else None


# ---------------------------------------------------------------------------------------- input pipeline


@dataclass(frozen=True)
class InputPipeline:
    """What happens to a [0, 1] batch before the model sees it: channels, value range, mean/std.

    ``mean``/``std`` of ``None`` means the model normalises internally (B-cos ``add_inverse`` models).
    """

    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    value_range: tuple[float, float] = (0.0, 1.0)
    data_config: dict[str, Any] = field(default_factory=dict, compare=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c != self.channels:
            if c == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif c == 3 and self.channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
            else:
                raise ValueError(
                    f"input pipeline: cannot feed {c}-channel images to a {self.channels}-channel model"
                )
        lo, hi = self.value_range
        if (lo, hi) != (0.0, 1.0):
            x = x * (hi - lo) + lo
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()

    def describe(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "mean": self.mean,
            "std": self.std,
            "range": list(self.value_range),
        }


def first_conv_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution (module order), or ``None`` if there is none."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


def _fit_stats(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return values * channels
    raise ValueError(f"input pipeline: {len(values)} mean/std values for a {channels}-channel model")


def resolve_input_pipeline(model: nn.Module, input_contract: dict[str, Any] | None = None) -> InputPipeline:
    """Decide how to feed ``model``: from its input contract, else from timm's data config.

    A contract (``{"encoding": "add_inverse", "channels": 3, "range": [0, 1], "normalize_outside":
    False}``) wins: ``normalize_outside=False`` means no mean/std outside the model. Without one, mean,
    std and input size come from ``timm.data.resolve_data_config(model=model)`` and the channel count
    from the first convolution (3 for timm models).
    """
    from timm.data import resolve_data_config

    try:
        data_config = dict(resolve_data_config({}, model=model))
    except Exception:  # a model timm knows nothing about: defaults
        data_config = dict(resolve_data_config({}))
    conv_c = first_conv_in_channels(model)
    if input_contract is not None:
        contract = dict(input_contract)
        channels = int(contract.get("channels") or conv_c or 3)
        rng = contract.get("range", (0.0, 1.0))
        if not isinstance(rng, (list, tuple)) or len(rng) != 2:
            raise ValueError(f"input contract: range must be [low, high], got {rng!r}")
        mean = std = None
        if contract.get("normalize_outside", True):
            mean = _fit_stats(contract.get("mean", data_config["mean"]), channels)
            std = _fit_stats(contract.get("std", data_config["std"]), channels)
        data_config["input_size"] = (channels, *tuple(data_config["input_size"])[1:])
        return InputPipeline(channels, mean, std, (float(rng[0]), float(rng[1])), data_config)
    channels = conv_c or int(data_config["input_size"][0])
    if channels not in (1, 3):
        raise ValueError(
            f"the model's first convolution takes {channels} channels; pass an input_contract saying how "
            "to feed it (e.g. encoding add_inverse: 3 channels, no normalisation outside)"
        )
    return InputPipeline(
        channels,
        _fit_stats(data_config["mean"], channels),
        _fit_stats(data_config["std"], channels),
        (0.0, 1.0),
        data_config,
    )
