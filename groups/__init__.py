"""Lie-group equivariance: GL+(n), SL(n), SO(n) through the polar decomposition (Mironenco & Forre 2024).

Importing this package registers the recipe entries: group families ``GL+``, ``SL``, ``SO``,
``Aff``, ``SAff``, ``SE``; constructors ``lognormal``, ``grid``, ``uniform``, ``haar``, ``siren``;
layers ``LiftingConv``, ``GroupConv``, ``GroupLayerNorm``, ``GroupBatchNorm``,
``GroupSpatialPool``, ``GroupPool``.
"""

from __future__ import annotations

from . import decompositions, equivariance, kernels, layers, matrix, models, sampling, spec
from .decompositions import PolarChart, polar, xi, xi_inv
from .kernels import Siren, SirenKernel
from .layers import GroupBatchNorm, GroupConv, GroupLayerNorm, GroupPool, GroupSpatialPool, LiftingConv
from .matrix import SL, SO, SP, Affine, GLPlus, PositiveDefinite
from .models import equivariant_cnn, plain_cnn, to_group_equivariant
from .sampling import Grid, GroupSamples, Haar, LogNormal, Uniform
from .spec import GroupSpec, aff, gl_plus, s_aff, se, sl, so

__all__ = [
    "SL",
    "SO",
    "SP",
    "Affine",
    "GLPlus",
    "Grid",
    "GroupBatchNorm",
    "GroupConv",
    "GroupLayerNorm",
    "GroupPool",
    "GroupSamples",
    "GroupSpatialPool",
    "GroupSpec",
    "Haar",
    "LiftingConv",
    "LogNormal",
    "PolarChart",
    "PositiveDefinite",
    "Siren",
    "SirenKernel",
    "Uniform",
    "aff",
    "decompositions",
    "equivariance",
    "equivariant_cnn",
    "gl_plus",
    "kernels",
    "layers",
    "matrix",
    "models",
    "plain_cnn",
    "polar",
    "s_aff",
    "sampling",
    "se",
    "sl",
    "so",
    "spec",
    "to_group_equivariant",
    "xi",
    "xi_inv",
]
