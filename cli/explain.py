"""``surgery explain``: explanation images for a (B-cos) artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.common import console, fail

EXPLAIN_EPILOG = """\
Examples:

```
surgery explain out/bcos-ft cat.png dog.jpg -o out/explanations
surgery explain out/bcos-ft digit.png --target 3 -o out/explanations
```
"""


def _load_image(path: Path, size: tuple[int, int]) -> object:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        fail(f"image not found: {path}")
    except (UnidentifiedImageError, OSError) as exc:
        fail(f"cannot read image {path}: {exc}")
    return torch.from_numpy(arr).permute(2, 0, 1)


def explain(
    artifact: Annotated[str, typer.Argument(metavar="ARTIFACT", help="An artifact directory.")],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="Image files (PNG, JPEG, ...).")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="Where the PNGs go.")],
    target: Annotated[int | None, typer.Option(help="Class to explain (default: the prediction).")] = None,
    scale: Annotated[int, typer.Option(help="Upscale small images in the PNG by this factor.")] = 1,
) -> None:
    """Write explanation PNGs for images: the image, its explanation and the contribution map.

    One PNG per image: the image, its explanation over black and over white, and the contribution
    map side by side. The image is fed as the artifact's input contract says (raw RGB in
    [0, 1] for add_inverse models, mean/std otherwise), resized to the artifact's input size.
    """
    import torch

    import surgery
    from surgery.explain import explain as run_explain
    from surgery.explain import save_explanation_png
    from surgery.train import resolve_input_pipeline

    result = surgery.load(artifact)
    size = tuple(result.input_size or (3, 224, 224))[-2:]
    pipeline = resolve_input_pipeline(result.model, result.contract or None)
    batch = torch.stack([_load_image(p, size) for p in images])  # type: ignore[misc]
    x = pipeline(batch)
    exp = run_explain(result.model.eval(), x, target)
    con = console()
    for i, p in enumerate(images):
        out = save_explanation_png(output / f"{p.stem}-explanation.png", x[i], exp, index=i, scale=scale)
        logit = exp.explained_logits[i].item()
        con.print(
            f"{p} -> {out}  (class {int(exp.target[i])}, logit {logit:.3f}, residual {exp.residual[i].item():.1e})"
        )
