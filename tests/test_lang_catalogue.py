"""A catalogue of wrong recipes: each error names file:line:col, shows a caret, says what is wrong."""

from __future__ import annotations

import pytest

import surgery
from surgery.errors import RecipeError

H = 'recipe "t" v1\n'

CATALOGUE = [
    (
        "unknown_condition_param",
        H + "param keep: bool = true\nremove ReLU if kep",
        3,
        16,
        "unknown param 'kep' in condition (did you mean 'keep'?)",
    ),
    (
        "syntax_missing_with",
        H + "replace Conv2d BcosConv2d(b=2)",
        2,
        16,
        "unexpected name 'BcosConv2d'; expected one of '&', '.', 'except', 'in', 'where', 'with', '|'",
    ),
    (
        "keyword_typo",
        H + "replce Conv2d with BcosConv2d",
        2,
        1,
        "unexpected 'replce' (did you mean 'replace'?)",
    ),
    (
        "unknown_layer",
        H + "replace Conv2d with BcosConv2D(b=2)",
        2,
        21,
        "unknown layer 'BcosConv2D' (did you mean 'BcosConv2d'?)",
    ),
    (
        "unknown_type",
        H + "replace Conv2D with BcosConv2d",
        2,
        9,
        "unknown layer type 'Conv2D' (did you mean 'Conv2d'?)",
    ),
    (
        "unknown_param_kw",
        H + "replace Conv2d with BcosConv2d(bb=2)",
        2,
        32,
        "BcosConv2d has no parameter 'bb' (did you mean 'b'?)",
    ),
    (
        "wrong_type",
        H + 'replace Conv2d with BcosConv2d(b="two")',
        2,
        34,
        "argument 'b' of BcosConv2d expects float, got string \"two\"",
    ),
    (
        "missing_arg",
        H + "replace Conv2d with LiftingConv()",
        2,
        21,
        "LiftingConv is missing argument 'group'",
    ),
    (
        "unknown_alias",
        H + "replace @clasifier with BcosLinear",
        2,
        9,
        "unknown alias '@clasifier' (did you mean 'classifier'?)",
    ),
    ("alias_arity", H + "freeze @stage", 2, 8, "@stage takes 1 argument(s): write @stage(n)"),
    (
        "bad_regex",
        H + 'freeze re"blocks.(\\d+"',
        2,
        8,
        "invalid regular expression: missing ), unterminated subpattern at position 7",
    ),
    (
        "unknown_name",
        H + "param b: float = 2\nreplace Conv2d with BcosConv2d(b=bb)",
        3,
        34,
        "unknown name 'bb' (did you mean 'b'?)",
    ),
    ("param_type", H + 'param b: float = "x"', 2, 18, "param 'b' is float but its default is string \"x\""),
    (
        "param_unknown_type",
        H + "param b: floot = 2",
        2,
        1,
        "unknown param type 'floot' (did you mean 'float'?)",
    ),
    ("param_dup", H + "param b: float = 2\nparam b: int = 1", 3, 1, "param 'b' is declared twice"),
    ("no_header", "replace Conv2d with BcosConv2d", 1, 1, 'a recipe starts with a header: recipe "NAME" v1'),
    (
        "bad_version",
        'recipe "t" v9\nfreeze Conv2d',
        1,
        12,
        "unsupported language version 'v9' (this surgery supports v1)",
    ),
    (
        "bad_version_word",
        'recipe "t" version1\nfreeze Conv2d',
        1,
        12,
        "expected a language version such as 'v1' after the recipe name, got 'version1'",
    ),
    ("unterminated", H + 'freeze "layer1', 2, 8, "unterminated string"),
    ("single_quotes", H + "freeze 'layer1'", 2, 8, "strings use double quotes"),
    (
        "unknown_encoding",
        H + "encode input add_invers",
        2,
        1,
        "unknown input encoding 'add_invers' (did you mean 'add_inverse'?)",
    ),
    (
        "unknown_group",
        H + "group G = GL(2) { samples = 4 }",
        2,
        1,
        "unknown group 'GL' (did you mean 'GL+'?)",
    ),
    (
        "group_option",
        H + "group G = GL+(2) { sampels = 4 }",
        2,
        20,
        "group GL+ has no option 'sampels' (did you mean 'samples'?)",
    ),
    ("group_dim", H + "group G = GL+(0) { }", 2, 15, "group dimension must be a positive int, got int 0"),
    (
        "unknown_ctor",
        H + "group G = GL+(2) { scale = lognormall(sigma=0.1) }",
        2,
        28,
        "unknown constructor 'lognormall' (did you mean 'lognormal'?)",
    ),
    (
        "bad_function",
        H + "rewrite call F.gelux with DetachableGELU",
        2,
        1,
        "unknown function 'F.gelux' (did you mean 'gelu'?)",
    ),
    (
        "non_torch_function",
        H + "rewrite call os.system with DetachableGELU",
        2,
        1,
        "rewrite call takes a torch function (F.name or torch.name), got 'os.system'",
    ),
    ("include_missing", H + 'include "nope.recipe"', 2, 1, "included recipe 'nope.recipe' not found"),
    (
        "count_type",
        H + 'expect count Conv2d == "x"',
        2,
        24,
        'a count is compared with an int, got string "x"',
    ),
    ("shape_type", H + 'expect output shape [*, "a"]', 2, 25, 'shape entries are ints or *, got string "a"'),
    ("div_zero", H + "param b: float = 1 / 0", 2, 18, "division by zero"),
    ("let_dup", H + "let a = Conv2d\nlet a = Linear", 3, 1, "'a' is already defined by an earlier let"),
    ("eof", H + "replace Conv2d with", 2, 20, "unexpected end of recipe; expected a name"),
    ("bad_char", H + "replace Conv2d with X; freeze Y", 2, 22, "unexpected character ';'"),
    (
        "ramp_unit",
        H + "finetune {\n  ramp b from 1 to 2 over 2 steps\n}",
        3,
        3,
        "ramps are measured in epochs, got 'steps'",
    ),
    (
        "positional_too_many",
        H + "replace Conv2d with BcosConv2d(2, 1, 1, 1, 1, 1, 1)",
        2,
        44,
        "BcosConv2d takes at most 4 positional argument(s)",
    ),
    (
        "kw_twice",
        H + "replace Conv2d with BcosConv2d(b=1, b=2)",
        2,
        37,
        "argument 'b' of BcosConv2d is given twice",
    ),
    (
        "unknown_escape",  # only a warning in Python (and a different one per version): an error here
        H + 'replace "layer\\.1" with Identity',
        2,
        9,
        "bad escape in string: invalid escape sequence '\\.' (write regular expressions as re\"...\")",
    ),
]


