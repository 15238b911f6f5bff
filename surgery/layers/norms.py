"""Normalisation layers whose variance is detached in explanation mode (B-cos v2 norms).

Dividing by a detached standard deviation keeps the layer dynamic linear: ``y = (x - mean) / sigma(x)``
with ``sigma`` a constant is linear in ``x`` (the mean subtraction is linear too). The uncentred
variants drop the mean subtraction but still divide by the *centred* standard deviation, as the
official code does. With explanation mode off, the centred layers call the fused torch kernels and
equal ``nn.LayerNorm`` / ``nn.GroupNorm`` / timm ``LayerNorm2d`` exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.layers.bcos_autograd import batch_variance
from surgery.layers.explanation_mode import DetachableModule, carry_param
from surgery.registry import register_layer

__all__ = [
    "BatchNormUncentered2d",
    "DetachableGroupNorm",
    "DetachableLayerNorm",
    "PositionNorm",
    "carry_norm_act",
    "is_channels_first_layernorm",
    "norm_act",
]


def _float_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


_CHANNELS_FIRST = ("LayerNorm2d", "LayerNorm2dFp32", "LayerNormAct2d", "LayerNormAct2dFp32")


def is_channels_first_layernorm(module: nn.Module) -> bool:
    """timm ``LayerNorm2d``, ``LayerNormAct2d`` (and Fp32 variants) normalise NCHW maps over C per position."""
    return isinstance(module, nn.LayerNorm) and any(
        k.__name__ in _CHANNELS_FIRST for k in type(module).__mro__
    )


def carry_norm_act(new: nn.Module, module: nn.Module | None, act: bool) -> nn.Module:
    """Keep the ``drop`` and ``act`` children of a timm norm+act layer (``BatchNormAct2d``, ``GroupNormAct``,
    ``LayerNormAct2d``, ...) on ``new``, so the conversion keeps the activation (applied after the norm
    by :func:`norm_act`). Identity children are not carried; ``act=False`` carries nothing."""
    if not act or module is None:
        return new
    for name in ("drop", "act"):
        sub = module._modules.get(name)
        if sub is not None and not isinstance(sub, nn.Identity):
            new.add_module(name, sub)
    return new


def norm_act(module: nn.Module, y: Tensor) -> Tensor:
    """``act(drop(y))`` with the children :func:`carry_norm_act` kept (timm's norm+act order)."""
    drop = module._modules.get("drop")
    if drop is not None:
        y = drop(y)
    act = module._modules.get("act")
    if act is not None:
        y = act(y)
    return y


@register_layer(
    transfer="gamma and running stats copied; with fold_mean=true the centring is folded into the bias "
    "(beta' = beta - gamma*mu/sigma), so before the bias is dropped it equals the BatchNorm2d in eval mode"
)
class BatchNormUncentered2d(DetachableModule, nn.BatchNorm2d):
    """Uncentred BatchNorm: ``y = gamma x / sqrt(var + eps) + beta`` (no mean subtraction).

    Eval mode uses ``running_var``. Training mode divides by the *centred* batch variance over
    (N, H, W) (detached in explanation mode) and updates ``running_var`` with it (biased, as the
    official code); ``running_mean`` is kept but unused. In training mode the layer therefore
    differs from the original BN even with the folded bias (the batch mean is not subtracted); it
    is a subclass of ``nn.BatchNorm2d`` so state-dict keys and norm-aware tooling still work.
    """

    @classmethod
    def from_module(cls, module: nn.Module, *, fold_mean: bool = True, act: bool = True) -> nn.Module:
        """Build from an ``nn.BatchNorm2d`` (or ``BatchNorm1d``), keeping gamma, beta and running stats.

        ``fold_mean=True`` (B-cosification ``BnUncV2``): beta' = beta - gamma*mu/sigma, exact in eval
        mode. ``fold_mean=False`` (``BnUnc2d``): beta copied unchanged. A timm ``BatchNormAct2d``
        keeps its activation (and drop) as children applied after the norm (``act=False``: dropped,
        for recipes that insert the norm before the original module).
        """
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise TypeError(
                f"BatchNormUncentered2d.from_module needs a BatchNorm2d, got {type(module).__name__}"
            )
        c = module.num_features
        new = cls(
            c,
            eps=module.eps,
            momentum=module.momentum,
            affine=True,
            track_running_stats=module.track_running_stats,
            device="meta",
        )
        ref = module.running_var if module.running_var is not None else module.weight
        dd = {"device": ref.device if ref is not None else None}
        pdtype = module.weight.dtype if module.weight is not None else torch.float32
        gamma = module.weight.detach() if module.weight is not None else torch.ones(c, dtype=pdtype, **dd)
        beta = module.bias.detach() if module.bias is not None else torch.zeros(c, dtype=pdtype, **dd)
        if fold_mean and module.running_mean is not None and module.running_var is not None:
            inv_std = torch.rsqrt(module.running_var.to(torch.float64) + module.eps)
            shift = gamma.to(torch.float64) * module.running_mean.to(torch.float64) * inv_std
            beta = (beta.to(torch.float64) - shift).to(beta.dtype)
        new.weight = carry_param(gamma, module.weight)
        new.bias = carry_param(beta, module.bias if module.bias is not None else module.weight)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(module, name, None)
            new._buffers[name] = buf.detach() if buf is not None else None
        return carry_norm_act(new, module, act)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"BatchNormUncentered2d expects (N, C, ...) input, got {x.dim()}-D")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_var is None
        if use_batch:
            xs = x.detach() if self.explanation else x
            var = batch_variance(xs)  # == xs.var(biased, over all dims but 1); fast on the CPU
            if self.training and self.track_running_stats and self.running_var is not None:
                with torch.no_grad():
                    self.running_var.mul_(1 - factor).add_(
                        var.detach().to(self.running_var.dtype), alpha=factor
                    )
        else:
            var = self.running_var
        scale = torch.rsqrt(var.to(_float_dtype(var)) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shape = (1, -1) + (1,) * (x.dim() - 2)  # channels at dim 1: NCHW maps, (N, C) / (N, C, L) too
        scale = scale.to(x.dtype).view(shape)
        if self.bias is None:
            return norm_act(self, x * scale)
        return norm_act(self, torch.addcmul(self.bias.to(x.dtype).view(shape), x, scale))


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int | None) -> Tensor:
    """Elementwise affine; ``channel_dim=1`` for channels-first maps, None for trailing dims."""
    if channel_dim is not None:
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        weight = weight.view(shape) if weight is not None else None
        bias = bias.view(shape) if bias is not None else None
    if weight is not None and bias is not None:
        return torch.addcmul(bias, x, weight)
    if weight is not None:
        return x * weight
    if bias is not None:
        return x + bias
    return x


