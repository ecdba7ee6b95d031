"""FastDeconv against the reference's own numbers and against a plainly written float64 operator."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg.nn import ChannelDeconv, Delinear, FastDeconv, isqrt_newton_schulz

GOLDEN = Path(__file__).parent / "data" / "fastdeconv_reference.npz"


# ---------------------------------------------------------------------------------------------
# the reference implementation's outputs (tests/data/fastdeconv_reference.npz)


def _golden_cases():
    data = np.load(GOLDEN)
    return data, json.loads(str(data["cases_json"]))


_DATA, _CASES = _golden_cases()


@pytest.mark.parametrize("method", ["iterate", "eigh"])
@pytest.mark.parametrize("case", _CASES, ids=[c["name"] for c in _CASES])
def test_matches_reference_outputs(case, method):
    d, n = _DATA, case["name"]
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "block")}
    kwargs["isqrt_method"] = method
    kwargs.update({k: case[k] for k in ("n_iter", "freeze", "freeze_iter") if k in case})
    layer = FastDeconv(case["in_channels"], case["out_channels"], case["kernel_size"], **kwargs).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(d[f"{n}/weight"]))
        layer.bias.copy_(torch.from_numpy(d[f"{n}/bias"]))

    def close(actual, key):
        ref = torch.from_numpy(d[key])
        torch.testing.assert_close(actual.detach().reshape(ref.shape), ref, rtol=1e-9, atol=1e-9 * ref.abs().max())

    for t in range(case["train_steps"]):
        x = torch.from_numpy(d[f"{n}/train{t}/x"]).double().requires_grad_()
        y = layer(x)
        y.backward(torch.from_numpy(d[f"{n}/train{t}/grad_out"]).double())
        close(y, f"{n}/train{t}/y")
        close(x.grad, f"{n}/train{t}/grad_x")
        close(layer.weight.grad, f"{n}/train{t}/grad_weight")
        close(layer.bias.grad, f"{n}/train{t}/grad_bias")
        layer.zero_grad()
    close(layer.running_mean, f"{n}/running_mean")
    close(layer.running_deconv, f"{n}/running_deconv")
    layer.eval()
    with torch.no_grad():
        close(layer(torch.from_numpy(d[f"{n}/eval/x"]).double()), f"{n}/eval/y")


# ---------------------------------------------------------------------------------------------
# an independent, plainly written float64 version of the operator


def _patches(x, k, stride, padding, dilation):
    """All patches at ``stride`` as rows (N·L, C·kh·kw), channel-major, by explicit slicing."""
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


def _ns(a, n_iter):
    norm = torch.sqrt((a * a).sum())
    y, z = a / norm, torch.eye(a.shape[0], dtype=a.dtype)
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    for _ in range(n_iter):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return z / torch.sqrt(norm)


def plain_deconv(x, weight, bias, *, stride, padding, dilation, groups, block, n_iter=5, eps=1e-5, s=3):
    """Whiten each patch's groups explicitly, then apply the conv as a matrix product."""
    c = x.shape[1]
    k = tuple(weight.shape[2:])
    if groups > 1:
        block = c // groups
    elif block > c:
        block = c
    elif c % block:
        block = math.gcd(block, c)
    nf = block * k[0] * k[1]
    samp_stride = (s * stride[0], s * stride[1])
    if k == (1, 1):
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)[:: samp_stride[0] * samp_stride[1]]
    else:
        rows, _ = _patches(x, k, samp_stride, padding, dilation)

    def split(r):  # (M, C·k²) -> list of (M, nf) sample blocks, one per matrix "slot"
        if groups > 1:
            return [r[:, g * nf:(g + 1) * nf] for g in range(groups)]
        per = c // block
        return [r[:, g::per] for g in range(per)]

    if groups > 1:
        means = [b.mean(0) for b in split(rows)]
        mats = []
        for b, m in zip(split(rows), means):
            xc = b - m
            mats.append(_ns(xc.t() @ xc / xc.shape[0] + eps * torch.eye(nf, dtype=x.dtype), n_iter))
    else:
        samples = torch.cat(split(rows), dim=0)
        mean = samples.mean(0)
        xc = samples - mean
        d = _ns(xc.t() @ xc / xc.shape[0] + eps * torch.eye(nf, dtype=x.dtype), n_iter)
        means, mats = [mean] * (c // block), [d] * (c // block)

    all_rows, (oh, ow) = _patches(x, k, stride, padding, dilation)
    pieces = split(all_rows)
    white = [(p - m) @ d.t() for p, m, d in zip(pieces, means, mats)]
    whitened = torch.empty_like(all_rows)
    if groups > 1:
        for g, wpiece in enumerate(white):
            whitened[:, g * nf:(g + 1) * nf] = wpiece
        out_per_group = weight.shape[0] // groups
        outs = [whitened[:, g * nf:(g + 1) * nf] @ weight[g * out_per_group:(g + 1) * out_per_group].reshape(
            out_per_group, -1).t() for g in range(groups)]
        y = torch.cat(outs, dim=1)
    else:
        per = c // block
        for g, wpiece in enumerate(white):
            whitened[:, g::per] = wpiece
        y = whitened @ weight.reshape(weight.shape[0], -1).t()
    y = y + bias
    n = x.shape[0]
    return y.reshape(n, oh, ow, -1).permute(0, 3, 1, 2)


GEOMETRIES = {
    "1x1": dict(c=16, out=6, k=1, stride=1, padding=0, dilation=1, groups=1, block=8, hw=(9, 11)),
    "3x3": dict(c=16, out=5, k=3, stride=1, padding=1, dilation=1, groups=1, block=4, hw=(10, 12)),
    "stem7x7_s2": dict(c=3, out=4, k=7, stride=2, padding=3, dilation=1, groups=1, block=64, hw=(16, 18)),
    "dilation2": dict(c=8, out=4, k=3, stride=1, padding=2, dilation=2, groups=1, block=8, hw=(11, 10)),
    "stride2": dict(c=8, out=4, k=3, stride=2, padding=1, dilation=1, groups=1, block=4, hw=(13, 14)),
    "depthwise": dict(c=6, out=6, k=3, stride=1, padding=1, dilation=1, groups=6, block=64, hw=(9, 9)),
    "grouped": dict(c=8, out=4, k=3, stride=1, padding=1, dilation=1, groups=2, block=64, hw=(9, 9)),
    "c_not_divisible": dict(c=12, out=4, k=3, stride=1, padding=1, dilation=1, groups=1, block=8, hw=(9, 10)),
}


@pytest.mark.parametrize("method", ["iterate", "eigh"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_matches_plain_float64_operator(name, method):
    g = GEOMETRIES[name]
    torch.manual_seed(0)
    layer = FastDeconv(g["c"], g["out"], g["k"], g["stride"], g["padding"], g["dilation"], g["groups"],
                       block=g["block"], isqrt_method=method).double()
    x = torch.randn(2, g["c"], *g["hw"], dtype=torch.float64) * 2 + 0.5
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()

    y1 = layer(x1)
    y2 = plain_deconv(x2, w2, b2, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                      groups=g["groups"], block=g["block"])
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, w2.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, b2.grad, rtol=1e-9, atol=1e-10)


def test_block_rule():
    assert FastDeconv(3, 4, 3).block == 3  # block > C_in -> C_in
    assert FastDeconv(96, 4, 3).block == 32  # gcd(64, 96)
    assert FastDeconv(128, 4, 3).block == 64
    assert FastDeconv(8, 8, 3, groups=4).block == 2  # grouped: C_in / groups
    layer = FastDeconv(96, 4, 3)
    assert layer.running_deconv.shape == (9 * 32, 9 * 32)
    dw = FastDeconv(8, 8, 3, groups=8)
    assert dw.running_deconv.shape == (8, 9, 9) and dw.running_mean.shape == (72,)


def test_many_iterations_whiten_to_identity():
    torch.manual_seed(1)
    layer = FastDeconv(8, 4, 1, block=8, n_iter=40, sampling_stride=1, eps=1e-8).double()
    mix = torch.randn(8, 8, dtype=torch.float64)
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(4, 8, 16, 16, dtype=torch.float64)) + 3.0
    layer(x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
    mean = layer.running_mean / layer.momentum  # first update from zero: m·μ
    d = (layer.running_deconv - (1 - layer.momentum) * torch.eye(8, dtype=torch.float64)) / layer.momentum
    white = (rows - mean) @ d.t()
    cov = white.t() @ white / white.shape[0]
    assert (cov - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-3


def test_gradcheck_small_layer():
    torch.manual_seed(2)
    layer = FastDeconv(4, 3, 3, padding=1, block=2, sampling_stride=1).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()

    def run(inp, weight):
        return torch.func.functional_call(layer, {"weight": weight}, (inp,), strict=False)

    assert torch.autograd.gradcheck(run, (x, w), eps=1e-6, atol=1e-6)


def test_isqrt_newton_schulz_batched_matches_single():
    torch.manual_seed(3)
    a = torch.randn(3, 6, 6, dtype=torch.float64)
    spd = a @ a.transpose(1, 2) + 0.5 * torch.eye(6, dtype=torch.float64)
    batched = isqrt_newton_schulz(spd, 30)
    for i in range(3):
        single = isqrt_newton_schulz(spd[i], 30)
        torch.testing.assert_close(batched[i], single)
        torch.testing.assert_close(single @ spd[i] @ single, torch.eye(6, dtype=torch.float64), atol=1e-8, rtol=0)


# ---------------------------------------------------------------------------------------------
# running statistics, eval cache, state_dict


def _trained_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = FastDeconv(8, 6, 3, padding=1, block=4, **kwargs)
    for _ in range(3):
        layer(torch.randn(2, 8, 12, 12) + 1.0)
    return layer.eval()


def test_eval_uses_running_statistics():
    layer = _trained_layer()
    x = torch.randn(2, 8, 12, 12)
    y = layer(x)
    mean = layer.running_mean.view(1, -1)
    d = layer.running_deconv.view(1, 36, 36)
    w, b = layer._fold(mean, d)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1))
    # The batch does not matter in eval mode: one sample alone gives the same output.
    torch.testing.assert_close(layer(x[:1]), y[:1])


def test_state_dict_round_trip_keeps_counter_and_outputs():
    layer = _trained_layer(freeze=True, freeze_iter=2)
    assert int(layer.counter) == 3
    fresh = FastDeconv(8, 6, 3, padding=1, block=4, freeze=True, freeze_iter=2).eval()
    fresh.load_state_dict(layer.state_dict())
    assert int(fresh.counter) == 3
    x = torch.randn(2, 8, 12, 12)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    # Training continues identically: both are past freeze_iter, so the running statistics are used.
    layer.train()
    fresh.train()
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_freeze_schedule_counts_like_the_reference():
    layer = FastDeconv(3, 4, 3, padding=1, freeze=True, freeze_iter=2)
    updated = []
    for _ in range(25):
        before = layer.running_deconv.clone()
        layer(torch.randn(1, 3, 8, 8))
        updated.append(not torch.equal(before, layer.running_deconv))
    # Statistics refresh while the counter (before the step) is <= 2; it wraps at 10·freeze_iter = 20.
    expected = [(i % 20) <= 2 for i in range(25)]
    assert updated == expected


def test_eval_cache_invalidated_when_weights_change():
    layer = _trained_layer()
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        y0 = layer(x)
        assert layer._fold_cache is not None
        cached = layer._fold_cache[1]
        assert layer(x).equal(y0) and layer._fold_cache[1] is cached  # reused, not recomputed
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.weight.grad = torch.ones_like(layer.weight)
    opt.step()
    with torch.no_grad():
        y1 = layer(x)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, F.conv2d(x, *layer._fold(*layer._running()), padding=1))
    # load_state_dict also invalidates.
    other = _trained_layer(seed=5)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x))
    # and .to() (new storage)
    layer = layer.double()
    with torch.no_grad():
        assert layer(x.double()).dtype == torch.float64


