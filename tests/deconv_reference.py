"""A plainly written float64 version of the FastDeconv operator, for tests; shares no code with ``seg.nn``.

The operator (Ye et al., ICLR 2020, as github.com/yechengxi/deconvolution computes it): take the im2col
patches of the input, ``C·kh·kw`` values each, channel-major. With ``groups == 1`` each patch holds ``C/block``
interleaved vectors of ``nf = block·kh·kw`` features (vector ``r`` is columns ``r, r + C/block, ...``), all
whitened with one shared mean ``μ`` and matrix ``D``; with ``groups > 1`` conv group ``g`` is columns
``g·nf ... (g+1)·nf`` with its own ``μ_g``, ``D_g``. Statistics come from the patches sampled every
``sampling_stride·stride`` pixels (for 1×1 kernels: every ``sh·sw``-th pixel of the flattened ``(N, H, W)``
order); ``D`` is the Newton–Schulz inverse square root of the covariance plus ``eps·I``. The output is the
conv applied to the whitened patches, which equals ``conv2d(x, W·D, b − W·D·μ)``.

Everything here takes and returns lists with one entry per whitening matrix (one for ``groups == 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Geometry:
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    block: int  # as requested; resolved below with the reference's rule
    sampling_stride: int = 3
    eps: float = 1e-5
    n_iter: int = 5

    @classmethod
    def of(cls, layer) -> Geometry:
        """A layer's geometry, from its public constructor attributes."""
        return cls(layer.in_channels, tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.padding),
                   tuple(layer.dilation), layer.groups, layer.block, layer.sampling_stride, layer.eps, layer.n_iter)

    @property
    def resolved_block(self) -> int:
        c, b = self.in_channels, self.block
        if self.groups > 1:
            return c // self.groups
        if b > c:
            return c
        return math.gcd(b, c) if c % b else b

    @property
    def nf(self) -> int:
        return self.resolved_block * self.kernel_size[0] * self.kernel_size[1]

    @property
    def per_row(self) -> int:
        """Interleaved vectors per patch (groups == 1)."""
        return self.in_channels // self.resolved_block

    @property
    def n_mats(self) -> int:
        return self.groups if self.groups > 1 else 1


def patches(x, k, stride, padding, dilation):
    """All patches at ``stride`` as rows ``(N·L, C·kh·kw)``, channel-major, by explicit slicing."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, stride, padding, dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = []
    for ch in range(c):
        for i in range(kh):
            for j in range(kw):
                sl = xp[:, ch, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                cols.append(sl.reshape(n, oh * ow))
    return torch.stack(cols, dim=-1).reshape(n * oh * ow, -1), (oh, ow)


def ns(a, n_iter):
    """The Newton–Schulz inverse square root of one SPD matrix, as the paper writes it."""
    norm = torch.sqrt((a * a).sum())
    y, z = a / norm, torch.eye(a.shape[0], dtype=a.dtype)
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    for _ in range(n_iter):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return z / torch.sqrt(norm)


def sampled_rows(x, g: Geometry):
    """The patch rows the statistics are computed from."""
    sh, sw = g.sampling_stride * g.stride[0], g.sampling_stride * g.stride[1]
    if g.kernel_size == (1, 1):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])[:: sh * sw]
    return patches(x, g.kernel_size, (sh, sw), g.padding, g.dilation)[0]


def slots(rows, g: Geometry):
    """``(M, C·k²)`` patch rows -> the ``(M, nf)`` vectors of each slot (interleaved vector or conv group)."""
    nf = g.nf
    if g.groups > 1:
        return [rows[:, i * nf:(i + 1) * nf] for i in range(g.groups)]
    return [rows[:, r:: g.per_row] for r in range(g.per_row)]


def samples(x, g: Geometry):
    """The samples of each matrix: ``(M·C/block, nf)`` shared (groups == 1) or ``(M, nf)`` per conv group."""
    parts = slots(sampled_rows(x, g), g)
    return [torch.cat(parts)] if g.groups == 1 else parts


def moments(x, g: Geometry):
    """Means and covariances (``eps`` on the diagonal) of each matrix's samples."""
    means, covs = [], []
    for s in samples(x, g):
        m = s.mean(0)
        xc = s - m
        means.append(m)
        covs.append(xc.t() @ xc / xc.shape[0] + g.eps * torch.eye(g.nf, dtype=x.dtype))
    return means, covs


