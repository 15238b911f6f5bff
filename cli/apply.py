"""``surgery apply`` and ``surgery plan``: a recipe against a model, with or without doing it.

Both are thin: ``surgery.plan`` / ``surgery.apply`` / ``surgery.save`` do the work and
``surgery.diff`` describes it. What lives here is the order of things that keeps the contract:
check the output directory before any slow work, save (atomically) before printing success, and
never create the directory when anything fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from surgery.cli.common import (
    EXIT_USER,
    ExpandOption,
    Format,
    FormatOption,
    SetOption,
    console,
    fail,
    model_slug,
    parse_input_size,
    print_data,
    recipe_arg,
    slug,
    warn,
)
from surgery.models import load_model

RecipeArg = Annotated[
    str,
    typer.Argument(
        metavar="RECIPE", help="A .recipe file, or the name of a shipped recipe (see `surgery check`)."
    ),
]
ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="timm:NAME[?opt=value&...], torchvision:NAME, package.module:factory, or an artifact directory.",
    ),
]
StrictOption = Annotated[
    bool,
    typer.Option(
        "--strict/--no-strict",
        help="A rule that matches nothing is an error (default); --no-strict reports it as a warning.",
    ),
]

APPLY_EPILOG = """\
Examples:

```
surgery apply bcos.recipe timm:resnet18       # writes out/bcos-resnet18
surgery apply bcos.recipe timm:resnet18 -o runs/r18 --set b=1.5
surgery apply bcos.recipe timm:resnet18?num_classes=10 --input-size 3x32x32 --dry-run
surgery apply bcos.recipe torchvision:resnet50 --format json > diff.json
```
"""

PLAN_EPILOG = """\
Examples:

