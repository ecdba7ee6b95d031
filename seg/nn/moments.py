"""Sampled patch statistics of a convolution's input: the mean and the centred second moment.

``FastDeconv`` whitens im2col patches sampled every ``sampling_stride × stride`` pixels. ``PatchSampler``
lays those samples out as ``(B, G, nf, K)``, one column per sample, so that every ``nf``-long column is
contiguous in memory the way ``F.unfold`` writes it: no transposed copy of the samples is ever made, and
the second moment is a batch of ``nf × K`` by ``K × nf`` products. ``sampled_moments`` computes mean and
second moment with a hand-written backward pass: the gradient of ``Σ cᵢcᵢᵀ`` is ``(G + Gᵀ)·c`` (one product
instead of autograd's two), the centring's term vanishes (the centred samples sum to zero over the global
batch) and the gradient reaches the input by one strided copy per kernel offset where patches do not
overlap (``F.fold`` where they do). Same values and gradients as autograd through unfold, mean and outer
products, up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from seg.nn.sync import summed_over_processes


@dataclass(frozen=True)
class PatchSampler:
    """Where a ``FastDeconv`` layer samples its input, and how the samples are grouped.

    ``stride`` is the sampling step (``sampling_stride × conv stride``). Columns of ``C·k²`` values hold
    ``C/block`` interleaved feature vectors of ``nf = k²·block`` values (``groups == 1``, the reference's
    shared block matrix) or one per conv group (``groups > 1``).
    """

    kernel: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    block: int

    @property
    def num_features(self) -> int:
        return self.kernel[0] * self.kernel[1] * self.block

    def _layout(self, channels: int) -> tuple[int, int]:
        """(matrices G, feature vectors per column and matrix)."""
        if self.groups > 1:
            return self.groups, 1
        return 1, channels // self.block

    def _grid(self, h: int, w: int) -> tuple[int, int]:
        """Sampled patch positions (rows, columns) on an ``h × w`` input."""
        (kh, kw), (dh, dw), (ph, pw), (sh, sw) = self.kernel, self.dilation, self.padding, self.stride
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _offsets(self, h: int, w: int) -> list[tuple[int, int, slice, slice, slice, slice]]:
        """For each kernel offset ``(a, b)``: the sample rows and columns that read inside the input (the rest
        read padding) and the input rows and columns they read, as slices."""
        (kh, kw), (dh, dw), (ph, pw), (sh, sw) = self.kernel, self.dilation, self.padding, self.stride
        ho, wo = self._grid(h, w)

        def span(offset: int, size: int, grid: int, step: int) -> tuple[slice, slice]:
            # sample i reads input index i·step + offset; keep 0 <= index < size
            first = max(0, -(offset // step)) if offset < 0 else 0
            last = min(grid, (size - 1 - offset) // step + 1) if size - 1 - offset >= 0 else 0
            last = max(first, last)
            start = first * step + offset
            return slice(first, last), slice(start, start + (last - first - 1) * step + 1 if last > first else start,
                                             step)

        out = []
        for a in range(kh):
            rows, src_rows = span(a * dh - ph, h, ho, sh)
            for b in range(kw):
                cols, src_cols = span(b * dw - pw, w, wo, sw)
                out.append((a, b, rows, cols, src_rows, src_cols))
        return out

    def _disjoint(self) -> bool:
        """Whether no input pixel is read by two sampled patches (each receives at most one gradient value)."""
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        return dh * (kh - 1) < sh and dw * (kw - 1) < sw

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The samples of ``x (N, C, H, W)`` as a new contiguous ``(B, G, nf, K)`` tensor (ours to modify).

        For k×k kernels this is ``F.unfold``'s layout (``(N, C·kh·kw, L)``, channel-major); where patches do not
        overlap it is written by one strided copy per kernel offset (about twice as fast as ``im2col`` on CPU).
        """
        n, c, h, w = x.shape
        g, per_row = self._layout(c)
        nf = self.num_features
        if self.kernel == (1, 1):
            return self._gather_pixels(x, g, per_row)
        if not self._disjoint():
            cols = F.unfold(x, self.kernel, self.dilation, self.padding, self.stride)  # (N, C·k², L)
            return cols.view(n, g, nf, per_row * cols.shape[-1])
        ho, wo = self._grid(h, w)
        out = x.new_empty(n, c, *self.kernel, ho, wo)
        for a, b, rows, cols, src_rows, src_cols in self._offsets(h, w):
            dst = out[:, :, a, b]
            dst[:, :, rows, cols].copy_(x[:, :, src_rows, src_cols])
            # Samples that read the padding: zeros.
            dst[:, :, :rows.start].zero_()
            dst[:, :, rows.stop:].zero_()
            dst[:, :, :, :cols.start].zero_()
            dst[:, :, :, cols.stop:].zero_()
        return out.view(n, g, nf, per_row * ho * wo)

    def _gather_pixels(self, x: torch.Tensor, g: int, per_row: int) -> torch.Tensor:
        """1×1, as the reference: every (sh·sw)-th pixel of the flattened (N, H, W) order, which starts at a
        different offset in each image when H·W is not a multiple of the step. Only the samples are copied."""
        n, c, h, w = x.shape
        if n == 0:
            return x.new_zeros(1, g, self.num_features, 0)
        step = self.stride[0] * self.stride[1]
        flat = x.reshape(n, c, h * w)
        pieces = [flat[i, :, self._offset(i, h * w, step)::step].view(g, self.num_features, per_row, -1)
                  for i in range(n)]
        return torch.cat(pieces, dim=-1).view(1, g, self.num_features, -1)

    @staticmethod
    def _offset(image: int, pixels: int, step: int) -> int:
        return (-image * pixels) % step

    def _scatter_patches(self, out: torch.Tensor, cols: torch.Tensor) -> None:
        """Write ``cols (n, C, kh, kw, Ho, Wo)`` into ``out (n, C, H, W)`` (zeros) where :meth:`gather` read them;
        for patches that do not overlap."""
        for a, b, rows, cs, src_rows, src_cols in self._offsets(*out.shape[-2:]):
            # Patches do not overlap: every pixel is written at most once.
            out[:, :, src_rows, src_cols].copy_(cols[:, :, a, b, rows, cs])

    def scatter(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The adjoint of :meth:`gather`: ``grad (B, G, nf, K)`` summed back into an input-shaped tensor."""
        n, c, h, w = shape
        if self.kernel != (1, 1) and not self._disjoint():
            return F.fold(grad.reshape(n, c * self.kernel[0] * self.kernel[1], -1), (h, w), self.kernel,
                          self.dilation, self.padding, self.stride)
        if self.kernel != (1, 1):
            out = grad.new_zeros(shape)
            self._scatter_patches(out, grad.reshape(n, c, *self.kernel, *self._grid(h, w)))
            return out
        g, per_row = self._layout(c)
        cols = grad.reshape(g, self.num_features, per_row, -1)  # gather's concatenation, image after image
        out = grad.new_zeros(n, c, h * w)
        step = self.stride[0] * self.stride[1]
        start = 0
        for i in range(n):
            dst = out[i, :, self._offset(i, h * w, step)::step]
            dst.copy_(cols[..., start:start + dst.shape[-1]].reshape(c, -1))
            start += dst.shape[-1]
        return out.view(shape)

    def scatter_product(self, left: torch.Tensor, c: torch.Tensor, shift: torch.Tensor,
                        shape: torch.Size) -> torch.Tensor:
        """``scatter(left @ c + shift)`` for ``left (G, nf, nf)``, ``shift (G, nf, 1)``; where patches do not
        overlap one image at a time, so that no sample-sized product is allocated beside ``c``."""
        if self.kernel == (1, 1) or not self._disjoint():
            return self.scatter(torch.add(left @ c, shift), shape)
        n, ch, h, w = shape
        grid = self._grid(h, w)
        out = c.new_zeros(shape)
        for i in range(n):
            part = torch.baddbmm(shift, left, c[i])  # (G, nf, per_row·L) = (C·kh·kw, L) of image i
            self._scatter_patches(out[i:i + 1], part.view(1, ch, *self.kernel, *grid))
        return out


def _gram(c: torch.Tensor) -> torch.Tensor:
    """``Σ_b c_b·c_bᵀ`` ``(G, nf, nf)`` of ``c (B, G, nf, K)``.

    For large ``nf`` in two row halves: the lower-left block is the transpose of the upper-right one, so
    three of the four block products are computed (a quarter fewer multiplications).
    """
    nf = c.shape[-2]
    if nf < 128:
        return (c @ c.mT).sum(0)
    h = nf // 2
    top, bottom = c[..., :h, :], c[..., h:, :]
    out = c.new_empty(c.shape[1], nf, nf)
    out[:, :h, :h] = (top @ top.mT).sum(0)
    upper = (top @ bottom.mT).sum(0)
    out[:, :h, h:] = upper
    out[:, h:, :h] = upper.mT
    out[:, h:, h:] = (bottom @ bottom.mT).sum(0)
    return out


class _SampledMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sampler: PatchSampler, full: bool, sync: bool,
                second_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = sampler.gather(x)
        count = torch.tensor(float(c.shape[0] * c.shape[-1]), dtype=c.dtype, device=c.device)
        total = c.sum((0, 3))
        if sync:
            count, total = summed_over_processes(count), summed_over_processes(total)
        elif c.shape[0] * c.shape[-1] == 0:
            raise ValueError("FastDeconv received an empty batch: no samples to compute statistics from")
        mean = total / count
        c.sub_(mean.unsqueeze(-1))  # centred in place: the gathered samples are a copy of our own
        if full:
            second = _gram(c)
        else:
            second = c.pow(2).sum((0, 2, 3))  # the trace only (G,): the rescaled steps' mean variance
        if sync:
            second = summed_over_processes(second)
        keep = second_grad and ctx.needs_input_grad[0]
        ctx.save_for_backward(c if keep else None, count)
        ctx.sampler, ctx.full, ctx.sync, ctx.second_grad = sampler, full, sync, keep
        ctx.shape, ctx.samples_shape = x.shape, c.shape
        ctx.mark_non_differentiable(count)
        if not second_grad:
            ctx.mark_non_differentiable(second)
        return mean, second, count

    @staticmethod
    def backward(ctx: Any, grad_mean: torch.Tensor, grad_second: torch.Tensor,
                 _grad_count: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        c, count = ctx.saved_tensors
        if ctx.sync:
            # Every process's loss depends on the reduced values: the local samples receive the sum of all
            # processes' gradients (as an all-reduce's backward pass).
            grad_mean = summed_over_processes(grad_mean)
            grad_second = summed_over_processes(grad_second) if ctx.second_grad else grad_second
        # ∂/∂μ of the second moment is −(G + Gᵀ)·Σc, zero since the centred samples sum to zero: only the
        # mean's own gradient reaches the samples through μ, equally to each.
        per_sample = (grad_mean / count).unsqueeze(-1)
        if not ctx.second_grad:
            grad_x = ctx.sampler.scatter(per_sample.expand(ctx.samples_shape), ctx.shape)
        elif ctx.full:
            grad_x = ctx.sampler.scatter_product(grad_second + grad_second.mT, c, per_sample, ctx.shape)
        else:
            grad_x = ctx.sampler.scatter(c * (2.0 * grad_second).view(1, -1, 1, 1) + per_sample, ctx.shape)
        return grad_x, None, None, None, None


def sampled_moments(x: torch.Tensor, sampler: PatchSampler, full: bool, sync: bool = False,
                    second_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``(G, nf)``, centred second moment and sample count of the sampled patches of ``x``.

    The second moment is ``Σ (s − μ)(s − μ)ᵀ`` ``(G, nf, nf)`` when ``full``, else its trace per matrix
    ``(G,)``. ``sync``: count, sums and moments over all processes of the default group (mean about the
    global mean). ``second_grad=False``: the second moment is a constant for autograd (the mean keeps its
    gradient). The count is a tensor in the samples' dtype, without gradient.
    """
    return _SampledMoments.apply(x, sampler, full, sync, second_grad)
