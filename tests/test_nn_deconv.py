"""FastDeconv against the reference's own numbers and against a plainly written float64 operator.

Everything here goes through the layers' public surface: ``forward`` in train and eval mode, gradients,
the buffers (``running_mean``, ``running_deconv``, ``counter``, ``stats_step``), ``state_dict`` and
``fold_deconv``; expected values come from ``tests/deconv_reference.py``, which shares no code with the
layers. Only the unit test of the module-private fold Function imports private names (the sampled moments have
their own tests in ``tests/test_nn_moments.py``).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from seg.nn import FastDeconv, fold_deconv, isqrt_newton_schulz
from tests.deconv_reference import (
    Geometry,
    assert_matches_reference,
    eval_reference,
    fold,
    mean_variances,
    moments,
    ns,
    plain_deconv,
    running_statistics,
    whitened_conv,
)

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
# an independent, plainly written float64 version of the operator (tests/deconv_reference.py)


GEOMETRIES = {
    "1x1": dict(c=16, out=6, k=1, stride=1, padding=0, dilation=1, groups=1, block=8, hw=(9, 11)),
    # 35 pixels, not a multiple of the sampling step 9: the images' samples start at different offsets.
    "1x1_offsets": dict(c=16, out=6, k=1, stride=1, padding=0, dilation=1, groups=1, block=8, hw=(5, 7)),
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
    assert_matches_reference(y1, y2, [(x1, x2), (layer.weight, w2), (layer.bias, b2)])


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


def _layer(name, **kwargs):
    """A float64 layer of one of the GEOMETRIES."""
    g = GEOMETRIES[name]
    return FastDeconv(g["c"], g["out"], g["k"], g["stride"], g["padding"], g["dilation"], g["groups"],
                      block=g["block"], **kwargs).double()


def _input(name, scale=2.0, shift=0.5):
    g = GEOMETRIES[name]
    return torch.randn(2, g["c"], *g["hw"], dtype=torch.float64) * scale + shift


@pytest.mark.parametrize("name", ["1x1", "dilation2", "c_not_divisible", "grouped"])
def test_gradients_when_only_the_input_or_only_the_weight_needs_them(name):
    # A frozen layer inside a trained network (gradient to the input only) and a first layer (gradient to
    # the weight only, the statistics then being constants): each against the reference's gradients.
    torch.manual_seed(0)
    layer = _layer(name)
    geom = Geometry.of(layer)
    x = _input(name)
    grad = None
    for frozen in (True, False):
        layer.weight.requires_grad_(not frozen)
        layer.bias.requires_grad_(not frozen)
        x1, x2 = x.clone().requires_grad_(frozen), x.clone().requires_grad_(frozen)
        w2 = layer.weight.detach().clone().requires_grad_(not frozen)
        b2 = layer.bias.detach().clone().requires_grad_(not frozen)
        y1 = layer(x1)
        y2 = plain_deconv(x2, w2, b2, stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
                          groups=geom.groups, block=geom.block)
        torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(y1) if grad is None else grad
        ours, theirs = ([x1], [x2]) if frozen else ([layer.weight, layer.bias], [w2, b2])
        for a, b in zip(torch.autograd.grad(y1, ours, grad), torch.autograd.grad(y2, theirs, grad)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_without_bias_matches_the_reference_in_train_and_eval_mode():
    torch.manual_seed(1)
    layer = FastDeconv(8, 4, 3, padding=1, block=4, bias=False).double()
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64) + 1.0
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    y1 = layer(x1)
    y2 = plain_deconv(x2, w2, None, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, block=4)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y1)
    for a, b in zip(torch.autograd.grad(y1, [x1, layer.weight], grad), torch.autograd.grad(y2, [x2, w2], grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), eval_reference(layer, x), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# which patches the statistics are computed from: seen in the running statistics after one step with
# momentum 1 (running_mean = the batch's mean, running_deconv = its whitening matrix)


def _whitening_of(samples, eps=1e-5, n_iter=5):
    mean = samples.mean(0)
    xc = samples - mean
    return mean, ns(xc.t() @ xc / xc.shape[0] + eps * torch.eye(samples.shape[1], dtype=samples.dtype), n_iter)


def _assert_statistics_are_those_of(layer, samples):
    mean, deconv = _whitening_of(samples, layer.eps, layer.n_iter)
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_deconv, deconv, rtol=1e-9, atol=1e-10)


def _channels_apart(n, c, h, w):
    """Random input whose channels have distinct means, so that a wrong channel grouping shows in the mean."""
    return torch.randn(n, c, h, w, dtype=torch.float64) + torch.arange(c, dtype=torch.float64).view(1, c, 1, 1)


# 77 pixels: the images start at offsets 0, 4, 8 of the 9-pixel step; 99 and 36: all at 0.
@pytest.mark.parametrize("hw", [(7, 11), (9, 11), (6, 6)])
def test_statistics_of_1x1_layers_sample_the_flattened_pixel_order(hw):
    layer = FastDeconv(16, 4, 1, block=8, momentum=1.0).double()
    x = _channels_apart(3, 16, *hw)
    layer(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 16)
    rows = pixels[::9]  # every 9th pixel of (N, H, W), as the reference
    # Two interleaved 8-channel vectors per pixel: channels 0, 2, ..., 14 and 1, 3, ..., 15.
    _assert_statistics_are_those_of(layer, torch.cat([rows[:, 0::2], rows[:, 1::2]]))
    # The check tells the alternatives apart: contiguous channel blocks ...
    contiguous = torch.cat([rows[:, :8], rows[:, 8:]])
    assert not torch.allclose(contiguous.mean(0), layer.running_mean)
    # ... and, where H·W is not a multiple of the step, sampling each image from its own first pixel.
    if (hw[0] * hw[1]) % 9:
        own_start = x.permute(0, 2, 3, 1).reshape(3, -1, 16)[:, ::9].reshape(-1, 16)
        own_start = torch.cat([own_start[:, 0::2], own_start[:, 1::2]])
        assert not torch.allclose(own_start.mean(0), layer.running_mean)


@pytest.mark.parametrize("stride", [1, 2])
def test_statistics_of_3x3_layers_come_from_the_strided_im2col_rows(stride):
    layer = FastDeconv(8, 4, 3, stride=stride, padding=1, block=4, momentum=1.0).double()
    x = _channels_apart(2, 8, 10, 13)
    layer(x)

    def interleaved(rows):  # (M, 72) -> (2·M, 36)
        return torch.cat([rows[:, 0::2], rows[:, 1::2]])

    def im2col(s):
        return F.unfold(x, 3, padding=1, stride=s).transpose(1, 2).reshape(-1, 72)

    # Patches every sampling_stride · stride pixels, two interleaved 36-feature vectors per patch.
    rows = im2col(3 * stride)
    _assert_statistics_are_those_of(layer, interleaved(rows))
    # The check tells the alternatives apart: another sampling step, contiguous channel blocks.
    wrong_step = 3 if stride == 2 else 1
    assert not torch.allclose(interleaved(im2col(wrong_step)).mean(0), layer.running_mean)
    assert not torch.allclose(torch.cat([rows[:, :36], rows[:, 36:]]).mean(0), layer.running_mean)


# ---------------------------------------------------------------------------------------------
# running statistics, eval mode, state_dict


def _trained_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = FastDeconv(8, 6, 3, padding=1, block=4, **kwargs)
    for _ in range(3):
        layer(torch.randn(2, 8, 12, 12) + 1.0)
    return layer.eval()


def _assert_is_eval_reference(layer, x, y, tol):
    torch.testing.assert_close(y.double(), eval_reference(layer, x), rtol=tol, atol=tol)


def test_eval_uses_running_statistics():
    layer = _trained_layer()
    x = torch.randn(2, 8, 12, 12)
    y = layer(x)
    _assert_is_eval_reference(layer, x, y, 1e-5)
    # The batch does not matter in eval mode: one sample alone gives the same output.
    torch.testing.assert_close(layer(x[:1]), y[:1])


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_eval_is_the_folded_conv_of_the_running_statistics(name):
    torch.manual_seed(0)
    layer = _layer(name)
    for step in range(2):
        layer(_input(name, shift=step))
    layer.eval()
    before = copy.deepcopy(layer.state_dict())
    x = _input(name)
    with torch.no_grad():
        y = layer(x)
    # conv2d(x, W·D, b − W·D·μ) from the weights and buffers, and the whitened patches themselves.
    _assert_is_eval_reference(layer, x, y, 1e-10)
    means, mats = running_statistics(layer)
    geom = Geometry.of(layer)
    torch.testing.assert_close(y, whitened_conv(x, layer.weight.detach(), layer.bias.detach(), means, mats, geom),
                               rtol=1e-10, atol=1e-10)
    # With gradients enabled (the weight's), the same output.
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    # fold_deconv: a plain Conv2d in the layer's mode with the same output.
    folded = fold_deconv(copy.deepcopy(layer))
    assert type(folded) is nn.Conv2d and not folded.training
    with torch.no_grad():
        torch.testing.assert_close(folded(x), y, rtol=1e-12, atol=1e-12)
    # Eval mode does not touch the buffers.
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


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


class _RecordCalls(TorchFunctionMode):
    """The names of the torch functions and tensor methods called while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


