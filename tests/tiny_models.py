"""Tiny models for fast end-to-end tests, referenced as ``tiny_models:NAME`` (tests/ is on sys.path)."""

from __future__ import annotations

from torch import nn


def tiny_cnn(num_classes: int = 10, in_chans: int = 3, width: int = 8) -> nn.Module:
    """A small CNN with the usual parts: conv, BN, ReLU, max-pool, global pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, width * 2, 3, padding=1),
        nn.BatchNorm2d(width * 2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width * 2, num_classes),
    )
