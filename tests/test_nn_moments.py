"""The sampled patch moments (seg.nn.moments) against autograd through plainly written float64 statistics
(tests/deconv_reference.py: explicit patch slicing, mean, outer products), values and gradients."""

from __future__ import annotations

import pytest
import torch

from seg.nn.moments import PatchSampler, sampled_moments
from tests.deconv_reference import Geometry, mean_variances, moments

# (in_channels, kernel, stride, padding, dilation, groups, block, input H×W): every path of gather/scatter
GEOMETRIES = {
    "3x3 non-overlapping": (8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 4, (10, 9)),
    "3x3 nf 144 (Gram in halves)": (32, (3, 3), (1, 1), (1, 1), (1, 1), 1, 16, (9, 10)),
    "3x3 stride 2 (gaps)": (8, (3, 3), (2, 2), (1, 1), (1, 1), 1, 4, (13, 11)),
    "3x3 dilation 2 (overlap)": (6, (3, 3), (1, 1), (2, 2), (2, 2), 1, 3, (9, 10)),
    "7x7 stride 2 stem (overlap)": (3, (7, 7), (2, 2), (3, 3), (1, 1), 1, 3, (15, 14)),
    "1x3 no padding": (4, (1, 3), (1, 1), (0, 0), (1, 1), 1, 2, (7, 11)),
    "1x1 uneven offsets": (8, (1, 1), (1, 1), (0, 0), (1, 1), 1, 4, (5, 7)),
    "1x1 stride 2": (8, (1, 1), (2, 2), (0, 0), (1, 1), 1, 8, (9, 8)),
    "3x3 grouped": (8, (3, 3), (1, 1), (1, 1), (1, 1), 2, 4, (8, 9)),
    "1x1 grouped": (6, (1, 1), (1, 1), (0, 0), (1, 1), 3, 2, (5, 5)),
}


def _case(name: str, batch: int = 3):
    c, k, s, p, d, groups, block, size = GEOMETRIES[name]
    geom = Geometry(c, k, s, p, d, groups, block)
    block = geom.resolved_block
    sampler = PatchSampler(k, d, p, (3 * s[0], 3 * s[1]), groups, block)
    torch.manual_seed(0)
    x = torch.randn(batch, c, *size, dtype=torch.float64) * 1.3 + 0.4
    return geom, sampler, x


def _stack(tensors):
    return torch.stack(list(tensors))


# full: the covariance (every geometry); not full: the mean variance of the rescaled steps.
CASES = [(name, True) for name in GEOMETRIES] + [(name, False) for name in
                                                 ("3x3 non-overlapping", "1x1 uneven offsets", "3x3 grouped")]


@pytest.mark.parametrize("name,full", CASES)
def test_moments_and_gradients_match_plain_formulas(name, full):
    geom, sampler, x = _case(name)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    mean, second, count = sampled_moments(x1, sampler, full=full)
    if full:
        spread = second / count + geom.eps * torch.eye(geom.nf, dtype=x.dtype)
        ref_means, ref_spreads = moments(x2, geom)
    else:
        spread = second / (count * geom.nf) + geom.eps
        ref_means, ref_spreads = mean_variances(x2, geom)
    ref_mean, ref_spread = _stack(ref_means), _stack(ref_spreads)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spread, ref_spread, rtol=1e-12, atol=1e-12)
    # Non-symmetric upstream gradients: the backward pass must not assume a symmetric one.
    g_mean, g_spread = torch.randn_like(mean), torch.randn_like(spread)
    ((mean * g_mean).sum() + (spread * g_spread).sum()).backward()
    ((ref_mean * g_mean).sum() + (ref_spread * g_spread).sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["3x3 non-overlapping", "7x7 stride 2 stem (overlap)", "1x1 uneven offsets"])
def test_constant_second_moment_keeps_the_mean_gradient(name):
    geom, sampler, x = _case(name)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    mean, second, _ = sampled_moments(x1, sampler, full=True, second_grad=False)
    assert not second.requires_grad and mean.requires_grad
    ref_mean = _stack(moments(x2, geom)[0])
    g_mean = torch.randn_like(mean)
    (mean * g_mean).sum().backward()
    (ref_mean * g_mean).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["3x3 non-overlapping", "3x3 dilation 2 (overlap)", "1x1 uneven offsets"])
def test_gradcheck(name):
    _, sampler, x = _case(name, batch=2)
    x = x[:, :, :6, :7].contiguous().requires_grad_()
    for full in (True, False):
        torch.autograd.gradcheck(lambda t, full=full: sampled_moments(t, sampler, full)[:2], [x])


def test_input_without_gradient_and_empty_batch():
    _, sampler, x = _case("3x3 non-overlapping")
    mean, second, count = sampled_moments(x, sampler, full=True)  # no grad wanted: nothing kept for backward
    assert not mean.requires_grad and not second.requires_grad and not count.requires_grad
    assert count.item() == 3 * 4 * 3 * 2  # 3 images · 4×3 sampled positions · 2 interleaved vectors
    with pytest.raises(ValueError, match="empty batch"):
        sampled_moments(x[:0], sampler, full=True)


# Geometries where every sampled patch reads only every step-th row and column (the step divides the padding and
# the dilation): ASPP's dilated 3×3, sizes that are not multiples of the step, a one-wide kernel axis.
SUBSAMPLED = {
    "ASPP-like 3x3 d6": ((3, 3), (6, 6), (6, 6), (3, 3), (20, 17)),
    "dilation beyond the map": ((3, 3), (72, 72), (72, 72), (3, 3), (60, 61)),
    "no padding": ((3, 3), (3, 3), (0, 0), (3, 3), (14, 16)),
    "3x1, steps 3 and 2": ((3, 1), (6, 1), (3, 0), (3, 2), (13, 9)),
    "per-axis dilation": ((3, 3), (6, 4), (6, 4), (3, 2), (19, 18)),
}


@pytest.mark.parametrize("name", list(SUBSAMPLED))
def test_subsampled_sampling_equals_the_padded_form(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, dilation, padding, stride, size = SUBSAMPLED[name]
    sampler = PatchSampler(kernel, dilation, padding, stride, 1, 4)
    assert sampler._subsampled() is not None
    x = torch.randn(2, 4, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = sampler.gather(x)
    grad = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got_back = sampler.scatter(grad, x.shape)
    # The samples as unfold takes them (every sampling-step-th patch of the padded input).
    cols = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    assert torch.equal(got.reshape(cols.shape[1], 2, -1), cols.transpose(0, 1))
    # The padded form (the sampler without the shortcut) gives the same samples and the same adjoint.
    monkeypatch.setattr(PatchSampler, "_subsampled", lambda self: None)
    assert torch.equal(sampler.gather(x), got)
    torch.testing.assert_close(got_back, sampler.scatter(grad, x.shape), rtol=0, atol=1e-12)
    assert torch.dot(got.flatten(), grad.flatten()).item() == pytest.approx(
        torch.dot(x.flatten(), got_back.flatten()).item(), rel=1e-12)
