"""``surgery check`` and ``surgery fmt``: recipes on their own, no model needed (fast, CI-friendly)."""

from __future__ import annotations

import difflib
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from surgery.cli.common import (
    EXIT_USER,
    Format,
    FormatOption,
    SetOption,
    console,
    error_message,
    print_data,
    recipe_arg,
)

CHECK_EPILOG = """\
Examples:

```
surgery check recipes/*.recipe
surgery check my.recipe --set b=1 --format json
```
"""

FMT_EPILOG = """\
Examples:

```
surgery fmt my.recipe                 # rewrite in place (atomically)
surgery fmt --check --diff recipes/   # CI: exit 1 and show what would change
cat my.recipe | surgery fmt -         # stdin to stdout (editor integration)
```
"""


def _error_dict(exc: BaseException) -> dict[str, Any]:
    span = getattr(exc, "span", None)
    return {
        "message": getattr(exc, "message", str(exc)),
        "text": str(exc),
        "file": getattr(span, "file", None),
        "line": getattr(span, "line", None),
        "column": getattr(span, "column", None),
    }


def check(
    recipes: Annotated[
        list[str], typer.Argument(metavar="RECIPE...", help="Recipe files or names of shipped recipes.")
    ],
    set_: SetOption = None,
    fmt: FormatOption = Format.rich,
) -> None:
    """Parse and check recipes without a model: names, types, arguments, includes, params.

    Exit code 2 if any recipe has an error (each is printed with file:line:col and a caret).
    """
    from surgery.errors import UserError
    from surgery.plan import jsonable, load_recipe

    results: list[dict[str, Any]] = []
    out, err = console(), console(stderr=True)
    for name in recipes:
        try:
            checked = load_recipe(recipe_arg(name), overrides=list(set_ or []))
        except UserError as exc:
            results.append({"recipe": name, "ok": False, "error": _error_dict(exc)})
            head, _, rest = error_message(exc).partition("\n")
            err.print(Text(head, style="bold red"), soft_wrap=True)
            if rest:
                err.print(Text(rest), soft_wrap=True)
            continue
        rules = [r for r in checked.rules if not r.kind.startswith("expect")]
        expects = len(checked.rules) - len(rules)
        results.append(
            {
                "recipe": name,
                "ok": True,
                "name": checked.name,
                "version": checked.version,
                "file": checked.file,
                "rules": len(rules),
                "expects": expects,
                "params": jsonable(checked.params),
                "includes": [f for f in checked.sources if f != checked.file],
                "finetune": checked.finetune is not None,
                "error": None,
            }
        )
        if fmt is Format.rich:
            line = Text.assemble(("✓ ", "green"), (name, "bold"), "  ")
            line.append(f"{checked.name or '(unnamed)'} {checked.version}", style="cyan")
            line.append(f" · {len(rules)} rule{'s' if len(rules) != 1 else ''}", style="dim")
            if expects:
                line.append(f" · {expects} expect", style="dim")
            if checked.params:
                params = ", ".join(f"{k}={v!r}" for k, v in checked.params.items())
                line.append(f" · {params}", style="dim")
            out.print(line)
    failed = sum(not r["ok"] for r in results)
    if fmt is not Format.rich:
        print_data({"schema": "surgery-check/1", "ok": failed == 0, "results": results}, fmt)
    if failed:
        raise typer.Exit(EXIT_USER)


def _expand(paths: list[str]) -> list[Path]:
    """Files as given; directories contribute their ``*.recipe`` files (recursively, sorted)."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(path.rglob("*.recipe")))
        else:
            out.append(path)
    return out


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` via a temporary sibling and ``os.replace``: never half-written."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fmt(
    recipes: Annotated[
        list[str], typer.Argument(metavar="RECIPE...", help="Recipe files or directories; '-' reads stdin.")
    ],
    check_only: Annotated[
        bool, typer.Option("--check", help="Change nothing; exit 1 and list the files that would change.")
    ] = False,
    show_diff: Annotated[
        bool, typer.Option("--diff", help="Show what would change as a unified diff.")
    ] = False,
) -> None:
    """Format recipes canonically, in place (atomically), or check that they are.

    Exit code 0 when nothing changed or all files were rewritten, 1 with --check when a file would
    change, 2 when a file is missing or does not parse.
    """
    from surgery.errors import UserError
    from surgery.lang.formatter import format_recipe

    out, err = console(), console(stderr=True)
    if recipes == ["-"]:
        text = sys.stdin.read()
        sys.stdout.write(format_recipe(text, "<stdin>"))
        return
    failed = changed = same = 0
    for path in _expand(recipes):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            err.print(Text(f"error: cannot read {path}: {why}", style="bold red"), soft_wrap=True)
            failed += 1
            continue
        try:
            new = format_recipe(text, str(path))
        except UserError as exc:
            head, _, rest = error_message(exc).partition("\n")
            err.print(Text(head, style="bold red"), soft_wrap=True)
            if rest:
                err.print(Text(rest), soft_wrap=True)
            failed += 1
            continue
        if new == text:
            same += 1
            continue
        changed += 1
        if show_diff:
            for line in difflib.unified_diff(
                text.splitlines(), new.splitlines(), f"{path} (now)", f"{path} (formatted)", lineterm=""
            ):
                style = (
                    "green"
                    if line.startswith("+")
                    else "red"
                    if line.startswith("-")
                    else "cyan"
                    if line.startswith("@@")
                    else ""
                )
                out.print(Text(line, style=style), soft_wrap=True)
        if check_only:
            out.print(Text.assemble(("would reformat ", "yellow"), str(path)), soft_wrap=True)
        else:
            write_atomic(path, new)
            err.print(Text.assemble(("reformatted ", "green"), str(path)), soft_wrap=True)
    verb = "would be reformatted" if check_only else "reformatted"
    summary = f"{changed} file{'s' if changed != 1 else ''} {verb}, {same} unchanged"
    if failed:
        summary += f", {failed} with errors"
    err.print(Text(summary, style="dim"), soft_wrap=True)
    if failed:
        raise typer.Exit(EXIT_USER)
    if check_only and changed:
        raise typer.Exit(1)
