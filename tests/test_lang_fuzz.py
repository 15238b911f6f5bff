"""Fuzzing the front end: any text, valid or mangled, gives a positioned RecipeError or a recipe."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recipe_strategies import recipes

import surgery
from surgery.errors import RecipeError

TOKENS = [
    "replace",
    "with",
    "drop",
    "bias",
    "on",
    "remove",
    "insert",
    "before",
    "after",
    "set",
    "=",
    "freeze",
    "encode",
    "input",
    "rewrite",
    "call",
    "expect",
    "no",
    "count",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    "|",
    "&",
    "except",
    "where",
    "in",
    "first",
    "last",
    "@",
    "*",
    "param",
    ":",
    "let",
    "include",
    "group",
    "finetune",
    "ramp",
    '"',
    're"',
    '"""',
    "#",
    "\n",
    "1e999",
    "99999999999999999999",
    "-",
    "/",
    "0",
    "Conv2d",
    "BcosConv2d",
    "GL+",
    "optional",
    "recipe",
    "v1",
    "v2",
    "not",
    "and",
    "or",
    ".",
    "F.gelu",
]


def _assert_only_recipe_errors(text: str) -> None:
    try:
        checked = surgery.check(text, file="fuzz.recipe")
    except RecipeError as err:
        assert err.span.file in ("fuzz.recipe", "--set") or err.span.file.endswith(".recipe")
        assert err.span.line >= 1 and err.span.column >= 1
        assert str(err).startswith(f"{err.span.file}:{err.span.line}:{err.span.column}: ")
        return
    assert checked.version == "v1"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    _assert_only_recipe_errors(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join))
def test_random_token_soup(text: str) -> None:
    _assert_only_recipe_errors('recipe "f" v1\n' + text)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(recipes())
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        i = draw(st.integers(0, len(text) - 1))
        op = draw(st.integers(0, 3))
        if op == 0:  # delete a span
            text = text[:i] + text[i + draw(st.integers(1, 8)) :]
        elif op == 1:  # insert a token
            text = text[:i] + " " + draw(st.sampled_from(TOKENS)) + " " + text[i:]
        elif op == 2:  # replace a character
            text = text[:i] + draw(st.characters()) + text[i + 1 :]
        else:  # duplicate a span
            j = min(len(text), i + draw(st.integers(1, 20)))
            text = text[:j] + text[i:j] + text[j:]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_recipes(text: str) -> None:
    _assert_only_recipe_errors(text)


def test_deep_nesting_is_a_recipe_error() -> None:
    text = 'recipe "f" v1\nfreeze ' + "(" * 5000 + "Conv2d" + ")" * 5000
    _assert_only_recipe_errors(text)
