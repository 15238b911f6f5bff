"""The two kinds of user error, each able to say exactly where it comes from.

``RecipeError`` points into recipe text (file, line, column, the source line with a caret, and a
did-you-mean); ``SurgeryError`` names a module of the model (and the recipe line that touched it).
Both are user errors: the CLI prints them without a traceback and exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


class UserError(Exception):
    """Base class of errors caused by the user's input, not by a bug in surgery."""


def did_you_mean(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The closest candidate to ``word``, case-insensitively, or None."""
    cands = list(dict.fromkeys(candidates))
    lowered = {c.lower(): c for c in cands}
    if word.lower() in lowered and lowered[word.lower()] != word:
        return lowered[word.lower()]
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[hits[0]] if hits else None


def with_hint(message: str, word: str, candidates: Iterable[str]) -> str:
    guess = did_you_mean(word, candidates)
    return f"{message} (did you mean '{guess}'?)" if guess else message


@dataclass(frozen=True)
class Span:
    """Where a piece of recipe text lies: 1-based line and column, end exclusive."""

    file: str = "<recipe>"
    line: int = 1
    column: int = 1
    end_line: int = 1
    end_column: int = 2

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class RecipeError(UserError):
    """An error in recipe text (syntax or meaning), rendered as ``file:line:col: message``."""

    def __init__(self, message: str, span: Span, source: str | None = None) -> None:
        self.message = message
        self.span = span
        self.source = source
        super().__init__(self.render())

    @property
    def file(self) -> str:
        return self.span.file

    @property
    def line(self) -> int:
        return self.span.line

    @property
    def column(self) -> int:
        return self.span.column

    def source_line(self) -> str | None:
        if self.source is None:
            return None
        lines = self.source.splitlines()
        return lines[self.span.line - 1] if 0 < self.span.line <= len(lines) else None

    def render(self) -> str:
        head = f"{self.span}: {self.message}"
        text = self.source_line()
        if text is None:
            return head
        start = self.span.column - 1
        if self.span.end_line == self.span.line and self.span.end_column > self.span.column:
            width = self.span.end_column - self.span.column
        else:
            width = max(1, len(text.rstrip()) - start)
        width = max(1, min(width, max(1, len(text) - start)))
        caret = " " * start + "^" * width
        return f"{head}\n  {text.rstrip()}\n  {caret}"


class SurgeryError(UserError):
    """An error applying a recipe to a model: names the module and the recipe line responsible."""

    def __init__(self, message: str, *, module: str | None = None, span: Span | None = None) -> None:
        self.message = message
        self.module = module
        self.span = span
        where = f"{span}: " if span is not None else ""
        what = f"module '{module}': " if module is not None else ""
        super().__init__(f"{where}{what}{message}")


class ModelRefError(UserError):
    """A model reference that cannot be resolved or loaded."""


class ArtifactError(UserError):
    """A missing, incomplete or corrupt artifact directory or checkpoint."""
