"""B-cos layers, norms, activations, heads and input-encoding modules.

Importing this package registers every layer with :mod:`surgery.registry` so recipes can name
them (``replace Conv2d with BcosConv2d(b=2)``).
"""

from surgery.layers.activations import (
    DetachableGELU,
    DetachableHardswish,
    DetachableSiLU,
    DetachableSquaredReLU,
    DetachableStarReLU,
)
from surgery.layers.attention import DetachableAttention, DetachableMetaFormerAttention
from surgery.layers.bcos import BcosConv2d, BcosLinear
from surgery.layers.conv_variants import BcosConv2dSame
from surgery.layers.dynamic_linear import DynamicLinear
from surgery.layers.encoding import AddInverse, EncodedInput, Normalize, find_encoded_input
from surgery.layers.explanation_mode import DetachableModule, explanation_mode, set_explanation_mode
from surgery.layers.heads import BcosPooledHead, BcosTokenHead, LogitLayer
from surgery.layers.losses import UniformOffLabelsBCEWithLogitsLoss
from surgery.layers.norms import BatchNormUncentered2d, DetachableGroupNorm, DetachableLayerNorm, PositionNorm

__all__ = [
    "AddInverse",
    "BatchNormUncentered2d",
    "BcosConv2d",
    "BcosConv2dSame",
    "BcosLinear",
    "BcosPooledHead",
    "BcosTokenHead",
    "DetachableAttention",
    "DetachableGELU",
    "DetachableGroupNorm",
    "DetachableHardswish",
    "DetachableLayerNorm",
    "DetachableMetaFormerAttention",
    "DetachableModule",
    "DetachableSiLU",
    "DetachableSquaredReLU",
    "DetachableStarReLU",
    "DynamicLinear",
    "EncodedInput",
    "LogitLayer",
    "Normalize",
    "PositionNorm",
    "UniformOffLabelsBCEWithLogitsLoss",
    "explanation_mode",
    "find_encoded_input",
    "set_explanation_mode",
]
