"""timm's convolution variants as plain convolutions, so B-cosification can carry them over exactly.

timm builds convs that are ``nn.Conv2d`` subclasses with a different forward:

* ``Conv2dSame`` (TF "SAME" padding, ``tf_*`` models): pads the input by an amount that depends on
  its size (stride > 1 or even kernels), then convolves unpadded;
* ``StdConv2d`` / ``StdConv2dSame`` (BiT ResNet-V2, ViT hybrids) and ``ScaledStdConv2d`` /
  ``ScaledStdConv2dSame`` (NFNets): standardise the weight every forward (``(W - mean) / std`` per
  output filter, times ``gain * fan_in^-0.5`` for the scaled ones).

B-cosification fine-tunes from the pretrained function, so the standardised weight is computed once
at conversion and stored as the new raw weight (exact at conversion; training then updates it
directly). The dynamic padding is kept by :class:`BcosConv2dSame`.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from surgery.layers.bcos import BcosConv2d

__all__ = ["BcosConv2dSame", "dynamic_same_padding", "is_conv_variant", "pad_same", "plain_conv2d"]

_SAME = ("Conv2dSame", "Conv2dSameExport")
_STANDARDISED = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def is_conv_variant(module: nn.Module) -> bool:
    """Whether ``module`` is one of timm's conv variants that :func:`plain_conv2d` rewrites."""
    return isinstance(module, nn.Conv2d) and type(module).__name__ in (*_SAME, *_STANDARDISED)


def dynamic_same_padding(module: nn.Module) -> bool:
    """Whether the module pads its input TF-"SAME" style at run time (size-dependent padding)."""
    name = type(module).__name__
    if name in _SAME:
        return True
    return name in _STANDARDISED and bool(getattr(module, "same_pad", False))


def standardised_weight(module: nn.Conv2d) -> Tensor:
    """The weight the module's forward convolves with (timm's ``F.batch_norm`` over each filter)."""
    w = module.weight.detach()
    name = type(module).__name__
    if name not in _STANDARDISED:
        return w
    gain = None
    if name.startswith("Scaled"):
        gain = (module.gain.detach() * module.scale).reshape(-1)
    flat = w.reshape(1, module.out_channels, -1)
    std = F.batch_norm(flat, None, None, weight=gain, training=True, momentum=0.0, eps=module.eps)
    return std.reshape_as(w)


def plain_conv2d(module: nn.Module) -> nn.Conv2d:
    """An ``nn.Conv2d`` (or, for dynamic "SAME" padding, a timm ``Conv2dSame``) computing what ``module`` does.

    Standardised weights are computed once; other modules are returned unchanged. Parameters keep
    their ``requires_grad``; works on meta tensors (planning).
    """
    if not is_conv_variant(module):
        return module  # type: ignore[return-value]
    dynamic = dynamic_same_padding(module)
    if dynamic:
        from timm.layers import Conv2dSame

        cls: type[nn.Conv2d] = Conv2dSame
    else:
        cls = nn.Conv2d
    w = module.weight
    new = cls(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=0 if dynamic else module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=module.bias is not None,
        device="meta",
    )
    new.weight = nn.Parameter(standardised_weight(module).clone(), requires_grad=w.requires_grad)
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


def _same_amount(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


def pad_same(
    x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> Tensor:
    """TF "SAME" zero padding as timm's ``pad_same``: total ``(ceil(i/s)-1)s + (k-1)d + 1 - i``, extra on the right."""
    ih, iw = x.shape[-2:]
    ph = _same_amount(int(ih), kernel_size[0], stride[0], dilation[0])
    pw = _same_amount(int(iw), kernel_size[1], stride[1], dilation[1])
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class BcosConv2dSame(BcosConv2d):
    """A :class:`BcosConv2d` after timm's dynamic TF "SAME" padding (from ``Conv2dSame`` and kin).

    The zero padding is applied to the input first, so the conv and the B-cos patch norm see the
    same padded input (zeros counted in the norm, as for a zero-padded ``BcosConv2d``); the layer
    itself has ``padding=0``. Built by ``BcosConv2d.from_module``; state-dict keys as ``nn.Conv2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, self.dilation))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME(dynamic)"


def bcos_from_conv_variant(
    cls: type[BcosConv2d],
    module: nn.Module,
    **kwargs: object,
) -> nn.Module:
    """``cls.from_module`` for a timm conv variant: the plain equivalent, then the B-cos layer.

    Dynamic "SAME" padding gives a :class:`BcosConv2dSame` (or ``cls`` itself if it already is one).
    """
    plain = plain_conv2d(module)
    dynamic = dynamic_same_padding(plain)
    target = BcosConv2dSame if dynamic and not issubclass(cls, BcosConv2dSame) else cls
    if dynamic:  # build from a plain Conv2d with padding 0; the subclass pads at run time
        conv = nn.Conv2d(
            plain.in_channels,
            plain.out_channels,
            plain.kernel_size,
            stride=plain.stride,
            padding=0,
            dilation=plain.dilation,
            groups=plain.groups,
            bias=plain.bias is not None,
            device="meta",
        )
        conv.weight, conv.bias = plain.weight, plain.bias
        plain = conv
    return target.from_module(plain, **kwargs)  # type: ignore[arg-type]
