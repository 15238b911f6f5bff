"""DistributedDataParallel on CPU: two gloo processes set up the way torchrun sets them up."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from surgery.lang.values import Call
from surgery.train import FinetuneConfig, finetune, read_metrics
from surgery.train.distributed import DistInfo, ShardSampler, init_distributed


def make_model() -> nn.Module:
    torch.manual_seed(0)  # no BatchNorm/dropout: DDP and one process then compute the same thing
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def make_config(batch_size: int) -> FinetuneConfig:
    return FinetuneConfig.from_block(
        {
            "data": Call("digits", (), {"size": 8}),
            "epochs": 1,
            "batch_size": batch_size,
            "steps_per_epoch": 4,
            "optimizer": Call("adamw", (), {"lr": 1e-2}),
            "loss": Call("bce"),
            "device": "cpu",
        }
    )


def _worker(rank: int, port: int, out: str) -> None:
    """One torchrun-style process: the env vars torchrun would set, then the normal API."""
    torch.set_num_threads(1)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    from surgery.train import cleanup_distributed

    model = make_model()
    result = finetune(model, make_config(batch_size=16), Path(out) / "run", progress=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
    (Path(out) / f"rank{rank}.acc").write_text(repr(result.final["val_acc"]))
    cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # DDP keeps the replicas identical
    # rank 0 alone wrote the run directory, one record per epoch
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(recs) == 1 and recs[0]["train_samples"] == 2 * 4 * 16
    assert recs[0]["val_samples"] == 359  # evaluation shards are summed over ranks, not padded
    assert (tmp_path / "run" / "checkpoints" / "epoch-0001" / "model.safetensors").exists()
    assert (tmp_path / "rank0.acc").read_text() == (tmp_path / "rank1.acc").read_text()
    # 2 ranks × 16 = one process × 32: same samples per step, gradients averaged the same way
    single = make_model()
    finetune(single, make_config(batch_size=32), tmp_path / "single", progress=False)
    for k, v in single.state_dict().items():
        assert torch.allclose(v, w0[k], atol=1e-5, rtol=1e-4), k


def test_single_process_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.enabled
    shard = ShardSampler(5, DistInfo(rank=1, world_size=2))
    assert list(shard) == [1, 3] and len(shard) == 2
