"""Input encodings a recipe can apply with ``encode input NAME``.

The contract recorded on the context: ``encoding``, ``channels`` (what the model takes),
``encoded_channels`` (what its first conv sees), ``range`` [0, 1], ``normalize_outside: False``
(data pipelines must feed raw [0, 1] images), ``mean`` / ``std`` (the normalisation the *original*
model expected outside, now done inside: what the engine uses to feed the original model the same
image), ``encoded_mean`` / ``encoded_std`` (the in-model normalisation of the encoded input),
``first_layer`` (the first conv's new name, ``<first>.conv``) and ``input_size``.

An encoding edits the model copy so that it takes a new kind of input, adapts the first layer so
the network still computes exactly the original function, and records the new *input contract*
(what the data pipeline must feed) on the :class:`EncodeContext`; the engine saves that contract
in the artifact manifest.

``add_inverse`` (B-cos): the model takes the raw RGB image in [0, 1]; inside it computes
``[x, 1 - x]``, normalises it and feeds a first conv with ``2C`` input channels:

* default (B-cosification, ``bcosify.py``): ``mean6 = (mu, 1 - mu)``, ``std6 = (sigma, sigma)``,
  ``W6 = [W, -W] / 2``. Since ``((1-x) - (1-mu)) / sigma = -(x - mu) / sigma``,
  ``W6 * norm6([x, 1-x]) = W * ((x - mu) / sigma)`` exactly. Explanations w.r.t. ``[x, 1-x]`` then
  leave a constant term ``-sum mean6 * dlogit/d[x, 1-x]`` (reference section 2.2).
* ``zero_mean=true``: ``mean6 = 0``, ``std6 = (sigma, sigma)``, ``W6 = [(1 - mu) W, -mu W]`` (per input
  channel). ``(1-mu) W x/sigma - mu W (1-x)/sigma = W (x - mu)/sigma``: also exact, also at zero-padded
  borders, and with no mean inside the model the contributions of a bias-free dynamic-linear
  network sum to the logit exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery.layers.conv_variants import is_conv_variant, plain_conv2d
from surgery.layers.encoding import AddInverse, EncodedInput, Normalize
from surgery.registry import register_encoding

__all__ = ["EncodeContext", "add_inverse", "normalize_inside"]


@dataclass
class EncodeContext:
    """What an encoding needs to know about the model, and where it records the input contract.

    ``first_layer``: qualified name of the first conv / ViT patch-embedding ``proj`` (the engine
    resolves ``@first_conv``). ``mean`` / ``std``: the input normalisation in force (timm
    ``pretrained_cfg``), None if unknown. ``contract``: filled by the encoding.
    """

    first_layer: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, ...] | None = None
    contract: dict[str, Any] = field(default_factory=dict)


# first layers whose forward is a plain convolution of ``weight`` (so the weight split is exact)
_PLAIN_CONV_NAMES = {"Conv2d", "Conv2dSame", "BcosConv2d"}


def _first_layer(model: nn.Module, ctx: EncodeContext) -> tuple[nn.Module, nn.Module, str]:
    """(parent, layer, attribute name) of ``ctx.first_layer``, checked to be an RGB conv."""
    if not ctx.first_layer:
        raise ValueError("encode input: the first layer is the model itself; wrap the model instead")
    parent_name, _, attr = ctx.first_layer.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = getattr(parent, attr)
    if isinstance(layer, EncodedInput):
        raise ValueError(f"encode input: {ctx.first_layer!r} already has an input encoding")
    if isinstance(layer, nn.Linear) and _has_conv_path(parent):
        layer = _patch_linear_as_conv(parent, layer)
        setattr(parent, attr, layer)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise TypeError(
            f"encode input: {ctx.first_layer!r} must be a Conv2d (or a ViT patch-embedding proj conv), "
            f"got {type(layer).__name__}"
        )
    if getattr(layer, "groups", 1) != 1:
        raise ValueError(f"encode input: grouped first conv {ctx.first_layer!r} is not supported")
    if is_conv_variant(layer) and type(layer).__name__ not in _PLAIN_CONV_NAMES:
        # weight-standardised convs (NFNet, BiT stems) convolve with a function of .weight: split that
        # effective weight, in a plain conv with the same padding, or the split is not exact
        layer = plain_conv2d(layer)
        setattr(parent, attr, layer)
    if type(layer).__name__ not in _PLAIN_CONV_NAMES:
        warnings.warn(
            f"encode input: first layer {ctx.first_layer!r} is a {type(layer).__name__}; the weight split "
            "is exact only if its forward is a plain convolution of .weight",
            stacklevel=3,
        )
    return parent, layer, attr


def _has_conv_path(embed: nn.Module) -> bool:
    """A timm NaFlexViT patch embedding (``NaFlexEmbeds``) in linear mode: it patchifies the image
    inside the model and can run the same projection as a patch-size conv instead (``is_linear``)."""
    return (
        getattr(embed, "is_linear", False) is True
        and getattr(embed, "norm_input", None) is None
        and isinstance(getattr(embed, "channels_last", None), bool)
        and len(tuple(getattr(embed, "patch_size", ()))) == 2
    )


def _patch_linear_as_conv(embed: nn.Module, linear: nn.Linear) -> nn.Conv2d:
    """The linear patch projection as a ``Conv2d(kernel = stride = patch)`` with the same weights.

    A linear map of each flattened ``(ph, pw, C)`` (or ``(C, ph, pw)``) patch is exactly that conv,
    and the embedding's conv path flattens the map row-major as its patchify does, so the model
    computes the same function; the encoding then sees an RGB conv. (With ``dynamic_img_pad`` the
    zero padding moves from the normalised to the raw image: exact only for sizes divisible by the patch.)
    """
    ph, pw = tuple(embed.patch_size)
    e, f = linear.weight.shape
    c = f // (ph * pw)
    w = linear.weight.detach()
    w = w.view(e, ph, pw, c).permute(0, 3, 1, 2) if embed.channels_last else w.view(e, c, ph, pw)
    conv = nn.Conv2d(c, e, (ph, pw), stride=(ph, pw), bias=linear.bias is not None, device="meta")
    conv.weight = nn.Parameter(w.contiguous().clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        conv.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    embed.is_linear = False
    embed.flatten = True
    return conv


def _mean_std(ctx: EncodeContext, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(ctx.mean if ctx.mean is not None else (0.0,) * channels, dtype=torch.float64)
    std = torch.tensor(ctx.std if ctx.std is not None else (1.0,) * channels, dtype=torch.float64)
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(
            f"encode input: mean/std have {mean.numel()}/{std.numel()} entries, conv has {channels}"
        )
    return mean, std


def _set_in_channels(layer: nn.Module, weight: torch.Tensor) -> None:
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    layer.in_channels = weight.shape[1]


def _forget_outside_normalisation(model: nn.Module, channels: int) -> None:
    """Point timm's data config at the new contract: no normalisation outside the model."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        cfg["mean"] = (0.0,) * channels
        cfg["std"] = (1.0,) * channels
        model.pretrained_cfg = cfg
        if isinstance(getattr(model, "default_cfg", None), dict):
            model.default_cfg = cfg


