"""``GroupSpec``: what a recipe's ``group G = GL+(2) { ... }`` block builds.

One spec is shared by every layer built with ``group=G``. It owns the sampling policy and the
*sample set of the current forward*: the lifting layer draws (or reuses) a set at the start of a
forward and every later group layer reads that same set, so features are always labelled with the
samples they actually live on -- through residual branches and in the last layer (the reference
code labels its last layer's inputs with an unrelated draw).

Sampling modes (``resample``): ``"train"`` (default) draws a fresh set each training forward and
uses one fixed, seeded set in evaluation, so predictions are deterministic; ``"always"`` draws every
forward (the reference code's behaviour: stochastic predictions); ``"never"`` always uses the
fixed set. ``with G.use(samples):`` forces a given set, e.g. to co-transform samples in an
equivariance test.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from surgery.registry import register_group

from .decompositions import PolarChart
from .matrix import SL, SO, Affine, GLPlus, MatrixGroup, so2_angle, so_log, vee
from .sampling import Grid, GroupSamples, Haar, LogNormal, Uniform, draw_pairs

__all__ = ["GroupSpec", "aff", "gl_plus", "s_aff", "se", "sl", "so"]

ANGLE_ENCODINGS = ("periodic", "raw", "normalized")
RESAMPLE_MODES = ("train", "always", "never")
WEIGHTINGS = ("none", "haar")


class GroupSpec:
    """A sampled Lie group ``H`` (acting on R^n; translations are handled by convolution).

    ``linear`` is the sampled group (GL+(n), SL(n) or SO(n)); ``affine`` records whether the recipe
    named the affine extension R^n x| H (same layers: translations are the convolution itself).
    """

    def __init__(
        self,
        family: str,
        linear: MatrixGroup,
        *,
        samples: int = 10,
        scale: LogNormal | None = None,
        rotation: Grid | Uniform | Haar | None = None,
        weights: str = "none",
        resample: str = "train",
        seed: int = 0,
        angle_encoding: str = "periodic",
        affine: bool = False,
        decomposition: str = "polar",
    ) -> None:
        if decomposition != "polar":
            raise ValueError(f"{family}: decomposition {decomposition!r} not supported (only 'polar')")
        if samples < 1:
            raise ValueError(f"{family}: samples must be >= 1, got {samples}")
        if weights not in WEIGHTINGS:
            raise ValueError(f"{family}: weights must be one of {WEIGHTINGS}, got {weights!r}")
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"{family}: resample must be one of {RESAMPLE_MODES}, got {resample!r}")
        if angle_encoding not in ANGLE_ENCODINGS:
            raise ValueError(
                f"{family}: angle_encoding must be one of {ANGLE_ENCODINGS}, got {angle_encoding!r}"
            )
        if isinstance(linear, SO) and scale is not None:
            raise ValueError(f"{family}: SO(n) has no positive-definite factor; remove `scale`")
        if weights == "haar" and scale is None:
            raise ValueError(f"{family}: weights='haar' needs a `scale` law to re-weight")
        if isinstance(rotation, Grid) and rotation.n is not None and rotation.n != samples:
            raise ValueError(f"{family}: grid({rotation.n}) has {rotation.n} angles but samples = {samples}")
        if isinstance(rotation, (Grid, Uniform)) and linear.n != 2:
            raise ValueError(f"{family}({linear.n}): grid/uniform angles need n = 2; use haar()")
        self.family = family
        self.linear = linear
        self.n = linear.n
        self.samples = samples
        self.scale = scale
        self.rotation = rotation
        self.weights = weights
        self.resample = resample
        self.seed = seed
        self.angle_encoding = angle_encoding
        self.affine = affine
        self.decomposition = decomposition
        self.chart = PolarChart(linear)
        self._fixed: GroupSamples | None = None
        self._override: GroupSamples | None = None

    # ------------------------------------------------------------------ structure
    @property
    def group(self) -> MatrixGroup:
        """The whole group: ``Affine(linear)`` for the affine families, else ``linear``."""
        return Affine(self.linear) if self.affine else self.linear

    @property
    def traceless(self) -> bool:
        return isinstance(self.linear, SL)

    @property
    def volume_preserving(self) -> bool:
        """True when every sample has determinant one (SL, SO): the |det|^-1 factors are skipped."""
        return isinstance(self.linear, (SL, SO))

    @property
    def coord_dim(self) -> int:
        """Length of the Lie-algebra feature vector :meth:`kernel_coords` returns."""
        dk = self.chart.dim_k
        if dk and self.angle_encoding == "periodic":
            dk = 2 if self.n == 2 else self.n * self.n
        return self.chart.dim_p + dk

    def __repr__(self) -> str:
        parts = [f"samples={self.samples}", f"scale={self.scale}", f"rotation={self.rotation}"]
        if self.weights != "none":
            parts.append(f"weights={self.weights!r}")
        parts += [f"resample={self.resample!r}", f"angle_encoding={self.angle_encoding!r}"]
        return f"GroupSpec({self.family}({self.n}), {', '.join(parts)})"

    # ------------------------------------------------------------------ coordinates
    def kernel_coords(self, rel: Tensor) -> Tensor:
        """Kernel-network features of group elements ``(..., n, n)``: xi^-1 in orthonormal coordinates.

        The P part is ``log p`` in an orthonormal basis; the rotation part is encoded per
        ``angle_encoding``: ``periodic`` = (cos, sin) of the SO(2) angle (continuous across
        +-pi; the flattened rotation matrix for n > 2), ``raw`` = angle in [0, 2 pi) as in the
        reference code, ``normalized`` = angle / pi in (-1, 1].
        """
        log_p, k = self.chart.split(rel)
        parts: list[Tensor] = []
        if self.chart.has_p:
            parts.append(vee(log_p, self.chart.p_basis(rel.dtype, rel.device)))
        if self.chart.has_k:
            if self.n == 2:
                theta = so2_angle(k)
                if self.angle_encoding == "periodic":
                    parts.append(torch.stack([torch.cos(theta), torch.sin(theta)], -1))
                elif self.angle_encoding == "raw":
                    theta = torch.where(theta.abs() < 1e-6, torch.zeros_like(theta), theta)
                    parts.append(torch.remainder(theta, 2 * torch.pi).unsqueeze(-1))
                else:
                    parts.append((theta / torch.pi).unsqueeze(-1))
            elif self.angle_encoding == "periodic":
                parts.append(k.flatten(-2))
            else:
                parts.append(vee(so_log(k), self.chart.k_basis(rel.dtype, rel.device)))
        return torch.cat(parts, -1)

    # ------------------------------------------------------------------ sampling
    def draw(self, generator: torch.Generator | None = None, *, training: bool = True) -> GroupSamples:
        """A fresh sample set (float64, CPU): ``g_i = exp(X_i) k_i`` with exact inverses."""
        return draw_pairs(
            self.n,
            self.samples,
            scale=self.scale,
            rotation=self.rotation,
            traceless=self.traceless,
            generator=generator,
            training=training,
            weighted=self.weights == "haar",
        )

    def fixed(self) -> GroupSamples:
        """The evaluation sample set: drawn once from ``seed``, identical across runs and copies."""
        if self._fixed is None:
            gen = torch.Generator().manual_seed(int(self.seed))
            self._fixed = self.draw(gen, training=False)
        return self._fixed

    def begin_forward(self, *, training: bool, device: torch.device | str | None = None) -> GroupSamples:
        """Choose the sample set of this forward (called by the lifting layer) and remember it."""
        if self._override is not None:
            s = self._override
        elif self.resample == "always" or (self.resample == "train" and training):
            s = self.draw(training=True)
        else:
            s = self.fixed()
        if device is not None and s.g.device != torch.device(device):
            s = self._on_device(s, torch.device(device))
        self._local().current = s
        return s

    def _on_device(self, s: GroupSamples, device: torch.device) -> GroupSamples:
        """Device copy of a set, memoised for reused sets (fixed/forced) so kernels can be cached."""
        if s is not self._fixed and s is not self._override:
            return s.to(device=device)
        memo = self.__dict__.setdefault("_device_sets", {})
        key = (id(s), str(device))
        hit = memo.get(key)
        if hit is None or hit[0] is not s:
            memo.clear()
            hit = memo[key] = (s, s.to(device=device))
        return hit[1]

    def current(self, expected: int | None = None) -> GroupSamples:
        """The sample set the features of the current forward live on."""
        s = getattr(self._local(), "current", None)
        if s is None:
            raise RuntimeError(
                f"{self.family}({self.n}): no sample set yet -- a LiftingConv on this group must run "
                "earlier in the same forward"
            )
        if expected is not None and len(s) != expected:
            raise RuntimeError(
                f"{self.family}({self.n}): features carry {expected} group samples but the current set "
                f"has {len(s)}"
            )
        return s

    @contextlib.contextmanager
    def use(self, samples: GroupSamples) -> Iterator[GroupSamples]:
        """Force ``samples`` for every forward inside the block (tests, co-transformed evaluation)."""
        old = self._override
        self._override = samples
        try:
            yield samples
        finally:
            self._override = old

    def _local(self) -> threading.local:
        loc = self.__dict__.get("_tls")
        if loc is None:
            loc = threading.local()
            self.__dict__["_tls"] = loc
        return loc

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_tls", None)
        state.pop("_device_sets", None)
        return state

    def __deepcopy__(self, memo: dict) -> GroupSpec:
        import copy

        new = GroupSpec.__new__(GroupSpec)
        memo[id(self)] = new
        for k, v in self.__getstate__().items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new


# ---------------------------------------------------------------------------------------------
# Registered group families
# ---------------------------------------------------------------------------------------------

_DOC_OPTIONS = """
Options: ``decomposition`` ("polar"), ``samples`` (N per forward), ``scale`` (law of the
positive-definite factor, default ``lognormal()``), ``rotation`` (``grid()`` default, ``uniform()``
or ``haar()``), ``weights`` ("none" | "haar": importance weights towards the invariant measure),
``resample`` ("train" | "always" | "never"), ``seed`` (of the fixed evaluation set),
``angle_encoding`` ("periodic" | "raw" | "normalized").
"""


def _doc_options(fn):
    """Append the shared option list to a family's docstring (before it is registered)."""
    fn.__doc__ = (fn.__doc__ or "") + "\n" + _DOC_OPTIONS
    return fn


