"""B-cos layers: exactness at b=1, dynamic linearity in explanation mode, weight transfer, heads."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from surgery.layers import (
    BatchNormUncentered2d,
    BcosConv2d,
    BcosLinear,
    BcosPooledHead,
    BcosTokenHead,
    DetachableAttention,
    DetachableGELU,
    DetachableGroupNorm,
    DetachableHardswish,
    DetachableLayerNorm,
    DetachableSiLU,
    LogitLayer,
    PositionNorm,
    UniformOffLabelsBCEWithLogitsLoss,
    explanation_mode,
)
from surgery.registry import REGISTRY

torch.set_num_threads(2)

CONV_CASES = [
    # cin, cout, k, stride, padding, dilation, groups, padding_mode
    (4, 6, 3, 1, 1, 1, 1, "zeros"),
    (4, 6, 3, 2, 1, 1, 2, "zeros"),
    (6, 6, 5, 2, 2, 1, 3, "zeros"),
    (4, 8, 3, 1, 2, 2, 1, "zeros"),
    (4, 8, 3, 2, 3, 2, 4, "zeros"),
    (4, 4, 3, 1, 3, 1, 1, "zeros"),  # padding > k/2: ones-conv path
    (3, 5, 4, 1, "same", 1, 1, "zeros"),  # even kernel, asymmetric 'same'
    (4, 4, 3, 1, 1, 1, 4, "reflect"),
    (4, 4, 3, 1, 1, 1, 1, "circular"),
    (8, 4, 1, 1, 0, 1, 1, "zeros"),
    (8, 4, 1, 2, 0, 1, 1, "zeros"),
]


def setmod(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def brute_force_bcos_conv(conv: nn.Conv2d, x: torch.Tensor, b: float) -> torch.Tensor:
    """B-cos conv from first principles: unfold every patch, cos per group, no tricks."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        pad = (0, 0)
    elif conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        pad = (0, 0)
    else:
        pad = conv.padding
    out = F.conv2d(x, conv.weight, None, conv.stride, pad, conv.dilation, conv.groups)
    n = x.shape[0]
    g = conv.groups
    cols = F.unfold(x, conv.kernel_size, conv.dilation, pad, conv.stride)  # (N, C*k*k, L)
    cols = cols.view(n, g, -1, cols.shape[-1])
    norms = (cols.square().sum(2) + 1e-6).sqrt()  # (N, G, L)
    norms = norms.repeat_interleave(conv.out_channels // g, dim=1).view_as(out)
    if b == 2:
        return out.abs() / norms * out
    return ((out / norms).abs() + 1e-6).pow(b - 1) * out


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("b", [2.0, 2.5])
def test_bcos_conv_matches_brute_force(case: tuple, b: float) -> None:
    cin, cout, k, s, p, d, g, mode = case
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=False, padding_mode=mode).double()
    x = torch.randn(2, cin, 9, 11, dtype=torch.float64)
    ref = brute_force_bcos_conv(conv, x, b)
    layer = BcosConv2d.from_module(conv, b=b)
    y = layer(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CONV_CASES)
def test_bcos_conv_b1_with_bias_is_the_original(case: tuple) -> None:
    cin, cout, k, s, p, d, g, mode = case
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=True, padding_mode=mode)
    x = torch.randn(2, cin, 10, 9)
    ref = conv(x)
    for max_out in (1, 2):
        layer = BcosConv2d.from_module(conv, b=1.0, bias=True, max_out=max_out)
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-6)


def test_b1_is_exactly_linear() -> None:
    torch.manual_seed(0)
    conv = BcosConv2d(4, 6, 3, 2, 1, groups=2, b=1.0, normalize_weights=True).double()
    lin = BcosLinear(7, 3, b=1.0, normalize_weights=True).double()
    x, z = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(conv(2 * x - 3 * z), 2 * conv(x) - 3 * conv(z), rtol=1e-12, atol=1e-12)
    w = conv.weight / conv.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, None, 2, 1, 1, 2), rtol=1e-12, atol=1e-12)
    u, v = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(lin(u - 0.5 * v), lin(u) - 0.5 * lin(v), rtol=1e-12, atol=1e-12)


