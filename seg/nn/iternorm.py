"""Iterative Normalization (Huang et al., CVPR 2019): batch whitening of channel groups by Newton iterations.

The operator is the one of the official PyTorch code (github.com/huangleiBuaa/IterNorm-pytorch): contiguous
groups of ``num_channels`` channels, each centred over ``N·H·W`` and multiplied by ``Σ^{-1/2}`` computed with
``T`` Newton steps on the trace-normalised covariance. Gradients come from autograd through the same steps
(the official code writes the same backward out by hand). Beyond the official code: ``sync`` statistics
over all processes, and float32 whitening under autocast.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from seg.distributed import is_distributed
from seg.nn.checks import check_momentum, check_positive
from seg.nn.sync import synced_mean_and_second


def group_size(num_features: int, num_channels: int) -> int:
    """The official rule: halve ``num_channels`` until it divides ``num_features`` (so 48 channels with
    ``num_channels=64`` are whitened in groups of 16, not in one group of 48)."""
    check_positive("num_features", num_features, int)
    check_positive("num_channels", num_channels, int)
    while num_features % num_channels != 0:
        num_channels //= 2
    return num_channels


class IterNorm(nn.Module):
    """Batch whitening in place of BatchNorm: ``y = weight · W·(x − μ) + bias`` per channel group.

    Training: per group of ``d = num_channels`` channels, ``μ`` is the mean over the ``m = N·H·W`` positions,
    ``Σ = eps·I + Xc·Xcᵀ/m``, ``Σ_N = Σ/tr(Σ)``, ``P₀ = I``, ``T`` times ``P ← 1.5·P − 0.5·P³·Σ_N`` and
    ``W = P_T/√tr(Σ)``. ``running_mean (G, d, 1)`` and ``running_wm (G, d, d)`` follow
    ``running ← momentum·batch + (1 − momentum)·running`` and replace ``μ`` and ``W`` in eval.

    Args:
        num_features: channels ``C`` of the input ``(N, C, *)``.
        num_channels: channels per group, halved until it divides ``C`` (``group_size``).
        T: Newton iterations (the paper's 5 by default). The iteration is the uncoupled form, which
            amplifies rounding errors: with tens of iterations it can diverge even in float64.
        eps: added to the covariance diagonal.
        momentum: running-statistics update rate, in (0, 1].
        affine: a learnable per-channel ``weight`` (ones) and ``bias`` (zeros), shape ``(C,)``.
        sync: statistics over all processes of the default process group (count-weighted: the statistics
            of the concatenated global batch; differentiable, as SyncBatchNorm).
    """

    def __init__(self, num_features: int, num_channels: int = 64, T: int = 5, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, sync: bool = False) -> None:
        super().__init__()
        check_positive("T", T, int)
        check_positive("eps", eps, float)
        check_momentum(momentum)
        if not isinstance(affine, bool):
            raise ValueError(f"affine must be a bool, got {affine!r}")
        if not isinstance(sync, bool):
            raise ValueError(f"sync must be a bool, got {sync!r}")
        self.num_features = num_features
        self.num_channels = group_size(num_features, num_channels)
        self.num_groups = num_features // self.num_channels
        self.T, self.eps, self.momentum = T, float(eps), float(momentum)
        self.affine, self.sync = affine, sync
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        g, d = self.num_groups, self.num_channels
        self.register_buffer("running_mean", torch.zeros(g, d, 1))
        # A real copy per group (the official code's expand() view cannot be updated in place per group).
        self.register_buffer("running_wm", torch.eye(d).repeat(g, 1, 1))

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_wm.copy_(torch.eye(self.num_channels).expand_as(self.running_wm))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_channels={self.num_channels}, T={self.T}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, sync={self.sync}")

    def _whitening(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch mean ``(G, d, 1)`` and whitening matrix ``(G, d, d)`` of ``flat (G, d, m)``."""
        if self.sync and is_distributed():
            # Count, sums and second moments in one all-reduce, about the running mean (seg.nn.sync).
            count, mean, second = synced_mean_and_second(flat, self.running_mean.to(flat.dtype))
        else:
            if flat.shape[-1] == 0:
                raise ValueError("IterNorm received an empty batch: no values to compute statistics from")
            count = float(flat.shape[-1])  # a Python number: no tensor built (and copied to the device) per step
            mean = flat.sum(-1, keepdim=True) / count
            centred = flat - mean
            # Two passes (mean, then the centred second moment), as the official code: no E[xxᵀ] − μμᵀ cancellation.
            second = centred @ centred.mT
        eye = torch.eye(self.num_channels, dtype=flat.dtype, device=flat.device)
        sigma = second / count + self.eps * eye
        trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1)
        sigma_n = sigma / trace
        p = eye.expand_as(sigma)
        for _ in range(self.T):
            p = 1.5 * p - 0.5 * (p @ p @ p @ sigma_n)
        return mean, p / trace.sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"IterNorm expects an input (N, C, *), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"IterNorm expects {self.num_features} channels, got shape {tuple(x.shape)}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        n, c = x.shape[:2]
        # Whitening in float32 at least: bf16/fp16 covariances and Newton steps lose the small eigenvalues.
        with torch.autocast(x.device.type, enabled=False):
            # (N, C, *) -> (G, d, N·H·W): channel groups are contiguous, positions run over N then H, W.
            flat = x.to(dtype).transpose(0, 1).reshape(self.num_groups, self.num_channels, -1)
            if self.training:
                mean, wm = self._whitening(flat)
                with torch.no_grad():
                    m = self.momentum
                    self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                    self.running_wm.mul_(1 - m).add_(wm.detach().to(self.running_wm.dtype), alpha=m)
            else:
                mean, wm = self.running_mean.to(dtype), self.running_wm.to(dtype)
            y = (wm @ (flat - mean)).reshape(c, n, *x.shape[2:])
            if self.affine:
                shape = (c, 1) + (1,) * (x.dim() - 2)
                y = y * self.weight.to(dtype).view(shape) + self.bias.to(dtype).view(shape)
            # Back to (N, C, *) in the ordinary layout: a transposed view would make every later op strided.
            y = y.transpose(0, 1).to(x.dtype).contiguous()
        return y