def test_eval_gradients_flow_to_weight():
    layer = _trained_layer()
    x = torch.randn(1, 8, 12, 12)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# mixed precision


def test_cpu_bfloat16_autocast_is_finite_and_close():
    torch.manual_seed(4)
    layer = FastDeconv(16, 8, 3, padding=1, block=8)
    x = torch.randn(2, 16, 16, 16) * 3 + 2
    ref_layer = copy.deepcopy(layer)
    y32 = ref_layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16  # what a plain conv gives under the same autocast
    assert torch.isfinite(y16).all()
    rel = (y16.float() - y32).abs().max() / y32.abs().max()
    assert rel < 0.05
    # statistics stay float32
    assert layer.running_deconv.dtype == torch.float32
    torch.testing.assert_close(layer.running_deconv, ref_layer.running_deconv, rtol=1e-4, atol=1e-5)
    y16.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# argument checking


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(block=0), "block"),
        (dict(block=-4), "block"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-5), "eps"),
        (dict(n_iter=0), "n_iter"),
        (dict(momentum=0.0), "momentum"),
        (dict(momentum=1.5), "momentum"),
        (dict(sampling_stride=0), "sampling_stride"),
        (dict(freeze_iter=0), "freeze_iter"),
        (dict(kernel_size=(1, 2, 3)), "kernel_size"),
        (dict(isqrt_method="svd"), "isqrt_method"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, name):
    args = dict(in_channels=8, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        FastDeconv(**args)


def test_bad_input_raises_value_error():
    layer = FastDeconv(8, 4, 3)
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="8 input channels"):
        layer(torch.randn(1, 4, 5, 5))