def test_from_linear_and_linear_layer() -> None:
    torch.manual_seed(0)
    fc = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    torch.testing.assert_close(BcosLinear.from_module(fc, b=1, bias=True)(x), fc(x), rtol=0, atol=1e-6)
    conv1x1 = BcosConv2d.from_module(fc, b=1, bias=True)
    assert conv1x1.weight.shape == (4, 6, 1, 1)
    torch.testing.assert_close(conv1x1(x[:, :, None, None])[:, :, 0, 0], fc(x), rtol=0, atol=1e-6)
    assert BcosLinear.from_module(fc).bias is None  # bias dropped unless asked for
    lin = BcosLinear.from_module(fc, b=2)
    out = F.linear(x, fc.weight)
    ref = out.abs() / (x.norm(dim=1, keepdim=True) + 1e-12) * out
    torch.testing.assert_close(lin(x), ref)


def _check_dynamic_linear(model: nn.Module, x: torch.Tensor, tol: float = 1e-10) -> None:
    """In explanation mode every output equals (d output / d x) . x exactly."""
    with explanation_mode(model):
        x = x.clone().requires_grad_(True)
        y = model(x).flatten(1)
        for n in range(y.shape[0]):
            for k in range(y.shape[1]):
                (g,) = torch.autograd.grad(y[n, k], x, retain_graph=True)
                lin, val = float((g * x.detach()).sum()), float(y[n, k].detach())
                assert abs(lin - val) <= tol * max(1.0, abs(val)), (n, k)


def _bcos_stack() -> nn.Module:
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bnu = BatchNormUncentered2d.from_module(bn)
    bnu.bias = None
    gn = DetachableGroupNorm(2, 8)
    gn.bias = None
    pn = PositionNorm(8)
    pn.bias = None
    model = nn.Sequential(
        BcosConv2d(6, 8, 3, 1, 1, b=2.0, normalize_weights=True),
        bnu,
        nn.ReLU(),
        BcosConv2d(8, 8, 3, 2, 2, dilation=2, groups=2, b=2.5, max_out=2),
        gn,
        DetachableGELU(),
        nn.AvgPool2d(3, 2, 1),
        BcosConv2d(8, 8, 3, 1, 1, b=1.5, normalize_weights=False),
        pn,
        DetachableSiLU(),
        BcosPooledHead(8, 5, b=2.0),
        LogitLayer(logit_temperature=2.0),
    )
    return model.double().eval()


def test_explanation_mode_makes_the_stack_dynamic_linear() -> None:
    model = _bcos_stack()
    x = torch.rand(2, 6, 12, 12, dtype=torch.float64)
    _check_dynamic_linear(model, x, tol=1e-10)
    # outside explanation mode the gradient is not W(x): the identity fails
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    (g,) = torch.autograd.grad(y[0, 0], xg)
    assert abs(float((g * x).sum() - y[0, 0].detach())) > 1e-6
    # explanation mode changes gradients, never values
    with explanation_mode(model):
        torch.testing.assert_close(model(x), y.detach(), rtol=1e-12, atol=1e-12)
    assert not any(getattr(m, "explanation", False) for m in model.modules())


def test_batchnorm_uncentered_fold_is_exact_in_eval() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(3, 5, 4, 4)
    ref = bn(x)
    bnu = BatchNormUncentered2d.from_module(bn).eval()
    torch.testing.assert_close(bnu(x), ref, rtol=0, atol=2e-6)
    plain = BatchNormUncentered2d.from_module(bn, fold_mean=False).eval()
    expect = bn.weight.view(1, -1, 1, 1) * x / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt()
    torch.testing.assert_close(plain(x), expect + bn.bias.view(1, -1, 1, 1), rtol=0, atol=2e-6)
    assert set(bnu.state_dict()) == set(bn.state_dict())
    # training: divides by the centred batch std, updates running_var
    bnu.train()
    before = bnu.running_var.clone()
    y = bnu(x)
    var = x.var(dim=(0, 2, 3), unbiased=False)
    expect = bnu.weight.view(1, -1, 1, 1) * x / (var.view(1, -1, 1, 1) + bn.eps).sqrt()
    torch.testing.assert_close(y, expect + bnu.bias.view(1, -1, 1, 1), rtol=0, atol=2e-6)
    torch.testing.assert_close(bnu.running_var, 0.9 * before + 0.1 * var)


