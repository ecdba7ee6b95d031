"""IterNorm against the paper's formulas written out in float64, and against the official hand-written backward.

``_direct`` computes the forward pass group by group and channel by channel (no reshapes shared with the
layer); ``_official_backward`` is the official code's backward (huangleiBuaa/IterNorm-pytorch), rewritten
from its formulas. Synced statistics are checked on two gloo processes (tests/dist_iternorm_worker.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from seg.nn import IterNorm
from tests.deconv_reference import assert_matches_reference
from tests.dist_iternorm_worker import make_inputs
from tests.dist_sync_worker import assert_ranks_match_one_process, run_two_ranks


def _group_matrix(x: torch.Tensor, channels: range) -> torch.Tensor:
    """Rows: the given channels; columns: every (sample, position) of the batch."""
    return torch.stack([x[:, ch].reshape(-1) for ch in channels])


def _newton(sigma: torch.Tensor, T: int) -> list[torch.Tensor]:
    """P₀ … P_T of the paper's iteration on the trace-normalised covariance."""
    d = sigma.shape[0]
    sigma_n = sigma / torch.trace(sigma)
    ps = [torch.eye(d, dtype=sigma.dtype)]
    for _ in range(T):
        p = ps[-1]
        ps.append(1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n)
    return ps


def _direct(x, weight, bias, d, T, eps, stats=None):
    """y, and per group the batch mean (d,) and whitening matrix W = P_T/√tr(Σ) (train), or ``stats``
    ``[(mean, W), ...]`` applied as they are (eval)."""
    c = x.shape[1]
    out = torch.empty_like(x)
    found = []
    for gi, start in enumerate(range(0, c, d)):
        rows = _group_matrix(x, range(start, start + d))
        m = rows.shape[1]
        if stats is None:
            mean = rows.sum(1) / m
            xc = rows - mean[:, None]
            sigma = eps * torch.eye(d, dtype=x.dtype) + xc @ xc.T / m
            wm = _newton(sigma, T)[-1] / torch.trace(sigma).sqrt()
        else:
            mean, wm = stats[gi]
            xc = rows - mean[:, None]
        found.append((mean, wm))
        y = wm @ xc
        for i, ch in enumerate(range(start, start + d)):
            out[:, ch] = y[i].reshape(x[:, ch].shape) * weight[ch] + bias[ch]
    return out, found


def _official_backward(grad: torch.Tensor, xc: torch.Tensor, T: int, eps: float) -> torch.Tensor:
    """∂L/∂x from ∂L/∂x̂ for one group (``(d, m)`` matrices), as the official hand-written backward:
    back through W = P_T·√rTr, the T Newton steps (accumulating ∂/∂Σ_N, up to the factor −0.5), the
    trace normalisation (rTr = 1/tr Σ), Σ = εI + Xc·Xcᵀ/m and the centring."""
    d, m = xc.shape
    eye = torch.eye(d, dtype=xc.dtype)
    sigma = eps * eye + xc @ xc.T / m
    r_tr = 1 / torch.trace(sigma)
    sn = sigma * r_tr
    ps = _newton(sigma, T)
    wm = ps[T] * r_tr.sqrt()
    g_wm = grad @ xc.T
    g_p = g_wm * r_tr.sqrt()
    g_sn = torch.zeros_like(sigma)
    for k in range(T, 1, -1):
        p = ps[k - 1].T
        p2 = p @ p
        g_sn = g_sn + p2 @ p @ g_p
        g_tmp = g_p @ sn.T
        g_p = 1.5 * g_p - 0.5 * g_tmp @ p2 - 0.5 * p2 @ g_tmp - 0.5 * p @ g_tmp @ p
    g_sn = g_sn + g_p
    g_tr = torch.trace(-sn.T @ g_sn + g_wm.T @ wm) * eye
    g_sigma = (g_sn + g_sn.T + 2 * g_tr) * (-0.5 / m * r_tr)
    return wm @ (grad - grad.mean(1, keepdim=True)) + g_sigma @ xc


