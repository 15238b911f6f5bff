"""Recipe text -> syntax tree, with every syntax error turned into a positioned ``RecipeError``."""

from __future__ import annotations

import ast as pyast
import functools
import threading
import warnings
from dataclasses import replace as dc_replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from surgery.errors import RecipeError, Span, did_you_mean
from surgery.lang import ast

KEYWORDS = [
    "recipe",
    "param",
    "let",
    "include",
    "group",
    "finetune",
    "ramp",
    "from",
    "to",
    "over",
    "optional",
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
    "freeze",
    "unfreeze",
    "encode",
    "input",
    "rewrite",
    "call",
    "in",
    "expect",
    "no",
    "count",
    "output",
    "shape",
    "equivalent",
    "complete",
    "within",
    "except",
    "first",
    "last",
    "where",
    "subclass",
    "and",
    "or",
    "not",
    "true",
    "false",
    "none",
    "if",
]
STATEMENT_KEYWORDS = [
    "param",
    "let",
    "include",
    "group",
    "finetune",
    "replace",
    "drop",
    "remove",
    "insert",
    "set",
    "freeze",
    "unfreeze",
    "encode",
    "rewrite",
    "expect",
    "optional",
]

# What a person calls each terminal, for "expected ..." messages.
TERMINAL_NAMES = {
    "NAME": "a name",
    "STRING": "a string",
    "LONG_STRING": 'a """docstring"""',
    "REGEX": 're"regex"',
    "NUMBER": "a number",
    "COMPARE": "a comparison (==, !=, <, <=, >, >=)",
    "POSITION": "'before' or 'after'",
    "OPTIONAL": "'optional'",
    "STAR": "'*'",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "SLASH": "'/'",
    "$END": "the end of the recipe",
}
MAX_DEPTH = 200


# Comments are ignored by the grammar; a lexer callback keeps them (per thread) for the formatter.
_COMMENTS = threading.local()


def _keep_comment(tok: Token) -> Token:
    sink = getattr(_COMMENTS, "sink", None)
    if sink is not None:
        sink.append((tok.line or 0, tok.column or 0, str(tok)))
    return tok


@functools.cache
def _lark() -> Lark:
    grammar = files("surgery.lang").joinpath("grammar.lark").read_text(encoding="utf-8")
    return Lark(
        grammar,
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        lexer="contextual",
        lexer_callbacks={"COMMENT": _keep_comment},
    )


def parse(text: str, file: str = "<recipe>") -> ast.Recipe:
    """Parse recipe text. Raises ``RecipeError`` (with file:line:col) on any syntax error."""
    if not isinstance(text, str):
        raise TypeError("parse() takes the recipe text as a str")
    _check_depth(text, file)
    comments: list[tuple[int, int, str]] = []
    _COMMENTS.sink = comments
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, file) from None
    finally:
        _COMMENTS.sink = None
    try:
        recipe = _ToAst(file, text).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, RecipeError):
            raise exc.orig_exc from None
        raise
    except RecursionError:
        raise RecipeError("recipe is nested too deeply", Span(file, 1, 1, 1, 2), text) from None
    return ast.Recipe(
        name=recipe.name,
        version=recipe.version,
        doc=recipe.doc,
        items=recipe.items,
        file=file,
        source=text,
        comments=tuple(sorted(comments)),
        span=recipe.span,
    )


def parse_file(path: str | Path) -> ast.Recipe:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {p}", Span(str(p), 1, 1, 1, 2)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe file: {exc}", Span(str(p), 1, 1, 1, 2)) from None
    return parse(text, str(path))


def _check_depth(text: str, file: str) -> None:
    """Refuse pathological nesting before the tree walkers could recurse too deep."""
    depth = 0
    line, col = 1, 0
    for ch in text:
        col += 1
        if ch == "\n":
            line, col = line + 1, 0
        elif ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                raise RecipeError(
                    f"brackets nested more than {MAX_DEPTH} deep", Span(file, line, col, line, col + 1), text
                )
        elif ch in ")]}":
            depth = max(0, depth - 1)


def _describe_expected(expected: set[str]) -> str:
    parser = _lark()
    names = set()
    for term in expected:
        if term in TERMINAL_NAMES:
            names.add(TERMINAL_NAMES[term])
            continue
        try:
            pattern = parser.get_terminal(term).pattern
            names.add(f"'{pattern.value}'" if pattern.type == "str" else term.lower())
        except KeyError:
            names.add(term.lower())
    ordered = sorted(names)
    if len(ordered) == 1:
        return ordered[0]
    if len(ordered) > 8:
        return ", ".join(ordered[:8]) + ", ..."
    return "one of " + ", ".join(ordered)


