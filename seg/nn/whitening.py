"""Whitening outside convolutions, as the reference's ``ChannelDeconv`` and ``Delinear`` (models/deconv.py).

``ChannelDeconv`` whitens ``block``-channel groups of a feature map (or of a batch of vectors), with no conv
attached: it stands where a BatchNorm stood (``model.norm: channel_deconv``, the reference's classifier
whitening). ``Delinear`` is a ``Linear`` layer that whitens ``block``-feature groups of its input and folds that
into its weight, as ``FastDeconv`` (:mod:`seg.nn.deconv`) does for a conv.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.distributed import is_distributed
from seg.nn.checks import check_momentum, check_positive
from seg.nn.deconv import resolve_block
from seg.nn.isqrt import isqrt
from seg.nn.sync import summed_together, synced_mean_and_second


def in_float32(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with autocast off and half-precision ``x`` in float32; the result in ``x``'s dtype.

    Whitening needs float32: half-precision covariances and Newton-Schulz steps lose the small eigenvalues,
    and under autocast the backward pass would mix bf16 and float32.
    """
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype in (torch.float16, torch.bfloat16):
            return fn(x.float()).to(x.dtype)
        return fn(x)


class ChannelDeconv(nn.Module):
    """Whitening of ``block`` channel groups of a feature map (or of a 2-D batch of vectors).

    As in the reference: channels beyond the largest multiple of ``block`` are standardised with one
    scalar mean and variance; the first training batch initialises the running statistics; the covariance
    is the second moment of the sampled pixels about zero. ``sync``: counts, sums and second moments over
    all processes of the default group (not in the reference).
    """

    def __init__(self, block: int, eps: float = 1e-2, n_iter: int = 5, momentum: float = 0.1,
                 sampling_stride: int = 3, sync: bool = False) -> None:
        super().__init__()
        check_positive("block", block)
        check_positive("eps", eps, float)
        check_positive("n_iter", n_iter)
        check_momentum(momentum)
        check_positive("sampling_stride", sampling_stride)
        self.block, self.eps, self.n_iter, self.momentum = block, float(eps), n_iter, float(momentum)
        self.sampling_stride = sampling_stride
        self.sync = bool(sync)
        self.register_buffer("running_mean1", torch.zeros(block, 1))
        self.register_buffer("running_deconv", torch.eye(block))
        self.register_buffer("running_mean2", torch.zeros(1, 1))
        self.register_buffer("running_var", torch.ones(1, 1))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _track(self, buf: torch.Tensor, value: torch.Tensor, first: torch.Tensor) -> None:
        """The reference's update: the first batch's value replaces the buffer, then the momentum update
        (decided on the device: ``first`` is a boolean tensor, never read on the host)."""
        with torch.no_grad():
            buf.copy_(torch.where(first, value, buf))
            buf.mul_(1 - self.momentum).add_(value, alpha=self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_float32(self._whiten, x)

    def _whiten(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.dim() == 2:
            x = x.view(shape[0], shape[1], 1, 1)
        if x.dim() != 4:
            raise ValueError(f"ChannelDeconv expects a 2-D or 4-D input, got shape {tuple(shape)}")
        n, c_all, h, w = x.shape
        b = self.block
        c = (c_all // b) * b
        if c == 0:
            raise ValueError(f"ChannelDeconv block={b} is larger than the {c_all} input channels; use a smaller block")
        s = self.sampling_stride
        sample = s > 1 and h >= s and w >= s
        first = self.num_batches_tracked == 0 if self.training else None

        sync = self.sync and is_distributed()
        x1 = x[:, :c].permute(1, 0, 2, 3).reshape(b, -1)
        x1_s = x1[:, :: s * s] if sample else x1
        rest = x[:, c:] if c != c_all else None
        if self.training:
            stats = self._statistics(x1_s, rest, s * s if sample else 1, sync)
            count1, mean1, second = stats[:3]
            self._track(self.running_mean1, mean1, first)
            cov = second / count1 + self.eps * torch.eye(b, dtype=x.dtype, device=x.device)
            deconv = isqrt(cov, self.n_iter)
            self._track(self.running_deconv, deconv, first)
        else:
            mean1, deconv = self.running_mean1, self.running_deconv
        out = (deconv @ (x1 - mean1)).view(c, n, h, w).permute(1, 0, 2, 3)

        if rest is not None:
            if self.training:
                mean2, var = stats[3:]
                self._track(self.running_mean2, mean2.view(1, 1), first)
                self._track(self.running_var, var.view(1, 1), first)
            else:
                mean2, var = self.running_mean2, self.running_var
            out = torch.cat([out, (rest - mean2) / (var + self.eps).sqrt()], dim=1)

        if self.training:
            self.num_batches_tracked.add_(1)
        return out.reshape(shape) if len(shape) == 2 else out

    def _statistics(self, x1_s: torch.Tensor, rest: torch.Tensor | None, step: int,
                    sync: bool) -> tuple[torch.Tensor | float, ...]:
        """Count, mean ``(b, 1)`` and second moment about zero ``(b, b)`` of the block samples; with ``rest``
        (the channels beyond the last block), also its sampled scalar mean and unbiased variance. ``sync``: over
        all processes, every sum in one all-reduce."""
        n = x1_s.shape[1]
        flat_s = None if rest is None else rest.reshape(rest.shape[0], -1)[:, ::step]
        if not sync:
            out: tuple[torch.Tensor | float, ...] = (float(n), x1_s.sum(-1, keepdim=True) / n, x1_s @ x1_s.t())
            if flat_s is None:
                return out
            mean2 = flat_s.sum() / flat_s.numel()
            return (*out, mean2, (flat_s - mean2).pow(2).sum() / (flat_s.numel() - 1))  # unbiased, as .var()
        pieces = [x1_s.new_full((1,), float(n)), x1_s.sum(-1, keepdim=True), x1_s @ x1_s.t()]
        if flat_s is not None:
            # The rest's variance about the global mean: sums about the running mean (shared by all processes),
            # as in seg.nn.sync.synced_mean_and_second.
            m2 = flat_s.numel()
            local_mean = flat_s.sum() / max(m2, 1)
            d = local_mean - self.running_mean2.view(())
            pieces += [flat_s.new_full((1,), float(m2)), d * m2, (flat_s - local_mean).pow(2).sum() + d * d * m2]
        total = summed_together(*pieces)
        count1 = total[0].view(())
        out = (count1, total[1] / count1, total[2])
        if flat_s is None:
            return out
        count2 = total[3].view(())
        big_d = total[4] / count2
        return (*out, big_d + self.running_mean2.view(()), (total[5] - big_d * big_d * count2) / (count2 - 1))


class Delinear(nn.Module):
    """A ``Linear`` layer that whitens ``block``-feature groups of its input (shared matrix); ``sync``: the
    mean and covariance over all processes of the default group (not in the reference)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-5,
                 n_iter: int = 5, momentum: float = 0.1, block: int = 512, sync: bool = False) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        check_positive("out_features", out_features)
        check_positive("eps", eps, float)
        check_positive("n_iter", n_iter)
        check_momentum(momentum)
        self.in_features, self.out_features = in_features, out_features
        self.block = resolve_block(block, in_features)
        self.eps, self.n_iter, self.momentum = float(eps), n_iter, float(momentum)
        self.sync = bool(sync)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer("running_mean", torch.zeros(self.block))
        self.register_buffer("running_deconv", torch.eye(self.block))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The nn.Linear initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_float32(self._whitened_linear, x)

    def _whitened_linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Delinear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        if self.training:
            sync = self.sync and is_distributed()
            rows = x.reshape(-1, self.block)
            eye = torch.eye(self.block, dtype=x.dtype, device=x.device)
            if sync:
                # Count, sum and second moment in one all-reduce, about the running mean.
                count, mean, second = synced_mean_and_second(rows.t(), self.running_mean.to(x.dtype).view(-1, 1))
                mean = mean.view(-1)
            else:
                count = float(rows.shape[0])
                mean = rows.sum(0) / count
                centred = rows - mean
                second = centred.t() @ centred
            cov = second / count + self.eps * eye
            deconv = isqrt(cov, self.n_iter)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(mean.detach(), alpha=self.momentum)
                self.running_deconv.mul_(1 - self.momentum).add_(deconv.detach(), alpha=self.momentum)
        else:
            mean, deconv = self.running_mean, self.running_deconv
        w = self.weight.reshape(-1, self.block) @ deconv
        shift = (w @ mean).view(self.out_features, -1).sum(1)
        b = -shift if self.bias is None else self.bias - shift
        return F.linear(x, w.view(self.weight.shape), b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