@register_encoding("add_inverse")
def add_inverse(model: nn.Module, ctx: EncodeContext, *, zero_mean: bool = False) -> None:
    """B-cos input encoding ``[x, 1 - x]`` with the normalisation moved inside the model; exact.

    The first conv gets ``2C`` input channels, weights ``[W, -W]/2`` (or ``[(1-mu)W, -mu W]`` with
    ``zero_mean=true``, which makes explanations complete). The model then takes raw images in
    [0, 1]: data pipelines must not normalise (see ``ctx.contract``).
    """
    parent, layer, attr = _first_layer(model, ctx)
    w = layer.weight.detach()
    c = w.shape[1]
    mean, std = _mean_std(ctx, c)
    if zero_mean:
        mu = mean.to(w.dtype).to(w.device).view(1, c, 1, 1)
        w6 = torch.cat([w * (1 - mu), -w * mu], dim=1)
        mean6 = torch.zeros(2 * c, dtype=torch.float64)
    else:
        w6 = torch.cat([w, -w], dim=1) / 2
        mean6 = torch.cat([mean, 1 - mean])
    std6 = torch.cat([std, std])
    _set_in_channels(layer, w6.contiguous())
    norm = Normalize(mean6.tolist(), std6.tolist()).to(w.device)
    setattr(parent, attr, EncodedInput(AddInverse(dim=1), norm, layer))
    _forget_outside_normalisation(model, c)
    ctx.contract.update(
        {
            "encoding": "add_inverse_zero_mean" if zero_mean else "add_inverse",
            "channels": c,
            "encoded_channels": 2 * c,
            "range": [0.0, 1.0],
            "normalize_outside": False,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "encoded_mean": [float(v) for v in mean6],
            "encoded_std": [float(v) for v in std6],
            "first_layer": f"{ctx.first_layer}.conv",
            "input_size": list(ctx.input_size) if ctx.input_size is not None else None,
        }
    )


@register_encoding("normalize_inside")
def normalize_inside(model: nn.Module, ctx: EncodeContext) -> None:
    """Move the input normalisation ``(x - mean)/std`` inside the model (input: raw [0, 1] image).

    No channel change; useful to explain a standard model on raw pixels (input x gradient) or to
    give every artifact the same data pipeline.
    """
    parent, layer, attr = _first_layer(model, ctx)
    c = layer.weight.shape[1]
    mean, std = _mean_std(ctx, c)
    norm = Normalize(mean.tolist(), std.tolist()).to(layer.weight.device)
    setattr(parent, attr, EncodedInput(nn.Identity(), norm, layer))
    _forget_outside_normalisation(model, c)
    ctx.contract.update(
        {
            "encoding": "normalize_inside",
            "channels": c,
            "encoded_channels": c,
            "range": [0.0, 1.0],
            "normalize_outside": False,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "encoded_mean": [float(v) for v in mean],
            "encoded_std": [float(v) for v in std],
            "first_layer": f"{ctx.first_layer}.conv",
            "input_size": list(ctx.input_size) if ctx.input_size is not None else None,
        }
    )