_PRODUCTS = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum", "tensordot",
             "linear", "mv", "addr"}


def _eval_output(layer, x):
    with torch.no_grad():
        return layer(x)


def test_eval_output_follows_every_change_of_weights_and_statistics():
    # The folded weight is reused between eval calls until a weight or a statistic changes.
    layer = _trained_layer()
    x = torch.randn(1, 8, 12, 12)

    def check(changed_from=None):
        y = _eval_output(layer, x)
        _assert_is_eval_reference(layer, x, y, 1e-5)
        if changed_from is not None:
            assert not torch.allclose(y, changed_from)
        return y

    y0 = check()
    # Reused, not recomputed: a repeated call runs the convolution and no matrix product, same output.
    with _RecordCalls() as calls:
        again = _eval_output(layer, x)
    assert again.equal(y0)
    assert calls.names.count("conv2d") == 1 and not _PRODUCTS & set(calls.names), calls.names
    # An optimizer step (in place).
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.weight.grad = torch.ones_like(layer.weight)
    opt.step()
    y = check(changed_from=y0)
    # Any in-place change of the weight, the bias or a running statistic.
    for edit in (lambda: layer.weight.mul_(0.5), lambda: layer.bias.add_(1.0),
                 lambda: layer.running_mean.add_(0.3), lambda: layer.running_deconv.mul_(1.5)):
        with torch.no_grad():
            edit()
        y = check(changed_from=y)
    # A new weight tensor.
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))
    y = check(changed_from=y)
    # load_state_dict.
    other = _trained_layer(seed=5)
    layer.load_state_dict(other.state_dict())
    y = check(changed_from=y)
    torch.testing.assert_close(y, _eval_output(other, x))
    # A further training step.
    layer.train()
    layer(torch.randn(2, 8, 12, 12) + 2.0)
    layer.eval()
    y = check(changed_from=y)
    # .to() (new storage)
    layer = layer.double()
    y64 = _eval_output(layer, x.double())
    assert y64.dtype == torch.float64
    _assert_is_eval_reference(layer, x, y64, 1e-12)


