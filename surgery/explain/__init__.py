"""Explanations of dynamic-linear (B-cos, B-cosified) networks, their rendering and localisation metric."""

from surgery.explain.core import Explanation, explain, gradient_to_rgba
from surgery.explain.metrics import grid_pointing_game
from surgery.explain.render import bwr_heatmap, explanation_panels, save_explanation_png

__all__ = [
    "Explanation",
    "bwr_heatmap",
    "explain",
    "explanation_panels",
    "gradient_to_rgba",
    "grid_pointing_game",
    "save_explanation_png",
]