def test_is_a_conv2d_and_takes_tuples():
    layer = FastDeconv(8, 4, (3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    assert isinstance(layer, torch.nn.Conv2d)
    assert layer(torch.randn(2, 8, 10, 10)).shape == (2, 4, 5, 5)
    no_bias = FastDeconv(8, 4, 3, bias=False)
    assert no_bias.bias is None
    assert no_bias(torch.randn(2, 8, 10, 10)).shape == (2, 4, 8, 8)


# ---------------------------------------------------------------------------------------------
# ChannelDeconv and Delinear


def test_channel_deconv_whitens_and_standardises_the_rest():
    torch.manual_seed(6)
    layer = ChannelDeconv(4, eps=1e-6, n_iter=30, sampling_stride=1).double()
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    blocks = y[:, :4].permute(1, 0, 2, 3).reshape(4, -1)
    cov = blocks @ blocks.t() / blocks.shape[1]
    # The reference whitens with the second moment about zero and then centres, so the covariance of the
    # output is I minus the outer product of the whitened mean.
    assert (cov - torch.eye(4, dtype=torch.float64)).abs().max() < 0.05
    rest = y[:, 4:]
    assert abs(float(rest.mean())) < 1e-8 and abs(float(rest.std()) - 1) < 1e-3
    layer.eval()
    assert layer(x).shape == x.shape
    assert ChannelDeconv(4)(torch.randn(5, 8)).shape == (5, 8)


def test_channel_deconv_errors():
    with pytest.raises(ValueError, match="2-D or 4-D"):
        ChannelDeconv(4)(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="block"):
        ChannelDeconv(8)(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="block"):
        ChannelDeconv(0)


def test_delinear_matches_linear_on_whitened_input():
    torch.manual_seed(7)
    layer = Delinear(12, 5, block=8, n_iter=5).double()
    assert layer.block == 4  # gcd(8, 12)
    x = torch.randn(32, 12, dtype=torch.float64) * 2 + 1
    y = layer(x)
    rows = x.reshape(-1, 4)
    mean = rows.mean(0)
    xc = rows - mean
    d = _ns(xc.t() @ xc / xc.shape[0] + 1e-5 * torch.eye(4, dtype=torch.float64), 5)
    white = ((rows - mean) @ d.t()).reshape(32, 12)
    torch.testing.assert_close(y, white @ layer.weight.t() + layer.bias)
    with pytest.raises(ValueError, match="12 input features"):
        layer(torch.randn(3, 10, dtype=torch.float64))


def _pair_of_layers(stats_every: int) -> tuple[FastDeconv, FastDeconv]:
    torch.manual_seed(0)
    fresh = FastDeconv(16, 8, 3, padding=1, block=8, sampling_stride=1).double()
    reuse = FastDeconv(16, 8, 3, padding=1, block=8, sampling_stride=1, stats_every=stats_every).double()
    reuse.load_state_dict(fresh.state_dict(), strict=False)
    return fresh, reuse


def test_stats_every_keeps_the_matrix_and_rescales_it_to_each_batch():
    fresh, reuse = _pair_of_layers(3)
    xs = [torch.randn(2, 16, 10, 12, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    # Step 0 refreshes: the reference operator.
    torch.testing.assert_close(reuse(xs[0]), fresh(xs[0]))
    with torch.no_grad():
        _, cov0 = fresh._moments(xs[0], full=True)
        d0 = fresh._batch_statistics(xs[0])[1]
    scale0 = cov0.diagonal(dim1=-2, dim2=-1).mean()
    # Steps 1 and 2 keep step 0's matrix, rescaled to the batch's mean variance, with the batch's mean;
    # gradients flow through that mean and variance only.
    once = FastDeconv(16, 8, 3, padding=1, block=8, sampling_stride=1).double()
    once(xs[0])
    running_mean, running_deconv = once.running_mean.clone(), once.running_deconv.clone()
    for x in xs[1:3]:
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = reuse(x1)
        samples = fresh._samples(x2)[:, 0]
        mean = samples.mean(0)
        var = (samples - mean).pow(2).mean() + fresh.eps
        deconv = d0 * (scale0 / var).sqrt()
        w, b = fresh._fold(mean[None], deconv)
        expected = F.conv2d(x2, w, b, padding=1)
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, [x1, reuse.weight, reuse.bias], g),
                             torch.autograd.grad(expected, [x2, fresh.weight, fresh.bias], g)):
            torch.testing.assert_close(got, want)
        # The running statistics follow what the step used.
        running_mean = 0.9 * running_mean + 0.1 * mean.detach()
        running_deconv = 0.9 * running_deconv + 0.1 * deconv.detach()[0]
        torch.testing.assert_close(reuse.running_mean, running_mean)
        torch.testing.assert_close(reuse.running_deconv, running_deconv)
    # Step 3 refreshes again.
    torch.testing.assert_close(reuse(xs[3]), fresh(xs[3]))


def test_stats_every_resumes_mid_cycle():
    _, layer = _pair_of_layers(4)
    x1, x2 = torch.randn(2, 2, 16, 10, 12, dtype=torch.float64)
    layer(x1)
    copy_ = FastDeconv(16, 8, 3, padding=1, block=8, sampling_stride=1, stats_every=4).double()
    copy_.load_state_dict(layer.state_dict())
    torch.testing.assert_close(copy_(x2), layer(x2))
    assert int(copy_.stats_step) == int(layer.stats_step) == 2


def test_stats_every_one_keeps_the_state_dict_of_the_reference_layout():
    keys = set(FastDeconv(16, 8, 3).state_dict())
    assert keys == {"weight", "bias", "running_mean", "running_deconv", "counter"}
    assert {"stats_step", "last_scale", "last_deconv"} <= set(FastDeconv(16, 8, 3, stats_every=2).state_dict())
    with pytest.raises(ValueError, match="stats_every"):
        FastDeconv(16, 8, 3, stats_every=0)


@pytest.mark.parametrize("in_channels,block", [(16, 16), (32, 16)])
def test_weight_gradient_is_contiguous(in_channels, block):
    # DDP's gradient buckets expect the parameter's own layout; odd strides make it warn and copy.
    layer = FastDeconv(in_channels, 19, 1, block=block)
    layer(torch.randn(2, in_channels, 8, 8)).sum().backward()
    assert layer.weight.grad.is_contiguous()
    assert layer.weight.grad.stride() == layer.weight.stride()


def _plain_fold(w, deconv, mean, per_row):
    """``W·D`` and ``Σ W·D·μ`` written directly: every interleaved group of columns times the same D."""
    out, nf = w.shape[0], deconv.shape[0]
    w3 = w.reshape(out, nf, per_row)
    folded = torch.einsum("ofr,fg->ogr", w3, deconv)
    shift = torch.einsum("ogr,g->o", folded, mean)
    return folded.reshape(w.shape), shift


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True),
                                   (True, True, False)])
