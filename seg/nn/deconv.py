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
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.distributed import is_distributed
from seg.nn.checks import check_momentum, check_positive
from seg.nn.isqrt import METHODS, isqrt
from seg.nn.moments import PatchSampler, sampled_covariance, sampled_moments


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


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
        check_positive("eps", eps, float)
        self.norm_type, self.eps = norm_type, float(eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm_type={self.norm_type}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            xn = sample_normalise(x, self.norm_type, self.eps)
        return super().forward(xn.to(x.dtype))


def resolve_block(block: int, in_channels: int, groups: int = 1) -> int:
    """The reference's block rule: clamp to C_in, else gcd when it does not divide; grouped: C_in/groups."""
    check_positive("block", block)
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
    This Function keeps its inputs and the small ``Σ_r W·D`` rows ``(out, nf)`` (for ``∂μ``), and recomputes the
    interleaved weight in the backward pass (one strided copy). Same result as the plain form to rounding
    (``∂μ`` from the kept rows). Each product is one 2-D matmul on the interleaved rows:
    a batched ``Dᵀ·W3`` over output channels avoids the copies but runs several times slower on CPU.
    """

    @staticmethod
    def _interleave(t: torch.Tensor, nf: int, per_row: int) -> torch.Tensor:
        """``(out, nf·per_row, ...)`` conv layout -> a new contiguous ``(out, per_row, nf)``: one row per (channel,
        group). One strided copy."""
        if torch.compiler.is_compiling():
            # Inductor (torch 2.14) miscompiles these strided copies (a compiled float64 training step drifted
            # 8% from eager, tests/test_engine_distributed.py); traced, the plain form costs nothing extra.
            return t.reshape(t.shape[0], nf, per_row).transpose(1, 2).contiguous()
        t = t if t.is_contiguous() else t.contiguous()  # e.g. an expanded gradient
        return torch.as_strided_copy(t, (t.shape[0], per_row, nf), (nf * per_row, 1, per_row))

    @staticmethod
    def _deinterleave(rows: torch.Tensor, out: int, nf: int, per_row: int) -> torch.Tensor:
        """Contiguous ``(out·per_row, nf)`` rows -> a new contiguous ``(out, nf, per_row)`` (the conv layout's
        order: the weight's gradient must keep the parameter's layout, for DDP buckets). One strided copy."""
        if torch.compiler.is_compiling():  # as in _interleave
            return rows.view(out, per_row, nf).transpose(1, 2).contiguous()
        return torch.as_strided_copy(rows, (out, nf, per_row), (per_row * nf, 1, nf))

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, deconv: torch.Tensor, mean: torch.Tensor, per_row: int,
                bias: torch.Tensor | None = None, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W·D, shift)`` with ``shift = Σ W·D·μ``; given a ``bias``, ``(W·D, bias − shift)`` (the folded bias in
        the same launch). ``symmetric``: ``D`` is symmetric up to rounding (a fresh whitening matrix, not running
        statistics that may come from anywhere): the weight's gradient uses ``D`` for ``Dᵀ``."""
        nf, out = deconv.shape[0], weight.shape[0]
        if per_row == 1:
            rows = torch.mm(weight.reshape(out, nf), deconv)
            summed, folded = rows, rows.view(weight.shape)
        else:
            rows = torch.mm(_InterleavedFold._interleave(weight, nf, per_row).view(out * per_row, nf), deconv)
            folded = _InterleavedFold._deinterleave(rows, out, nf, per_row)
            # Σ_r R[o, r] (out, nf), for the shift Σ_r R[o, r]·μ (one matrix-vector product) and the mean's gradient.
            summed, folded = folded.sum(2), folded.view(weight.shape)
        second = torch.mv(summed, mean) if bias is None else torch.addmv(bias, summed, mean, alpha=-1)
        # Σ_r R[o, r] is (out, nf), 1/per_row of the weight: kept, the mean's gradient is one product.
        ctx.save_for_backward(weight, deconv, mean, summed)
        ctx.per_row, ctx.sign, ctx.symmetric = per_row, 1.0 if bias is None else -1.0, symmetric
        return folded, second

    @staticmethod
    def backward(ctx: Any, grad_folded: torch.Tensor | None,
                 grad_second: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        weight, deconv, mean, summed = ctx.saved_tensors
        per_row, nf = ctx.per_row, deconv.shape[0]
        out = weight.shape[0]
        sign = ctx.sign
        grad_weight = grad_deconv = grad_mean = None
        if ctx.needs_input_grad[2] and grad_second is not None:
            # ∂shift/∂μ = Σ_o g_o Σ_r R[o, r]: one product with the kept sum (beta=0: the input is ignored).
            grad_mean = torch.addmv(mean, summed.t(), grad_second, beta=0, alpha=sign)
        grad_bias = grad_second if len(ctx.needs_input_grad) >= 5 and ctx.needs_input_grad[4] else None
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return grad_weight, grad_deconv, grad_mean, None, grad_bias, None
        # The gradient with respect to the folded rows R = W_rows·D (out·per_row, nf): from the conv weight, plus
        # the rank-one term of the shift Σ_r R[o, r]·μ (negative in the folded bias).
        if grad_folded is None:
            grad_rows = torch.zeros(out * per_row, nf, dtype=deconv.dtype, device=deconv.device)
        elif per_row == 1:
            grad_rows = grad_folded.reshape(out, nf)
        else:
            grad_rows = _InterleavedFold._interleave(grad_folded, nf, per_row)  # (out, per_row, nf), ours
        if grad_second is not None:
            if per_row == 1:
                grad_rows = torch.addr(grad_rows, grad_second, mean, alpha=sign)
            else:
                grad_rows.addcmul_(grad_second.view(out, 1, 1), mean, value=sign)
        grad_rows = grad_rows.view(out * per_row, nf)
        if ctx.needs_input_grad[0]:
            # ∂R·Dᵀ (with D for Dᵀ when symmetric: a view less).
            grad_weight = torch.mm(grad_rows, deconv if ctx.symmetric else deconv.t())
            grad_weight = (grad_weight.view(weight.shape) if per_row == 1
                           else _InterleavedFold._deinterleave(grad_weight, out, nf, per_row).view(weight.shape))
        if ctx.needs_input_grad[1]:
            w_rows = (weight.reshape(out, nf) if per_row == 1
                      else _InterleavedFold._interleave(weight, nf, per_row).view(out * per_row, nf))
            grad_deconv = torch.mm(w_rows.t(), grad_rows)
        return grad_weight, grad_deconv, grad_mean, None, grad_bias, None


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
        check_positive("in_channels", in_channels)
        check_positive("out_channels", out_channels)
        check_positive("groups", groups)
        check_positive("eps", eps, float)
        check_positive("n_iter", n_iter)
        check_momentum(momentum)
        check_positive("sampling_stride", sampling_stride)
        check_positive("freeze_iter", freeze_iter)
        check_positive("stats_every", stats_every)
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
        # read the host-side copy (``_counter``, reloaded with the state dict): deciding on the host from a device
        # value would stall the GPU queue every step. The buffer follows it at every step with ``freeze`` and
        # whenever the state dict is taken without.
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

    def _batch_statistics(self, x: torch.Tensor, conv_input: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Mean ``(G, nf)`` and whitening matrices ``(G, nf, nf)`` of the current batch, and the alias of
        ``conv_input`` the convolution must read (see :func:`seg.nn.moments.sampled_moments`; None without);
        with ``stats_every > 1`` also keeps the matrix and its scale for the rescaled steps that follow."""
        mean, cov, *alias = self._moments(x, full=True, conv_input=conv_input)
        deconv = isqrt(cov, self.n_iter, self.isqrt_method)
        if self.stats_every > 1:
            with torch.no_grad():
                self.last_deconv.copy_(deconv.detach().reshape(self.last_deconv.shape))
                self.last_scale.copy_(cov.detach().diagonal(dim1=-2, dim2=-1).mean(-1))
        return mean, deconv, alias[0] if alias else None

    def _rescaled_statistics(self, x: torch.Tensor, conv_input: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Between refreshes: this batch's mean, the kept whitening (a constant), the factor ``(G,)`` that
        rescales it to this batch's variance, and the alias of ``conv_input`` (as ``_batch_statistics``)."""
        mean, var, *alias = self._moments(x, full=False, conv_input=conv_input)
        g = self.last_scale.shape[0]
        return (mean, self.last_deconv.view(g, self.num_features, self.num_features), (self.last_scale / var).sqrt(),
                alias[0] if alias else None)

    def _moments(self, x: torch.Tensor, full: bool, conv_input: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, ...]:
        """Mean ``(G, nf)`` and either the covariance ``(G, nf, nf)`` (``full``) or its mean diagonal ``(G,)``,
        both with ``eps`` added, over all processes when ``sync`` is on; then the alias of ``conv_input`` when
        given."""
        sync = self.sync and is_distributed()
        # Synced sums are taken about the running mean (the same on every process, close to the batch's).
        shift = self.running_mean.to(x.dtype) if sync else None
        # matrix_grad=False: the matrix (and its rescaling) is a constant: nothing recorded for the
        # covariance, the inverse square root or the fold's ∂D; the mean keeps its gradient.
        if full:
            return sampled_covariance(x, self._sampler(), self.eps, sync, self.matrix_grad, shift, conv_input)
        mean, second, count, *alias = sampled_moments(x, self._sampler(), full, sync, self.matrix_grad, shift,
                                                       conv_input)
        # The mean variance only: O(M·nf) instead of the covariance's O(M·nf²).
        return mean, second / (count * self.num_features) + self.eps, *alias

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

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if not self.freeze:  # the step count, kept on the host during training (see _advance_schedule)
            with torch.no_grad():
                self.counter.fill_(self._counter)
        super()._save_to_state_dict(destination, prefix, keep_vars)

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

    @torch.compiler.disable
    def _advance_schedule(self) -> tuple[bool, bool]:
        """This training step's place in the host-side schedules: (frozen, refresh). The reference's freeze,
        counted on the host (no device read): statistics while the count before the step is <= freeze_iter,
        wrapping at 10·freeze_iter; then ``stats_every``'s refresh. Run eagerly under torch.compile: the counts
        change every step, and a compiled forward that read them would be recompiled at every step."""
        frozen = self.freeze and self._counter > self.freeze_iter
        self._counter = (self._counter + 1) % (10 * self.freeze_iter)
        if self.freeze:
            # Without freeze nothing reads the buffer during training: it is written when the state is saved
            # (_save_to_state_dict), not by one more launch per layer and step.
            with torch.no_grad():
                self.counter.fill_(self._counter)
        return frozen, not frozen and self._refresh_due()

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

    def _fold(self, mean: torch.Tensor, deconv: torch.Tensor, scale: torch.Tensor | None = None,
              fresh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``W·D`` and bias ``b − Σ W·D·μ`` for means ``(G, nf)`` and matrices ``(G, nf, nf)``; with a
        per-matrix ``scale (G,)``, of ``D·scale``. ``fresh``: ``D`` was just computed (symmetric up to rounding)."""
        dtype = deconv.dtype
        w = self.weight.to(dtype)
        out_c, nf = self.out_channels, self.num_features
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.groups == 1 and deconv.dim() == 3:
            deconv, mean = deconv[0], mean[0]
        if self.groups == 1 and scale is None and bias is not None:
            # The default: weight and bias folded in one Function.
            return _InterleavedFold.apply(w, deconv, mean, self.in_channels // self.block, bias, fresh)
        if self.groups == 1:
            wf, shift = _InterleavedFold.apply(w, deconv, mean, self.in_channels // self.block, None, fresh)
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

        frozen, refresh = self._advance_schedule()
        with torch.autocast(x.device.type, enabled=False):
            scale: torch.Tensor | None = None
            if frozen:
                mean, deconv = self._running()
            else:
                # Statistics from the float32 normalised input, not from its cast back to bf16/fp16.
                xs = xn if xn is not None else stats_input(x)
                # Where the samples' gradient can be added in place into the convolution's input gradient (1×1
                # sampling), the statistics hand the convolution its input: one strided add over the samples
                # in the backward pass instead of an input-sized zero-filled gradient and an input-sized sum.
                conv_input = x if (xn is None and x.requires_grad and torch.is_grad_enabled()
                                   and self._sampler().adds_in_place()) else None
                if refresh:
                    mean, deconv, alias = self._batch_statistics(xs, conv_input)
                    self._update_running(mean, deconv)
                else:
                    mean, deconv, scale, alias = self._rescaled_statistics(xs, conv_input)
                    # Rescaled steps update them too: eval follows the weights at the pace of training.
                    self._update_running(mean, deconv * scale.detach().view(-1, 1, 1))
                if alias is not None:
                    x = alias
            stats_dtype = _stats_dtype(self.weight.dtype)
            w, b = self._fold(mean.to(stats_dtype), deconv.to(stats_dtype),
                              None if scale is None else scale.to(stats_dtype), fresh=not frozen and refresh)
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
