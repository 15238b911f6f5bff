"""What every command shares: consoles, output formats, option parsing, and the error contract.

The error contract lives here so that a command module added later gets it by being registered:
``guarded`` turns ``UserError`` into its message on stderr and exit code 2, any other exception
into a one-line "internal error" with a hint to re-run with ``--debug`` and exit code 1, and adds
the ``--debug`` option (full traceback) to the command's own options.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2

_DEBUG = {"global": False}
"""Set by the root ``--debug`` option (``surgery --debug CMD``); each command also takes ``--debug``."""


def set_global_debug(value: bool) -> None:
    _DEBUG["global"] = value


class Format(str, Enum):
    """How a command prints its result: a rich terminal view, or data for scripts and CI."""

    rich = "rich"
    json = "json"
    yaml = "yaml"


FormatOption = Annotated[
    Format,
    typer.Option("--format", "-f", help="rich (terminal view), json or yaml (stable keys, see docs/cli.md)."),
]
ExpandOption = Annotated[
    bool, typer.Option("--expand", help="List every module instead of folding identical sibling blocks.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="NAME=VALUE", help="Override a recipe `param` (repeatable): --set b=1."),
]


def console(*, stderr: bool = False) -> Console:
    """A rich console: colour only on a terminal (rich also honours NO_COLOR / FORCE_COLOR).

    Piped output gets a fixed width of 120 (or $COLUMNS) rather than rich's 80, so tables stay on
    one line per row in logs.
    """
    con = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not con.is_terminal and not os.environ.get("COLUMNS"):
        con = Console(stderr=stderr, highlight=False, width=120)
    return con


def print_data(data: Any, fmt: Format) -> None:
    """JSON or YAML on stdout, nothing else: scripts parse it as is."""
    if fmt is Format.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        from surgery.diff import to_yaml

        sys.stdout.write(to_yaml(data))
    sys.stdout.flush()


def note(message: str, *, style: str = "dim") -> None:
    """A human-facing line on stderr (never mixed into JSON/YAML on stdout)."""
    console(stderr=True).print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    con = console(stderr=True)
    con.print("warning: ", style="bold yellow", end="", markup=False)
    con.print(message, markup=False, highlight=False, soft_wrap=True)


def error_message(exc: BaseException) -> str:
    """How a user error reads: a RecipeError already starts with file:line:col."""
    from surgery.errors import RecipeError

    text = str(exc).rstrip() or type(exc).__name__
    return text if isinstance(exc, RecipeError) else f"error: {text}"


def _report_user_error(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)
    con = console(stderr=True)
    text = error_message(exc)
    head, _, rest = text.partition("\n")
    con.print(head, style="bold red", markup=False, highlight=False, soft_wrap=True)
    if rest:
        con.print(rest, markup=False, highlight=False, soft_wrap=True)


def _report_internal_error(exc: BaseException, debug: bool) -> None:
    con = console(stderr=True)
    if debug:
        traceback.print_exc(file=sys.stderr)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    con.print(
        f"internal error: {type(exc).__name__}: {first}", style="bold red", markup=False, highlight=False
    )
    if not debug:
        con.print(
            "This is a bug in surgery or in code it called, not in your input. "
            "Re-run with --debug for the traceback.",
            markup=False,
            highlight=False,
        )


def _passthrough() -> tuple[type[BaseException], ...]:
    from typer._click import exceptions as click_exc

    return (typer.Exit, typer.Abort, click_exc.ClickException)


DebugOption = Annotated[
    bool,
    typer.Option("--debug", help="On an error, print the full traceback.", rich_help_panel="Troubleshooting"),
]


def guarded(fn: F) -> F:
    """Wrap a command in the error contract and give it a ``--debug`` option (if it has none)."""
    sig = inspect.signature(fn, eval_str=True)
    own_debug = "debug" in sig.parameters
    passthrough = _passthrough()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from surgery.errors import UserError

        debug = bool(kwargs.get("debug") if own_debug else kwargs.pop("debug", False))
        debug = debug or _DEBUG["global"] or bool(os.environ.get("SURGERY_DEBUG"))
        try:
            return fn(*args, **kwargs)
        except passthrough:
            raise
        except UserError as exc:
            _report_user_error(exc, debug)
            raise typer.Exit(EXIT_USER) from None
        except Exception as exc:
            _report_internal_error(exc, debug)
            raise typer.Exit(EXIT_INTERNAL) from None

    if not own_debug:
        params = [*sig.parameters.values()]
        params.append(
            inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugOption)
        )
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {
            **{p.name: p.annotation for p in sig.parameters.values()},
            "debug": DebugOption,
            "return": sig.return_annotation,
        }
    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------- option parsing


def parse_input_size(text: str | None) -> tuple[int, ...] | None:
    """``3x224x224`` -> (3, 224, 224); ``224`` -> (3, 224, 224)."""
    if text is None:
        return None
    parts = re.split(r"[x×,]", text.strip().lower())
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a size like 3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise typer.BadParameter(f"'{text}' is not a size like 3x224x224")
    return (3, dims[0], dims[0]) if len(dims) == 1 else dims


def slug(text: str) -> str:
    """A safe directory-name piece: ``timm:resnet18?num_classes=10`` -> ``resnet18``."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return out or "model"


def model_slug(ref: str, base_name: str | None) -> str:
    head = ref.partition("?")[0].rstrip("/")
    if base_name and ":" in head:
        return slug(base_name.rpartition(":")[2] or base_name)
    return slug(Path(head).name or head)


def fail(message: str) -> None:
    """Raise a user error from CLI-level checks (exit 2, message on stderr)."""
    from surgery.errors import UserError

    raise UserError(message)


def recipe_arg(name: str) -> str:
    """RECIPE as given, once it is known to exist: a file, or a shipped recipe's name.

    Checked here so that a typo reads "recipe not found" rather than a syntax error in the name.
    """
    from surgery.lang.checker import shipped_recipe, shipped_recipe_names

    if Path(name).is_file() or shipped_recipe(name) is not None:
        return name
    if Path(name).is_dir():
        fail(f"{name} is a directory, not a recipe file")
    shipped = shipped_recipe_names()
    also = f"; shipped recipes: {', '.join(shipped)}" if shipped else ""
    fail(f"recipe not found: {name} (no such file, and no shipped recipe of that name{also})")
    return name
