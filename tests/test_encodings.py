"""Input encodings: exact function preservation, the recorded contract, B-cosification at b=1."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from surgery.layers import (
    AddInverse,
    BatchNormUncentered2d,
    BcosConv2d,
    BcosPooledHead,
    EncodedInput,
    LogitLayer,
    Normalize,
)
from surgery.ops.encodings import EncodeContext, add_inverse, normalize_inside
from surgery.registry import REGISTRY

torch.set_num_threads(2)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalized(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def small_cnn() -> nn.Sequential:
    """conv-BN-ReLU-maxpool-conv(grouped)-BN-ReLU-pool-fc with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AvgPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, 2, 1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(8, 5),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def bcosify_small_cnn(model: nn.Sequential, *, b: float, keep_bias: bool) -> nn.Sequential:
    """What the B-cosify recipe does, by hand: encode, B-cos convs, uncentred BN, head reorder."""
    add_inverse(model, EncodeContext("0", IMAGENET_MEAN, IMAGENET_STD))
    model[0].conv = BcosConv2d.from_module(model[0].conv, b=b, bias=keep_bias)
    model[4] = BcosConv2d.from_module(model[4], b=b, bias=keep_bias)
    for i in (1, 5):
        model[i] = BatchNormUncentered2d.from_module(model[i]).eval()
        if not keep_bias:
            model[i].bias = None
    model[7] = nn.Identity()
    model[8] = nn.Identity()
    model[9] = BcosPooledHead.from_module(model[9], b=b, bias=keep_bias)
    model.append(LogitLayer.from_module(model[9], bias=0.0 if keep_bias else None))
    return model.eval()


@pytest.mark.parametrize("zero_mean", [False, True])
def test_add_inverse_is_exact_float64(zero_mean: bool) -> None:
    model = small_cnn().double()
    mean, std = (0.5, 0.25, 0.375), (0.25, 0.5, 0.125)  # exactly representable
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    ref = model(normalized(x, mean, std))
    ctx = EncodeContext("0", mean, std, (3, 16, 16))
    add_inverse(model, ctx, zero_mean=zero_mean)
    model.double()
    assert isinstance(model[0], EncodedInput)
    assert model[0].conv.weight.shape == (8, 6, 3, 3)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-12)


def test_add_inverse_weights_and_contract() -> None:
    model = small_cnn()
    w = model[0].weight.detach().clone()
    ctx = EncodeContext("0", IMAGENET_MEAN, IMAGENET_STD, (3, 32, 32))
    add_inverse(model, ctx)
    torch.testing.assert_close(model[0].conv.weight, torch.cat([w, -w], 1) / 2)
    c = ctx.contract
    assert c["encoding"] == "add_inverse" and c["channels"] == 3 and c["encoded_channels"] == 6
    assert c["range"] == [0.0, 1.0] and c["normalize_outside"] is False
    assert c["mean"] == pytest.approx(list(IMAGENET_MEAN))
    assert c["std"] == pytest.approx(list(IMAGENET_STD))
    assert c["encoded_mean"] == pytest.approx([*IMAGENET_MEAN, *(1 - m for m in IMAGENET_MEAN)])
    assert c["encoded_std"] == pytest.approx(list(IMAGENET_STD) * 2)
    assert c["first_layer"] == "0.conv"
    keys = set(model.state_dict())
    assert {"0.conv.weight", "0.conv.bias", "0.normalize.mean", "0.normalize.std"} <= keys
    # attribute reads fall through to the wrapped conv
    assert model[0].in_channels == 6 and model[0].kernel_size == (3, 3)
    with pytest.raises(ValueError, match="already"):
        add_inverse(model, EncodeContext("0", IMAGENET_MEAN, IMAGENET_STD))


def test_zero_mean_weights() -> None:
    model = small_cnn()
    w = model[0].weight.detach().clone()
    ctx = EncodeContext("0", IMAGENET_MEAN, IMAGENET_STD)
    add_inverse(model, ctx, zero_mean=True)
    mu = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(model[0].conv.weight, torch.cat([w * (1 - mu), -w * mu], 1))
    assert ctx.contract["encoding"] == "add_inverse_zero_mean"
    assert ctx.contract["encoded_mean"] == [0.0] * 6
    assert not model[0].normalize.has_mean


def test_unknown_normalisation_means_identity() -> None:
    model = small_cnn()
    x = torch.rand(2, 3, 16, 16)
    ref = model(x)
    add_inverse(model, EncodeContext("0", None, None))
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet18", {}), ("test_vit", {"img_size": 32}), ("test_convnext", {})],
)
def test_add_inverse_on_timm_models(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **kwargs).eval()
    cfg = model.pretrained_cfg
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(normalized(x, cfg["mean"], cfg["std"]))
        ctx = EncodeContext(cfg["first_conv"], tuple(cfg["mean"]), tuple(cfg["std"]), cfg["input_size"])
        add_inverse(model, ctx)
        out = model(x)
        feats = model.forward_features(x)
    assert type(model).__module__.startswith("timm")  # class and methods kept
    assert feats.shape[0] == 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # timm's data config now describes the new contract: no normalisation outside the model
    assert tuple(model.pretrained_cfg["mean"]) == (0.0, 0.0, 0.0)
    assert tuple(model.pretrained_cfg["std"]) == (1.0, 1.0, 1.0)