def _detachable_norm(x: Tensor, dims: tuple[int, ...], eps: float, centered: bool, detach: bool) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (no mean subtraction if not centred).

    Computed in at least float32 (the affine too); callers cast back to the input dtype.
    """
    xf = x.to(_float_dtype(x))
    var, mean = torch.var_mean(xf, dim=dims, unbiased=False, keepdim=True)
    if detach:
        var = var.detach()
    if centered:
        xf = xf - mean
    return xf * torch.rsqrt(var + eps)


@register_layer(
    transfer="normalized_shape, eps, weight and bias copied; timm LayerNorm2d becomes channels_first"
)
class DetachableLayerNorm(DetachableModule, nn.LayerNorm):
    """LayerNorm with the variance detached in explanation mode.

    ``channels_first=True`` normalises an NCHW map over C per position (timm ``LayerNorm2d``,
    position norm); ``centered=False`` drops the mean subtraction (uncentred B-cos variant).
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        channels_first: bool = False,
        centered: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if channels_first and len(self.normalized_shape) != 1:
            raise ValueError("channels_first LayerNorm normalises one (channel) dimension")
        self.channels_first = channels_first
        self.centered = centered

    @classmethod
    def from_module(cls, module: nn.Module, *, centered: bool = True, act: bool = True) -> nn.Module:
        """Build from ``nn.LayerNorm`` / timm ``LayerNorm`` / ``LayerNorm2d``, keeping weights.

        timm ``LayerNormAct`` / ``LayerNormAct2d`` keep their activation as a child (``act=False``: not).
        """
        if not isinstance(module, nn.LayerNorm):
            raise TypeError(f"{cls.__name__}.from_module needs a LayerNorm, got {type(module).__name__}")
        new = cls(
            module.normalized_shape,
            module.eps,
            module.elementwise_affine,
            channels_first=is_channels_first_layernorm(module),
            centered=centered,
            device="meta",
        )
        new.weight = module.weight
        new.bias = module.bias
        return carry_norm_act(new, module, act)

    def forward(self, x: Tensor) -> Tensor:
        return norm_act(self, self._norm(x))

    def _norm(self, x: Tensor) -> Tensor:
        if self.channels_first:
            if not self.explanation and self.centered:
                y = F.layer_norm(
                    x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
                )
                return y.permute(0, 3, 1, 2)
            y = _detachable_norm(x, (1,), self.eps, self.centered, self.explanation)
            return _affine(y, self.weight, self.bias, 1).to(x.dtype)
        if not self.explanation and self.centered:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        dims = tuple(range(-len(self.normalized_shape), 0))
        y = _detachable_norm(x, dims, self.eps, self.centered, self.explanation)
        return _affine(y, self.weight, self.bias, None).to(x.dtype)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.channels_first:
            s += ", channels_first=True"
        if not self.centered:
            s += ", centered=False"
        return s