@pytest.mark.parametrize(
    ("case", "text", "line", "column", "message"), CATALOGUE, ids=[c[0] for c in CATALOGUE]
)
def test_wrong_recipe_is_reported_at_its_position(
    case: str, text: str, line: int, column: int, message: str
) -> None:
    with pytest.raises(RecipeError) as info:
        surgery.check(text, file="t.recipe")
    err = info.value
    assert (err.span.file, err.span.line, err.span.column) == ("t.recipe", line, column)
    assert err.message == message
    rendered = str(err).splitlines()
    assert rendered[0] == f"t.recipe:{line}:{column}: {message}"
    # the offending source line, then a caret under the column
    assert rendered[1].strip() == text.splitlines()[line - 1].strip()
    assert rendered[2].index("^") - 2 == column - 1


def test_catalogue_is_large_and_distinct() -> None:
    assert len(CATALOGUE) >= 20
    assert len({c[4] for c in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize(
    ("override", "column", "message"),
    [
        ("bb=2", 1, "unknown param 'bb' in --set (did you mean 'b'?)"),
        ("b=two", 3, "param 'b' expects float, got 'two'"),
        ("b", 1, "--set expects NAME=VALUE, got 'b'"),
    ],
)
def test_bad_set_override(override: str, column: int, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        surgery.check(H + "param b: float = 2", overrides=[override])
    assert info.value.span.file == "--set"
    assert info.value.span.column == column
    assert info.value.message == message


def test_include_cycle_names_the_chain(tmp_path) -> None:
    (tmp_path / "a.recipe").write_text(H + 'include "b.recipe"\n')
    (tmp_path / "b.recipe").write_text(H + 'include "a.recipe"\n')
    with pytest.raises(RecipeError) as info:
        surgery.check(surgery.parse_file(tmp_path / "a.recipe"))
    assert "include cycle" in info.value.message
    assert info.value.span.line == 2
    assert info.value.span.file.endswith("b.recipe")