def test_eval_gradients_flow_to_weight():
    layer = _trained_layer().double()
    geom = Geometry.of(layer)
    x = torch.randn(1, 8, 12, 12, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    means, mats = running_statistics(layer)
    y1 = layer(x1)
    y2 = F.conv2d(x2, *fold(w2, b2, means, mats, geom), padding=1)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y1)
    got = torch.autograd.grad(y1, [x1, layer.weight, layer.bias], grad)
    want = torch.autograd.grad(y2, [x2, w2, b2], grad)
    assert got[1].abs().sum() > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


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
# stats_every and matrix_grad


def _pair_of_layers(stats_every: int) -> tuple[FastDeconv, FastDeconv]:
    torch.manual_seed(0)
    fresh = FastDeconv(16, 8, 3, padding=1, block=8, sampling_stride=1).double()
    reuse = FastDeconv(16, 8, 3, padding=1, block=8, sampling_stride=1, stats_every=stats_every).double()
    reuse.load_state_dict(fresh.state_dict(), strict=False)
    return fresh, reuse


def test_stats_every_keeps_the_matrix_and_rescales_it_to_each_batch():
    fresh, reuse = _pair_of_layers(3)
    geom = Geometry.of(reuse)
    xs = [torch.randn(2, 16, 10, 12, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    # Step 0 refreshes: the reference operator.
    torch.testing.assert_close(reuse(xs[0]), fresh(xs[0]))
    means0, (cov0,) = moments(xs[0], geom)
    d0 = ns(cov0, geom.n_iter)
    scale0 = cov0.diagonal().mean()
    running_mean = 0.1 * means0[0]
    running_deconv = 0.9 * torch.eye(geom.nf, dtype=torch.float64) + 0.1 * d0
    torch.testing.assert_close(reuse.running_mean, running_mean)
    torch.testing.assert_close(reuse.running_deconv, running_deconv)
    # Steps 1 and 2 keep step 0's matrix, rescaled to the batch's mean variance, with the batch's mean;
    # gradients flow through that mean and variance only.
    for x in xs[1:3]:
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        w2 = reuse.weight.detach().clone().requires_grad_()
        b2 = reuse.bias.detach().clone().requires_grad_()
        out = reuse(x1)
        (mean,), (var,) = mean_variances(x2, geom)
        deconv = d0 * (scale0 / var).sqrt()
        expected = whitened_conv(x2, w2, b2, [mean], [deconv], geom)
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, [x1, reuse.weight, reuse.bias], g),
                             torch.autograd.grad(expected, [x2, w2, b2], g)):
            torch.testing.assert_close(got, want)
        # The running statistics follow what the step used.
        running_mean = 0.9 * running_mean + 0.1 * mean.detach()
        running_deconv = 0.9 * running_deconv + 0.1 * deconv.detach()
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


