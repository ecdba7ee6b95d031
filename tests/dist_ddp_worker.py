"""Run by test_engine_distributed.py: a DDP-wrapped small deconvolution network trained on two gloo processes
with a 3:2 batch split (the trainer's DDP settings), then a checkpoint save with broken weights on one rank."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seg.engine.checkpointer import Checkpointer, NonFiniteLossError
from seg.engine.distributed import DistInfo
from seg.engine.trainer import buffers_identical_by_construction
from seg.nn import deconvolve
from tests.dist_sync_worker import save_and_exit

SPLIT = (3, 2)  # samples on rank 0 and rank 1
STEPS = 4


def make_model() -> nn.Module:
    """A stem (3 channels: the stem's settings, 15 iterations, float32 convolution) and two body layers."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    return deconvolve(net, block=4, sync=True, stem_freeze_iter=2)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(sum(SPLIT), 3, 12, 10, generator=g), torch.randint(0, 4, (sum(SPLIT), 6, 5), generator=g))
            for _ in range(STEPS)]


def worker(rank: int, out_dir: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = make_model()
    broadcast = not buffers_identical_by_construction(model)
    ddp = DistributedDataParallel(model, broadcast_buffers=broadcast)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lo = sum(SPLIT[:rank])
    losses = []
    for x, y in batches():
        loss = nn.functional.cross_entropy(ddp(x[lo: lo + SPLIT[rank]]), y[lo: lo + SPLIT[rank]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = {k: v.clone() for k, v in model.state_dict().items()}

    # Broken weights on rank 1 only: every rank must learn it in the save and raise, none may wait alone.
    info = DistInfo(rank, 2, 0, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    ckpt = Checkpointer(Path(out_dir) / "run", info, {}, model=model, optimizer=opt, scheduler=sched,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), log=lambda *_: None)
    if rank == 1:
        with torch.no_grad():
            next(model.parameters())[0].fill_(float("nan"))
    message = ""
    try:
        ckpt.save(STEPS)
    except NonFiniteLossError as e:
        message = str(e)
    save_and_exit(rank, out_dir, {"state": state, "losses": torch.tensor(losses), "broadcast": broadcast,
                                  "save_error": message})


if __name__ == "__main__":
    out = sys.argv[1]
    mp.spawn(worker, args=(out, os.path.join(out, "init")), nprocs=2, join=True)
