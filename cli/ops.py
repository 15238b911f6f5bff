"""``surgery ops``: everything a recipe may name, straight from the registry (so never out of date)."""

from __future__ import annotations

import inspect
from enum import Enum
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from surgery.cli.common import Format, FormatOption, console, fail, print_data

OPS_EPILOG = """\
Examples:

```
surgery ops                      # every layer, encoding, constructor and group
surgery ops --kind layer
surgery ops BcosConv2d           # one entry in full: parameters, weight transfer, documentation
surgery ops --format json
```
"""

HIDDEN_PARAMS = ("context",)
"""Parameters the engine fills in itself (a layer's build context): not for recipes to give."""


class Kind(str, Enum):
    layer = "layer"
    encoding = "encoding"
    constructor = "constructor"
    group = "group"


TITLES = {
    "layer": "layers  (replace … with NAME(...), insert NAME(...), rewrite call … with NAME)",
    "encoding": "input encodings  (encode input NAME)",
    "constructor": "value constructors  (arguments, e.g. kernel=siren(width=60))",
    "group": "Lie-group families  (group G = NAME(n) { … })",
}


def recipe_value(v: Any) -> str:
    """A Python default as a recipe would write it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(recipe_value(x) for x in v) + "]"
    return repr(v)


def _params(entry: Any) -> list[dict[str, Any]]:
    from surgery.lang.types import describe
    from surgery.plan import jsonable

    out = []
    for p in entry.params.values():
        if p.name in HIDDEN_PARAMS:
            continue
        out.append(
            {
                "name": p.name,
                "type": describe(p.annotation),
                "required": p.required,
                "default": None if p.required else jsonable(p.default),
                "default_text": None if p.required else recipe_value(p.default),
            }
        )
    return out


def entry_dict(entry: Any) -> dict[str, Any]:
    return {
        "name": entry.name,
        "kind": entry.kind,
        "summary": entry.first_doc_line(),
        "doc": entry.doc,
        "params": _params(entry),
        "transfer": entry.transfer or None,
        "class": f"{entry.cls.__module__}.{entry.cls.__qualname__}" if entry.cls is not None else None,
    }


def _signature_text(params: list[dict[str, Any]]) -> Text:
    text = Text()
    for i, p in enumerate(params):
        if i:
            text.append(", ")
        text.append(p["name"], style="bold")
        text.append(f": {p['type']}", style="cyan")
        if p["required"]:
            text.append(" (required)", style="yellow")
        else:
            text.append(f" = {p['default_text']}", style="dim")
    return text


def ops(
    name: Annotated[
        str | None, typer.Argument(metavar="[NAME]", help="Show one entry in full (e.g. BcosConv2d).")
    ] = None,
    kind: Annotated[Kind | None, typer.Option("--kind", "-k", help="Only this kind of entry.")] = None,
    fmt: FormatOption = Format.rich,
) -> None:
    """List every registered layer, input encoding, value constructor and group family.

    Each with its parameters (type and default) and a line of documentation: exactly what a recipe
    may name, including what plugins registered.
    """
    from surgery.errors import with_hint
    from surgery.registry import REGISTRY

    kinds = [kind.value] if kind else list(REGISTRY.KINDS)
    entries = {k: REGISTRY.entries(k) for k in kinds}
    if name is not None:
        found = [e for k in kinds for e in entries[k] if e.name == name]
        if not found:
            found = [e for k in kinds for e in entries[k] if e.name.lower() == name.lower()]
        if not found:
            fail(
                with_hint(
                    f"nothing registered as '{name}'", name, [e.name for k in kinds for e in entries[k]]
                )
            )
        if fmt is not Format.rich:
            print_data({"schema": "surgery-ops/1", "entries": [entry_dict(e) for e in found]}, fmt)
            return
        for e in found:
            _show_one(e)
        return
    if fmt is not Format.rich:
        print_data(
            {"schema": "surgery-ops/1", **{k: [entry_dict(e) for e in v] for k, v in entries.items()}}, fmt
        )
        return
    con = console()
    for k in kinds:
        table = Table(
            title=Text(f"{TITLES[k]}  · {len(entries[k])}", style="bold"),
            title_justify="left",
            show_header=True,
            header_style="dim",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            expand=False,
        )
        table.add_column("name", style="bold green", no_wrap=True)
        table.add_column("parameters", overflow="fold", ratio=3)
        table.add_column("description", overflow="fold", ratio=2)
        for e in entries[k]:
            table.add_row(Text(e.name), _signature_text(_params(e)), Text(e.first_doc_line()))
        con.print(table)
        con.print()
    con.print(Text("surgery ops NAME shows one entry in full.", style="dim"))


def _show_one(entry: Any) -> None:
    con = console()
    d = entry_dict(entry)
    con.print(
        Text.assemble(
            (entry.name, "bold green"), (f"  {entry.kind}", "dim"), (f"  {d['class'] or ''}", "dim")
        )
    )
    if d["params"]:
        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False, padding=(0, 2, 0, 2))
        table.add_column("parameter", style="bold")
        table.add_column("type", style="cyan")
        table.add_column("default")
        for p in d["params"]:
            table.add_row(
                Text(p["name"]),
                Text(p["type"]),
                Text("required", style="yellow") if p["required"] else Text(p["default_text"]),
            )
        con.print(table)
    else:
        con.print(Text("  no parameters", style="dim"))
    if d["transfer"]:
        con.print(Text.assemble(("weights: ", "bold"), d["transfer"]))
    if entry.doc:
        con.print()
        con.print(Text(inspect.cleandoc(entry.doc)))