def test_norms_equal_originals_outside_explanation_mode() -> None:
    torch.manual_seed(0)
    ln = nn.LayerNorm(6)
    ln.weight.data.uniform_(0.5, 1.5)
    ln.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 6)
    dln = DetachableLayerNorm.from_module(ln)
    assert torch.equal(dln(x), ln(x))
    with explanation_mode(dln):
        torch.testing.assert_close(dln(x), ln(x), rtol=0, atol=1e-5)
    ln2d = timm.layers.LayerNorm2d(6)
    ln2d.weight.data.uniform_(0.5, 1.5)
    m = torch.randn(2, 6, 4, 5)
    d2 = DetachableLayerNorm.from_module(ln2d)
    assert d2.channels_first
    assert torch.equal(d2(m), ln2d(m))
    pn = PositionNorm.from_module(ln2d)
    assert torch.equal(pn(m), ln2d(m))
    with explanation_mode(pn):
        torch.testing.assert_close(pn(m), ln2d(m), rtol=0, atol=1e-5)
    gn = nn.GroupNorm(3, 6)
    gn.weight.data.uniform_(0.5, 1.5)
    dgn = DetachableGroupNorm.from_module(gn)
    assert torch.equal(dgn(m), gn(m))
    with explanation_mode(dgn):
        torch.testing.assert_close(dgn(m), gn(m), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("layer", "ref"),
    [
        (DetachableGELU(), nn.GELU()),
        (DetachableGELU.from_module(nn.GELU(approximate="tanh")), nn.GELU(approximate="tanh")),
        (DetachableGELU.from_module(timm.layers.GELUTanh()), nn.GELU(approximate="tanh")),
        (DetachableSiLU(), nn.SiLU()),
        (DetachableHardswish(), nn.Hardswish()),
    ],
)
def test_gated_activations(layer: nn.Module, ref: nn.Module) -> None:
    x = torch.linspace(-6, 6, 301, dtype=torch.float64).view(1, -1)
    assert torch.equal(layer(x), ref(x))
    with explanation_mode(layer):
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-12, atol=1e-12)
    _check_dynamic_linear(layer, x[:, ::30], tol=1e-12)


def test_gelu_from_module_keeps_approximation() -> None:
    assert DetachableGELU.from_module(nn.GELU(approximate="tanh")).approximate == "tanh"
    assert DetachableGELU.from_module(None).approximate == "none"


@pytest.mark.parametrize("fused", [True, False])
def test_attention_equal_and_dynamic_linear(fused: bool) -> None:
    from timm.layers.attention import Attention

    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, qkv_bias=True).eval()
    attn.fused_attn = fused
    x = torch.randn(2, 5, 8)
    ref = attn(x)
    det = DetachableAttention.from_module(attn)
    assert isinstance(det, Attention) and det.fused_attn is fused
    assert torch.equal(det(x), ref)
    with explanation_mode(det):
        torch.testing.assert_close(det(x), ref, rtol=1e-5, atol=1e-6)
    nb = Attention(8, num_heads=2, qkv_bias=False, proj_bias=False).double().eval()
    nb.fused_attn = fused
    _check_dynamic_linear(DetachableAttention.from_module(nb), torch.randn(1, 4, 8, dtype=torch.float64))


def test_attention_rejects_other_modules() -> None:
    with pytest.raises(TypeError):
        DetachableAttention.from_module(nn.Linear(2, 2))


def test_logit_layer_and_loss() -> None:
    fc = nn.Linear(4, 10)
    layer = LogitLayer.from_module(fc)
    assert layer.logit_bias == pytest.approx(-math.log(9))
    assert LogitLayer.from_module(None).logit_bias is None
    assert LogitLayer.from_module(fc, bias=0.5, temperature=2.0)(torch.ones(1)).item() == pytest.approx(1.0)
    logits = torch.randn(3, 4)
    target = torch.tensor([0, 3, 1])
    loss = UniformOffLabelsBCEWithLogitsLoss()(logits, target)
    dense = torch.full((3, 4), 0.25)
    dense[torch.arange(3), target] = 1.0
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, dense))


