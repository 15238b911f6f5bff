"""``surgery diff`` and ``surgery inspect``: what a model is made of, and how two models differ."""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Annotated

import typer
from rich.text import Text
from rich.tree import Tree
from torch import nn

from surgery.cli.common import ExpandOption, Format, FormatOption, console, print_data
from surgery.models import load_model

DIFF_EPILOG = """\
Examples:

```
surgery diff timm:resnet18 out/bcos-resnet18          # base model vs. artifact
surgery diff out/run1 out/run2 --format json
surgery diff timm:resnet18 torchvision:resnet18 --expand
```
"""

INSPECT_EPILOG = """\
Examples:

```
surgery inspect timm:resnet50
surgery inspect timm:vit_small_patch16_224 --depth 2
surgery inspect mypkg.models:small_cnn?width=32 --format json
```
"""


def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="Model reference or artifact directory (before).")],
    b: Annotated[str, typer.Argument(metavar="B", help="Model reference or artifact directory (after).")],
    fmt: FormatOption = Format.rich,
    expand: ExpandOption = False,
) -> None:
    """Structural diff of two models: modules by name, types, parameter shapes and counts.

    A module on one side only, or whose type changed, is listed once with its subtree; modules of
    the same type are compared by their own parameters, trainability and configuration.
    """
    from surgery import diff as sdiff

    before, _ = load_model(a)
    after, _ = load_model(b)
    report = sdiff.compute(before, after, before_ref=a, after_ref=b)
    if fmt is not Format.rich:
        print_data(report.to_dict(), fmt)
        return
    sdiff.render(report, console(), expand=expand)


# ---------------------------------------------------------------- inspect