def _syntax_error(exc: UnexpectedInput, text: str, file: str) -> RecipeError:
    line = getattr(exc, "line", None) or 1
    column = getattr(exc, "column", None) or 1
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        lines = text.splitlines() or [""]
        line = len(lines)
        column = len(lines[-1]) + 1
        expected = _describe_expected(_really_expected(exc))
        return RecipeError(
            f"unexpected end of recipe; expected {expected}", Span(file, line, column, line, column + 1), text
        )
    if isinstance(exc, UnexpectedCharacters):
        ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        if ch == '"':
            msg = "unterminated string"
        elif ch in "'`":
            msg = "strings use double quotes"
        else:
            msg = f"unexpected character {ch!r}"
        return RecipeError(msg, Span(file, line, column, line, column + 1), text)
    assert isinstance(exc, UnexpectedToken)
    tok = exc.token
    end = column + max(1, len(str(tok)))
    expected = _really_expected(exc)
    word = str(tok)
    if tok.type == "NAME" and word not in KEYWORDS:
        guess = did_you_mean(word, [k for k in KEYWORDS if _lark_accepts(k, expected)] or KEYWORDS)
        if guess and _lark_accepts(guess, expected):
            return RecipeError(
                f"unexpected '{word}' (did you mean '{guess}'?)", Span(file, line, column, line, end), text
            )
    return RecipeError(
        f"unexpected {_token_words(tok)}; expected {_describe_expected(expected)}",
        Span(file, line, column, line, end),
        text,
    )


def _really_expected(exc: UnexpectedInput) -> set[str]:
    """Terminals that can truly come next: LALR merges look-aheads, so ask the parser itself."""
    expected = set(getattr(exc, "expected", ()) or ())
    ip = getattr(exc, "interactive_parser", None)
    if ip is not None:
        try:
            accepted = set(ip.accepts())
        except Exception:  # the parser state cannot be replayed: keep Lark's own answer
            return expected
        return accepted or expected
    return expected


def _lark_accepts(keyword: str, expected: set[str]) -> bool:
    parser = _lark()
    for term in expected:
        try:
            pattern = parser.get_terminal(term).pattern
        except KeyError:
            continue
        if pattern.type == "str" and pattern.value == keyword:
            return True
    return False


def _token_words(tok: Token) -> str:
    if tok.type in ("STRING", "LONG_STRING"):
        return "string " + str(tok)
    if tok.type == "NUMBER":
        return f"number {tok}"
    if tok.type == "NAME":
        return f"name '{tok}'"
    return f"'{tok}'"


def _span(file: str, meta: Any) -> Span:
    if getattr(meta, "empty", False) or getattr(meta, "line", None) is None:
        return Span(file)
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(file: str, tok: Token) -> Span:
    return Span(file, tok.line or 1, tok.column or 1, tok.end_line or tok.line or 1, tok.end_column or 2)


def unquote(tok: str, file: str = "<recipe>", span: Span | None = None, source: str | None = None) -> str:
    """The value of a double-quoted string token, with Python-style escapes."""
    body = tok
    if body.startswith('re"'):
        # Regular expressions are raw: backslashes belong to the regex; only \" is an escape.
        return body[3:-1].replace('\\"', '"')
    if body.startswith('"""'):
        return body[3:-3]
    try:
        with warnings.catch_warnings():
            # an unknown escape ("\.") is only a warning in Python, and a different one per version:
            # make it the same clear error everywhere (regular expressions belong in re"...")
            warnings.simplefilter("error", DeprecationWarning)
            warnings.simplefilter("error", SyntaxWarning)
            return pyast.literal_eval(body)
    except (SyntaxError, ValueError, DeprecationWarning, SyntaxWarning) as exc:
        msg = getattr(exc, "msg", None) or str(exc)
        hint = ' (write regular expressions as re"...")' if "escape" in msg else ""
        raise RecipeError(f"bad escape in string: {msg}{hint}", span or Span(file), source) from None


def _split_args(items: list[Any] | None) -> tuple[tuple[ast.Expr, ...], tuple[ast.KwArg, ...]]:
    if not items:
        return (), ()
    args = tuple(a for a in items if not isinstance(a, ast.KwArg))
    kwargs = tuple(a for a in items if isinstance(a, ast.KwArg))
    return args, kwargs