@pytest.mark.parametrize("per_row", [1, 3])
def test_interleaved_fold_matches_plain_form(per_row, needs):
    from seg.nn.deconv import _InterleavedFold

    torch.manual_seed(0)
    nf = 4 * 9
    w = torch.randn(5, nf * per_row // 9, 3, 3, dtype=torch.float64)
    a = torch.randn(nf, nf, dtype=torch.float64)
    inputs = [w, a @ a.t() / nf, torch.randn(nf, dtype=torch.float64)]
    ours = [t.clone().requires_grad_(n) for t, n in zip(inputs, needs)]
    plain = [t.clone().requires_grad_(n) for t, n in zip(inputs, needs)]
    wf1, s1 = _InterleavedFold.apply(*ours, per_row)
    wf2, s2 = _plain_fold(*plain, per_row)
    torch.testing.assert_close(wf1, wf2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1, s2, rtol=1e-12, atol=1e-12)
    assert wf1.is_contiguous() and wf1.shape == w.shape
    g_w, g_s = torch.randn_like(wf1), torch.randn_like(s1)
    ((wf1 * g_w).sum() + (s1 * g_s).sum()).backward()
    ((wf2 * g_w).sum() + (s2 * g_s).sum()).backward()
    for t1, t2, n in zip(ours, plain, needs):
        if n:
            torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-10, atol=1e-12)
    # Gradients with odd strides (expanded, from a sum) and each output alone are handled too.
    w_sum = inputs[0].clone().requires_grad_()
    folded, shift = _InterleavedFold.apply(w_sum, inputs[1], inputs[2], per_row)
    (folded.sum() + shift.sum()).backward()
    w_ref = inputs[0].clone().requires_grad_()
    sum(t.sum() for t in _plain_fold(w_ref, inputs[1], inputs[2], per_row)).backward()
    torch.testing.assert_close(w_sum.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    torch.autograd.gradcheck(lambda *t: _InterleavedFold.apply(*t, per_row)[0],
                             [t.clone().requires_grad_(True) for t in inputs])
    torch.autograd.gradcheck(lambda *t: _InterleavedFold.apply(*t, per_row)[1],
                             [t.clone().requires_grad_(True) for t in inputs])


@pytest.mark.parametrize("shape", [(7, 5), (3, 7, 5)])
def test_gram_matches_autograd(shape):
    from seg.nn.deconv import _Gram

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g1, g2 = _Gram.apply(x1), x2.mT @ x2
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(g1)  # not symmetric: the backward must not assume it is
    g1.backward(grad)
    g2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(_Gram.apply, [x.clone().requires_grad_()])


@pytest.mark.parametrize("name", ["3x3", "1x1", "grouped", "depthwise"])
def test_stats_every_scaled_fold_equals_fold_of_the_scaled_matrix(name):
    # Rescaled steps multiply the folded weight by s instead of D: same values, same gradients.
    g = GEOMETRIES[name]
    torch.manual_seed(0)
    layer = FastDeconv(g["c"], g["out"], g["k"], g["stride"], g["padding"], g["dilation"], g["groups"],
                       block=g["block"], stats_every=2).double()
    layer(torch.randn(2, g["c"], *g["hw"], dtype=torch.float64))  # refresh step
    x = torch.randn(2, g["c"], *g["hw"], dtype=torch.float64) * 3 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(x1)  # rescaled step
    mean, deconv, scale = layer._rescaled_statistics(x2)
    w, b = layer._fold(mean, deconv * scale.view(-1, 1, 1))
    expected = F.conv2d(x2, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x1, layer.weight, layer.bias], grad)
    want = torch.autograd.grad(expected, [x2, layer.weight, layer.bias], grad)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stats_every", [1, 2])
