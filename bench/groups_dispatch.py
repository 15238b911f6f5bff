"""Operators one training step dispatches (forward, backward, Adam): what a GPU step launches.

Counted with a ``TorchDispatchMode`` on the CPU under bf16 autocast with foreach Adam (the GPU
defaults), paper size (width 40, N = 10, 40x40, batch 2: the count does not depend on the batch).
Each op is classed as ``device`` (touches activations or parameters: a kernel launch on a GPU),
``geometry`` (float64 or tiny tensors: the sample-set geometry, host-side since it is memoised
on the set), ``metadata`` (views, transposes, detach: no kernel) and ``casts`` (``_to_copy``).

    python bench/groups_dispatch.py            # the numbers in docs/groups.md ("Changed since ...")
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from surgery.groups import equivariant_cnn, gl_plus, plain_cnn

METADATA = {
    "aten.view", "aten.t", "aten.detach", "aten._unsafe_view", "aten.permute", "aten.unsqueeze",
    "aten.expand", "aten.transpose", "aten.select", "aten._local_scalar_dense", "aten.as_strided",
    "aten.squeeze", "aten.slice", "aten.alias", "aten.lift_fresh", "aten._reshape_alias", "aten.empty",
    "aten.empty_like", "aten.split", "aten.unbind", "aten.diagonal",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.kinds: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        small = all(t.dtype == torch.float64 or t.numel() <= 64 for t in tensors)
        self.kinds["metadata" if name in METADATA else "geometry" if small else "device"] += 1
        if name == "aten._to_copy":
            self.kinds["casts"] += 1
        return out


def count(model: nn.Module) -> dict[str, int]:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    x, y = torch.randn(2, 1, 40, 40), torch.randint(0, 10, (2,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    with OpCounter() as counter:
        step()
    return dict(counter.kinds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=40)
    ap.add_argument("--samples", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    models = {
        "plain CNN": plain_cnn(width=args.width),
        "group, separable": equivariant_cnn(
            gl_plus(2, samples=args.samples), width=args.width, separable=True
        ),
    }
    print("| model | device ops | geometry ops | metadata ops | casts |\n|---|---|---|---|---|")
    for name, model in models.items():
        k = count(model)
        print(
            f"| {name} | {k.get('device', 0)} | {k.get('geometry', 0)} | {k.get('metadata', 0)} | {k.get('casts', 0)} |"
        )


if __name__ == "__main__":
    main()
