"""``surgery demo``: the end-to-end job on built-in data (the README's first command)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.common import console

DEMO_EPILOG = """\
Examples:

```
surgery demo -o out/demo
surgery demo -o out/demo --epochs 5 --model resnet34
```
"""


def demo(
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="DIR", help="Where everything goes.")
    ] = Path("out/demo"),
    model: Annotated[str, typer.Option(help="A timm CNN to train and B-cosify.")] = "resnet18",
    recipe: Annotated[
        str, typer.Option(help="The recipe to apply (a file or a shipped name).")
    ] = "bcosify-resnet",
    epochs: Annotated[
        int, typer.Option(help="Epochs for the standard model and for the B-cos fine-tune.")
    ] = 3,
    size: Annotated[int, typer.Option(help="Image size the digits are upsampled to.")] = 32,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Run the end-to-end job on built-in data: train, B-cosify, diff, fine-tune, explain.

    Trains a standard timm CNN on scikit-learn's digits, B-cosifies it with a shipped recipe, shows
    the diff, fine-tunes briefly, reports accuracy and writes explanation images to disk.
    """
    from surgery.demo import DemoSettings, run_demo

    settings = DemoSettings(
        model=model, recipe=recipe, size=size, epochs_standard=epochs, epochs_bcos=epochs, progress=progress
    )
    run_demo(output, settings, console())
