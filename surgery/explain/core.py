"""Dynamic-linear explanations: ``W(x) = d logit / d input`` computed in explanation mode.

In explanation mode a B-cos / B-cosified network is ``f(x) = W(x) x (+ constants)``, so the gradient
of the explained logit w.r.t. the input *is* the dynamic linear map, and ``x * W(x)`` summed over
channels is an exact decomposition of the logit (B-cos v2 ``explain()``). For a model converted with
``encode input add_inverse`` the input is the raw image, and the explanation is taken w.r.t. the
encoded ``[x, 1 - x]`` (captured by a hook on the model's ``EncodedInput.encode``), i.e. before the
in-model normalisation. Completeness then reads

    logit = sum(contributions) + constant + logit_bias (+ residual)

with ``constant = -sum(mean6 * W(x))`` from the normalisation's mean (0 for ``zero_mean``),
``logit_bias`` from a ``LogitLayer``, ``tokens`` the share of the learned additive inputs of a ViT
(class / register / distillation tokens, position embeddings: ``p . d logit / d p``; they enter the
explanation-mode network linearly, like the image), ``terms`` the share ``c . d logit / d c`` of
every other additive constant (biases the recipe kept, a running mean, FRN's threshold: see
:func:`surgery.explain.completeness.additive_constants`; generated encodings, XCiT's Fourier
position encoding: :func:`~surgery.explain.completeness.generated_constants`), and ``residual`` what is left: 0 up to
rounding for a complete conversion, whatever the recipe kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.explain.completeness import LEARNED_INPUT, additive_constants, generated_constants
from surgery.layers.encoding import EncodedInput, Normalize
from surgery.layers.explanation_mode import explanation_mode
from surgery.layers.heads import LogitLayer

__all__ = ["Explanation", "explain", "gradient_to_rgba"]


@dataclass
class Explanation:
    """Result of :func:`explain` for a batch of N images (all tensors detached, on the input device).

    ``inputs``: the explained input (N, C, H, W): the encoded ``[x, 1-x]`` (C=6) for add_inverse
    models, else the images. ``weights``: ``W(x) = d logit[target] / d inputs``. ``contributions``:
    ``sum_c inputs * weights`` (N, H, W). ``constant``: ``-sum(mean * weights)`` (N,), the part of
    the logit due to the in-model normalisation's mean. ``logit_bias``: the LogitLayer bias (0 if
    none). ``rgba``: (N, H, W, 4) colour explanation in [0, 1].
    """

    logits: Tensor
    target: Tensor
    inputs: Tensor
    weights: Tensor
    contributions: Tensor
    constant: Tensor
    logit_bias: float
    rgba: Tensor
    tokens: dict[str, Tensor] = field(default_factory=dict)
    terms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def explained_logits(self) -> Tensor:
        """``logits[n, target[n]]``."""
        return self.logits.gather(1, self.target[:, None]).squeeze(1)

    @property
    def residual(self) -> Tensor:
        """Logit minus (contributions + constant + token shares + other terms + logit bias): 0 up to
        rounding for a complete conversion."""
        total = self.contributions.flatten(1).sum(1) + self.constant + self.logit_bias
        for share in [*self.tokens.values(), *self.terms.values()]:
            total = total + share
        return self.explained_logits - total

    @property
    def relative_residual(self) -> Tensor:
        """``|residual| / |logit - logit_bias|`` per image: the share of the explained part that the
        explanation misses (``surgery explain`` warns above 1e-4)."""
        part = (self.explained_logits - self.logit_bias).abs()
        return self.residual.abs() / part.clamp(min=torch.finfo(part.dtype).tiny)


def _same_image_encoders(calls: dict[int, tuple[Tensor, Tensor]], images: Tensor) -> list[int]:
    """The encoders whose first call encoded the model's input image itself, in module order.

    Their weights add up: each encodes the same ``[x, 1-x]`` (FastViT's two stem branches). An
    encoder that saw a resized image (CrossViT's 224-px branch of a 240-px model) is left out with a
    warning: its share of the logit then stays in ``residual``. Without a match (a model that
    transforms the image before its first layer), the first encoder, as before (with the warning
    when there are others).
    """
    if not calls:
        return []
    order = sorted(calls)
    same = [
        i
        for i in order
        if calls[i][0].shape == images.shape
        and torch.equal(calls[i][0], images.detach().to(calls[i][0].dtype))
    ]
    if not same:
        same = order[:1]
    if len(same) < len(order):
        warnings.warn(
            f"explain(): {len(order) - len(same)} of {len(order)} encoded first layers see a transformed "
            "image (e.g. resized per branch); their share of the logit is left in `residual`",
            stacklevel=3,
        )
    return same


def gradient_to_rgba(
    inputs6: Tensor, weights6: Tensor, smooth: int = 15, alpha_percentile: float = 99.5
) -> Tensor:
    """Colour explanation of B-cos v2 ``gradient_to_image`` (reference section 1.3), batched.

    inputs6, weights6: (N, 6, H, W) encoded image ``[x, 1-x]`` and its dynamic weights. Colour
    channel k = weight on x_k relative to weight on 1 - x_k (after per-pixel max-abs normalisation
    and clamping at 0); alpha = L2 norm of the weights where the contribution is positive, smoothed
    with a ``smooth``-sized box filter and clipped at the ``alpha_percentile`` percentile.
    Returns (N, H, W, 4) in [0, 1].
    """
    if inputs6.shape[1] != 6 or weights6.shape != inputs6.shape:
        raise ValueError(f"expected (N, 6, H, W) inputs and weights, got {tuple(inputs6.shape)}")
    contribs = (inputs6 * weights6).sum(1, keepdim=True)
    w = weights6 / (weights6.abs().amax(1, keepdim=True) + 1e-12)
    w = w.clamp(min=0)
    rgb = w[:, :3] / (w[:, :3] + w[:, 3:] + 1e-12)
    alpha = weights6.norm(p=2, dim=1, keepdim=True)
    alpha = torch.where(contribs < 0, torch.full_like(alpha, 1e-12), alpha)
    if smooth:
        alpha = F.avg_pool2d(alpha, smooth, stride=1, padding=(smooth - 1) // 2)
    q = torch.quantile(alpha.flatten(1).float(), alpha_percentile / 100, dim=1).to(alpha.dtype)
    alpha = (alpha / q.clamp(min=1e-12).view(-1, 1, 1, 1)).clamp(0, 1)
    return torch.cat([rgb, alpha], dim=1).permute(0, 2, 3, 1)


def _find_logit_bias(model: nn.Module) -> float:
    """Bias of the model's last ``LogitLayer`` (0 if none); its temperature is part of W(x)."""
    bias = 0.0
    for m in model.modules():
        if isinstance(m, LogitLayer) and m.logit_bias is not None:
            bias = float(m.logit_bias)
    return bias


def _additive_inputs(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's learned additive inputs by name (shape (1, ...) or (T, D): shared by the batch)."""
    return {n: p for n, p in model.named_parameters() if LEARNED_INPUT.search(n) and p.dim() >= 2}


def _other_constants(model: nn.Module, tokens: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Additive constants that are neither tokens nor the encodings' means (those are ``constant``)."""
    encoders = [n for n, m in model.named_modules() if isinstance(m, EncodedInput)]
    return {
        n: t
        for n, t in additive_constants(model).items()
        if n not in tokens and not any(n.startswith(f"{e}.normalize.") for e in encoders)
    }


def _token_shares(selected: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-image ``sum(p * d selected[n] / d p)`` for each parameter (one batched backward)."""
    n = selected.shape[0]
    eye = torch.eye(n, dtype=selected.dtype, device=selected.device)
    tensors = list(params.values())
    try:
        grads = torch.autograd.grad(
            selected, tensors, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
    except RuntimeError:  # an op without a batching rule: one backward per image
        rows = [
            torch.autograd.grad(selected[i], tensors, retain_graph=True, allow_unused=True) for i in range(n)
        ]
        grads = tuple(
            None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(tensors))
        )
    zero = torch.zeros(n, dtype=selected.dtype, device=selected.device)
    return {
        name: zero if g is None else (p.detach().unsqueeze(0) * g).flatten(1).sum(1).detach()
        for (name, p), g in zip(params.items(), grads, strict=True)
    }


def _as_target(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
    n = logits.shape[0]
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, device=logits.device).long().flatten()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries for a batch of {n}")
    return t


def explain(
    model: nn.Module,
    images: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    smooth: int = 15,
    alpha_percentile: float = 99.5,
) -> Explanation:
    """Explain ``model`` on ``images`` (N, C, H, W) for class ``target`` (default: the prediction).

    Runs one forward and one backward inside :func:`surgery.layers.explanation_mode`. For a model
    with an ``EncodedInput`` (``encode input add_inverse`` / ``normalize_inside``), ``images`` are
    raw [0, 1] images and the explanation is w.r.t. the encoded input; otherwise w.r.t. ``images``
    (input x gradient; a 6-channel input is taken as ``[x, 1-x]`` already). The model should be in
    eval mode (train-mode batch statistics couple the images of the batch). The model's parameters
    get no gradients.
    """
    if images.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if model.training:
        warnings.warn("explain(): model is in training mode; call model.eval() first", stacklevel=2)
    # every EncodedInput (CrossViT, FastViT encode two first layers): its first call's input and leaf
    encoders = [m for m in model.modules() if isinstance(m, EncodedInput)]
    calls: dict[int, tuple[Tensor, Tensor]] = {}

    def make_hook(i: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
        def hook(_m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
            if i in calls:  # only the first call (the model input)
                return out
            leaf = out.detach().requires_grad_(True)
            calls[i] = (inp[0].detach(), leaf)
            return leaf

        return hook

    handles = [m.encode.register_forward_hook(make_hook(i)) for i, m in enumerate(encoders)]
    x = images.detach().clone().requires_grad_(True)  # used when no EncodedInput is hooked
    additive = _additive_inputs(model)
    others = _other_constants(model, additive)
    frozen = [p for p in [*additive.values(), *others.values()] if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad(), explanation_mode(model), generated_constants(model) as generated:
            logits = model(x)
            tgt = _as_target(target, logits)
            selected = logits.gather(1, tgt[:, None]).squeeze(1)
            used = _same_image_encoders(calls, x)
            leaves = [calls[i][1] for i in used] or [x]
            constants = {**additive, **others, **generated}
            grads = torch.autograd.grad(selected.sum(), leaves, retain_graph=bool(constants), allow_unused=True)
            wrt = leaves[0]
            grad = torch.stack([torch.zeros_like(wrt) if g is None else g for g in grads]).sum(0)
            shares = _token_shares(selected, constants) if constants else {}
            tokens = {n: shares[n] for n in additive}
            terms = {n: s for n, s in shares.items() if n not in additive and bool(s.abs().max() > 0)}
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    inputs = wrt.detach()
    grad = grad.detach()
    contributions = (inputs * grad).sum(1)
    constant = torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
    for i, g in zip(used, grads, strict=False):  # no encoder used: grads is x's
        norm = encoders[i].normalize
        if isinstance(norm, Normalize) and g is not None:
            constant = constant - (norm.mean.to(g.dtype).view(1, -1, 1, 1) * g).flatten(1).sum(1)
    if inputs.shape[1] == 6:
        x6, w6 = inputs, grad
    elif inputs.shape[1] == 3:  # a standard model seen as B-cos with first layer [W, -W]/2
        x6, w6 = torch.cat([inputs, 1 - inputs], 1), torch.cat([grad, -grad], 1) / 2
    else:
        x6 = w6 = None
    if x6 is not None:
        rgba = gradient_to_rgba(x6, w6, smooth=smooth, alpha_percentile=alpha_percentile)
    else:  # no colour semantics: grey, alpha from the positive contributions
        pos = contributions.clamp(min=0)
        a = pos / pos.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
        rgba = torch.stack([torch.full_like(a, 0.5)] * 3 + [a], dim=-1)
    return Explanation(
        logits=logits.detach(),
        target=tgt.detach(),
        inputs=inputs,
        weights=grad,
        contributions=contributions,
        constant=constant,
        logit_bias=_find_logit_bias(model),
        rgba=rgba.detach(),
        tokens=tokens,
        terms=terms,
    )
