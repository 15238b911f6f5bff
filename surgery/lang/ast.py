"""The recipe syntax tree.

Every node keeps its source span, but spans never take part in equality: two recipes that differ
only in layout or comments compare equal, which is what the formatter's round-trip guarantee
(``parse(format(x)) == parse(x)``) is stated in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery.errors import Span

NO_SPAN = Span()


@dataclass(frozen=True, kw_only=True)
class Node:
    span: Span = field(default=NO_SPAN, compare=False, repr=False)


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class Num(Node):
    value: int | float
    text: str = field(default="", compare=False)


@dataclass(frozen=True)
class Str(Node):
    value: str


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class NoneLit(Node):
    pass


@dataclass(frozen=True)
class Ref(Node):
    """A name: a ``param``, a ``group``, or (in ``finetune``) a bare word."""

    name: str


@dataclass(frozen=True)
class ListExpr(Node):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class KwArg(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class CallExpr(Node):
    """``name(args)``: a value constructor such as ``siren(width=60)``."""

    name: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[KwArg, ...] = ()


@dataclass(frozen=True)
class BinOp(Node):
    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Neg(Node):
    operand: Expr


Expr = Num | Str | Bool | NoneLit | Ref | ListExpr | CallExpr | BinOp | Neg


# ---------------------------------------------------------------- selectors


@dataclass(frozen=True)
class SelName(Node):
    """A type name (``Conv2d``, ``nn.Conv2d``) or the name of a ``let``."""

    path: str


@dataclass(frozen=True)
class SelSubclass(Node):
    path: str


@dataclass(frozen=True)
class SelGlob(Node):
    pattern: str


@dataclass(frozen=True)
class SelRegex(Node):
    pattern: str


@dataclass(frozen=True)
class SelAlias(Node):
    name: str
    args: tuple[Expr, ...] = ()


@dataclass(frozen=True)
class SelAll(Node):
    pass


@dataclass(frozen=True)
class SelOr(Node):
    left: Selector
    right: Selector


@dataclass(frozen=True)
class SelAnd(Node):
    left: Selector
    right: Selector


@dataclass(frozen=True)
class SelExcept(Node):
    left: Selector
    right: Selector


@dataclass(frozen=True)
class SelFirst(Node):
    inner: Selector


@dataclass(frozen=True)
class SelLast(Node):
    inner: Selector


@dataclass(frozen=True)
class SelWhere(Node):
    inner: Selector
    predicate: Predicate


@dataclass(frozen=True)
class SelIn(Node):
    inner: Selector
    scope: Selector


Selector = (
    SelName
    | SelSubclass
    | SelGlob
    | SelRegex
    | SelAlias
    | SelAll
    | SelOr
    | SelAnd
    | SelExcept
    | SelFirst
    | SelLast
    | SelWhere
    | SelIn
)


@dataclass(frozen=True)
class PredCompare(Node):
    attr: str
    op: str
    value: Expr


@dataclass(frozen=True)
class PredTruthy(Node):
    attr: str


@dataclass(frozen=True)
class PredNot(Node):
    inner: Predicate


@dataclass(frozen=True)
class PredAnd(Node):
    left: Predicate
    right: Predicate


@dataclass(frozen=True)
class PredOr(Node):
    left: Predicate
    right: Predicate


Predicate = PredCompare | PredTruthy | PredNot | PredAnd | PredOr


# ---------------------------------------------------------------- statements


@dataclass(frozen=True)
class LayerCall(Node):
    name: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[KwArg, ...] = ()
    parens: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Param(Node):
    name: str
    type: str
    default: Expr | None = None
    doc: str = field(default="", compare=False)


@dataclass(frozen=True)
class Let(Node):
    name: str
    selector: Selector


@dataclass(frozen=True)
class Include(Node):
    path: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[KwArg, ...] = ()


@dataclass(frozen=True)
class Option(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class GroupDecl(Node):
    name: str
    family: str
    dim: Expr
    options: tuple[Option, ...] = ()


@dataclass(frozen=True)
class RampDecl(Node):
    param: str
    start: Expr
    end: Expr
    over: Expr
    unit: str = "epochs"


@dataclass(frozen=True)
class Finetune(Node):
    options: tuple[Option, ...] = ()
    ramps: tuple[RampDecl, ...] = ()


@dataclass(frozen=True)
class Replace(Node):
    selector: Selector
    layer: LayerCall
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class DropBias(Node):
    selector: Selector
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class Remove(Node):
    selector: Selector
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class Insert(Node):
    layer: LayerCall
    position: str
    selector: Selector
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class SetAttr(Node):
    attr: str
    value: Expr
    selector: Selector
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class Freeze(Node):
    selector: Selector
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class Unfreeze(Node):
    selector: Selector
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class Encode(Node):
    name: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[KwArg, ...] = ()
    parens: bool = field(default=False, compare=False)
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class Rewrite(Node):
    function: str
    layer: LayerCall
    scope: Selector | None = None
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class ExpectNone(Node):
    selector: Selector
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class ExpectNoBias(Node):
    selector: Selector | None = None
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class ExpectCount(Node):
    selector: Selector
    op: str
    value: Expr
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class ExpectShape(Node):
    dims: tuple[Expr | None, ...]
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class ExpectEquivalent(Node):
    tolerance: Expr | None = None
    optional: bool = False
    condition: Predicate | None = None


@dataclass(frozen=True)
class ExpectComplete(Node):
    tolerance: Expr | None = None
    optional: bool = False
    condition: Predicate | None = None


Statement = (
    Replace
    | DropBias
    | Remove
    | Insert
    | SetAttr
    | Freeze
    | Unfreeze
    | Encode
    | Rewrite
    | ExpectNone
    | ExpectNoBias
    | ExpectCount
    | ExpectShape
    | ExpectEquivalent
    | ExpectComplete
)
Item = Param | Let | Include | GroupDecl | Finetune | Statement
EXPECTATIONS = (ExpectNone, ExpectNoBias, ExpectCount, ExpectShape, ExpectEquivalent, ExpectComplete)


@dataclass(frozen=True)
class Recipe(Node):
    name: str | None
    version: str | None
    doc: str | None
    items: tuple[Item, ...]
    file: str = field(default="<recipe>", compare=False)
    source: str = field(default="", compare=False, repr=False)
    comments: tuple[tuple[int, int, str], ...] = field(default=(), compare=False, repr=False)