@pytest.mark.parametrize("name", ["3x3", "1x1", "grouped", "depthwise"])
def test_stats_every_rescaled_step_whitens_with_the_kept_matrix_times_the_scale(name):
    # A rescaled step is the operator with D·s, s = √(kept variance / batch variance) per matrix: same values,
    # same gradients (the kept D a constant, the batch's mean and variance with gradient).
    torch.manual_seed(0)
    layer = _layer(name, stats_every=2)
    geom = Geometry.of(layer)
    x0 = _input(name, scale=1.0, shift=0.0)
    layer(x0)  # refresh step
    _, covs0 = moments(x0, geom)
    kept = [(ns(c, geom.n_iter), c.diagonal().mean()) for c in covs0]
    x = _input(name, scale=3.0, shift=1.0)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    out = layer(x1)  # rescaled step
    means, variances = mean_variances(x2, geom)
    mats = [d * (s / v).sqrt() for (d, s), v in zip(kept, variances)]
    expected = whitened_conv(x2, w2, b2, means, mats, geom)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x1, layer.weight, layer.bias], grad)
    want = torch.autograd.grad(expected, [x2, w2, b2], grad)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("stats_every", [1, 2])
@pytest.mark.parametrize("name", ["3x3", "1x1", "grouped"])
def test_matrix_grad_false_treats_the_matrix_as_a_constant(name, stats_every):
    torch.manual_seed(0)
    exact = _layer(name, stats_every=stats_every)
    const = _layer(name, stats_every=stats_every, matrix_grad=False)
    const.load_state_dict(exact.state_dict())
    geom = Geometry.of(const)
    kept = None
    for step in range(2):  # with stats_every=2: a refresh step, then a rescaled one
        x = _input(name, shift=step)
        x1, x2, x3 = (x.clone().requires_grad_() for _ in range(3))
        w3 = const.weight.detach().clone().requires_grad_()
        b3 = const.bias.detach().clone().requires_grad_()
        y_exact, y_const = exact(x1), const(x2)
        torch.testing.assert_close(y_const, y_exact, rtol=1e-12, atol=1e-12)  # same forward
        torch.testing.assert_close(const.running_deconv, exact.running_deconv)
        # Expected gradients: the batch's mean with gradient, the (rescaled) matrix as a constant.
        if step == 0 or stats_every == 1:
            means, covs = moments(x3, geom)
            mats = [ns(c.detach(), geom.n_iter) for c in covs]
            kept = [(d, c.detach().diagonal().mean()) for d, c in zip(mats, covs)]
        else:
            means, variances = mean_variances(x3, geom)
            mats = [d * (s / v.detach()).sqrt() for (d, s), v in zip(kept, variances)]
        expected = whitened_conv(x3, w3, b3, means, mats, geom)
        torch.testing.assert_close(y_const, expected, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(y_const)
        got = torch.autograd.grad(y_const, [x2, const.weight, const.bias], grad)
        want = torch.autograd.grad(expected, [x3, w3, b3], grad)
        for a, b_ in zip(got, want):
            torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-10)
        # ... and the exact operator's input gradient differs (the option does change the mathematics).
        assert not torch.allclose(torch.autograd.grad(y_exact, x1, grad)[0], got[0])


