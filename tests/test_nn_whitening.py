"""ChannelDeconv and Delinear (seg/nn/whitening.py) against plainly written float64 operators, and under bf16
autocast. Their synced statistics are tested in tests/test_nn_sync.py."""

from __future__ import annotations

import pytest
import torch

from seg.nn import ChannelDeconv, Delinear
from tests.deconv_reference import ns


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
    d = ns(xc.t() @ xc / xc.shape[0] + 1e-5 * torch.eye(4, dtype=torch.float64), 5)
    white = ((rows - mean) @ d.t()).reshape(32, 12)
    torch.testing.assert_close(y, white @ layer.weight.t() + layer.bias)
    with pytest.raises(ValueError, match="12 input features"):
        layer(torch.randn(3, 10, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["delinear", "channel_deconv"])
def test_whitening_layers_keep_float32_statistics_under_bf16_autocast(kind: str) -> None:
    torch.manual_seed(0)
    make = (lambda: Delinear(32, 10, block=16)) if kind == "delinear" else (lambda: ChannelDeconv(16))
    ref, amp = make(), make()
    amp.load_state_dict(ref.state_dict())
    x = torch.randn(64, 32) if kind == "delinear" else torch.randn(4, 32, 6, 6)
    y_ref = ref(x)
    x_amp = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = amp(x_amp)
    y_amp.float().square().sum().backward()  # mixed dtypes in the backward pass used to raise here
    assert x_amp.grad is not None and torch.isfinite(x_amp.grad.float()).all()
    assert y_amp.dtype == torch.bfloat16 and amp.running_deconv.dtype == torch.float32
    # Statistics from the bf16-rounded input in float32: close to the float32 layer's, far from bf16's 1e-2.
    torch.testing.assert_close(amp.running_deconv, ref.running_deconv, rtol=0, atol=2e-3)
    torch.testing.assert_close(y_amp.float(), y_ref, rtol=0.05, atol=0.05)
