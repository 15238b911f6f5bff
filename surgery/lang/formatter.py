"""Canonical recipe layout: ``format_recipe(text)`` is idempotent and keeps the meaning.

One statement per line, blocks indented by two spaces, one space around operators, a blank line
after the header, the author's blank-line grouping and every comment kept. The guarantee tested:
``format(format(x)) == format(x)`` and ``parse(format(x)) == parse(x)``.
"""

from __future__ import annotations

from surgery.lang import ast
from surgery.lang.parser import parse

INDENT = "  "


def quote(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def quote_regex(s: str) -> str:
    return 're"' + s.replace('"', '\\"') + '"'


# ---------------------------------------------------------------- values

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def expr(e: ast.Expr, level: int = 0) -> str:
    if isinstance(e, ast.Num):
        return e.text or repr(e.value)
    if isinstance(e, ast.Str):
        return quote(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.NoneLit):
        return "none"
    if isinstance(e, ast.Ref):
        return e.name
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(expr(x) for x in e.items) + "]"
    if isinstance(e, ast.CallExpr):
        return f"{e.name}({args(e.args, e.kwargs)})"
    if isinstance(e, ast.Neg):
        inner = expr(e.operand, 3)
        return f"-{inner}"
    if isinstance(e, ast.BinOp):
        p = _PREC[e.op]
        text = f"{expr(e.left, p)} {e.op} {expr(e.right, p + 1)}"
        return f"({text})" if p < level else text
    raise TypeError(type(e))


def args(positional: tuple[ast.Expr, ...], kwargs: tuple[ast.KwArg, ...]) -> str:
    parts = [expr(a) for a in positional] + [f"{k.name}={expr(k.value)}" for k in kwargs]
    return ", ".join(parts)


def layer(call: ast.LayerCall) -> str:
    if call.args or call.kwargs or call.parens:
        return f"{call.name}({args(call.args, call.kwargs)})"
    return call.name


# ---------------------------------------------------------------- selectors


def selector(s: ast.Selector, level: int = 0) -> str:
    if isinstance(s, ast.SelName):
        text, p = s.path, 5
    elif isinstance(s, ast.SelSubclass):
        text, p = f"subclass {s.path}", 5
    elif isinstance(s, ast.SelGlob):
        text, p = quote(s.pattern), 5
    elif isinstance(s, ast.SelRegex):
        text, p = quote_regex(s.pattern), 5
    elif isinstance(s, ast.SelAlias):
        text = f"@{s.name}" + (f"({args(s.args, ())})" if s.args else "")
        p = 5
    elif isinstance(s, ast.SelAll):
        text, p = "*", 5
    elif isinstance(s, ast.SelExcept):
        text, p = f"{selector(s.left, 0)} except {selector(s.right, 1)}", 0
    elif isinstance(s, ast.SelOr):
        text, p = f"{selector(s.left, 1)} | {selector(s.right, 2)}", 1
    elif isinstance(s, ast.SelAnd):
        text, p = f"{selector(s.left, 2)} & {selector(s.right, 3)}", 2
    elif isinstance(s, ast.SelFirst):
        text, p = f"first {selector(s.inner, 3)}", 3
    elif isinstance(s, ast.SelLast):
        text, p = f"last {selector(s.inner, 3)}", 3
    elif isinstance(s, ast.SelWhere):
        text, p = f"{selector(s.inner, 4)} where {predicate(s.predicate)}", 4
    elif isinstance(s, ast.SelIn):
        text, p = f"{selector(s.inner, 4)} in {selector(s.scope, 5)}", 4
    else:
        raise TypeError(type(s))
    return f"({text})" if p < level else text


def predicate(pr: ast.Predicate, level: int = 0) -> str:
    if isinstance(pr, ast.PredCompare):
        text, p = f"{pr.attr} {pr.op} {expr(pr.value)}", 3
    elif isinstance(pr, ast.PredTruthy):
        text, p = pr.attr, 3
    elif isinstance(pr, ast.PredNot):
        text, p = f"not {predicate(pr.inner, 2)}", 2
    elif isinstance(pr, ast.PredAnd):
        text, p = f"{predicate(pr.left, 1)} and {predicate(pr.right, 2)}", 1
    elif isinstance(pr, ast.PredOr):
        text, p = f"{predicate(pr.left, 0)} or {predicate(pr.right, 1)}", 0
    else:
        raise TypeError(type(pr))
    return f"({text})" if p < level else text


# ---------------------------------------------------------------- statements


def statement(item: ast.Item) -> list[str]:
    """The canonical lines of one item (blocks span several)."""
    lines = _statement(item)
    cond = getattr(item, "condition", None)
    if cond is not None:
        lines[-1] += f" if {predicate(cond)}"
    return lines


def _statement(item: ast.Item) -> list[str]:
    opt = "optional " if getattr(item, "optional", False) else ""
    if isinstance(item, ast.Param):
        default = f" = {expr(item.default)}" if item.default is not None else ""
        return [f"param {item.name}: {item.type}{default}"]
    if isinstance(item, ast.Let):
        return [f"let {item.name} = {selector(item.selector)}"]
    if isinstance(item, ast.Include):
        a = args(item.args, item.kwargs)
        return [f"include {quote(item.path)}" + (f"({a})" if a else "")]
    if isinstance(item, ast.GroupDecl):
        lines = [f"group {item.name} = {item.family}({expr(item.dim)}) {{"]
        lines += [f"{INDENT}{o.name} = {expr(o.value)}" for o in item.options]
        return [*lines, "}"]
    if isinstance(item, ast.Finetune):
        lines = ["finetune {"]
        lines += [f"{INDENT}{o.name} = {expr(o.value)}" for o in item.options]
        lines += [
            f"{INDENT}ramp {r.param} from {expr(r.start)} to {expr(r.end)} over {expr(r.over)} {r.unit}"
            for r in item.ramps
        ]
        return [*lines, "}"]
    if isinstance(item, ast.Replace):
        return [f"{opt}replace {selector(item.selector)} with {layer(item.layer)}"]
    if isinstance(item, ast.DropBias):
        return [f"{opt}drop bias on {selector(item.selector)}"]
    if isinstance(item, ast.Remove):
        return [f"{opt}remove {selector(item.selector)}"]
    if isinstance(item, ast.Insert):
        return [f"{opt}insert {layer(item.layer)} {item.position} {selector(item.selector)}"]
    if isinstance(item, ast.SetAttr):
        return [f"{opt}set {item.attr} = {expr(item.value)} on {selector(item.selector)}"]
    if isinstance(item, ast.Freeze):
        return [f"{opt}freeze {selector(item.selector)}"]
    if isinstance(item, ast.Unfreeze):
        return [f"{opt}unfreeze {selector(item.selector)}"]
    if isinstance(item, ast.Encode):
        a = args(item.args, item.kwargs)
        return [f"{opt}encode input {item.name}" + (f"({a})" if a or item.parens else "")]
    if isinstance(item, ast.Rewrite):
        scope = f" in {selector(item.scope)}" if item.scope is not None else ""
        return [f"{opt}rewrite call {item.function} with {layer(item.layer)}{scope}"]
    if isinstance(item, ast.ExpectNone):
        return [f"{opt}expect no {selector(item.selector)}"]
    if isinstance(item, ast.ExpectNoBias):
        on = f" on {selector(item.selector)}" if item.selector is not None else ""
        return [f"{opt}expect no bias{on}"]
    if isinstance(item, ast.ExpectCount):
        # a `where` predicate would swallow the comparison: anything but an atom is parenthesised
        return [f"{opt}expect count {selector(item.selector, 5)} {item.op} {expr(item.value)}"]
    if isinstance(item, ast.ExpectShape):
        dims = ", ".join("*" if d is None else expr(d) for d in item.dims)
        return [f"{opt}expect output shape [{dims}]"]
    if isinstance(item, (ast.ExpectEquivalent, ast.ExpectComplete)):
        tol = f" within {expr(item.tolerance)}" if item.tolerance is not None else ""
        word = "equivalent" if isinstance(item, ast.ExpectEquivalent) else "complete"
        return [f"{opt}expect {word}{tol}"]
    raise TypeError(type(item))


def _block_children(item: ast.Item) -> list[ast.Node]:
    if isinstance(item, ast.GroupDecl):
        return list(item.options)
    if isinstance(item, ast.Finetune):
        return [*item.options, *item.ramps]
    return []


def format_tree(tree: ast.Recipe) -> str:
    """Canonical text of a parsed recipe, comments kept in place."""
    comments = list(tree.comments)  # (line, column, text), sorted
    src_lines = tree.source.splitlines()
    out: list[str] = []

    def take_before(line: int) -> list[str]:
        taken = [c for c in comments if c[0] < line]
        for c in taken:
            comments.remove(c)
        return [c[2] for c in taken]

    def take_trailing(start: int, end: int) -> str:
        taken = [c for c in comments if start <= c[0] <= end]
        for c in taken:
            comments.remove(c)
        return "  ".join(c[2] for c in taken)

    def blank_before(line: int) -> bool:
        return line >= 2 and line - 2 < len(src_lines) and src_lines[line - 2].strip() == ""

    head_end = 0
    if tree.version is not None:
        out.append(f"recipe {quote(tree.name or '')} {tree.version}")
        head_end = _header_line(src_lines)
        trailing = take_trailing(head_end, head_end)
        if trailing:
            out[-1] += "  " + trailing
    if tree.doc is not None:
        out.append(f'"""{tree.doc}"""')
    first = True
    for item in tree.items:
        line = item.span.line
        lead = take_before(line)
        if out and (
            first or blank_before(line) or (lead and blank_before(_first_comment_line(tree, lead, line)))
        ):
            out.append("")
        first = False
        out.extend(lead)
        lines = statement(item)
        children = _block_children(item)
        if children:
            head_trailing = take_trailing(line, line)
            out.append(lines[0] + (f"  {head_trailing}" if head_trailing else ""))
            for child, text in zip(children, lines[1:-1], strict=True):
                for c in take_before(child.span.line):
                    out.append(INDENT + c)
                tr = take_trailing(child.span.line, child.span.end_line)
                out.append(text + (f"  {tr}" if tr else ""))
            for c in take_before(item.span.end_line):
                out.append(INDENT + c)
            tr = take_trailing(item.span.end_line, item.span.end_line)
            out.append("}" + (f"  {tr}" if tr else ""))
        else:
            tr = take_trailing(line, item.span.end_line)
            out.append(lines[0] + (f"  {tr}" if tr else ""))
    rest = [c[2] for c in comments]
    if rest:
        if out:
            out.append("")
        out.extend(rest)
    return "\n".join(out).rstrip() + "\n"


def _header_line(src_lines: list[str]) -> int:
    for i, text in enumerate(src_lines, 1):
        if text.strip().startswith("recipe"):
            return i
    return 1


def _first_comment_line(tree: ast.Recipe, lead: list[str], default: int) -> int:
    for line, _col, text in tree.comments:
        if text == lead[0]:
            return line
    return default


def format_recipe(text: str, file: str = "<recipe>") -> str:
    """Canonical layout of recipe text; raises ``RecipeError`` if it does not parse."""
    return format_tree(parse(text, file))
