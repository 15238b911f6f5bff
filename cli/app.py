"""The ``surgery`` command: one line per command below, each a thin layer over the Python API.

Adding a command is one line: write ``def explain(...)`` in ``cli/explain.py`` (typer-annotated
parameters, a docstring that says what it does) and register it here with
``app.command(epilog=...)(explain.explain)``. Registration through :class:`SurgeryTyper` gives it
the shared error contract (exit 2 on user errors, 1 on bugs) and the ``--debug`` option.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import Annotated, Any

import typer

from surgery.cli import apply, common, demo, explain, model, ops, recipe, train


class SurgeryTyper(typer.Typer):
    """A Typer whose commands share the error contract and ``--debug`` (see ``common.guarded``)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(common.guarded(fn))
            return fn

        return deco


app = SurgeryTyper(
    name="surgery",
    help="Declarative model surgery for PyTorch: apply a .recipe to a model, see the diff, save an artifact.",
    epilog="Exit codes: 0 success, 2 user error (recipe, model reference, files), 1 internal error. "
    "Documentation: docs/cli.md.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    import surgery

    parts = [f"surgery {surgery.__version__}"]
    for pkg in ("torch", "timm"):
        with suppress(PackageNotFoundError):
            parts.append(f"{pkg} {version(pkg)}")
    typer.echo(" · ".join(parts))
    raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show versions and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="On an error, print the full traceback.")] = False,
) -> None:
    """surgery: declarative model surgery for PyTorch."""
    common.set_global_debug(debug)


# ---------------------------------------------------------------- commands (one line each)

app.command(epilog=apply.APPLY_EPILOG)(apply.apply)
app.command(epilog=apply.PLAN_EPILOG)(apply.plan)
app.command(epilog=recipe.CHECK_EPILOG)(recipe.check)
app.command(epilog=recipe.FMT_EPILOG)(recipe.fmt)
app.command(epilog=model.DIFF_EPILOG)(model.diff)
app.command("inspect", epilog=model.INSPECT_EPILOG)(model.inspect_model)
app.command(epilog=ops.OPS_EPILOG)(ops.ops)
app.command(epilog=train.FINETUNE_EPILOG)(train.finetune)
app.command("eval", epilog=train.EVAL_EPILOG)(train.eval_)
app.command(epilog=explain.EXPLAIN_EPILOG)(explain.explain)
app.command(epilog=demo.DEMO_EPILOG)(demo.demo)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``surgery = "surgery.cli.app:main"``).

    The current directory goes on ``sys.path`` (as ``python -m`` does) so that ``mymodels:factory``
    model references to the user's own code work from the project directory.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    app(args=argv if argv is not None else sys.argv[1:], prog_name="surgery")


if __name__ == "__main__":
    main()
