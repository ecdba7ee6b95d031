"""Cross-process deconvolution statistics equal single-process statistics on the whole batch."""

from __future__ import annotations

import pytest
import torch

from tests.dist_sync_worker import assert_ranks_match_one_process, make_inputs, run_two_ranks

# Two gloo processes per case (~3 s each quiet): the reference operator in the fast tier, the options in slow.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("stats_every,matrix_grad,norm_type",
                         [(1, True, "none"), pytest.param(2, True, "none", marks=_SLOW),
                          pytest.param(1, False, "none", marks=_SLOW), pytest.param(1, True, "layernorm", marks=_SLOW)])
def test_sync_two_gloo_processes_equal_one_process(tmp_path, stats_every, matrix_grad, norm_type):
    # norm_type: the per-sample normalisation is local, the statistics of its output are synced.
    ranks = run_two_ranks("dist_sync_worker.py", tmp_path, str(stats_every), "true" if matrix_grad else "false",
                          norm_type)

    layer, x, grad = make_inputs(stats_every, matrix_grad, norm_type)
    layer.sync = True  # no process group here: plain local statistics over the whole batch
    x = x.clone().requires_grad_()
    for _ in range(2):
        x.grad = None
        y = layer(x)
        y.backward(grad)

    assert_ranks_match_one_process(
        ranks, values={"y": y.detach()}, input_grads={"grad_x": x.grad},
        buffers={"running_mean": layer.running_mean, "running_deconv": layer.running_deconv},
        param_grads={"grad_weight": layer.weight.grad})


@pytest.mark.slow  # two gloo processes per case
@pytest.mark.parametrize("kind", ["channel_deconv", "delinear"])
def test_channel_deconv_and_delinear_sync_equal_one_process(tmp_path, kind):
    from tests.dist_whitening_worker import make_inputs as whitening_inputs

    ranks = run_two_ranks("dist_whitening_worker.py", tmp_path, kind)
    layer, x, grad = whitening_inputs(kind)  # sync=True without a process group: the whole batch, locally
    x = x.clone().requires_grad_()
    for _ in range(2):
        x.grad = None
        y = layer(x)
        y.backward(grad)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)

    assert_ranks_match_one_process(
        ranks, values={"y": y.detach(), "y_eval": y_eval}, input_grads={"grad_x": x.grad},
        buffers=dict(layer.named_buffers()),
        param_grads={"grad_weight": layer.weight.grad} if kind == "delinear" else {})
