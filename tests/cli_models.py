"""Tiny models for the CLI and diff tests, referenced as ``cli_models:tiny_cnn`` (tests/ on sys.path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """A residual block whose forward calls ``F.gelu``, so ``rewrite call`` has something to rewrite."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.bn1(self.conv1(x)))
        return F.gelu(x + self.bn2(self.conv2(y)))


class TinyCNN(nn.Module):
    """stem conv, three identical blocks, max pool, global pool, linear head.

    ``pretrained_cfg`` names the first conv and the classifier the way timm models do.
    """

    pretrained_cfg = {"first_conv": "conv1", "classifier": "fc", "input_size": (3, 16, 16)}  # noqa: RUF012

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = nn.ReLU()
        self.blocks = nn.Sequential(*[Block(width) for _ in range(3)])
        self.pool = nn.MaxPool2d(2)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.pool(self.blocks(x))
        return self.fc(torch.flatten(self.global_pool(x), 1))


def tiny_cnn(num_classes: int = 10, width: int = 8) -> nn.Module:
    """The factory the tests name: ``cli_models:tiny_cnn?input_size=3x16x16``."""
    return TinyCNN(num_classes=num_classes, width=width)


def broken() -> nn.Module:
    """A factory that fails with a bug, not a user error: the CLI must exit 1 and hint at --debug."""
    raise ZeroDivisionError("a bug in the model code")
