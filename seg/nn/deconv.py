"""Network deconvolution layers (Ye et al., ICLR 2020): convolutions that whiten their own input.

``FastDeconv`` samples im2col patches of its input, removes their mean, whitens ``block``-channel groups
with the inverse square root of their covariance (Newton–Schulz) and folds that whitening into the conv
weight (``W·D``, bias ``b − W·D·μ``), so the output is one ordinary ``conv2d`` on the raw input. Defaults
compute the same operator as the reference implementation (github.com/yechengxi/deconvolution).
``norm_type`` adds ND++'s per-sample input normalisation (Ye et al.'s follow-up, amazon-science/
network-deconvolution-pp) in front of the statistics; ``SampleNormConv2d`` is its folded eval-mode form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.distributed import is_distributed
from seg.nn.isqrt import METHODS, isqrt
from seg.nn.moments import PatchSampler, sampled_covariance, sampled_moments
from seg.nn.sync import summed_together, synced_mean_and_second


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def _check_positive(name: str, value: Any, kind: type = int) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def _check_momentum(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {value!r}")


# Layers with at least this many Newton–Schulz iterations (the stem: its image covariance is ill-conditioned)
# also convolve in float32 under autocast: the folded weight W·D has large entries of both signs, and with
# bf16-rounded weights and a bf16 image the stem's output is off by several per cent (relative L2; 2.7% on the
# synthetic photos of tests/test_nn_deconv_amp.py, ~11% in issue 21's reading), against ~0.4% for body layers.
FLOAT32_CONV_N_ITER = 15


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics run in float32 at least (float64 stays float64), whatever the autocast dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The last half-precision input cast to the statistics dtype: (input, its version, grad mode, the copy). Layers
# that read one input in turn (the ASPP branches) share one float32 copy (and one cast backward) instead of
# making one each. One entry: it is replaced by the next cast, so it keeps at most one copy alive.
_LAST_CAST: list[tuple[torch.Tensor, int, bool, torch.Tensor] | None] = [None]


def stats_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the statistics dtype (:func:`_stats_dtype`), the same copy for every layer reading the same,
    unchanged tensor."""
    dtype = _stats_dtype(x.dtype)
    if x.dtype == dtype:
        return x
    last = _LAST_CAST[0]
    grad_mode = torch.is_grad_enabled()
    if last is not None and last[0] is x and last[1] == x._version and last[2] == grad_mode:
        return last[3]
    xs = x.to(dtype)
    _LAST_CAST[0] = (x, x._version, grad_mode, xs)
    return xs


# ND++'s per-sample input normalisations; "none" is the original operator.
NORM_TYPES = ("none", "layernorm", "l1norm")


def check_norm_type(norm_type: Any) -> str:
    if norm_type not in NORM_TYPES:
        raise ValueError(f"norm_type must be one of {', '.join(NORM_TYPES)}, got {norm_type!r}")
    return norm_type


def sample_normalise(x: torch.Tensor, norm_type: str, eps: float) -> torch.Tensor:
    """ND++'s per-sample normalisation of ``x (N, ...)`` over all but the batch dimension.

    ``layernorm``: ``x/σ − μ/σ`` with ``σ = std + eps`` (the unbiased standard deviation, eps added to σ
    and not to the variance, as ND++); no affine. ``l1norm``: ``x / (mean|x| + eps)``. Computed in float32
    at least (float64 stays float64); the result has that dtype, the caller casts it where needed.
    """
    if norm_type == "none":
        return x
    shape = x.shape
    flat = x.to(_stats_dtype(x.dtype)).reshape(shape[0], -1)
    if norm_type == "layernorm":
        # Checked in eager mode only: a shape test would be frozen into (and warned about by) a trace.
        if flat.shape[1] < 2 and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            raise ValueError(f"norm_type 'layernorm' needs at least 2 values per sample, got shape {tuple(shape)}")
        std = flat.std(dim=1, keepdim=True) + eps
        # ND++ writes x/σ − μ/σ rather than (x − μ)/σ; the two differ only by rounding.
        out = flat / std - flat.mean(dim=1, keepdim=True) / std
    elif norm_type == "l1norm":
        out = flat / (flat.abs().mean(dim=1, keepdim=True) + eps)
    else:
        raise ValueError(f"norm_type must be one of {', '.join(NORM_TYPES)}, got {norm_type!r}")
    return out.view(shape)