def batch_statistics(x, g: Geometry):
    """Means and whitening matrices of a batch (a refresh step)."""
    means, covs = moments(x, g)
    return means, [ns(c, g.n_iter) for c in covs]


def mean_variances(x, g: Geometry):
    """Means and mean variances (over samples and features, plus ``eps``) of each matrix's samples."""
    means, variances = [], []
    for s in samples(x, g):
        m = s.mean(0)
        means.append(m)
        variances.append((s - m).pow(2).mean() + g.eps)
    return means, variances


def whitened_conv(x, weight, bias, means, mats, g: Geometry):
    """The conv applied to explicitly whitened patches ``D·(p − μ)``."""
    rows, (oh, ow) = patches(x, g.kernel_size, g.stride, g.padding, g.dilation)
    nf = g.nf
    whitened = torch.empty_like(rows)
    if g.groups > 1:
        for i, (p, m, d) in enumerate(zip(slots(rows, g), means, mats)):
            whitened[:, i * nf:(i + 1) * nf] = (p - m) @ d.t()
        per_out = weight.shape[0] // g.groups
        w2 = weight.reshape(weight.shape[0], -1)
        y = torch.cat([whitened[:, i * nf:(i + 1) * nf] @ w2[i * per_out:(i + 1) * per_out].t()
                       for i in range(g.groups)], dim=1)
    else:
        for r, p in enumerate(slots(rows, g)):
            whitened[:, r:: g.per_row] = (p - means[0]) @ mats[0].t()
        y = whitened @ weight.reshape(weight.shape[0], -1).t()
    if bias is not None:
        y = y + bias
    return y.reshape(x.shape[0], oh, ow, -1).permute(0, 3, 1, 2)


def fold(weight, bias, means, mats, g: Geometry):
    """The folded conv: weight ``W·D`` and bias ``b − W·D·μ``, column slice by column slice."""
    out = weight.shape[0]
    w2 = weight.reshape(out, -1)
    pieces, shifts = [], []
    if g.groups > 1:
        per_out = out // g.groups
        for i, (m, d) in enumerate(zip(means, mats)):
            wd = w2[i * per_out:(i + 1) * per_out] @ d
            pieces.append(wd)
            shifts.append(wd @ m)
        folded, shift = torch.cat(pieces), torch.cat(shifts)
    else:
        folded = torch.zeros_like(w2)
        shift = torch.zeros(out, dtype=w2.dtype)
        for r in range(g.per_row):
            wd = w2[:, r:: g.per_row] @ mats[0]
            folded[:, r:: g.per_row] = wd
            shift = shift + wd @ means[0]
    b = -shift if bias is None else bias - shift
    return folded.reshape(weight.shape), b


def running_statistics(layer, dtype=torch.float64):
    """The layer's running means and matrices (its public buffers), one per matrix, as ``dtype``."""
    g = Geometry.of(layer)
    mean = layer.running_mean.detach().to(dtype).reshape(g.n_mats, g.nf)
    deconv = layer.running_deconv.detach().to(dtype).reshape(g.n_mats, g.nf, g.nf)
    return list(mean), list(deconv)


def eval_reference(layer, x):
    """The eval-mode output from the layer's weights and buffers: ``conv2d(x, W·D, b − W·D·μ)`` in float64."""
    g = Geometry.of(layer)
    means, mats = running_statistics(layer)
    bias = None if layer.bias is None else layer.bias.detach().double()
    w, b = fold(layer.weight.detach().double(), bias, means, mats, g)
    return F.conv2d(x.detach().double(), w, b, g.stride, g.padding, g.dilation, g.groups)


def plain_deconv(x, weight, bias, *, stride, padding, dilation, groups, block, n_iter=5, eps=1e-5, s=3):
    """One training step of the operator: the batch's statistics, then the conv on the whitened patches."""
    g = Geometry(x.shape[1], tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation), groups,
                 block, s, eps, n_iter)
    return whitened_conv(x, weight, bias, *batch_statistics(x, g), g)


def assert_matches_reference(
    y: torch.Tensor, y_ref: torch.Tensor, leaves: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """``y`` equals ``y_ref``; after backpropagating one random upstream gradient through both, every
    (leaf of ``y``, leaf of ``y_ref``) pair has the same ``.grad``. Float64 tolerances."""
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    for got, want in leaves:
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-10)
