"""Hypothesis strategies that write valid recipe text, for the formatter and fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st

TYPES = ["Conv2d", "Linear", "BatchNorm2d", "ReLU", "nn.Conv2d", "MaxPool2d", "GELU", "LayerNorm"]
LAYERS = [
    "BcosConv2d(b=b)",
    "BcosLinear(b=2.0, max_out=1)",
    "Identity",
    "AvgPool2d",
    "ReLU()",
    "DetachableGELU",
]
GLOBS = ['"layer1.*"', '"**.conv1"', '"blocks.?.attn"', '"fc"']
REGEXES = ['re"blocks\\.\\d+\\.attn"', 're"layer[12]\\..*"']
ALIASES = ["@first_conv", "@classifier", "@stem", "@stage(2)", "@pool"]

names = st.sampled_from(["b", "width", "p"])
numbers = st.one_of(
    st.integers(min_value=0, max_value=1000).map(str),
    st.floats(min_value=0, max_value=100, allow_nan=False).map(lambda f: repr(round(f, 4))),
    st.sampled_from(["1e-4", "2.5e3", ".5"]),
)


@st.composite
def expressions(draw: st.DrawFn, depth: int = 0) -> str:
    leaf = st.one_of(numbers, st.sampled_from(['"text"', "true", "false", "none", "b"]))
    if depth > 2:
        return draw(leaf)
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(leaf)
    if kind == 1:
        op = draw(st.sampled_from(["+", "-", "*", "/"]))
        return f"{draw(expressions(depth + 1))} {op} {draw(expressions(depth + 1))}"
    if kind == 2:
        return f"({draw(expressions(depth + 1))})"
    if kind == 3:
        return "[" + ", ".join(draw(st.lists(expressions(depth + 1), max_size=3))) + "]"
    return f"-{draw(leaf)}"


@st.composite
def predicates(draw: st.DrawFn, depth: int = 0) -> str:
    attr = draw(st.sampled_from(["kernel_size", "groups", "bias", "in_channels", "stride"]))
    leaf = st.one_of(
        st.just(attr),
        st.builds(
            lambda op, n: f"{attr} {op} {n}", st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), numbers
        ),
    )
    if depth > 2:
        return draw(leaf)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(leaf)
    if kind == 1:
        return f"not {draw(predicates(depth + 1))}"
    if kind == 2:
        return f"({draw(predicates(depth + 1))})"
    op = draw(st.sampled_from(["and", "or"]))
    return f"{draw(predicates(depth + 1))} {op} {draw(predicates(depth + 1))}"


@st.composite
def selectors(draw: st.DrawFn, depth: int = 0) -> str:
    atom = st.one_of(
        st.sampled_from(TYPES),
        st.sampled_from(TYPES).map(lambda t: f"subclass {t}"),
        st.sampled_from(GLOBS),
        st.sampled_from(REGEXES),
        st.sampled_from(ALIASES),
        st.just("*"),
    )
    if depth > 2:
        return draw(atom)
    kind = draw(st.integers(0, 6))
    if kind <= 1:
        return draw(atom)
    if kind == 2:
        op = draw(st.sampled_from(["|", "&", "except"]))
        return f"{draw(selectors(depth + 1))} {op} {draw(selectors(depth + 1))}"
    if kind == 3:
        return f"{draw(st.sampled_from(['first', 'last']))} {draw(selectors(depth + 1))}"
    if kind == 4:
        return f"{draw(atom)} where {draw(predicates())}"
    if kind == 5:
        return f"{draw(atom)} in {draw(st.sampled_from(GLOBS + ALIASES))}"
    return f"({draw(selectors(depth + 1))})"


@st.composite
def statements(draw: st.DrawFn) -> str:
    sel = draw(selectors())
    layer = draw(st.sampled_from(LAYERS))
    kind = draw(st.integers(0, 12))
    opt = draw(st.sampled_from(["", "", "optional "]))
    return [
        f"{opt}replace {sel} with {layer}",
        f"{opt}drop bias on {sel}",
        f"{opt}remove {sel}",
        f"{opt}insert {layer} {draw(st.sampled_from(['before', 'after']))} {sel}",
        f"{opt}set momentum = {draw(expressions())} on {sel}",
        f"{opt}freeze {sel}",
        f"{opt}unfreeze {sel}",
        "encode input add_inverse",
        "rewrite call F.gelu with DetachableGELU in " + draw(st.sampled_from(GLOBS)),
        f"expect no {sel}",
        f"expect count ({sel}) >= {draw(st.integers(0, 9))}",
        "expect output shape [*, 10]",
        "expect equivalent within 1e-4",
    ][kind] + draw(st.sampled_from(["", "", " if b > 1", " if not b == 2 or b < 0"]))


@st.composite
def recipes(draw: st.DrawFn) -> str:
    lines = ['recipe "generated" v1', '"""A generated recipe."""', "param b: float = 2.0  # exponent"]
    if draw(st.booleans()):
        lines.append(f"let chosen = {draw(selectors())}")
    if draw(st.booleans()):
        lines += ["group G = GL+(2) {", "  samples = 4", "  scale = lognormal(sigma=0.1)", "}"]
    for stmt in draw(st.lists(statements(), min_size=1, max_size=6)):
        if draw(st.booleans()):
            lines.append("# a comment")
        lines.append(stmt + draw(st.sampled_from(["", "  # trailing"])))
        if draw(st.booleans()):
            lines.append("")
    if draw(st.booleans()):
        lines += [
            "finetune {",
            "  data = digits(size=32)",
            "  epochs = 2",
            "  ramp b from 1 to 2 over 1 epochs",
            "}",
        ]
    return "\n".join(lines) + "\n"