def _build(
    family: str,
    linear: MatrixGroup,
    *,
    affine: bool,
    decomposition: str,
    samples: int,
    scale: LogNormal | None,
    rotation: Grid | Uniform | Haar | None,
    weights: str,
    resample: str,
    seed: int,
    angle_encoding: str,
    default_scale: bool = True,
) -> GroupSpec:
    if scale is None and default_scale:
        scale = LogNormal()
    if rotation is None:
        rotation = Grid() if linear.n == 2 else Haar()
    return GroupSpec(
        family,
        linear,
        samples=samples,
        scale=scale,
        rotation=rotation,
        weights=weights,
        resample=resample,
        seed=seed,
        angle_encoding=angle_encoding,
        affine=affine,
        decomposition=decomposition,
    )


@register_group("GL+", returns=GroupSpec)
@_doc_options
def gl_plus(
    n: int,
    *,
    decomposition: str = "polar",
    samples: int = 10,
    scale: LogNormal | None = None,
    rotation: Grid | Uniform | Haar | None = None,
    weights: str = "none",
    resample: str = "train",
    seed: int = 0,
    angle_encoding: str = "periodic",
) -> GroupSpec:
    """GL+(n) (with translations by convolution: the full affine group R^n x| GL+(n))."""
    return _build("GL+", GLPlus(n), affine=False, **_kw(locals()))