def resolve_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every ``@alias`` that resolves on this model, with ``stage(n)`` spelled out per stage."""
    from surgery import aliases
    from surgery.errors import SurgeryError

    out: dict[str, list[str]] = {}
    for name, (arity, _fn, _doc) in aliases.ALIASES.items():
        if arity or name == "model":
            continue
        try:
            out[name] = aliases.resolve(model, name, ())
        except SurgeryError:
            continue
    for n, names in aliases.stages(model).items():
        out[f"stage({n})"] = list(names)
    return out


def trace_status(model: nn.Module) -> dict[str, str | None]:
    """name -> None (traces) or the reason it does not, for modules with code of their own.

    torch.nn built-ins and containers without ``forward`` are skipped: fx treats them as leaves.
    """
    from surgery.fx import is_torch_builtin, traceable

    out: dict[str, str | None] = {}
    for name, m in model.named_modules():
        if name and is_torch_builtin(m) and not isinstance(m, nn.Sequential):
            continue
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            continue
        ok, why = traceable(m)
        out[name] = None if ok else why
    return out


def _count(m: nn.Module) -> tuple[int, int]:
    ps = list(m.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


def _signature(m: nn.Module, trace: dict[str, str | None], name: str) -> Hashable:
    """Two sibling blocks fold when their subtrees have the same types, shapes and traceability."""
    from surgery.diff import type_name

    prefix = f"{name}." if name else ""
    return (
        tuple((n, type_name(c)) for n, c in m.named_modules()),
        tuple((n, tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()),
        tuple(trace.get(prefix + n if n else name, "-") is None for n, _ in m.named_modules()),
    )


def _fold_tags(tag_lists: list[list[str]]) -> list[str]:
    """Tags of folded siblings: shared ones as they are, ``@stage(n)`` runs as ``@stage(0-11)``."""
    from surgery.diff import ranges

    if all(t == tag_lists[0] for t in tag_lists):
        return tag_lists[0]
    nums = []
    for tags in tag_lists:
        m = [re.fullmatch(r"stage\((\d+)\)", t) for t in tags]
        if len(tags) != 1 or not m[0]:
            return []
        nums.append(int(m[0].group(1)))
    return [f"stage({ranges(nums)})"]


def _label(
    key: str, m: nn.Module, full: str, tags: list[str], trace: dict[str, str | None], count: int = 1
) -> Text:
    from surgery.diff import fmt_count, type_name

    total, trainable = _count(m)
    text = Text()
    text.append(key, style="bold")
    if count > 1:
        text.append(f" ×{count}", style="magenta")
    text.append(f"  {type_name(m)}", style="cyan")
    if total:
        text.append(f"  {fmt_count(total)}", style="dim")
        if trainable != total:
            text.append(f" ({fmt_count(trainable)} trainable)", style="yellow")
    for t in tags:
        text.append(f"  @{t}", style="magenta")
    if full in trace:
        why = trace[full]
        text.append("  fx ✓" if why is None else "  fx ✗", style="green dim" if why is None else "bold red")
    return text


def _add_children(
    node: Tree,
    m: nn.Module,
    name: str,
    tags: dict[str, list[str]],
    trace: dict[str, str | None],
    *,
    depth: int,
    max_depth: int | None,
    expand: bool,
) -> None:
    children = list(m.named_children())
    if not children:
        return
    if max_depth is not None and depth >= max_depth:
        n = sum(1 for _ in m.modules()) - 1
        node.add(Text(f"… {n} submodule{'s' if n != 1 else ''} (--depth)", style="dim"))
        return
    runs: list[list[tuple[str, nn.Module]]] = []
    for key, child in children:
        full = f"{name}.{key}" if name else key
        if (
            not expand
            and runs
            and key.isdigit()
            and runs[-1][-1][0].isdigit()
            and int(key) == int(runs[-1][-1][0]) + 1
            and _signature(child, trace, full)
            == _signature(runs[-1][0][1], trace, f"{name}.{runs[-1][0][0]}" if name else runs[-1][0][0])
        ):
            runs[-1].append((key, child))
        else:
            runs.append([(key, child)])
    for run in runs:
        key, child = run[0]
        full = f"{name}.{key}" if name else key
        if len(run) == 1:
            label = _label(key, child, full, tags.get(full, []), trace)
        else:
            fulls = [f"{name}.{k}" if name else k for k, _ in run]
            label = _label(
                f"{run[0][0]}-{run[-1][0]}",
                child,
                full,
                _fold_tags([tags.get(f, []) for f in fulls]),
                trace,
                len(run),
            )
        sub = node.add(label)
        _add_children(sub, child, full, tags, trace, depth=depth + 1, max_depth=max_depth, expand=expand)


def _names(names: list[str]) -> str:
    from surgery.diff import display_name, fold_names

    return ", ".join(label for label, _ in fold_names([(display_name(n), None) for n in names]))


def inspect_model(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="timm:NAME, torchvision:NAME, package.module:factory, or an artifact directory.",
        ),
    ],
    depth: Annotated[
        int | None, typer.Option("--depth", "-d", min=0, help="Show the module tree this many levels deep.")
    ] = None,
    trace: Annotated[
        bool, typer.Option("--trace/--no-trace", help="Check which modules torch.fx can trace (default on).")
    ] = True,
    fmt: FormatOption = Format.rich,
    expand: ExpandOption = False,
) -> None:
    """Show MODEL's module tree: types, parameter counts, @aliases, and fx traceability.

    The @aliases shown are those a recipe can use on this model (@first_conv, @classifier, @pool,
    @stem, @stage(n)). "fx ✓/✗" marks modules with code of their own that torch.fx can / cannot
    trace, which `rewrite call` and graph diffs need. Identical sibling blocks are folded.
    """
    from surgery.aliases import pretrained_cfg
    from surgery.diff import fmt_count, fold_names, type_name

    net, base = load_model(model)
    aliases = resolve_aliases(net)
    tags: dict[str, list[str]] = {}
    for alias, names in aliases.items():
        for n in names:
            tags.setdefault(n, []).append(alias)
    status = trace_status(net) if trace else {}
    total, trainable = _count(net)
    size = base.input_size if base is not None and base.input_size else pretrained_cfg(net).get("input_size")
    if fmt is not Format.rich:
        modules = []
        for name, m in net.named_modules():
            n_all, n_train = _count(m)
            modules.append(
                {
                    "name": name,
                    "type": type_name(m),
                    "depth": name.count(".") + 1 if name else 0,
                    "params": n_all,
                    "trainable": n_train,
                    "aliases": tags.get(name, []),
                    "traceable": (status[name] is None) if name in status else None,
                    "trace_error": status.get(name),
                }
            )
        print_data(
            {
                "schema": "surgery-inspect/1",
                "model": model,
                "class": type(net).__name__,
                "params": total,
                "trainable": trainable,
                "input_size": list(size) if size else None,
                "aliases": aliases,
                "modules": modules,
            },
            fmt,
        )
        return
    con = console()
    root = _label(model, net, "", tags.get("", []), status)
    if size:
        root.append(f"  input {'×'.join(str(s) for s in size)}", style="dim")
    tree = Tree(root, guide_style="dim")
    _add_children(tree, net, "", tags, status, depth=0, max_depth=depth, expand=expand)
    con.print(tree)
    con.print()
    from rich.table import Table

    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column(style="magenta", no_wrap=True)
    table.add_column(overflow="fold")
    stage_keys = [k for k in aliases if k.startswith("stage(")]
    for k, names in aliases.items():
        if k in stage_keys:
            continue
        table.add_row(Text(f"@{k}"), Text(_names(names)))
    if stage_keys:
        folded = fold_names([(n, None) for k in stage_keys for n in aliases[k]])
        single = all(len(aliases[k]) == 1 for k in stage_keys) and len(folded) == 1
        if single:
            nums = [int(k[6:-1]) for k in stage_keys]
            from surgery.diff import ranges

            table.add_row(Text(f"@stage({ranges(nums)})"), Text(folded[0][0] + "  (one stage each)"))
        else:
            for k in stage_keys:
                table.add_row(Text(f"@{k}"), Text(_names(aliases[k])))
    con.print(Text("aliases", style="bold"))
    con.print(table)
    summary = Text.assemble(("\nparameters ", "bold"), fmt_count(total))
    if trainable != total:
        summary.append(f" ({fmt_count(trainable)} trainable)")
    con.print(summary)
    if trace:
        bad = {n: why for n, why in status.items() if why is not None}
        if not bad:
            con.print(Text.assemble(("fx ", "bold"), ("every module with code of its own traces", "green")))
        else:
            con.print(
                Text(f"fx: {len(bad)} module{'s' if len(bad) != 1 else ''} do not trace", style="bold red")
            )
            for n, why in list(bad.items())[:20]:
                con.print(Text.assemble(("  " + (n or "<model>"), "bold"), f": {why}"))
            if len(bad) > 20:
                con.print(Text(f"  … and {len(bad) - 20} more (--format json lists all)", style="dim"))