@register_layer(
    transfer="per-channel weight and bias copied from any norm with C affine parameters "
    "(LayerNorm2d, BatchNorm2d, GroupNorm); eps copied"
)
class PositionNorm(DetachableLayerNorm):
    """Position norm: LayerNorm over channels at each position of an NCHW map (B-cos v2 default).

    Same function as timm ``LayerNorm2d``; ``centered=False`` gives ``PositionNormUncentered2d``.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        centered: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_channels,
            eps,
            affine,
            affine,
            channels_first=True,
            centered=centered,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def from_module(cls, module: nn.Module, *, centered: bool = True, act: bool = True) -> nn.Module:
        """Build from a channel norm (LayerNorm2d, BatchNorm2d, GroupNorm), keeping its affine params.

        A timm norm+act layer keeps its activation as a child (``act=False``: not).
        """
        if isinstance(module, nn.LayerNorm):
            c = module.normalized_shape[-1]
        else:
            c = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
        if not isinstance(c, int):
            raise TypeError(
                f"PositionNorm.from_module cannot find the channel count of {type(module).__name__}"
            )
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        new = cls(c, getattr(module, "eps", 1e-5), weight is not None, centered=centered, device="meta")
        if weight is not None:
            new.weight = carry_param(weight.reshape(c), weight)
            new.bias = (
                carry_param(bias.reshape(c), bias)
                if bias is not None
                else carry_param(torch.zeros_like(new.weight), weight)
            )
        return carry_norm_act(new, module, act)


@register_layer(transfer="num_groups, eps, weight and bias copied")
class DetachableGroupNorm(DetachableModule, nn.GroupNorm):
    """GroupNorm with the variance detached in explanation mode (``centered=False``: uncentred).

    Covers the B-cos ``DetachableGNLayerNorm2d`` (1 group) and ``...InstanceNorm2d`` (C groups).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        centered: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.centered = centered

    @classmethod
    def from_module(cls, module: nn.Module, *, centered: bool = True, act: bool = True) -> nn.Module:
        """Build from an ``nn.GroupNorm``, keeping its weights (timm ``GroupNormAct``: and its activation)."""
        if not isinstance(module, nn.GroupNorm):
            raise TypeError(f"DetachableGroupNorm.from_module needs a GroupNorm, got {type(module).__name__}")
        new = cls(
            module.num_groups,
            module.num_channels,
            module.eps,
            module.affine,
            centered=centered,
            device="meta",
        )
        new.weight = module.weight
        new.bias = module.bias
        return carry_norm_act(new, module, act)

    def forward(self, x: Tensor) -> Tensor:
        if not self.explanation and self.centered:
            return norm_act(self, F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))
        n, c = x.shape[:2]
        xg = x.reshape(n, self.num_groups, c // self.num_groups, *x.shape[2:])
        y = _detachable_norm(xg, tuple(range(2, xg.dim())), self.eps, self.centered, self.explanation)
        return norm_act(self, _affine(y.reshape(x.shape), self.weight, self.bias, 1).to(x.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.centered else ", centered=False")