@register_group("SL", returns=GroupSpec)
@_doc_options
def sl(
    n: int,
    *,
    decomposition: str = "polar",
    samples: int = 10,
    scale: LogNormal | None = None,
    rotation: Grid | Uniform | Haar | None = None,
    weights: str = "none",
    resample: str = "train",
    seed: int = 0,
    angle_encoding: str = "periodic",
) -> GroupSpec:
    """SL(n): area-preserving linear maps (with translations: R^n x| SL(n))."""
    return _build("SL", SL(n), affine=False, **_kw(locals()))


@register_group("SO", returns=GroupSpec)
def so(
    n: int,
    *,
    samples: int = 10,
    rotation: Grid | Uniform | Haar | None = None,
    resample: str = "train",
    seed: int = 0,
    angle_encoding: str = "periodic",
) -> GroupSpec:
    """SO(n): rotations only (with translations: the roto-translation group SE(n))."""
    return _build(
        "SO",
        SO(n),
        affine=False,
        decomposition="polar",
        samples=samples,
        scale=None,
        rotation=rotation,
        weights="none",
        resample=resample,
        seed=seed,
        angle_encoding=angle_encoding,
        default_scale=False,
    )


@register_group("Aff", returns=GroupSpec)
@_doc_options
def aff(
    n: int,
    *,
    decomposition: str = "polar",
    samples: int = 10,
    scale: LogNormal | None = None,
    rotation: Grid | Uniform | Haar | None = None,
    weights: str = "none",
    resample: str = "train",
    seed: int = 0,
    angle_encoding: str = "periodic",
) -> GroupSpec:
    """R^n x| GL+(n), the orientation-preserving affine group (same layers as ``GL+``)."""
    return _build("Aff", GLPlus(n), affine=True, **_kw(locals()))


@register_group("SAff", returns=GroupSpec)
@_doc_options
def s_aff(
    n: int,
    *,
    decomposition: str = "polar",
    samples: int = 10,
    scale: LogNormal | None = None,
    rotation: Grid | Uniform | Haar | None = None,
    weights: str = "none",
    resample: str = "train",
    seed: int = 0,
    angle_encoding: str = "periodic",
) -> GroupSpec:
    """R^n x| SL(n), the area-preserving affine group (same layers as ``SL``)."""
    return _build("SAff", SL(n), affine=True, **_kw(locals()))


@register_group("SE", returns=GroupSpec)
def se(
    n: int,
    *,
    samples: int = 10,
    rotation: Grid | Uniform | Haar | None = None,
    resample: str = "train",
    seed: int = 0,
    angle_encoding: str = "periodic",
) -> GroupSpec:
    """SE(n) = R^n x| SO(n), roto-translations (same layers as ``SO``)."""
    spec = so(
        n, samples=samples, rotation=rotation, resample=resample, seed=seed, angle_encoding=angle_encoding
    )
    spec.family, spec.affine = "SE", True
    return spec


def _kw(local: dict) -> dict:
    keys = ("decomposition", "samples", "scale", "rotation", "weights", "resample", "seed", "angle_encoding")
    return {k: local[k] for k in keys}
