"""Where this process stands in the run: its rank, the world size, whether the run spans several processes.

The one module that asks ``torch.distributed`` about the live process group (which
:func:`seg.engine.distributed.init_distributed` sets up); the layers' synced statistics, the model builder's
sync decision and the evaluation loops' sums all ask here. It imports nothing from ``seg``, so every layer,
``seg.nn`` included, may use it. Without a process group: rank 0 of a world of one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_initialized() -> bool:
    """Whether a process group exists (possibly of one process)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if group_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if group_initialized() else 1


def is_distributed() -> bool:
    """True when a process group of more than one process exists: sums and statistics must cross processes."""
    return group_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that prints progress and writes."""
    return rank() == 0


def group_on_cuda() -> bool:
    """Whether the process group reduces CUDA tensors (NCCL): ``init_distributed`` makes one for ``--device cuda``
    and a gloo group for ``cpu``, so this follows the run's chosen device, not the machine
    (``torch.cuda.is_available()`` is also true for a CPU run on a GPU machine, where SyncBatchNorm fails)."""
    return group_initialized() and "nccl" in str(dist.get_backend())


def barrier(device: torch.device | None = None) -> None:
    """Wait until every process gets here (nothing in a single process). ``device``: this process's CUDA device
    under NCCL (default: the current one)."""
    if not is_distributed():
        return
    if group_on_cuda():
        index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
        dist.barrier(device_ids=[index])
    else:
        dist.barrier()


def sum_counts(tensor: torch.Tensor) -> torch.Tensor:
    """Counts (e.g. a confusion matrix) summed over all processes, on ``tensor``'s device (``tensor`` itself in one
    process; no autograd: the differentiable sums of the layers are in :mod:`seg.nn.sync`).

    NCCL reduces CUDA tensors only and gloo CPU ones: the sum is taken on the current CUDA device under NCCL and
    on the CPU otherwise.
    """
    if not is_distributed():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if group_on_cuda() else torch.device("cpu")
    out = tensor.to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)