```
surgery plan bcos.recipe timm:vit_small_patch16_224
surgery plan bcos.recipe mypkg.models:small_cnn?width=32 --no-strict --format json
```
"""


def _report_problems(problems: list[Any], *, strict: bool) -> None:
    for p in problems:
        if p.level == "error" and strict:
            continue  # raised as the error itself, with its caret
        warn(p.render())


def apply(
    recipe: RecipeArg,
    model: ModelArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="DIR",
            help="Artifact directory to write (default: `out/RECIPE-MODEL`). Must not exist, unless --force.",
        ),
    ] = None,
    set_: SetOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan, apply, verify and show the diff; write nothing.")
    ] = False,
    fmt: FormatOption = Format.rich,
    strict: StrictOption = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    input_size: Annotated[
        str | None,
        typer.Option(
            "--input-size",
            metavar="CxHxW",
            help="Input size for the smoke forward pass and `expect output`, e.g. 3x224x224 "
            "(default: the model's pretrained_cfg or ?input_size= of the reference).",
        ),
    ] = None,
    expand: ExpandOption = False,
) -> None:
    """Apply RECIPE to MODEL: plan, apply (to a copy), verify, show the diff, save the artifact.

    The artifact directory holds model.safetensors, the recipe, the resolved plan and a manifest;
    `surgery.load(DIR)` (or any command taking MODEL) rebuilds it. Writing is atomic: on any error
    no directory is left behind, and an existing one is never replaced without --force.
    """
    import surgery
    from surgery import diff
    from surgery.apply import input_size_of

    size = parse_input_size(input_size)
    recipe = recipe_arg(recipe)
    if output is not None and not dry_run and output.exists() and not force:
        fail(f"{output} already exists (pass --force to replace it)")
    net, base = load_model(model)
    the_plan = surgery.plan(recipe, net, overrides=list(set_ or []))
    _report_problems(the_plan.problems, strict=strict)
    if strict:
        the_plan.raise_for_errors()
    target = None
    if not dry_run:
        name = the_plan.recipe.name or Path(the_plan.recipe.file).stem
        target = output or Path("out") / f"{slug(name)}-{model_slug(model, base.name if base else None)}"
        if target.exists() and not force:
            fail(f"{target} already exists (pass --force to replace it, or -o DIR)")
    size = input_size_of(net, base, size)
    result = surgery.apply(the_plan.recipe, net, the_plan=the_plan, strict=strict, input_size=size)
    result.base = base
    report = diff.compute(
        result.original,
        result.model,
        result.plan,
        before_ref=model,
        after_ref=str(target) if target else None,
    )
    report.extra = {
        "artifact": str(target) if target else None,
        "verified": result.verified,
        "input_size": list(size) if size else None,
        "dry_run": dry_run,
    }
    if target is not None:
        surgery.save(result, target, overwrite=force)
    if fmt is not Format.rich:
        print_data(report.to_dict(), fmt)
        return
    con = console()
    diff.render(report, con, expand=expand)
    if target is not None:
        con.print(Text.assemble("\n", ("✓", "green"), " saved ", (str(target), "bold")), soft_wrap=True)
    else:
        con.print(Text.assemble("\n", ("dry run:", "yellow"), " nothing written"))


def plan(
    recipe: RecipeArg,
    model: ModelArg,
    set_: SetOption = None,
    fmt: FormatOption = Format.rich,
    strict: StrictOption = True,
    expand: ExpandOption = False,
) -> None:
    """Show which modules each rule of RECIPE matches in MODEL, without changing anything.

    Per rule: its line, how many modules it matched and which (folded; --expand lists all). Rules
    that match nothing are errors (exit code 2 unless --no-strict); modules changed by more than
    one rule are warnings.
    """
    import surgery

    recipe = recipe_arg(recipe)
    net, _ = load_model(model)
    the_plan = surgery.plan(recipe, net, overrides=list(set_ or []))
    if fmt is not Format.rich:
        print_data({"schema": "surgery-plan/1", "model": model, **the_plan.to_dict()}, fmt)
    else:
        render_plan(the_plan, model, expand=expand)
    if the_plan.errors and strict:
        n = len(the_plan.errors)
        console(stderr=True).print(
            Text(
                f"error: {n} rule{' matches' if n == 1 else 's match'} nothing (use --no-strict to allow)",
                style="bold red",
            )
        )
        raise typer.Exit(EXIT_USER)


def render_plan(the_plan: Any, model: str, *, expand: bool = False, limit: int = 6) -> None:
    from rich import box
    from rich.table import Table

    from surgery.diff import display_name, fold_names

    levels: dict[int, list[Any]] = {}
    for p in the_plan.problems:
        levels.setdefault(p.rule.index, []).append(p)
    r = the_plan.recipe
    title = Text.assemble(
        (f"{r.name or r.file}", "bold"),
        (f" {r.version}" if r.version else "", "bold"),
        " on ",
        (model, "cyan"),
        (f"  {the_plan.model_class}", "dim"),
    )
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        header_style="dim",
        pad_edge=False,
    )
    table.add_column("line", justify="right", style="dim", no_wrap=True)
    table.add_column("rule", overflow="fold")
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("modules", overflow="fold")
    for step in the_plan.steps:
        rule = step.rule
        probs = levels.get(rule.index, [])
        if rule.kind.startswith("expect"):
            table.add_row(
                str(rule.span.line),
                Text(rule.text, style="dim"),
                "",
                Text("checked after apply", style="dim"),
            )
            continue
        folded = [
            label + (f" ×{len(idx)}" if len(idx) > 1 else "")
            for label, idx in fold_names([(display_name(n), None) for n in step.names])
        ]
        shown = folded if expand else folded[:limit]
        names = Text(", ".join(shown))
        if len(shown) < len(folded):
            names.append(f", … {len(folded) - len(shown)} more (--expand)", style="dim")
        count = Text(str(len(step.names)), style="magenta")
        rule_text = Text(rule.text)
        if any(p.level == "error" for p in probs):
            rule_text.stylize("bold red")
            count = Text("0", style="bold red")
            names = Text("matches nothing", style="bold red")
        elif probs:
            rule_text.stylize("yellow")
        table.add_row(str(rule.span.line), rule_text, count, names)
    con = console()
    con.print(table)
    for p in the_plan.problems:
        style = "bold red" if p.level == "error" else "yellow"
        con.print(Text.assemble((f"{p.level}: ", style), p.render()), soft_wrap=True)
