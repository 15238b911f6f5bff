"""Does a recipe value fit a Python annotation? Used to type-check layer and constructor arguments."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

_UNIONS = (Union, types.UnionType)


def conforms(value: Any, ann: Any) -> bool:
    """True when ``value`` (a recipe value) may be passed where ``ann`` is expected."""
    if ann is Any or ann is inspect.Parameter.empty or isinstance(ann, (str, typing.TypeVar)):
        return True
    origin = typing.get_origin(ann)
    if origin in _UNIONS:
        return any(conforms(value, a) for a in typing.get_args(ann))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(ann))
    if ann is None or ann is type(None):
        return value is None
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is bool or ann is str:
        return isinstance(value, ann)
    if origin in (tuple, list, Sequence, typing.Sequence) or ann in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(ann)
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
        return all(conforms(v, args[0]) for v in value)
    if origin is not None:
        return isinstance(value, origin)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def coerce(value: Any, ann: Any) -> Any:
    """Adapt a conforming value to what the callee expects: lists become tuples where a tuple is wanted."""
    origin = typing.get_origin(ann)
    if origin in _UNIONS:
        for a in typing.get_args(ann):
            if conforms(value, a):
                return coerce(value, a)
        return value
    if (origin is tuple or ann is tuple) and isinstance(value, list):
        return tuple(value)
    if ann is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def describe(ann: Any) -> str:
    """How a person would name the type: ``float``, ``one of "max", "mean"``, ``list of int``."""
    if ann is Any or ann is inspect.Parameter.empty:
        return "any value"
    origin = typing.get_origin(ann)
    if origin in _UNIONS:
        parts = [describe(a) for a in typing.get_args(ann) if a is not type(None)]
        opt = " or none" if type(None) in typing.get_args(ann) else ""
        return " or ".join(parts) + opt
    if origin is Literal:
        return "one of " + ", ".join(repr(a).replace("'", '"') for a in typing.get_args(ann))
    if origin in (tuple, list, Sequence, typing.Sequence):
        args = typing.get_args(ann)
        return f"list of {describe(args[0])}" if args else "list"
    if ann is type(None):
        return "none"
    if isinstance(ann, type):
        return ann.__name__
    return str(ann)


def describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, int):
        return f"int {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"