@pytest.mark.parametrize("name", ["3x3", "1x1", "grouped"])
def test_matrix_grad_false_treats_the_matrix_as_a_constant(name, stats_every):
    g = GEOMETRIES[name]
    torch.manual_seed(0)
    args = (g["c"], g["out"], g["k"], g["stride"], g["padding"], g["dilation"], g["groups"])
    exact = FastDeconv(*args, block=g["block"], stats_every=stats_every).double()
    const = FastDeconv(*args, block=g["block"], stats_every=stats_every, matrix_grad=False).double()
    const.load_state_dict(exact.state_dict())
    for step in range(2):  # with stats_every=2: a refresh step, then a rescaled one
        x = torch.randn(2, g["c"], *g["hw"], dtype=torch.float64) * 2 + step
        x1, x2, x3 = (x.clone().requires_grad_() for _ in range(3))
        probe = copy.deepcopy(exact)  # the statistics this step uses, computed before the step counts
        y_exact, y_const = exact(x1), const(x2)
        torch.testing.assert_close(y_const, y_exact, rtol=1e-12, atol=1e-12)  # same forward
        torch.testing.assert_close(const.running_deconv, exact.running_deconv)
        # Expected gradients: the batch's mean with gradient, the (rescaled) matrix as a constant.
        if step == 0 or stats_every == 1:
            mean, deconv = probe._batch_statistics(x3)
            scale = None
        else:
            mean, deconv, scale = probe._rescaled_statistics(x3)
            scale = scale.detach()
        w, b = probe._fold(mean, deconv.detach(), scale)
        expected = F.conv2d(x3, w, b, probe.stride, probe.padding, probe.dilation, probe.groups)
        grad = torch.randn_like(y_const)
        got = torch.autograd.grad(y_const, [x2, const.weight, const.bias], grad)
        want = torch.autograd.grad(expected, [x3, probe.weight, probe.bias], grad)
        for a, b_ in zip(got, want):
            torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)
        # ... and the exact operator's input gradient differs (the option does change the mathematics).
        assert not torch.allclose(torch.autograd.grad(y_exact, x1, grad)[0], got[0])


@pytest.mark.parametrize("hw", [(9, 11), (6, 6)])  # 99 pixels: each image starts at another offset; 36: all at 0
def test_samples_of_1x1_layers_follow_the_flattened_pixel_order(hw):
    layer = FastDeconv(16, 4, 1, block=8)
    x = torch.randn(3, 16, *hw)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 16)[::9]  # every 9th pixel of (N, H, W), as the reference
    expected = rows.reshape(-1, 8, 2).transpose(1, 2).reshape(-1, 1, 8)  # two interleaved groups per row
    torch.testing.assert_close(layer._samples(x), expected, rtol=0, atol=0)


def test_samples_of_3x3_layers_are_the_strided_im2col_rows():
    layer = FastDeconv(8, 4, 3, padding=1, block=4)
    x = torch.randn(2, 8, 10, 13)
    cols = F.unfold(x, 3, padding=1, stride=3)  # (N, 72, L)
    rows = cols.transpose(1, 2).reshape(-1, 72)
    expected = rows.reshape(-1, 36, 2).transpose(1, 2).reshape(-1, 1, 36)
    torch.testing.assert_close(layer._samples(x), expected, rtol=0, atol=0)
