"""Sampled patch statistics of a convolution's input: the mean and the centred second moment.

``FastDeconv`` whitens im2col patches sampled every ``sampling_stride × stride`` pixels. ``PatchSampler``
lays those samples out as ``(G, nf, M)``: one contiguous row per feature, every sample of every image in
it (rows in ``F.unfold``'s channel-major order, then images, then positions). The samples of all images and
all kernel offsets are one strided view of the (padded) input, copied once; the second moment is then one
``nf × M`` by ``M × nf`` product per matrix. ``sampled_moments`` computes mean and second moment with a
hand-written backward pass: the gradient of ``Σ cᵢcᵢᵀ`` is ``(G + Gᵀ)·c`` (one product instead of autograd's
two), the centring's term vanishes (the centred samples sum to zero over the global batch) and the gradient
reaches the input by one strided copy where patches do not overlap (``F.fold`` where they do). Same values and
gradients as autograd through unfold, mean and outer products, up to rounding.

Nothing here reads a device value on the host: counts are Python numbers or device tensors, and synced
statistics (count, sum and second moment) travel in one all-reduce per call, forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from seg.nn.sync import summed_over_processes

# Index tensors of the 1×1 samples where images start at different offsets, per (N, H·W, step, device).
_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
# eps·I per (size, eps, dtype, device): built once, not in every training step.
_EYE_CACHE: dict[tuple, torch.Tensor] = {}


def scaled_eye(n: int, eps: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``eps·I (n, n)``, cached (read-only: callers never modify it)."""
    key = (n, eps, dtype, device)
    eye = _EYE_CACHE.get(key)
    if eye is None:
        if len(_EYE_CACHE) > 64:
            _EYE_CACHE.clear()
        eye = _EYE_CACHE[key] = torch.eye(n, dtype=dtype, device=device) * eps
    return eye


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

    def _matrices(self, channels: int) -> int:
        return self.groups if self.groups > 1 else 1

    def _grid(self, h: int, w: int) -> tuple[int, int]:
        """Sampled patch positions (rows, columns) on an ``h × w`` input."""
        (kh, kw), (dh, dw), (ph, pw), (sh, sw) = self.kernel, self.dilation, self.padding, self.stride
        return (max(0, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1),
                max(0, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1))

    def _disjoint(self) -> bool:
        """Whether no input pixel is read by two sampled patches (each receives at most one gradient value)."""
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        return dh * (kh - 1) < sh and dw * (kw - 1) < sw

    def _subsampled(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """(dilation, padding) on every ``stride``-th row and column of the input when the sampled patches read
        only those: on each axis the step divides the padding and, for a kernel wider than one, the dilation.
        Then the samples are the patches of ``x[..., ::sh, ::sw]`` at step 1 with dilation and padding divided
        by the step, and the padded copy is sh·sw times smaller (ASPP's 3×3 at dilation 72, output stride 8, pads
        a 60×60 map to 204×204 and reads one pixel in nine of it). None otherwise, or with step 1."""
        if self.stride == (1, 1):
            return None
        dilation, padding = [], []
        for k, d, p, s in zip(self.kernel, self.dilation, self.padding, self.stride):
            if p % s or (k > 1 and d % s):
                return None
            dilation.append(d // s if k > 1 else 1)
            padding.append(p // s)
        return (dilation[0], dilation[1]), (padding[0], padding[1])

    def _patches(self, padded: torch.Tensor, h: int, w: int, copy: bool = False,
                 dilation: tuple[int, int] | None = None, stride: tuple[int, int] | None = None) -> torch.Tensor:
        """The sampled patches of a padded ``(N, C, H + 2ph, W + 2pw)`` tensor as one strided view
        ``(C, kh, kw, N, Ho, Wo)``: feature rows in unfold's order, then images, then positions; ``copy``: as a new
        contiguous tensor (one operation). ``dilation``/``stride``: in place of the sampler's (the subsampled
        input of :meth:`_subsampled`); ``h``, ``w`` stay the input's, so the grid is the same."""
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, dilation or self.dilation, stride or self.stride
        n, c = padded.shape[:2]
        s0, s1, s2, s3 = padded.stride()
        strided = torch.as_strided_copy if copy else torch.as_strided
        return strided(padded, (c, kh, kw, n, *self._grid(h, w)), (s1, dh * s2, dw * s3, s0, sh * s2, sw * s3),
                       padded.storage_offset())

    def gather(self, x: torch.Tensor, squeeze: bool = False) -> torch.Tensor:
        """The samples of ``x (N, C, H, W)`` as a new contiguous ``(G, nf, M)`` tensor (ours to modify);
        ``squeeze``: ``(nf, M)`` where there is one matrix."""
        g = self._matrices(x.shape[1])
        if self.kernel == (1, 1):
            samples = self._pixels(x)
        elif (sub := self._subsampled()) is not None:
            dilation, (ph, pw) = sub
            every = x[:, :, ::self.stride[0], ::self.stride[1]]
            padded = F.pad(every, (pw, pw, ph, ph)) if ph or pw else every
            samples = self._patches(padded, *x.shape[-2:], copy=True, dilation=dilation, stride=(1, 1))
        else:
            ph, pw = self.padding
            padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
            samples = self._patches(padded, *x.shape[-2:], copy=True)
        if squeeze and g == 1:
            return samples.view(self.num_features, -1)
        return samples.view(g, self.num_features, -1)

    def _pixel_layout(self, shape: torch.Size) -> tuple[int, int] | None:
        """1×1: (step, samples per image) when every image starts at offset 0 (one strided view), else None."""
        n, _, h, w = shape
        step = self.stride[0] * self.stride[1]
        if n > 1 and (h * w) % step:
            return None
        return step, -(-h * w // step)

    def _pixel_index(self, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """1×1 with per-image offsets: (image, pixel) of every sample of the flattened ``(N, H·W)`` order."""
        n, _, h, w = shape
        step = self.stride[0] * self.stride[1]
        key = (n, h * w, step, device)
        index = _INDEX_CACHE.get(key)
        if index is None:
            if len(_INDEX_CACHE) > 64:
                _INDEX_CACHE.clear()
            flat = torch.arange(0, n * h * w, step, device=device)
            index = _INDEX_CACHE[key] = (flat // (h * w), flat % (h * w))
        return index

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """1×1, as the reference: every (sh·sw)-th pixel of the flattened (N, H, W) order, which starts at a
        different offset in each image when H·W is not a multiple of the step. ``(C, samples)``, a copy."""
        n, c, h, w = x.shape
        layout = self._pixel_layout(x.shape)
        if layout is None:
            image, pixel = self._pixel_index(x.shape, x.device)
            return x.reshape(n, c, h * w).transpose(0, 1)[:, image, pixel]
        step, per_image = layout
        if x.stride(2) != w * x.stride(3):
            x = x.contiguous()
        s0, s1, _, s3 = x.stride()
        return torch.as_strided_copy(x, (c, n, per_image), (s1, s0, step * s3), x.storage_offset())

    def adds_in_place(self) -> bool:
        """Whether :meth:`add_into` can add sample gradients in place into an input gradient (1×1 patches: the
        samples are pixels, each read once)."""
        return self.kernel == (1, 1)

    def add_into(self, out: torch.Tensor, grad: torch.Tensor) -> bool:
        """``out += scatter(grad)`` in place, for an input-shaped ``out`` (e.g. the convolution's input gradient):
        one addition over the samples (a strided view, or an indexed accumulation where images start at
        different offsets), instead of a zero-filled input-sized tensor and an input-sized sum. False (``out``
        untouched) where the layout does not allow it: not :meth:`adds_in_place`, or ``out`` not laid out
        densely (e.g. an expanded tensor; channels-last where images start at different offsets)."""
        if not self.adds_in_place():
            return False
        n, c, h, w = out.shape
        layout = self._pixel_layout(out.shape)
        if layout is None:
            if not out.is_contiguous():
                return False
            image, pixel = self._pixel_index(out.shape, out.device)
            # (The public index_put_ takes no None index; aten's takes one for the leading ":".)
            torch.ops.aten.index_put_(out.view(n, c, h * w).transpose(0, 1), [None, image, pixel],
                                      grad.reshape(c, -1).to(out.dtype), True)  # (add_ takes mixed dtypes)
            return True
        if not (out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)):
            return False
        step, per_image = layout
        s0, s1, _, s3 = out.stride()
        out.as_strided((c, n, per_image), (s1, s0, step * s3), out.storage_offset()).add_(
            grad.reshape(c, n, per_image))
        return True

    def scatter(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The adjoint of :meth:`gather`: ``grad (G, nf, M)`` summed back into an input-shaped tensor."""
        n, c, h, w = shape
        if self.kernel == (1, 1):
            out = grad.new_zeros(shape)
            layout = self._pixel_layout(shape)
            if layout is None:
                image, pixel = self._pixel_index(shape, grad.device)
                out.view(n, c, h * w).transpose(0, 1)[:, image, pixel] = grad.reshape(c, -1)
                return out
            step, per_image = layout
            out.as_strided((c, n, per_image), (h * w, c * h * w, step)).copy_(grad.reshape(c, n, per_image))
            return out
        (kh, kw), (ph, pw) = self.kernel, self.padding
        ho, wo = self._grid(h, w)
        if not self._disjoint():
            cols = grad.reshape(c * kh * kw, n, ho * wo).transpose(0, 1)
            sub = self._subsampled()
            if sub is None:
                return F.fold(cols, (h, w), self.kernel, self.dilation, self.padding, self.stride)
            # Only every stride-th pixel was read: fold on that grid, the rest of the gradient is zero.
            sh, sw = self.stride
            out = grad.new_zeros(shape)
            out[:, :, ::sh, ::sw] = F.fold(cols, (-(-h // sh), -(-w // sw)), self.kernel, sub[0], sub[1], 1)
            return out
        # Patches do not overlap: every (padded) pixel is written at most once, by one strided copy.
        padded = grad.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
        self._patches(padded, h, w).copy_(grad.reshape(c, kh, kw, n, ho, wo))
        if not (ph or pw):
            return padded
        return padded.as_strided(shape, padded.stride(), ph * padded.stride(2) + pw)


class _SampledMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sampler: PatchSampler, full: bool, sync: bool, second_grad: bool,
                eps: float | None, shift: torch.Tensor | None,
                conv_input: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        # The covariance form (eps given) of one matrix works on 2-D tensors: (nf, M) samples, (nf, nf) result.
        c = sampler.gather(x, squeeze=eps is not None and not sync)
        nf, m = c.shape[-2:]
        g = c.shape[0] if c.dim() == 3 else 1
        delta = None
        if sync:
            mean, second, count, delta = _synced_moments(c, full, shift)
        else:
            if m == 0:
                raise ValueError("FastDeconv received an empty batch: no samples to compute statistics from")
            mean = c.mean(-1, keepdim=True)
            c.sub_(mean)  # centred in place: the gathered samples are a copy of our own
            count = float(m)
            if full and eps is None:
                second = torch.bmm(c, c.mT)
            elif full:
                product = torch.addmm if c.dim() == 2 else torch.baddbmm
                second = product(scaled_eye(nf, eps, c.dtype, c.device), c, c.mT, alpha=1.0 / m)
            else:
                second = c.pow(2).sum((1, 2))
        if sync and eps is not None:
            # The covariance from the global sums: eps·I + second/N.
            second = torch.add(scaled_eye(nf, eps, c.dtype, c.device), second / count)
        keep = second_grad and ctx.needs_input_grad[0]
        ctx.save_for_backward(c if keep else None, delta if keep else None,
                              count if isinstance(count, torch.Tensor) else None)
        ctx.count = count if not isinstance(count, torch.Tensor) else None
        ctx.sampler, ctx.full, ctx.sync, ctx.second_grad, ctx.cov = sampler, full, sync, keep, eps is not None
        ctx.shape, ctx.samples_shape = x.shape, c.shape
        # conv_input: returned as it is (autograd makes it a view) for the convolution to read; backward() then
        # receives the convolution's input gradient and adds the samples' share into it.
        ctx.alias = conv_input is not None
        ctx.alias_dtype = None if conv_input is None else conv_input.dtype
        alias = (conv_input,) if conv_input is not None else ()
        constant = [] if second_grad else [second]
        if eps is not None:
            ctx.mark_non_differentiable(*constant)
            return mean.view(mean.shape[:-1]), second, *alias
        count_out = count if isinstance(count, torch.Tensor) else c.new_full((), count)
        ctx.mark_non_differentiable(count_out, *constant)
        return mean.view(g, nf), second, count_out, *alias

    @staticmethod
    def backward(ctx: Any, grad_mean: torch.Tensor, grad_second: torch.Tensor,
                 *rest: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.alias:
            # The samples' gradient goes to the convolution's input (the statistics read that tensor or its
            # float32 copy), added into the convolution's gradient; the copy's cast receives nothing.
            if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[7]):
                return (None,) * 8
            return (None,) * 7 + (_SampledMoments._input_grad(ctx, grad_mean, grad_second, rest[-1]),)
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        return (_SampledMoments._input_grad(ctx, grad_mean, grad_second, None),) + (None,) * 7

    @staticmethod
    def _input_grad(ctx: Any, grad_mean: torch.Tensor, grad_second: torch.Tensor,
                    grad_alias: torch.Tensor | None) -> torch.Tensor:
        """The gradient of the input: the samples' gradient scattered into the input's shape, added into
        ``grad_alias`` (the convolution input's gradient) when given."""
        c, delta, count_t = ctx.saved_tensors
        count = ctx.count if count_t is None else count_t
        if ctx.sync:
            # Every process's loss depends on the reduced values: the local samples receive the sum of all
            # processes' gradients (as an all-reduce's backward pass), both gradients in one all-reduce.
            if ctx.second_grad:
                flat = summed_over_processes(torch.cat([grad_mean.reshape(-1), grad_second.reshape(-1)]))
                grad_mean = flat[:grad_mean.numel()].view(grad_mean.shape)
                grad_second = flat[grad_mean.numel():].view(grad_second.shape)
            else:
                grad_mean = summed_over_processes(grad_mean)
        # ∂/∂μ of the second moment is −(G + Gᵀ)·Σc, zero since the centred samples sum to zero: only the
        # mean's own gradient reaches the samples through μ, equally to each.
        if ctx.second_grad and ctx.full and delta is None and not isinstance(count, torch.Tensor):
            # The common case in one product: ∂mean/N + α·(G + Gᵀ)·c (beta scales the mean's gradient).
            left = grad_second + grad_second.mT
            product = torch.addmm if c.dim() == 2 else torch.baddbmm
            alpha = 1.0 / count if ctx.cov else 1.0
            grad_c = product(grad_mean.unsqueeze(-1), left, c, beta=1.0 / count, alpha=alpha)
            return _SampledMoments._to_input(ctx, grad_c, grad_alias)
        per_sample = (grad_mean / count).unsqueeze(-1)
        if not ctx.second_grad:
            grad_c = per_sample.expand(ctx.samples_shape)
        elif ctx.full:
            # Of the covariance second/N (+ eps·I): the product's gradient scaled by 1/N.
            alpha = 1.0 / count if ctx.cov else 1.0
            left = grad_second + grad_second.mT
            if delta is not None:
                # Synced: the local samples were centred about their own mean; x − μ = c + δ.
                per_sample = per_sample + (left @ delta) * alpha
            product = torch.addmm if c.dim() == 2 else torch.baddbmm
            if isinstance(alpha, torch.Tensor):
                grad_c = product(per_sample, left * alpha, c)
            else:
                grad_c = product(per_sample, left, c, alpha=alpha)
        else:
            centred = c if delta is None else c + delta
            grad_c = torch.addcmul(per_sample, centred, (2.0 * grad_second).view(-1, 1, 1))
        return _SampledMoments._to_input(ctx, grad_c, grad_alias)

    @staticmethod
    def _to_input(ctx: Any, grad_c: torch.Tensor, grad_alias: torch.Tensor | None) -> torch.Tensor:
        if grad_alias is None:
            grad = ctx.sampler.scatter(grad_c, ctx.shape)
            return grad.to(ctx.alias_dtype) if ctx.alias else grad
        if ctx.sampler.add_into(grad_alias, grad_c):
            return grad_alias
        return grad_alias + ctx.sampler.scatter(grad_c, ctx.shape).to(grad_alias.dtype)


def _synced_moments(c: torch.Tensor, full: bool, shift: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``(G, nf, 1)``, second moment about it, count (0-d) over all processes, in one all-reduce; and the
    offset ``δ`` of the local mean from the global one. ``c`` is centred about its local mean in place.

    Each process sends its count ``n``, ``n·d`` and ``Σ (x − K)(x − K)ᵀ = Mᵣ + n·d·dᵀ``, where ``d`` is its mean
    less the shared reference ``K`` (``shift``, the same on every process, e.g. the running mean: close to the
    batch mean, so that ``Σ − N·D·Dᵀ`` loses little to cancellation) and ``Mᵣ`` its second moment about its own
    mean. The global second moment is ``Σ − N·D·Dᵀ`` with ``D = Σ n·d / N``: exact for unequal batches.
    """
    g, nf, m = c.shape
    local_mean = c.sum(-1, keepdim=True) / max(m, 1)
    c.sub_(local_mean)
    d = local_mean if shift is None else local_mean - shift.view(g, nf, 1)
    if full:
        local = torch.baddbmm(torch.bmm(c, c.mT), d, d.mT, alpha=float(m))
    else:
        local = c.pow(2).sum((1, 2)) + float(m) * d.pow(2).sum((1, 2))
    flat = summed_over_processes(torch.cat([c.new_full((1,), float(m)), (d * m).reshape(-1), local.reshape(-1)]))
    count = flat[0]
    big_d = flat[1:1 + g * nf].view(g, nf, 1) / count
    total = flat[1 + g * nf:].view(local.shape)
    mean = big_d if shift is None else big_d + shift.view(g, nf, 1)
    if full:
        second = total - (big_d @ big_d.mT) * count
    else:
        second = total - big_d.pow(2).sum((1, 2)) * count
    return mean, second, count, local_mean - mean


# Dynamo cannot trace this Function (its forward centres a gathered copy in place and saves it; its backward
# reads shapes that dynamic-shape tracing makes symbolic): under torch.compile the statistics run eager, in a
# graph break, and everything around them compiles.
@torch.compiler.disable
def sampled_moments(x: torch.Tensor, sampler: PatchSampler, full: bool, sync: bool = False,
                    second_grad: bool = True, shift: torch.Tensor | None = None,
                    conv_input: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Mean ``(G, nf)``, centred second moment and sample count of the sampled patches of ``x``.

    The second moment is ``Σ (s − μ)(s − μ)ᵀ`` ``(G, nf, nf)`` when ``full``, else its trace per matrix
    ``(G,)``. ``sync``: count, sums and moments over all processes of the default group (mean about the
    global mean), in one all-reduce; ``shift`` (``(G, nf)``, the same on every process, e.g. the running mean)
    is the reference point the local sums are taken about (only rounding depends on it). ``second_grad=False``:
    the second moment is a constant for autograd (the mean keeps its gradient). The count is a 0-d tensor in
    the samples' dtype, without gradient.

    ``conv_input``: the tensor the layer's convolution reads (``x`` itself, or the tensor ``x`` is a float32 copy
    of), returned last: the convolution must read that returned alias. The samples' gradient is then added to
    the convolution's input gradient (in place where :meth:`PatchSampler.add_into` can), not returned to ``x``
    as a second, input-sized gradient for autograd to sum.
    """
    return _SampledMoments.apply(x, sampler, full, sync, second_grad, None, shift, conv_input)


@torch.compiler.disable
def sampled_covariance(x: torch.Tensor, sampler: PatchSampler, eps: float, sync: bool = False,
                       second_grad: bool = True, shift: torch.Tensor | None = None,
                       conv_input: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Mean ``(G, nf)`` and covariance ``Σ (s − μ)(s − μ)ᵀ / N + eps·I`` ``(G, nf, nf)`` of the sampled patches,
    as :func:`sampled_moments` (the division and ``eps`` inside the same product). Without ``sync`` and with one
    matrix (``G = 1``) the shapes are ``(nf,)`` and ``(nf, nf)``; ``conv_input`` as in :func:`sampled_moments`."""
    return _SampledMoments.apply(x, sampler, True, sync, second_grad, eps, shift, conv_input)