# ---------------------------------------------------------------------------------------------
# unit tests of two module-private autograd Functions
#
# These two import private names on purpose. Through the layer, their values and gradients are covered by
# the float64 comparisons above (train mode with every input needing a gradient, only the input, only the
# weight, matrix_grad=False; eval mode; 1, 2, 3 and 4 interleaved vectors per patch; grouped convs). What
# only these tests reach: combinations of needed gradients the layer never asks for (the matrix but not the
# mean), incoming gradients with odd strides (expanded, from a sum) and a non-symmetric gradient of the Gram
# matrix. If a refactor removes the Functions, delete these tests with them.


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
    if all(needs):  # gradcheck differentiates with respect to all inputs: once per per_row is enough
        torch.autograd.gradcheck(lambda *t: _InterleavedFold.apply(*t, per_row)[0],
                                 [t.clone().requires_grad_(True) for t in inputs])
        torch.autograd.gradcheck(lambda *t: _InterleavedFold.apply(*t, per_row)[1],
                                 [t.clone().requires_grad_(True) for t in inputs])


# ---------------------------------------------------------------------------------------------
# ND++ norm_type: per-sample normalisation of the input before the statistics


def _normalised(x, norm_type, eps=1e-5):
    """ND++'s formulas written out sample by sample in float64: (x − μ)/(σ + eps) with σ the unbiased
    standard deviation over C·H·W, or x / (mean|x| + eps)."""
    out = []
    for sample in x.double():
        n = sample.numel()
        if norm_type == "layernorm":
            mu = sample.sum() / n
            sigma = (((sample - mu) ** 2).sum() / (n - 1)).sqrt()
            out.append((sample - mu) / (sigma + eps))
        else:
            out.append(sample / (sample.abs().sum() / n + eps))
    return torch.stack(out)


