"""A small plain CNN with the paper's shape, and its conversion into the group-equivariant network.

``plain_cnn`` is an ordinary PyTorch model (Conv2d, BatchNorm2d, GELU, MaxPool2d,
AdaptiveMaxPool2d, MLP head) whose module structure matches the network of Mironenco & Forre:

    stem conv 5x5 (no padding) -> norm -> GELU
    residual block: 2 x [conv 5x5 pad 2 -> norm -> GELU], identity skip, GELU
    norm -> max-pool 2x2 -> GELU
    conv 5x5 (no padding) -> norm -> GELU
    global max pool -> Linear(w, 256) -> LayerNorm -> GELU -> Dropout(0.3) -> Linear(256, classes)

``pool_norm=True`` puts a ``BatchNorm1d`` on the pooled features (the head's first module). It
acts on invariant features, so equivariance is untouched, and it removes the initial loss plateau
of the group version: the global max over samples x space of a group network is a large common
offset plus a small image-dependent part (between-image std / mean ~0.08 at initialisation
against ~0.19 for the plain CNN), which the head (bias-free Linear, LayerNorm over its units) does
not remove; centring each pooled feature over the batch does (docs/groups.md, Training).

``to_group_equivariant`` performs the replacements of ``recipes/affine-equivariant.recipe`` in
plain Python (first conv -> LiftingConv, other convs -> GroupConv, BatchNorm2d -> GroupLayerNorm,
MaxPool2d -> GroupSpatialPool, global pooling -> GroupPool), so benchmarks and tests do not
depend on the recipe engine.
"""

from __future__ import annotations

from torch import Tensor, nn

from .kernels import SirenKernel
from .layers import GroupConv, GroupLayerNorm, GroupPool, GroupSpatialPool, LiftingConv
from .spec import GroupSpec

__all__ = ["BasicBlock", "PlainCNN", "equivariant_cnn", "plain_cnn", "to_group_equivariant"]


class BasicBlock(nn.Module):
    """``act(x + norm2(conv2(act(norm1(conv1(x))))) ...)``: two 'same' convs and an identity skip."""

    def __init__(self, width: int, kernel_size: int = 5) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(width, width, kernel_size, padding=pad, bias=False)
        self.norm1 = nn.BatchNorm2d(width)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(width, width, kernel_size, padding=pad, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.act2 = nn.GELU()
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.act2(self.norm2(self.conv2(y)))
        return self.act(x + y)


class PlainCNN(nn.Module):
    """The paper's network shape with ordinary layers (any input size >= 4 k - 2 pixels)."""

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 40,
        in_chans: int = 1,
        *,
        kernel_size: int = 5,
        blocks: int = 1,
        hidden: int = 256,
        dropout: float = 0.3,
        pool_norm: bool = False,
        input_pad: int = 0,
    ) -> None:
        super().__init__()
        k = kernel_size
        if input_pad < 0:
            raise ValueError(f"input_pad must be >= 0, got {input_pad}")
        # input_pad: zeros around the input so that content moved towards the canvas edge (shifts,
        # scaling up) stays clear of the borders of every layer's receptive field
        self.pad = nn.ZeroPad2d(input_pad) if input_pad else nn.Identity()
        self.stem = nn.Conv2d(in_chans, width, k, bias=False)
        self.stem_norm = nn.BatchNorm2d(width)
        self.stem_act = nn.GELU()
        self.blocks = nn.Sequential(*[BasicBlock(width, k) for _ in range(blocks)])
        self.norm = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.pool_act = nn.GELU()
        self.conv = nn.Conv2d(width, width, k, bias=False)
        self.conv_norm = nn.BatchNorm2d(width)
        self.conv_act = nn.GELU()
        self.global_pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten(1)
        # pool_norm: first module of the head (the recipe replaces BatchNorm2d only, so it stays);
        # without it the module structure is exactly the reference's
        self.head = nn.Sequential(
            *([nn.BatchNorm1d(width)] if pool_norm else []),
            nn.Linear(width, hidden, bias=False),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        # timm-style metadata: recipe aliases (@first_conv, @classifier) and the probe input size
        self.pretrained_cfg = {
            "first_conv": "stem",
            "classifier": f"head.{len(self.head) - 1}",
            "input_size": (in_chans, 40, 40),
            "num_classes": num_classes,
        }

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem_act(self.stem_norm(self.stem(self.pad(x))))
        x = self.blocks(x)
        x = self.pool_act(self.pool(self.norm(x)))
        return self.conv_act(self.conv_norm(self.conv(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flatten(self.global_pool(self.forward_features(x))))


def plain_cnn(num_classes: int = 10, width: int = 40, in_chans: int = 1, **kw) -> PlainCNN:
    """Plain CNN with the module structure the affine-equivariant recipe converts."""
    return PlainCNN(num_classes, width, in_chans, **kw)


def to_group_equivariant(
    model: nn.Module,
    group: GroupSpec,
    *,
    kernel: SirenKernel | None = None,
    lift_kernel: SirenKernel | None = None,
    separable: bool = False,
    mask: str = "cosine",
    antialias: int = 2,
    radius: float = 1.4,
    stencil: str = "fixed",
    pool_reduce: str = "max",
) -> nn.Module:
    """Replace, in place, the modules of ``model`` as the shipped recipe does; returns ``model``.

    First Conv2d (module order) -> LiftingConv; other Conv2d -> GroupConv; BatchNorm2d ->
    GroupLayerNorm; MaxPool2d/AvgPool2d -> GroupSpatialPool; AdaptiveMax/AvgPool2d -> GroupPool.
    """
    first = True
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if isinstance(child, nn.Conv2d) and not isinstance(child, (LiftingConv, GroupConv)):
                if first:
                    new = LiftingConv.from_module(
                        child,
                        group=group,
                        kernel=lift_kernel or kernel,
                        mask=mask,
                        antialias=antialias,
                        radius=radius,
                        stencil=stencil,
                    )
                    first = False
                else:
                    new = GroupConv.from_module(
                        child,
                        group=group,
                        kernel=kernel,
                        separable=separable,
                        mask=mask,
                        antialias=antialias,
                        radius=radius,
                        stencil=stencil,
                    )
            elif isinstance(child, nn.BatchNorm2d):
                new = GroupLayerNorm.from_module(child)
            elif isinstance(child, (nn.MaxPool2d, nn.AvgPool2d)):
                new = GroupSpatialPool.from_module(child)
            elif isinstance(child, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
                new = GroupPool.from_module(child, reduce=pool_reduce)
            if new is not None:
                setattr(parent, name, new)
    return model


def equivariant_cnn(
    group: GroupSpec,
    num_classes: int = 10,
    width: int = 40,
    in_chans: int = 1,
    *,
    kernel: SirenKernel | None = None,
    lift_kernel: SirenKernel | None = None,
    separable: bool = False,
    mask: str = "cosine",
    antialias: int = 2,
    radius: float = 1.4,
    stencil: str = "fixed",
    **kw,
) -> nn.Module:
    """The paper's network: ``to_group_equivariant(plain_cnn(...), group)``."""
    return to_group_equivariant(
        plain_cnn(num_classes, width, in_chans, **kw),
        group,
        kernel=kernel,
        lift_kernel=lift_kernel,
        separable=separable,
        mask=mask,
        antialias=antialias,
        radius=radius,
        stencil=stencil,
    )
