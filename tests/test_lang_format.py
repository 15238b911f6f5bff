"""The formatter: idempotent, meaning-preserving, comment-preserving."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from recipe_strategies import recipes

import surgery
from surgery.lang.formatter import format_recipe


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes())
def test_format_is_idempotent_and_keeps_meaning(text: str) -> None:
    once = format_recipe(text)
    assert format_recipe(once) == once
    assert surgery.parse(once) == surgery.parse(text)


@settings(max_examples=60, deadline=None)
@given(recipes())
def test_format_keeps_every_comment(text: str) -> None:
    before = [c[2] for c in surgery.parse(text).comments]
    after = [c[2] for c in surgery.parse(format_recipe(text)).comments]
    assert sorted(before) == sorted(after)


def test_canonical_layout() -> None:
    messy = (
        'recipe   "x"   v1\n"""Doc."""\n# lead\nparam b:float=2.0 # exponent\n'
        "replace  Conv2d   where kernel_size==1 and(groups==1 or not bias)with BcosConv2d( b = b*2 )\n"
        "group G=GL+(2){samples=4\nscale=lognormal(sigma=0.1)}\n"
    )
    assert format_recipe(messy) == (
        'recipe "x" v1\n"""Doc."""\n\n# lead\nparam b: float = 2.0  # exponent\n'
        "replace Conv2d where kernel_size == 1 and (groups == 1 or not bias) with BcosConv2d(b=b * 2)\n"
        "group G = GL+(2) {\n  samples = 4\n  scale = lognormal(sigma=0.1)\n}\n"
    )


def test_parentheses_only_where_needed() -> None:
    text = (
        'recipe "x" v1\nfreeze (Conv2d | Linear) & ("a.*" except "a.b")\nset p = (1 + 2) * 3 - (4 - 5) on *\n'
    )
    out = format_recipe(text)
    assert 'freeze (Conv2d | Linear) & ("a.*" except "a.b")' in out
    assert "set p = (1 + 2) * 3 - (4 - 5) on *" in out
    assert surgery.parse(out) == surgery.parse(text)


def test_regex_stays_raw() -> None:
    text = 'recipe "x" v1\n\nfreeze re"blocks\\.\\d+\\b"\n'
    tree = surgery.parse(text)
    assert tree.items[0].selector.pattern == "blocks\\.\\d+\\b"
    assert format_recipe(text) == text