def test_normalize_inside_is_exact() -> None:
    model = small_cnn()
    x = torch.rand(2, 3, 16, 16)
    ref = model(normalized(x, IMAGENET_MEAN, IMAGENET_STD))
    ctx = EncodeContext("0", IMAGENET_MEAN, IMAGENET_STD)
    normalize_inside(model, ctx)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    assert ctx.contract["encoding"] == "normalize_inside"


def test_bcosification_at_b1_with_biases_reproduces_the_logits() -> None:
    """add_inverse + uncentred BN (folded) + B-cos convs at b=1 + head reorder, biases kept."""
    model = small_cnn()
    x = torch.rand(3, 3, 24, 24)
    with torch.no_grad():
        ref = model(normalized(x, IMAGENET_MEAN, IMAGENET_STD))
        converted = bcosify_small_cnn(model, b=1.0, keep_bias=True)
        out = converted(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # at b=2 without biases it is a different function, with the logit bias -ln(C-1)
    fresh = bcosify_small_cnn(small_cnn(), b=2.0, keep_bias=False)
    assert fresh[-1].logit_bias == pytest.approx(-math.log(4))
    assert not any(
        getattr(m, "bias", None) is not None for m in fresh.modules() if not isinstance(m, LogitLayer)
    )


def test_resnet18_bcosified_at_b1_reproduces_the_logits() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=6).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(normalized(x, IMAGENET_MEAN, IMAGENET_STD))
        add_inverse(model, EncodeContext("conv1", IMAGENET_MEAN, IMAGENET_STD))
        for name, m in list(model.named_modules()):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if type(m) is nn.Conv2d:
                setattr(parent, attr, BcosConv2d.from_module(m, b=1.0, bias=True))
            elif type(m) is nn.BatchNorm2d:
                setattr(parent, attr, BatchNormUncentered2d.from_module(m).eval())
        model.global_pool = nn.Identity()
        model.fc = BcosPooledHead.from_module(model.fc, b=1.0, bias=True)
        out = model(x)
    assert not any(type(m) in (nn.Conv2d, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_encodings_are_registered() -> None:
    entry = REGISTRY.get("encoding", "add_inverse")
    assert entry is not None and entry.target is add_inverse
    assert entry.params["zero_mean"].annotation is bool and entry.params["zero_mean"].default is False
    assert REGISTRY.get("encoding", "normalize_inside") is not None
    assert REGISTRY.get("layer", "AddInverse").target(None).dim == 1
    norm = REGISTRY.get("layer", "Normalize").target(None, mean=[0.5], std=[0.25])
    assert isinstance(norm, Normalize)
    torch.testing.assert_close(norm(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 2.0))
    assert isinstance(AddInverse(), nn.Module)


def test_first_layer_must_be_a_conv() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(TypeError):
        add_inverse(model, EncodeContext("1", None, None))


def test_bcos_conv_built_from_the_encoded_first_layer_keeps_the_encoding() -> None:
    model = small_cnn()
    x = torch.rand(2, 3, 16, 16)
    ref = model(normalized(x, IMAGENET_MEAN, IMAGENET_STD))
    add_inverse(model, EncodeContext("0", IMAGENET_MEAN, IMAGENET_STD))
    wrapper = model[0]
    built = BcosConv2d.from_module(wrapper, b=1.0, bias=True)  # what `replace @first_conv with ...` does
    assert built is wrapper and isinstance(built.conv, BcosConv2d) and built.conv.in_channels == 6
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


BCOSIFY_RECIPE = """
recipe "bcosify-test" v1
param b: float = 2.0
param keep_bias: bool = false
encode input add_inverse
replace Conv2d with BcosConv2d(b=b, bias=keep_bias)
replace BatchNorm2d with BatchNormUncentered2d
remove @pool
replace @classifier with BcosPooledHead(b=b, bias=keep_bias)
insert LogitLayer() after @classifier
expect no Conv2d | Linear | BatchNorm2d
"""


def test_recipe_through_the_engine_at_b1_reproduces_the_logits() -> None:
    import surgery

    result = surgery.apply(BCOSIFY_RECIPE, "timm:test_resnet", b=1.0, keep_bias=True)
    contract = result.contract
    assert contract["encoding"] == "add_inverse" and contract["normalize_outside"] is False
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = result.original.eval()(normalized(x, tuple(contract["mean"]), tuple(contract["std"])))
        out = result.model.eval()(x)
    c = ref.shape[1]
    torch.testing.assert_close(out, ref - math.log(c - 1), rtol=1e-4, atol=1e-4)
