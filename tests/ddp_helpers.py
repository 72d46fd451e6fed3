"""Workers for the DDP parity test: 2 gloo processes on CPU versus one process, same global batch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ascl.training.config import load_config
from ascl.training.frameworks import build_framework

GLOBAL_BATCH = 8
GROUP = 2  # BatchNorm group size: per-rank bn_splits = per-rank batch / GROUP


def config(framework: str, batch_per_process: int) -> Any:
    return load_config(None, [
        f"framework={framework}", "data.image_size=8", "model.head_hidden=32", "model.head_dim=16",
        "model.pred_hidden=32", f"model.bn_splits={batch_per_process // GROUP}", "moco.queue_size=24",
    ])


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g), torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g)


def one_step(framework: str, rank: int, world: int) -> dict[str, Any]:
    """Loss (mean over ranks), gradients (DDP-averaged) and the queue after one forward/backward."""
    per = GLOBAL_BATCH // world
    torch.manual_seed(0)
    fw = build_framework(config(framework, per)).train()
    model = torch.nn.parallel.DistributedDataParallel(fw, forward_sync_buffers=False) if world > 1 else fw
    x_q, x_k = inputs()
    torch.manual_seed(123)  # the batch-shuffle permutation (drawn on rank 0)
    loss = model(x_q[rank * per : (rank + 1) * per], x_k[rank * per : (rank + 1) * per])
    loss.backward()
    loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    grads = {n: p.grad.clone() for n, p in fw.named_parameters() if p.grad is not None}
    queue = fw.queue.keys.clone() if framework == "moco" else torch.zeros(0)
    return {"loss": loss, "grads": grads, "queue": queue}


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {fw: one_step(fw, rank, world) for fw in ("moco", "byol")}
        if rank == 0:
            torch.save(results, Path(out_dir) / "ddp.pt")
    finally:
        dist.destroy_process_group()
