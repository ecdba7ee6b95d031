"""Process-group set-up for one process or ``torchrun`` (single or multi node), and a clean exit.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them we run as a single process. NCCL on
CUDA, gloo on CPU. :class:`DistInfo` is what the launch set up (with the device); code outside the loop asks
:mod:`seg.distributed` about the live process group instead.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seg.distributed import barrier as process_barrier
from seg.distributed import group_initialized
from seg.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None) -> torch.device:
    """'cpu', 'cuda' or None (CUDA when available); asking for CUDA without one is an error."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but torch sees no CUDA device (use --device cpu)")
    return torch.device(name)


def init_distributed(device_name: str | None = None, timeout_min: float = 30.0) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise describe a single process."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not group_initialized():
        timeout = datetime.timedelta(minutes=timeout_min)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # After `torchrun --max-restarts` restarts the workers, the agent's store still holds the previous
        # attempt's keys (e.g. gloo's peer addresses, which would point at dead processes); a prefix per
        # attempt keeps every attempt's rendezvous separate.
        store = dist.PrefixStore(f"deconvseg/attempt_{elastic_restart_count()}", store)
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world_size, local_rank, device)


def barrier(info: DistInfo) -> None:
    """Wait for every process of ``info``'s run (:func:`seg.distributed.barrier` on its device)."""
    if info.distributed:
        process_barrier(info.device)


def all_gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's ``obj`` (a list of one element in a single process)."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def elastic_restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def finish(info: DistInfo, exit_code: int) -> None:
    """End the process. Under a process group: tear it down and leave with ``os._exit``.

    torch's gloo backend can abort during interpreter shutdown ("terminate called without an active
    exception") after an otherwise successful run; skipping the interpreter's teardown avoids it, so
    the exit code is always the one the training produced.
    """
    if not info.distributed:
        sys.exit(exit_code)
    try:
        if group_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