def _layer(c=12, d=4, T=5, eps=1e-5, momentum=0.1, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = IterNorm(c, num_channels=d, T=T, eps=eps, momentum=momentum, **kwargs).double()
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    return layer


def _x(n=3, c=12, hw=(5, 7), seed=1):
    torch.manual_seed(seed)
    # Channels on different scales and correlated: whitening has something to do.
    base = torch.randn(n, c, *hw, dtype=torch.float64)
    mix = torch.eye(c, dtype=torch.float64) + 0.4 * torch.randn(c, c, dtype=torch.float64)
    return torch.einsum("dc,nc...->nd...", mix, base) * 2 + 0.7


# ---------------------------------------------------------------------------------------------
# the formulas


@pytest.mark.parametrize("T,eps", [(5, 1e-5), (1, 1e-5), (8, 1e-2)])
@pytest.mark.parametrize("shape", [(3, 12, 5, 7), (16, 12), (2, 12, 3, 2, 4)])
def test_train_forward_and_gradients_match_the_formulas(T, eps, shape):
    layer = _layer(T=T, eps=eps)
    x = _x(shape[0], 12, shape[2:])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    y1 = layer(x1)
    y2, _ = _direct(x2, w2, b2, 4, T, eps)
    assert y1.shape == x.shape and y1.is_contiguous()
    assert_matches_reference(y1, y2, [(x1, x2), (layer.weight, w2), (layer.bias, b2)])


@pytest.mark.parametrize("T", [1, 2, 5])
def test_input_gradient_matches_the_official_hand_written_backward(T):
    layer = _layer(T=T, eps=1e-3)
    x = _x(4, 12, (3, 5)).requires_grad_()
    grad = torch.randn(4, 12, 3, 5, dtype=torch.float64)
    layer(x).backward(grad)
    for start in range(0, 12, 4):
        channels = range(start, start + 4)
        rows = _group_matrix(x.detach(), channels)
        xc = rows - rows.mean(1, keepdim=True)
        # The affine comes after the whitening: ∂L/∂x̂ = weight · ∂L/∂y.
        g_hat = _group_matrix(grad * layer.weight.detach().view(1, -1, 1, 1), channels)
        expected = _official_backward(g_hat, xc, T, 1e-3)
        torch.testing.assert_close(_group_matrix(x.grad, channels), expected, rtol=1e-9, atol=1e-10)


def test_running_statistics_follow_the_official_update():
    momentum = 0.3
    layer = _layer(momentum=momentum)
    means = [torch.zeros(4, dtype=torch.float64) for _ in range(3)]
    wms = [torch.eye(4, dtype=torch.float64) for _ in range(3)]
    for step in range(3):
        x = _x(seed=10 + step)
        _, stats = _direct(x, torch.ones(12), torch.zeros(12), 4, 5, 1e-5)
        for g, (mean, wm) in enumerate(stats):
            means[g] = momentum * mean + (1 - momentum) * means[g]
            wms[g] = momentum * wm + (1 - momentum) * wms[g]
        layer(x.requires_grad_())
    assert layer.running_mean.shape == (3, 4, 1) and layer.running_wm.shape == (3, 4, 4)
    assert not layer.running_mean.requires_grad and not layer.running_wm.requires_grad
    torch.testing.assert_close(layer.running_mean, torch.stack(means)[..., None], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_wm, torch.stack(wms), rtol=1e-12, atol=1e-12)


def test_eval_uses_the_running_statistics_with_gradients():
    layer = _layer()
    for step in range(2):
        layer(_x(seed=20 + step))
    layer.eval()
    before = copy.deepcopy(layer.state_dict())
    stats = [(layer.running_mean[g, :, 0].clone(), layer.running_wm[g].clone()) for g in range(3)]
    x = _x(seed=30)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    y1 = layer(x1)
    y2, _ = _direct(x2, w2, b2, 4, 5, 1e-5, stats=stats)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, w2.grad, rtol=1e-12, atol=1e-12)
    # Eval does not mix samples and does not touch the buffers.
    torch.testing.assert_close(layer(x[1:]), y1[1:].detach(), rtol=1e-12, atol=1e-12)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_many_iterations_whiten_each_group():
    # 12, not "many more": the uncoupled iteration amplifies rounding, and here diverges from about T=20.
    layer = _layer(T=12, eps=1e-8, affine=False)
    y = layer(_x(8, 12, (6, 6))).detach()
    for start in range(0, 12, 4):
        rows = _group_matrix(y, range(start, start + 4))
        torch.testing.assert_close(rows.mean(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-10)
        cov = rows @ rows.T / rows.shape[1]
        torch.testing.assert_close(cov, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# construction, state, precision


@pytest.mark.parametrize(
    "c, requested, d",
    [(64, 64, 64), (256, 64, 64), (96, 64, 32), (48, 64, 16), (3, 64, 1), (24, 16, 8), (12, 5, 2), (30, 64, 2)],
)
def test_group_size_is_halved_until_it_divides_the_channels(c, requested, d):
    layer = IterNorm(c, num_channels=requested)
    assert (layer.num_channels, layer.num_groups) == (d, c // d)
    assert layer.running_mean.shape == (c // d, d, 1)
    assert layer.running_wm.shape == (c // d, d, d)
    torch.testing.assert_close(layer.running_wm, torch.eye(d).repeat(c // d, 1, 1))
    assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0) and layer.weight.shape == (c,)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_features=0), "num_features"),
        (dict(num_features=-8), "num_features"),
        (dict(num_features=8.0), "num_features"),
        (dict(num_channels=0), "num_channels"),
        (dict(num_channels=None), "num_channels"),
        (dict(T=0), "T"),
        (dict(T=2.5), "T"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-5), "eps"),
        (dict(momentum=0.0), "momentum"),
        (dict(momentum=1.5), "momentum"),
        (dict(momentum=True), "momentum"),
        (dict(affine="yes"), "affine"),
        (dict(sync=1), "sync"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, name):
    args = dict(num_features=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        IterNorm(**args)


def test_bad_inputs_raise_value_error():
    layer = IterNorm(8, num_channels=4)
    with pytest.raises(ValueError, match="8 channels"):
        layer(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        layer(torch.randn(8))
    with pytest.raises(ValueError, match="empty batch"):
        layer(torch.randn(0, 8, 3, 3))


def test_state_dict_round_trip():
    layer = _layer(affine=True)
    for step in range(2):
        layer(_x(seed=40 + step))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_wm"}
    fresh = IterNorm(12, num_channels=4).double()
    fresh.load_state_dict(state)
    layer.eval()
    fresh.eval()
    x = _x(seed=50)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    # A layer of another grouping cannot take them.
    with pytest.raises(RuntimeError, match="running_wm"):
        IterNorm(12, num_channels=6).double().load_state_dict(state)


def test_without_affine_has_no_parameters():
    layer = IterNorm(8, num_channels=4, affine=False)
    assert layer.weight is None and layer.bias is None and not list(layer.parameters())
    assert set(layer.state_dict()) == {"running_mean", "running_wm"}


def test_cpu_bfloat16_autocast_whitens_in_float32():
    torch.manual_seed(3)
    layer = IterNorm(16, num_channels=8)
    ref = copy.deepcopy(layer)
    x = (_x(4, 16, (8, 8)) * 10 + 30).float()
    y32 = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x.bfloat16())
        y_float_in = copy.deepcopy(ref)(x)
    assert y16.dtype == torch.bfloat16 and y_float_in.dtype == torch.float32  # the input's dtype
    assert torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().max() < 0.1
    assert layer.running_wm.dtype == torch.float32
    # Statistics of the bf16-rounded input, computed in float32 (bf16 Newton steps would be far off).
    torch.testing.assert_close(layer.running_wm, ref.running_wm, rtol=2e-2, atol=2e-3)
    y16.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_sync_without_a_process_group_is_the_local_operator():
    a, b = _layer(sync=True), _layer(sync=False)
    x = _x()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# synced statistics on two processes


@pytest.mark.slow  # two gloo processes
def test_sync_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = run_two_ranks("dist_iternorm_worker.py", tmp_path)

    layer, xs, grads = make_inputs()
    layer.sync = False  # the unsynced operator on the concatenated batch
    for x, grad in zip(xs, grads):
        layer.zero_grad()
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(grad)

    assert_ranks_match_one_process(
        ranks, values={"y": y.detach()}, input_grads={"grad_x": x.grad},
        buffers={"running_mean": layer.running_mean, "running_wm": layer.running_wm},
        param_grads={"grad_weight": layer.weight.grad, "grad_bias": layer.bias.grad})