class SampleNormConv2d(nn.Conv2d):
    """A ``Conv2d`` on the per-sample-normalised input (``sample_normalise``): what ``fold_deconv`` makes of
    a ``FastDeconv`` with ``norm_type`` other than ``none``, whose normalisation depends on each sample and
    so cannot be folded into the weight."""

    def __init__(self, *args: Any, norm_type: str = "layernorm", eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_norm_type(norm_type)
        _check_positive("eps", eps, float)
        self.norm_type, self.eps = norm_type, float(eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm_type={self.norm_type}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            xn = sample_normalise(x, self.norm_type, self.eps)
        return super().forward(xn.to(x.dtype))


def resolve_block(block: int, in_channels: int, groups: int = 1) -> int:
    """The reference's block rule: clamp to C_in, else gcd when it does not divide; grouped: C_in/groups."""
    _check_positive("block", block)
    if groups > 1:
        return in_channels // groups
    if block > in_channels:
        return in_channels
    if in_channels % block != 0:
        return math.gcd(block, in_channels)
    return block


class _InterleavedFold(torch.autograd.Function):
    """``W·D`` and ``Σ W·D·μ`` for a conv weight whose input rows hold ``per_row`` interleaved feature groups.

    The weight ``(out, C·k²)`` is viewed as ``(out, nf, per_row)``: column ``f·per_row + r`` is feature ``f`` of
    group ``r``, and every group is multiplied by the same ``D (nf, nf)``. Autograd through the plain form keeps
    two weight-sized intermediates per layer until the backward pass (the interleaved weight for ``∂D`` and
    ``W·D`` for ``∂μ``), on top of the folded weight the conv keeps; over a ResNet-50 that is hundreds of MB.
    This Function keeps only its inputs and recomputes the interleaved weight in the backward pass (a copy).
    Same products, same result as the plain form. Each product is one 2-D matmul on the interleaved rows:
    a batched ``Dᵀ·W3`` over output channels avoids the copies but runs several times slower on CPU.
    """

    @staticmethod
    def _interleave(t: torch.Tensor, nf: int, per_row: int) -> torch.Tensor:
        """``(out, nf·per_row, ...)`` conv layout -> ``(out·per_row, nf)`` rows, one per (channel, group)."""
        out = t.shape[0]
        if per_row == 1:
            return t.reshape(out, nf)
        return t.reshape(out, nf, per_row).transpose(1, 2).reshape(out * per_row, nf)

    @staticmethod
    def _deinterleave(rows: torch.Tensor, shape: torch.Size, nf: int, per_row: int) -> torch.Tensor:
        out = shape[0]
        if per_row == 1:
            return rows.reshape(shape)
        # contiguous(): for some shapes the reshape is a strided view, and the weight's gradient must keep
        # the parameter's layout (DDP buckets).
        return rows.view(out, per_row, nf).transpose(1, 2).reshape(shape).contiguous()

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, deconv: torch.Tensor, mean: torch.Tensor, per_row: int,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W·D, shift)`` with ``shift = Σ W·D·μ``; given a ``bias``, ``(W·D, bias − shift)`` (the folded bias in
        the same launch)."""
        nf, out = deconv.shape[0], weight.shape[0]
        rows = _InterleavedFold._interleave(weight, nf, per_row) @ deconv
        # Σ_r R[o, r]·μ: the rows of each output channel summed first, one matrix-vector product.
        summed = rows if per_row == 1 else rows.view(out, per_row, nf).sum(1)
        second = torch.mv(summed, mean) if bias is None else torch.addmv(bias, summed, mean, alpha=-1)
        ctx.save_for_backward(weight, deconv, mean)
        ctx.per_row, ctx.sign = per_row, 1.0 if bias is None else -1.0
        return _InterleavedFold._deinterleave(rows, weight.shape, nf, per_row), second

    @staticmethod
    def backward(ctx: Any, grad_folded: torch.Tensor | None,
                 grad_second: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        weight, deconv, mean = ctx.saved_tensors
        per_row, nf = ctx.per_row, deconv.shape[0]
        out = weight.shape[0]
        # The gradient with respect to the folded rows R = W_rows·D: from the conv weight, plus the rank-one
        # term of the shift Σ_r R[o, r]·μ (negative in the folded bias).
        if grad_folded is None:
            grad_rows = torch.zeros(out * per_row, nf, dtype=deconv.dtype, device=deconv.device)
        elif per_row == 1:
            grad_rows = grad_folded.reshape(out, nf)
        else:
            # An explicit copy: reshape could return a view for odd strides (an expanded gradient).
            grad_rows = torch.empty(out * per_row, nf, dtype=grad_folded.dtype, device=grad_folded.device)
            grad_rows.view(out, per_row, nf).copy_(grad_folded.reshape(out, nf, per_row).transpose(1, 2))
        sign = ctx.sign
        if grad_second is not None:
            if per_row == 1:
                grad_rows = torch.addr(grad_rows, grad_second, mean, alpha=sign)
            else:
                grad_rows.view(out, per_row, nf).addcmul_(grad_second.view(out, 1, 1), mean, value=sign)
        grad_weight = grad_deconv = grad_mean = None
        if ctx.needs_input_grad[0]:
            grad_weight = _InterleavedFold._deinterleave(grad_rows @ deconv.t(), weight.shape, nf, per_row)
        if ctx.needs_input_grad[1]:
            grad_deconv = _InterleavedFold._interleave(weight, nf, per_row).t() @ grad_rows
        if ctx.needs_input_grad[2] and grad_second is not None:
            # ∂shift/∂μ = Σ_o g_o Σ_r R[o, r] = (gᵀ·Σ_r W_rows)·D: two vector products, not another W·D.
            w_sum = weight.reshape(out, nf) if per_row == 1 else weight.reshape(out, nf, per_row).sum(2)
            grad_mean = torch.mv(deconv.t(), torch.mv(w_sum.t(), grad_second))
            if sign < 0:
                grad_mean = grad_mean.neg_()
        if len(ctx.needs_input_grad) == 4:  # called without a bias
            return grad_weight, grad_deconv, grad_mean, None
        return grad_weight, grad_deconv, grad_mean, None, grad_second if ctx.needs_input_grad[4] else None


class FastDeconv(nn.Conv2d):
    """A ``Conv2d`` that deconvolves (whitens) its input, in place of Conv2d + BatchNorm.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.
        eps: added to the covariance diagonal.
        n_iter: Newton–Schulz iterations for the inverse square root.
        momentum: running-statistics update rate (``running ← (1−m)·running + m·batch``).
        block: channels whitened together; groups of ``block`` channels share one matrix.
        sampling_stride: patches are sampled every ``sampling_stride × stride`` pixels.
        freeze: refresh the statistics only for the first ``freeze_iter + 1`` of every
            ``10·freeze_iter`` training steps and use the running ones otherwise.
        sync: statistics over all processes of the default process group.
        stats_every: compute the whitening matrix only every ``stats_every`` training steps; in between,
            keep it (as a constant) and only rescale it to the batch's mean variance, with the batch's
            mean (both cheap, with gradient) — no covariance, no inverse square root. 1 (the default) is
            the reference operator; larger values change the mathematics for speed (see
            ``benchmarks/README.md`` for the cost and the effect on mIoU).
        matrix_grad: whether gradients flow through the whitening matrix (the covariance and its inverse
            square root), as in the reference. ``False`` treats the matrix as a constant in the backward pass
            (the mean keeps its gradient): no backward through the covariance, the inverse square root or
            the fold's ``∂D`` product. A speed option that changes the mathematics (see
            ``benchmarks/README.md``).
        isqrt_method: ``auto`` | ``iterate`` | ``eigh``: two exact forms of the same Newton–Schulz result
            (see ``seg.nn.isqrt``); ``auto`` picks the faster for the device.
        norm_type: ``none`` | ``layernorm`` | ``l1norm``: ND++'s per-sample normalisation of the input
            (``sample_normalise``, with this layer's ``eps``) before the statistics and the conv, in training
            and eval; ``none`` (the default) is the original operator.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        eps: float = 1e-5,
        n_iter: int = 5,
        momentum: float = 0.1,
        block: int = 64,
        sampling_stride: int = 3,
        freeze: bool = False,
        freeze_iter: int = 100,
        sync: bool = False,
        isqrt_method: str = "auto",
        stats_every: int = 1,
        matrix_grad: bool = True,
        norm_type: str = "none",
    ) -> None:
        check_norm_type(norm_type)
        if isqrt_method not in METHODS:
            raise ValueError(f"isqrt_method must be one of {', '.join(METHODS)}, got {isqrt_method!r}")
        _check_positive("in_channels", in_channels)
        _check_positive("out_channels", out_channels)
        _check_positive("groups", groups)
        _check_positive("eps", eps, float)
        _check_positive("n_iter", n_iter)
        _check_momentum(momentum)
        _check_positive("sampling_stride", sampling_stride)
        _check_positive("freeze_iter", freeze_iter)
        _check_positive("stats_every", stats_every)
        kernel = _pair(kernel_size, "kernel_size")
        dil = _pair(dilation, "dilation")
        if isinstance(padding, str):
            # im2col needs explicit numbers: 'valid' is 0, 'same' (stride 1, odd kernel) is symmetric.
            if padding == "valid":
                padding = 0
            elif padding == "same" and all((d * (k - 1)) % 2 == 0 for k, d in zip(kernel, dil)):
                padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dil))
            else:
                raise ValueError(f"padding {padding!r} is not supported by FastDeconv (use explicit integers)")
        block = resolve_block(block, in_channels, groups)
        super().__init__(in_channels, out_channels, kernel, _pair(stride, "stride"), _pair(padding, "padding"),
                         dil, groups, bias)
        self.eps = float(eps)
        self.n_iter = int(n_iter)
        self.momentum = float(momentum)
        self.block = block
        self.sampling_stride = int(sampling_stride)
        self.freeze = bool(freeze)
        self.freeze_iter = int(freeze_iter)
        self.sync = bool(sync)
        self.isqrt_method = isqrt_method
        self.norm_type = norm_type
        kh, kw = self.kernel_size
        self.num_features = kh * kw * block
        n_mats = groups if groups > 1 else 1
        self.register_buffer("running_mean", torch.zeros(n_mats * self.num_features))
        eye = torch.eye(self.num_features)
        self.register_buffer("running_deconv", eye.repeat(groups, 1, 1) if groups > 1 else eye)
        # A buffer (not a Python int) so that it survives state_dict round trips and resume. Training steps
        # read the host-side copy (``_counter``, kept equal to the buffer, and reloaded with the state dict):
        # deciding on the host from a device value would stall the GPU queue every step.
        self.register_buffer("counter", torch.zeros((), dtype=torch.long))
        self._counter = 0
        self.stats_every = int(stats_every)
        self.matrix_grad = bool(matrix_grad)
        if self.stats_every > 1:
            # The whitening reused between refreshes, the mean variance it was computed at, and the step
            # count that schedules the refreshes; buffers, so that a resumed run continues exactly (only
            # present when the option is on).
            self.register_buffer("stats_step", torch.zeros((), dtype=torch.long))
            self.register_buffer("last_deconv", self.running_deconv.clone())
            self.register_buffer("last_scale", torch.ones(n_mats))
        self._stats_step = 0  # host-side copy of ``stats_step`` (as ``_counter``)
        self._fold_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", block={self.block}, n_iter={self.n_iter}, eps={self.eps}, "
                f"sampling_stride={self.sampling_stride}, freeze={self.freeze}, sync={self.sync}"
                + (f", stats_every={self.stats_every}" if self.stats_every > 1 else "")
                + ("" if self.matrix_grad else ", matrix_grad=False")
                + ("" if self.norm_type == "none" else f", norm_type={self.norm_type}"))

    # -- statistics ---------------------------------------------------------------------------

    def _sampler(self) -> PatchSampler:
        return PatchSampler(self.kernel_size, self.dilation, self.padding,  # type: ignore[arg-type]
                            (self.sampling_stride * self.stride[0], self.sampling_stride * self.stride[1]),
                            self.groups, self.block)

    def _batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(G, nf)`` and whitening matrices ``(G, nf, nf)`` of the current batch; with ``stats_every > 1``
        also keeps the matrix and its scale for the rescaled steps that follow."""
        mean, cov = self._moments(x, full=True)
        deconv = isqrt(cov, self.n_iter, self.isqrt_method)
        if self.stats_every > 1:
            with torch.no_grad():
                self.last_deconv.copy_(deconv.detach().reshape(self.last_deconv.shape))
                self.last_scale.copy_(cov.detach().diagonal(dim1=-2, dim2=-1).mean(-1))
        return mean, deconv

    def _rescaled_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Between refreshes: this batch's mean, the kept whitening (a constant) and the factor ``(G,)`` that
        rescales it to this batch's variance."""
        mean, var = self._moments(x, full=False)
        g = self.last_scale.shape[0]
        return mean, self.last_deconv.view(g, self.num_features, self.num_features), (self.last_scale / var).sqrt()

    def _moments(self, x: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(G, nf)`` and either the covariance ``(G, nf, nf)`` (``full``) or its mean diagonal ``(G,)``,
        both with ``eps`` added, over all processes when ``sync`` is on."""
        sync = self.sync and is_distributed()
        # Synced sums are taken about the running mean (the same on every process, close to the batch's).
        shift = self.running_mean.to(x.dtype) if sync else None
        # matrix_grad=False: the matrix (and its rescaling) is a constant: nothing recorded for the
        # covariance, the inverse square root or the fold's ∂D; the mean keeps its gradient.
        if full:
            return sampled_covariance(x, self._sampler(), self.eps, sync, self.matrix_grad, shift)
        mean, second, count = sampled_moments(x, self._sampler(), full, sync, self.matrix_grad, shift)
        # The mean variance only: O(M·nf) instead of the covariance's O(M·nf²).
        return mean, second / (count * self.num_features) + self.eps

    def _update_running(self, mean: torch.Tensor, deconv: torch.Tensor) -> None:
        """``running ← (1 − m)·running + m·batch`` for both statistics (one fused launch where dtypes agree)."""
        running = [buf if buf.shape == value.shape else buf.view(value.shape)
                   for buf, value in ((self.running_mean, mean), (self.running_deconv, deconv))]
        with torch.no_grad():
            if mean.dtype == deconv.dtype == running[0].dtype == running[1].dtype:
                torch._foreach_lerp_(running, [mean, deconv], self.momentum)
                return
            for buf, value in zip(running, (mean, deconv)):
                buf.lerp_(value.to(buf.dtype), self.momentum)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The host-side copies of the step counters follow the loaded buffers (read once, here).
        self._counter = int(self.counter)
        if self.stats_every > 1:
            self._stats_step = int(self.stats_step)

    def _running(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups if self.groups > 1 else 1
        return (self.running_mean.view(g, self.num_features),
                self.running_deconv.view(g, self.num_features, self.num_features))

    def _refresh_due(self) -> bool:
        """Whether this training step computes the full statistics (always, unless ``stats_every > 1``)."""
        if self.stats_every == 1:
            return True
        step = self._stats_step
        self._stats_step = (step + 1) % self.stats_every
        with torch.no_grad():
            self.stats_step.fill_(self._stats_step)
        return step == 0

    # -- folding ------------------------------------------------------------------------------

    def _fold(self, mean: torch.Tensor, deconv: torch.Tensor,
              scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``W·D`` and bias ``b − Σ W·D·μ`` for means ``(G, nf)`` and matrices ``(G, nf, nf)``; with a
        per-matrix ``scale (G,)``, of ``D·scale``."""
        dtype = deconv.dtype
        w = self.weight.to(dtype)
        out_c, nf = self.out_channels, self.num_features
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.groups == 1 and deconv.dim() == 3:
            deconv, mean = deconv[0], mean[0]
        if self.groups == 1 and scale is None and bias is not None:
            # The default: weight and bias folded in one Function.
            return _InterleavedFold.apply(w, deconv, mean, self.in_channels // self.block, bias)
        if self.groups == 1:
            wf, shift = _InterleavedFold.apply(w, deconv, mean, self.in_channels // self.block)
        else:
            # Grouped convs: one matrix per conv group, no interleaving.
            wg = w.reshape(self.groups, out_c // self.groups, nf) @ deconv
            wf, shift = wg.reshape(self.weight.shape), (wg @ mean.unsqueeze(-1)).reshape(out_c)
        if scale is not None:
            # W·(D·s) = (W·D)·s: scaling the folded weight, not D, keeps D out of the backward pass (a
            # constant D needs no W_rowsᵀ·∂R product; the gradient of s is an elementwise sum).
            per_channel = scale.repeat_interleave(out_c // scale.shape[0])
            wf = wf * per_channel.view(-1, 1, 1, 1)
            shift = shift * per_channel
        return self._with_bias(wf, shift)

    def _with_bias(self, wf: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = -shift if self.bias is None else self.bias.to(shift.dtype) - shift
        return wf, bias

    def _cache_key(self) -> tuple:
        tensors = [self.weight, self.running_mean, self.running_deconv]
        if self.bias is not None:
            tensors.append(self.bias)
        # _version advances on every in-place change (optimizer steps, load_state_dict's copy_);
        # data_ptr changes when .to() or parameter reassignment gives new storage.
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode weight and bias (running statistics folded in), cached until something changes."""
        key = self._cache_key()
        if self._fold_cache is not None and self._fold_cache[0] == key:
            return self._fold_cache[1], self._fold_cache[2]
        with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
            mean, deconv = self._running()
            w, b = self._fold(mean.to(_stats_dtype(self.weight.dtype)), deconv.to(_stats_dtype(self.weight.dtype)))
            w, b = w.to(self.weight.dtype), b.to(self.weight.dtype)
        self._fold_cache = (key, w, b)
        return w, b

    def train(self, mode: bool = True) -> FastDeconv:
        self._fold_cache = None
        return super().train(mode)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if x.dim() != 4:
            raise ValueError(f"FastDeconv expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"FastDeconv expects {self.in_channels} input channels, got {x.shape[1]}")
        xn: torch.Tensor | None = None  # the normalised input in the statistics dtype (norm_type only)
        if self.norm_type != "none":
            with torch.autocast(x.device.type, enabled=False):
                xn = sample_normalise(x, self.norm_type, self.eps)
            x = xn.to(x.dtype)
        if not self.training:
            if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
                # Gradients wanted in eval mode: fold afresh so they flow to the weight.
                with torch.autocast(x.device.type, enabled=False):
                    mean, deconv = self._running()
                    w, b = self._fold(mean, deconv)
                w, b = w.to(self.weight.dtype), b.to(self.weight.dtype)
            else:
                w, b = self.folded()
            return self._conv(x, w, b)

        # The reference's schedule, counted on the host (no device read): refresh while the count before
        # the step is <= freeze_iter, wrap at 10·freeze_iter.
        frozen = self.freeze and self._counter > self.freeze_iter
        self._counter = (self._counter + 1) % (10 * self.freeze_iter)
        with torch.no_grad():
            self.counter.fill_(self._counter)
        with torch.autocast(x.device.type, enabled=False):
            scale: torch.Tensor | None = None
            if frozen:
                mean, deconv = self._running()
            else:
                # Statistics from the float32 normalised input, not from its cast back to bf16/fp16.
                xs = xn if xn is not None else stats_input(x)
                if self._refresh_due():
                    mean, deconv = self._batch_statistics(xs)
                    self._update_running(mean, deconv)
                else:
                    mean, deconv, scale = self._rescaled_statistics(xs)
                    # Rescaled steps update them too: eval follows the weights at the pace of training.
                    self._update_running(mean, deconv * scale.detach().view(-1, 1, 1))
            stats_dtype = _stats_dtype(self.weight.dtype)
            w, b = self._fold(mean.to(stats_dtype), deconv.to(stats_dtype),
                              None if scale is None else scale.to(stats_dtype))
        w, b = w.to(self.weight.dtype), b.to(self.weight.dtype)
        return self._conv(x, w, b)

    @property
    def conv_in_float32(self) -> bool:
        """Whether the convolution itself runs in float32 under autocast (see :data:`FLOAT32_CONV_N_ITER`)."""
        return self.n_iter >= FLOAT32_CONV_N_ITER

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # One pixel per image (e.g. the ASPP pooling branch): N samples for a block of C channels, a singular
        # covariance, so W·D is huge along its null space and the output a difference of large numbers, as
        # in the stem. Such a convolution costs nothing in float32.
        if not (self.conv_in_float32 or x.shape[-1] * x.shape[-2] == 1):
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        # Autocast off and float32 operands; the result in the input's dtype (float32 for the image).
        dtype = _stats_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(x.to(dtype), w.to(dtype), b.to(dtype), self.stride, self.padding, self.dilation,
                         self.groups)
        return y.to(x.dtype)


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
        _check_positive("block", block)
        _check_positive("eps", eps, float)
        _check_positive("n_iter", n_iter)
        _check_momentum(momentum)
        _check_positive("sampling_stride", sampling_stride)
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
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        _check_positive("eps", eps, float)
        _check_positive("n_iter", n_iter)
        _check_momentum(momentum)
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