@pytest.mark.parametrize("norm_type", ["layernorm", "l1norm"])
@pytest.mark.parametrize("name", ["3x3", "1x1", "grouped", "stem7x7_s2"])
def test_norm_type_is_the_plain_operator_on_the_normalised_input(name, norm_type):
    torch.manual_seed(0)
    layer = _layer(name, norm_type=norm_type)
    geom = Geometry.of(layer)
    # Samples on very different scales: the normalisation is per sample, not per batch.
    x = _input(name) * torch.tensor([1.0, 7.0], dtype=torch.float64).view(2, 1, 1, 1)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    y1 = layer(x1)
    xn = _normalised(x2, norm_type)
    y2 = plain_deconv(xn, w2, b2, stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
                      groups=geom.groups, block=geom.block)
    assert_matches_reference(y1, y2, [(x1, x2), (layer.weight, w2), (layer.bias, b2)])
    # The running statistics are those of the normalised input.
    plain = _layer(name)
    plain(xn.detach())
    torch.testing.assert_close(layer.running_mean, plain.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.running_deconv, plain.running_deconv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm_type", ["layernorm", "l1norm"])
def test_norm_type_eval_and_fold_keep_the_normalisation(norm_type):
    torch.manual_seed(1)
    layer = _layer("3x3", norm_type=norm_type)
    for step in range(2):
        layer(_input("3x3", shift=step))
    layer.eval()
    geom = Geometry.of(layer)
    x = _input("3x3", scale=5.0, shift=-1.0)
    means, mats = running_statistics(layer)
    expected = whitened_conv(_normalised(x, norm_type), layer.weight.detach(), layer.bias.detach(), means, mats,
                             geom)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    # One sample alone gives the same output: eval does not mix samples.
    with torch.no_grad():
        torch.testing.assert_close(layer(x[1:]), y[1:], rtol=1e-12, atol=1e-12)
    # Eval gradients (the input's, through the normalisation) match the formulas'.
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(y)
    (g1,) = torch.autograd.grad(layer(x1), x1, grad)
    (g2,) = torch.autograd.grad(whitened_conv(_normalised(x2, norm_type), layer.weight.detach(),
                                              layer.bias.detach(), means, mats, geom), x2, grad)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)
    # fold_deconv keeps the per-sample normalisation in front of the folded conv.
    folded = fold_deconv(copy.deepcopy(layer))
    from seg.nn import SampleNormConv2d

    assert type(folded) is SampleNormConv2d and folded.norm_type == norm_type and folded.eps == layer.eps
    assert isinstance(folded, nn.Conv2d) and not folded.training
    with torch.no_grad():
        torch.testing.assert_close(folded(x), y, rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated; export still uses it
        traced = torch.jit.trace(folded, x)
    torch.testing.assert_close(traced(x * 0.5), folded(x * 0.5), rtol=1e-12, atol=1e-12)


def test_norm_type_none_is_the_default_and_folds_to_a_plain_conv():
    layer = FastDeconv(8, 4, 3)
    assert layer.norm_type == "none"
    assert type(fold_deconv(layer.eval())) is nn.Conv2d


def test_norm_type_under_bfloat16_autocast_keeps_float32_statistics():
    torch.manual_seed(4)
    layer = FastDeconv(16, 8, 3, padding=1, block=8, norm_type="layernorm")
    ref_layer = copy.deepcopy(layer)
    x = torch.randn(2, 16, 16, 16) * 30 + 20
    y32 = ref_layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().max() / y32.abs().max() < 0.05
    assert layer.running_deconv.dtype == torch.float32
    # Statistics from the input rounded to bf16 but normalised in float32.
    torch.testing.assert_close(layer.running_deconv, ref_layer.running_deconv, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("bad", ["batchnorm", "", None, "LayerNorm"])
def test_bad_norm_type_raises_value_error(bad):
    with pytest.raises(ValueError, match="norm_type"):
        FastDeconv(8, 4, 3, norm_type=bad)


def test_layernorm_needs_two_values_per_sample():
    layer = FastDeconv(1, 2, 1, norm_type="layernorm")
    with pytest.raises(ValueError, match="layernorm"):
        layer(torch.randn(4, 1, 1, 1))


def test_deconvolve_passes_norm_type_to_every_layer_and_fold_keeps_it():
    from seg.nn import SampleNormConv2d, deconvolve

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model = deconvolve(model, norm_type="l1norm")
    layers = [m for m in model.modules() if isinstance(m, FastDeconv)]
    assert len(layers) == 2 and all(m.norm_type == "l1norm" for m in layers)  # the stem too
    model(torch.randn(2, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
        folded = fold_deconv(copy.deepcopy(model))
        assert sum(type(m) is SampleNormConv2d for m in folded.modules()) == 2
        torch.testing.assert_close(folded(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="norm_type"):
        deconvolve(nn.Conv2d(8, 4, 1), norm_type="groupnorm")


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_channels_last_input_and_weight_give_the_default_layouts_values_and_gradients(name):
    # The patch sampling reads the input's actual strides: an NHWC input (and weight, as
    # train.channels_last makes them) must give what NCHW gives. Float64: agreement to rounding.
    torch.manual_seed(0)
    layers = [_layer(name), None]
    layers[1] = copy.deepcopy(layers[0]).to(memory_format=torch.channels_last)
    x = _input(name)
    results = []
    for layer, inp in zip(layers, (x, x.contiguous(memory_format=torch.channels_last))):
        inp = inp.clone().requires_grad_()
        y = layer(inp)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        results.append((y.detach(), inp.grad, layer.weight.grad, layer.running_mean.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # torch.compile of a small model (seconds of compilation)
def test_compiled_training_steps_are_not_recompiled_by_the_step_counters() -> None:
    # The freeze and stats_every counters advance every step on the host; read by a compiled forward they
    # would be guards, and every step would recompile until dynamo's limit sends the layer back to eager.
    torch.manual_seed(0)
    model = torch.nn.Sequential(FastDeconv(4, 8, 3, padding=1, block=4),
                                FastDeconv(8, 8, 3, padding=1, block=8, stats_every=2)).train()
    compiled = torch.compile(model)
    x = torch.randn(2, 4, 12, 12)
    for _ in range(2):  # the first refresh and the first rescaled step compile once each
        compiled(x).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            compiled(x).sum().backward()
    assert model[0]._counter == 6 and int(model[0].state_dict()["counter"]) == 6


def test_counter_of_a_layer_without_freeze_is_saved_with_the_state():
    # Without freeze the buffer is not written by every step; the state dict carries the count all the same.
    layer = FastDeconv(4, 4, 3, padding=1, block=4)
    for _ in range(3):
        layer(torch.randn(1, 4, 6, 6))
    state = layer.state_dict()
    assert int(state["counter"]) == 3
    fresh = FastDeconv(4, 4, 3, padding=1, block=4)
    fresh.load_state_dict(state)
    fresh(torch.randn(1, 4, 6, 6))
    assert int(fresh.state_dict()["counter"]) == 4
