"""Cross-process sums with gradients, for deconvolution statistics over the global batch.

Every process computes local sums (sample count, sum of samples, sum of outer products); an all-reduce makes
them global. The backward pass all-reduces the incoming gradients too, so each process receives the
gradient of *all* processes' losses with respect to its own samples, as SyncBatchNorm does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sync_active() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def summed_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``tensor`` summed over all processes (no autograd; for use inside autograd Functions)."""
    out = tensor.clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return summed_over_processes(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # d(sum over ranks)/d(local) is the identity, and every rank's loss depends on the reduced value:
        # the local input's gradient is the sum of all ranks' output gradients.
        return summed_over_processes(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over all processes (identity without a process group)."""
    if not sync_active():
        return tensor
    return _AllReduceSum.apply(tensor)
