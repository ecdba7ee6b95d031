"""Cross-process sums with gradients, for deconvolution statistics over the global batch.

Every process computes local sums (sample count, sum of samples, sum of outer products); an all-reduce makes
them global. The backward pass all-reduces the incoming gradients too, so each process receives the
gradient of *all* processes' losses with respect to its own samples, as SyncBatchNorm does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seg.distributed import is_distributed


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
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


def summed_together(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over all processes, all in one all-reduce (differentiable: one all-reduce backward
    too). Tensors of one dtype; the results are views of one flat buffer."""
    flat = _AllReduceSum.apply(torch.cat([t.reshape(-1) for t in tensors]))
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def synced_mean_and_second(x: torch.Tensor, shift: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count (0-d), mean ``(..., d, 1)`` and second moment about it ``(..., d, d)`` of the columns of ``x (..., d, m)``
    over all processes, in one all-reduce, differentiable; exact for unequal batches.

    Each process sends ``n``, ``n·d`` and ``Mᵣ + n·d·dᵀ`` (= ``Σ (x − K)(x − K)ᵀ``), with ``d`` its mean less ``K``
    (``shift``, ``(..., d, 1)``, the same on every process, e.g. the running mean: near the batch mean, so that
    the global ``Σ − N·D·Dᵀ`` loses little to cancellation) and ``Mᵣ`` its second moment about its own mean.
    """
    m = x.shape[-1]
    local_mean = x.sum(-1, keepdim=True) / max(m, 1)
    centred = x - local_mean
    d = local_mean if shift is None else local_mean - shift
    local = torch.matmul(centred, centred.mT) + (d * m) @ d.mT
    count, total_d, total = summed_together(x.new_full((), float(m)), d * m, local)
    big_d = total_d / count
    mean = big_d if shift is None else big_d + shift
    return count, mean, total - (big_d * count) @ big_d.mT