@pytest.mark.parametrize(
    ("name", "pool", "classifier", "exact"),
    [
        ("resnet18", "global_pool", "fc", True),
        ("test_efficientnet", "global_pool", "classifier", True),
        ("regnetx_002", "head.global_pool", "head.fc", True),
        ("regnetx_002", None, "head", True),  # built from the whole ClassifierHead
        ("mobilenetv2_050", "global_pool", "classifier", True),
        ("mobilenetv3_small_050", "global_pool", "classifier", False),  # conv_head after the pool
        ("test_convnext", None, "head", False),  # per-position LayerNorm2d before the classifier
    ],
)
def test_pooled_head_composes_on_timm_cnns(name: str, pool: str | None, classifier: str, exact: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    if pool:
        setmod(model, pool, nn.Identity())
    if name.startswith("mobilenetv3"):
        setmod(model, "flatten", nn.Identity())  # the reordered head needs the map to survive
    setmod(model, classifier, BcosPooledHead.from_module(model.get_submodule(classifier), b=1.0, bias=True))
    with torch.no_grad():
        y = model(x)
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    assert y.shape == (2, 7)
    assert feats.dim() in (2, 4)
    if exact:  # b=1 with bias: the classifier commutes with average pooling
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_pooled_head_on_densenet() -> None:
    from timm.models.densenet import DenseNet

    torch.manual_seed(0)
    model = DenseNet(growth_rate=8, block_config=(2, 2), num_classes=5).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.global_pool = nn.Identity()
        model.classifier = BcosPooledHead.from_module(model.classifier, b=1.0, bias=True)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_pooled_head_accepts_pooled_input_and_matches_b1() -> None:
    torch.manual_seed(0)
    fc = nn.Linear(6, 3, bias=False)
    head = BcosPooledHead.from_module(fc, b=1.0)
    fmap = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(head(fmap), fc(fmap.mean((2, 3))), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head(fmap.mean((2, 3))), fc(fmap.mean((2, 3))), rtol=1e-5, atol=1e-6)


def test_token_head_on_vit() -> None:
    torch.manual_seed(0)
    # class-token ViT: the per-token head then token 0 is the original head exactly (any b)
    vit = timm.create_model("test_vit", num_classes=6, img_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = vit(x)
        vit.global_pool = ""
        vit.head = BcosTokenHead.from_module(vit.head, b=1.0, bias=True, pool="token")
        torch.testing.assert_close(vit(x), ref, rtol=1e-5, atol=1e-6)
    # mean-pooled ViT without fc_norm: head per token then mean == mean then head at b=1
    vit = timm.create_model("test_vit", num_classes=6, img_size=32, global_pool="avg", fc_norm=False).eval()
    with torch.no_grad():
        ref = vit(x)
        vit.global_pool = ""
        vit.head = BcosTokenHead.from_module(
            vit.head, b=1.0, bias=True, num_prefix_tokens=vit.num_prefix_tokens
        )
        torch.testing.assert_close(vit(x), ref, rtol=1e-4, atol=1e-5)
        vit.head.b = 2.0
        assert vit(x).shape == (2, 6)


def test_bf16_autocast_is_safe() -> None:
    torch.manual_seed(0)
    conv = BcosConv2d(16, 8, 3, 1, 1, b=2.0)
    x = torch.randn(2, 16, 8, 8) * 100.0  # squares far beyond the fp16 range
    with torch.no_grad():
        ref = conv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2 * float(ref.abs().max()))


def test_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    cases = [
        (BcosConv2d(8, 8, 3, 1, 2, dilation=2, groups=2, b=2.5, max_out=2), torch.randn(1, 8, 8, 8)),
        (BcosLinear(8, 4, b=2.0), torch.randn(3, 8)),
        (BatchNormUncentered2d(8).eval(), torch.randn(2, 8, 4, 4)),
    ]
    for module, x in cases:
        for expl in (False, True):
            module.set_explanation_mode(expl)
            compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), module(x))
    torch._dynamo.reset()


