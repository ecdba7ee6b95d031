"""Segmenter pads to its output stride itself, for any input size, in a form tracing keeps dynamic."""

import warnings

import pytest
import torch
from torch import nn

from seg.config import ModelConfig
from seg.models.segmenter import Segmenter, pad_to_multiple


def tiny_segmenter(aux: bool = False) -> Segmenter:
    """Output stride 8: two strided convolutions, a 1x1 head."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    return Segmenter(encoder, nn.Conv2d(4, 5, 1), nn.Conv2d(4, 5, 1) if aux else None, 8, ModelConfig()).eval()


def test_pad_to_multiple_pads_bottom_right_with_zeros():
    x = torch.randn(2, 3, 13, 16)
    padded = pad_to_multiple(x, 8)
    assert padded.shape == (2, 3, 16, 16)
    assert torch.equal(padded[..., :13, :16], x) and not padded[..., 13:, :].any()
    assert torch.equal(pad_to_multiple(x, 1), x)


@pytest.mark.parametrize("h,w", [(37, 53), (16, 24), (1, 9)])
def test_any_size_gives_logits_at_that_size(h, w):
    model = tiny_segmenter(aux=True)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        out = model(x)
        # The same as padding by hand and cropping the full-size logits.
        padded = pad_to_multiple(x, 8)
        ref = nn.functional.interpolate(
            model.head(model.encoder(padded)), size=padded.shape[-2:], mode="bilinear", align_corners=False
        )[..., :h, :w]
    assert out["out"].shape == out["aux"].shape == (1, 5, h, w)
    torch.testing.assert_close(out["out"], ref)


def test_tracing_keeps_the_padding_dynamic():
    model = tiny_segmenter()

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["out"]

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no shape-dependent Python branch
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.trace is deprecated upstream
        traced = torch.jit.trace(Logits(), torch.randn(1, 3, 64, 96))
        x = torch.randn(2, 3, 37, 53)  # another batch size, and not a multiple of the stride
        torch.testing.assert_close(traced(x), model(x)["out"])