@v_args(meta=True)
class _ToAst(Transformer):
    """Lark parse tree -> ``surgery.lang.ast`` nodes, spans attached."""

    def __init__(self, file: str, text: str) -> None:
        super().__init__()
        self.file = file
        self.text = text

    def _s(self, meta: Any) -> Span:
        return _span(self.file, meta)

    def _error(self, message: str, span: Span) -> RecipeError:
        return RecipeError(message, span, self.text)

    def _str(self, tok: Token) -> str:
        return unquote(str(tok), self.file, _tok_span(self.file, tok), self.text)

    # ---- top level
    def start(self, meta: Any, children: list[Any]) -> ast.Recipe:
        name = version = doc = None
        items = []
        for child in children:
            if isinstance(child, tuple) and child and child[0] == "header":
                _, name, version = child
            elif isinstance(child, tuple) and child and child[0] == "doc":
                doc = child[1]
            else:
                items.append(child)
        return ast.Recipe(name=name, version=version, doc=doc, items=tuple(items), span=self._s(meta))

    def header(self, meta: Any, c: list[Any]) -> tuple[str, str, str]:
        return ("header", self._str(c[0]), str(c[1]))

    def docstring(self, meta: Any, c: list[Any]) -> tuple[str, str]:
        return ("doc", str(c[0])[3:-3])

    def param(self, meta: Any, c: list[Any]) -> ast.Param:
        doc = _trailing_comment(self.text, meta.end_line if not meta.empty else 0)
        return ast.Param(name=str(c[0]), type=str(c[1]), default=c[2], doc=doc, span=self._s(meta))

    def let(self, meta: Any, c: list[Any]) -> ast.Let:
        return ast.Let(name=str(c[0]), selector=c[1], span=self._s(meta))

    def include(self, meta: Any, c: list[Any]) -> ast.Include:
        args, kwargs = _split_args(c[1])
        return ast.Include(path=self._str(c[0]), args=args, kwargs=kwargs, span=self._s(meta))

    def group(self, meta: Any, c: list[Any]) -> ast.GroupDecl:
        name, family, dim, *options = c
        return ast.GroupDecl(
            name=str(name), family=family, dim=dim, options=tuple(options), span=self._s(meta)
        )

    def group_family(self, meta: Any, c: list[Any]) -> str:
        return str(c[0]) + ("+" if c[1] is not None else "")

    def option(self, meta: Any, c: list[Any]) -> ast.Option:
        return ast.Option(name=str(c[0]), value=c[1], span=self._s(meta))

    def finetune(self, meta: Any, c: list[Any]) -> ast.Finetune:
        options = tuple(x for x in c if isinstance(x, ast.Option))
        ramps = tuple(x for x in c if isinstance(x, ast.RampDecl))
        return ast.Finetune(options=options, ramps=ramps, span=self._s(meta))

    def ramp(self, meta: Any, c: list[Any]) -> ast.RampDecl:
        return ast.RampDecl(
            param=str(c[0]), start=c[1], end=c[2], over=c[3], unit=str(c[4]), span=self._s(meta)
        )

    def statement(self, meta: Any, c: list[Any]) -> ast.Statement:
        optional, stmt, condition = c
        if optional is not None or condition is not None:
            stmt = dc_replace(stmt, optional=optional is not None, condition=condition, span=self._s(meta))
        return stmt

    # ---- statements
    def layer(self, meta: Any, c: list[Any]) -> ast.LayerCall:
        args, kwargs = _split_args(c[1])
        parens = not meta.empty and self.text[_offset(self.text, meta.end_line, meta.end_column) - 1] == ")"
        return ast.LayerCall(name=str(c[0]), args=args, kwargs=kwargs, parens=parens, span=self._s(meta))

    def replace(self, meta: Any, c: list[Any]) -> ast.Replace:
        return ast.Replace(selector=c[0], layer=c[1], span=self._s(meta))

    def drop_bias(self, meta: Any, c: list[Any]) -> ast.DropBias:
        return ast.DropBias(selector=c[0], span=self._s(meta))

    def remove(self, meta: Any, c: list[Any]) -> ast.Remove:
        return ast.Remove(selector=c[0], span=self._s(meta))

    def insert(self, meta: Any, c: list[Any]) -> ast.Insert:
        return ast.Insert(layer=c[0], position=str(c[1]), selector=c[2], span=self._s(meta))

    def set(self, meta: Any, c: list[Any]) -> ast.SetAttr:
        return ast.SetAttr(attr=str(c[0]), value=c[1], selector=c[2], span=self._s(meta))

    def freeze(self, meta: Any, c: list[Any]) -> ast.Freeze:
        return ast.Freeze(selector=c[0], span=self._s(meta))

    def unfreeze(self, meta: Any, c: list[Any]) -> ast.Unfreeze:
        return ast.Unfreeze(selector=c[0], span=self._s(meta))

    def encode(self, meta: Any, c: list[Any]) -> ast.Encode:
        args, kwargs = _split_args(c[1])
        parens = not meta.empty and self.text[_offset(self.text, meta.end_line, meta.end_column) - 1] == ")"
        return ast.Encode(name=str(c[0]), args=args, kwargs=kwargs, parens=parens, span=self._s(meta))

    def rewrite(self, meta: Any, c: list[Any]) -> ast.Rewrite:
        return ast.Rewrite(function=c[0], layer=c[1], scope=c[2], span=self._s(meta))

    def expect_none(self, meta: Any, c: list[Any]) -> ast.ExpectNone:
        return ast.ExpectNone(selector=c[0], span=self._s(meta))

    def expect_no_bias(self, meta: Any, c: list[Any]) -> ast.ExpectNoBias:
        return ast.ExpectNoBias(selector=c[0], span=self._s(meta))

    def expect_count(self, meta: Any, c: list[Any]) -> ast.ExpectCount:
        return ast.ExpectCount(selector=c[0], op=str(c[1]), value=c[2], span=self._s(meta))

    def expect_shape(self, meta: Any, c: list[Any]) -> ast.ExpectShape:
        return ast.ExpectShape(dims=c[0], span=self._s(meta))

    def expect_equivalent(self, meta: Any, c: list[Any]) -> ast.ExpectEquivalent:
        return ast.ExpectEquivalent(tolerance=c[0], span=self._s(meta))

    def expect_complete(self, meta: Any, c: list[Any]) -> ast.ExpectComplete:
        return ast.ExpectComplete(tolerance=c[0], span=self._s(meta))

    def shape(self, meta: Any, c: list[Any]) -> tuple[ast.Expr | None, ...]:
        return tuple(c)

    def shape_dim(self, meta: Any, c: list[Any]) -> ast.Expr | None:
        return None if isinstance(c[0], Token) and c[0].type == "STAR" else c[0]

    def dotted(self, meta: Any, c: list[Any]) -> str:
        return ".".join(str(x) for x in c)

    # ---- selectors
    def sel_name(self, meta: Any, c: list[Any]) -> ast.SelName:
        return ast.SelName(path=c[0], span=self._s(meta))

    def sel_subclass(self, meta: Any, c: list[Any]) -> ast.SelSubclass:
        return ast.SelSubclass(path=c[0], span=self._s(meta))

    def sel_glob(self, meta: Any, c: list[Any]) -> ast.SelGlob:
        return ast.SelGlob(pattern=self._str(c[0]), span=self._s(meta))

    def sel_regex(self, meta: Any, c: list[Any]) -> ast.SelRegex:
        return ast.SelRegex(pattern=self._str(c[0]), span=self._s(meta))

    def sel_alias(self, meta: Any, c: list[Any]) -> ast.SelAlias:
        args, kwargs = _split_args(c[1])
        if kwargs:
            raise self._error("aliases take positional arguments only", kwargs[0].span)
        return ast.SelAlias(name=str(c[0]), args=args, span=self._s(meta))

    def sel_all(self, meta: Any, c: list[Any]) -> ast.SelAll:
        return ast.SelAll(span=self._s(meta))

    def sel_or(self, meta: Any, c: list[Any]) -> ast.SelOr:
        return ast.SelOr(left=c[0], right=c[1], span=self._s(meta))

    def sel_and(self, meta: Any, c: list[Any]) -> ast.SelAnd:
        return ast.SelAnd(left=c[0], right=c[1], span=self._s(meta))

    def sel_except(self, meta: Any, c: list[Any]) -> ast.SelExcept:
        return ast.SelExcept(left=c[0], right=c[1], span=self._s(meta))

    def sel_first(self, meta: Any, c: list[Any]) -> ast.SelFirst:
        return ast.SelFirst(inner=c[0], span=self._s(meta))

    def sel_last(self, meta: Any, c: list[Any]) -> ast.SelLast:
        return ast.SelLast(inner=c[0], span=self._s(meta))

    def sel_where(self, meta: Any, c: list[Any]) -> ast.SelWhere:
        return ast.SelWhere(inner=c[0], predicate=c[1], span=self._s(meta))

    def sel_in(self, meta: Any, c: list[Any]) -> ast.SelIn:
        return ast.SelIn(inner=c[0], scope=c[1], span=self._s(meta))

    # ---- predicates
    def pred_compare(self, meta: Any, c: list[Any]) -> ast.PredCompare:
        return ast.PredCompare(attr=str(c[0]), op=str(c[1]), value=c[2], span=self._s(meta))

    def pred_truthy(self, meta: Any, c: list[Any]) -> ast.PredTruthy:
        return ast.PredTruthy(attr=str(c[0]), span=self._s(meta))

    def pred_not(self, meta: Any, c: list[Any]) -> ast.PredNot:
        return ast.PredNot(inner=c[0], span=self._s(meta))

    def pred_and(self, meta: Any, c: list[Any]) -> ast.PredAnd:
        return ast.PredAnd(left=c[0], right=c[1], span=self._s(meta))

    def pred_or(self, meta: Any, c: list[Any]) -> ast.PredOr:
        return ast.PredOr(left=c[0], right=c[1], span=self._s(meta))

    # ---- values
    def number(self, meta: Any, c: list[Any]) -> ast.Num:
        text = str(c[0])
        span = self._s(meta)
        if any(ch in text for ch in ".eE"):
            value: int | float = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise self._error(f"number {text} is out of range", span)
        else:
            if len(text) > 18:
                raise self._error(f"number {text} is out of range", span)
            value = int(text)
        return ast.Num(value=value, text=text, span=span)

    def string(self, meta: Any, c: list[Any]) -> ast.Str:
        return ast.Str(value=self._str(c[0]), span=self._s(meta))

    def true(self, meta: Any, c: list[Any]) -> ast.Bool:
        return ast.Bool(value=True, span=self._s(meta))

    def false(self, meta: Any, c: list[Any]) -> ast.Bool:
        return ast.Bool(value=False, span=self._s(meta))

    def none(self, meta: Any, c: list[Any]) -> ast.NoneLit:
        return ast.NoneLit(span=self._s(meta))

    def ref(self, meta: Any, c: list[Any]) -> ast.Ref:
        return ast.Ref(name=str(c[0]), span=self._s(meta))

    def call(self, meta: Any, c: list[Any]) -> ast.CallExpr:
        args, kwargs = _split_args(c[1])
        return ast.CallExpr(name=str(c[0]), args=args, kwargs=kwargs, span=self._s(meta))

    def list(self, meta: Any, c: list[Any]) -> ast.ListExpr:
        return ast.ListExpr(items=tuple(x for x in c if x is not None), span=self._s(meta))

    def binop(self, meta: Any, c: list[Any]) -> ast.BinOp:
        return ast.BinOp(op=str(c[1]), left=c[0], right=c[2], span=self._s(meta))

    def neg(self, meta: Any, c: list[Any]) -> ast.Neg:
        return ast.Neg(operand=c[1], span=self._s(meta))

    def arglist(self, meta: Any, c: list[Any]) -> list[Any]:
        return list(c)

    def kwarg(self, meta: Any, c: list[Any]) -> ast.KwArg:
        return ast.KwArg(name=str(c[0]), value=c[1], span=self._s(meta))


def _offset(text: str, line: int, column: int) -> int:
    """Character offset of a 1-based (line, column) position."""
    off = 0
    for _ in range(line - 1):
        nl = text.find("\n", off)
        if nl < 0:
            return len(text)
        off = nl + 1
    return min(len(text), off + column - 1)


def _trailing_comment(text: str, line: int) -> str:
    """The ``# ...`` comment at the end of ``line``, used as a param's documentation."""
    lines = text.splitlines()
    if not 0 < line <= len(lines):
        return ""
    src = lines[line - 1]
    in_str = False
    for i, ch in enumerate(src):
        if ch == '"' and (i == 0 or src[i - 1] != "\\"):
            in_str = not in_str
        elif ch == "#" and not in_str:
            return src[i + 1 :].strip()
    return ""