def test_everything_is_registered_with_typed_params() -> None:
    names = set(REGISTRY.names("layer"))
    expected = {
        "BcosConv2d",
        "BcosLinear",
        "BatchNormUncentered2d",
        "DetachableLayerNorm",
        "DetachableGroupNorm",
        "PositionNorm",
        "DetachableGELU",
        "DetachableAttention",
        "LogitLayer",
        "BcosPooledHead",
        "BcosTokenHead",
        "AddInverse",
        "Normalize",
        "Identity",
        "AvgPool2d",
        "ReLU",
        "DetachableSiLU",
    }
    assert expected <= names
    entry = REGISTRY.get("layer", "BcosConv2d")
    assert entry.params["b"].annotation is float and entry.params["b"].default == 2.0
    assert entry.params["max_out"].annotation is int
    assert entry.transfer
    pool = REGISTRY.get("layer", "AvgPool2d").target(nn.MaxPool2d(3, 2, 1))
    assert isinstance(pool, nn.AvgPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    bcos = REGISTRY.get("layer", "BcosConv2d").target(nn.Conv2d(3, 4, 3), b=1.5)
    assert isinstance(bcos, BcosConv2d) and bcos.b == 1.5


def test_token_head_takes_pooling_from_the_engine_context() -> None:
    from types import SimpleNamespace

    vit = timm.create_model("test_vit", num_classes=3, img_size=32, global_pool="avg", reg_tokens=2).eval()
    head = BcosTokenHead.from_module(
        vit.head, b=2.0, context=SimpleNamespace(model=vit, name="head", meta=False)
    )
    assert vit.global_pool == "" and head.pool == "avg" and head.num_prefix_tokens == 3
    vit.head = head
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    tok = timm.create_model("test_vit", num_classes=3, img_size=32)
    head = BcosTokenHead.from_module(tok.head, context=SimpleNamespace(model=tok, name="head", meta=False))
    assert head.pool == "token" and tok.global_pool == ""


def test_from_module_works_on_meta_modules() -> None:
    """The planner builds layers on the meta device: no data access allowed."""
    meta = torch.device("meta")
    bn = nn.BatchNorm2d(4, device=meta)
    ln2d = timm.layers.LayerNorm2d(4, device=meta)
    built = [
        BcosConv2d.from_module(nn.Conv2d(3, 4, 3, device=meta), b=2.0, max_out=2, bias=True),
        BcosLinear.from_module(nn.Linear(3, 4, device=meta)),
        BcosPooledHead.from_module(nn.Linear(3, 4, device=meta)),
        BatchNormUncentered2d.from_module(bn),
        DetachableLayerNorm.from_module(ln2d),
        PositionNorm.from_module(bn),
        DetachableGroupNorm.from_module(nn.GroupNorm(2, 4, device=meta)),
    ]
    for m in built:
        assert all(t.device.type == "meta" for t in [*m.parameters(), *m.buffers()]), type(m).__name__


def test_frozen_weights_stay_frozen() -> None:
    conv, bn, fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
    for m in (conv, bn, fc):
        m.requires_grad_(False)
    built = [
        BcosConv2d.from_module(conv, bias=True),
        BcosPooledHead.from_module(fc),
        BatchNormUncentered2d.from_module(bn),
        PositionNorm.from_module(bn),
    ]
    assert not any(p.requires_grad for m in built for p in m.parameters())
    assert all(p.requires_grad for p in BcosConv2d.from_module(nn.Conv2d(3, 4, 3)).parameters())


def test_builtin_norm_factories_carry_state_and_work_on_meta() -> None:
    bn = nn.BatchNorm2d(4)
    bn.running_var.uniform_(0.5, 2.0)
    new = REGISTRY.get("layer", "BatchNorm2d").target(bn, eps=0.01)
    assert new.eps == 0.01 and torch.equal(new.running_var, bn.running_var)
    ln = REGISTRY.get("layer", "LayerNorm").target(nn.LayerNorm(6, eps=1e-6))
    assert ln.eps == 1e-6
    gn = REGISTRY.get("layer", "GroupNorm").target(nn.GroupNorm(2, 6))
    assert gn.num_groups == 2
    meta = torch.device("meta")
    for name, module in (
        ("BatchNorm2d", nn.BatchNorm2d(4, device=meta)),
        ("LayerNorm", nn.LayerNorm(4, device=meta)),
        ("GroupNorm", nn.GroupNorm(2, 4, device=meta)),
    ):
        built = REGISTRY.get("layer", name).target(module)
        assert all(t.device.type == "meta" for t in [*built.parameters(), *built.buffers()])
