"""Predictor: whole vs slide, flip and multi-scale TTA, logits vs probabilities, normalisation, checkpoints,
folding."""

import numpy as np
import pytest
import torch
from torch import nn

from seg.checkpoint import CheckpointError
from seg.config import Config, ModelConfig, to_dict
from seg.errors import UserError
from seg.inference import InferenceError, Predictor, slide_windows
from seg.models import build_model


class PixelModel(nn.Module):
    """Per-pixel (1x1) classifier: its logits at a pixel depend only on that pixel."""

    def __init__(self, num_classes=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


class ShiftModel(nn.Module):
    """Not flip-equivariant: each pixel also sees its right-hand neighbour (a one-sided kernel)."""

    def __init__(self, num_classes=5):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, num_classes, (1, 3), padding=(0, 1))
        with torch.no_grad():
            self.conv.weight[..., 0] = 0  # ignore the left neighbour only

    def forward(self, x):
        return {"out": self.conv(x)}


@pytest.mark.parametrize(
    "h,w,crop,stride", [(37, 53, (16, 16), (10, 12)), (8, 8, (8, 8), (4, 4)), (5, 40, (16, 16), (8, 8))]
)
def test_slide_windows_cover_the_image(h, w, crop, stride):
    covered = np.zeros((h, w), int)
    for y, x in slide_windows(h, w, crop, stride):
        ch, cw = min(crop[0], h), min(crop[1], w)
        assert 0 <= y <= h - ch and 0 <= x <= w - cw
        covered[y : y + ch, x : x + cw] += 1
    assert covered.min() >= 1


def test_slide_equals_whole_for_a_local_model_with_overlapping_crops():
    model = PixelModel().eval()
    x = torch.randn(2, 3, 37, 53)
    whole = Predictor(model, device="cpu").logits(x)
    slide = Predictor(
        model, device="cpu", mode="slide", crop_size=(16, 16), stride=(10, 12), batch_size=4
    ).logits(x)
    torch.testing.assert_close(slide, whole)


def test_slide_equals_whole_when_the_crop_covers_the_image():
    model = build_model(ModelConfig(encoder="resnet18", output_stride=16)).eval()
    x = torch.randn(1, 3, 48, 80)
    whole = Predictor(model, device="cpu").logits(x)
    slide = Predictor(model, device="cpu", mode="slide", crop_size=(64, 128), stride=(32, 64)).logits(x)
    assert whole.shape == (1, 19, 48, 80)
    torch.testing.assert_close(slide, whole)


def test_flip_tta_on_a_flip_symmetric_input():
    x = torch.randn(1, 3, 16, 24)
    x = x + x.flip(-1)  # symmetric under horizontal flip
    model = ShiftModel().eval()
    plain = Predictor(model, device="cpu").probabilities(x)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-4)  # the model itself breaks the symmetry
    tta = Predictor(model, device="cpu", flip=True).probabilities(x)
    # Averaging a view with its mirror makes the probabilities mirror-symmetric ...
    torch.testing.assert_close(tta, tta.flip(-1))
    # ... and equal to the mean of the plain output and its mirror image.
    torch.testing.assert_close(tta, (plain + plain.flip(-1)) / 2)
    # A flip-equivariant model is unchanged by flip TTA.
    pix = PixelModel().eval()
    torch.testing.assert_close(
        Predictor(pix, device="cpu", flip=True).probabilities(x),
        Predictor(pix, device="cpu").probabilities(x),
    )


def test_multiscale_returns_full_size_probabilities():
    model = PixelModel().eval()
    x = torch.randn(1, 3, 20, 30)
    probs = Predictor(model, device="cpu", scales=(0.5, 1.0, 1.5)).probabilities(x)
    assert probs.shape == (1, 5, 20, 30)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 20, 30))


def test_logits_are_logits_and_probabilities_are_probabilities():
    model = PixelModel().eval()
    x = torch.randn(2, 3, 9, 11)
    ref = model(x)["out"].detach()
    single = Predictor(model, device="cpu")
    torch.testing.assert_close(single.logits(x), ref)  # raw scores, not softmaxed
    torch.testing.assert_close(single.probabilities(x), ref.softmax(1))
    pred, probs = single.predict_tensor(x, return_probs=True)
    assert torch.equal(pred, ref.argmax(1)) and torch.equal(single.predict_tensor(x), pred)
    torch.testing.assert_close(probs, ref.softmax(1))
    # Several views are averaged as probabilities: there are no logits to return.
    tta = Predictor(model, device="cpu", scales=(1.0, 1.5), flip=True)
    assert tta.views == [(1.0, False), (1.0, True), (1.5, False), (1.5, True)]
    with pytest.raises(ValueError, match="single view.*probabilities"):
        tta.logits(x)
    pred, probs = tta.predict_tensor(x, return_probs=True)
    assert torch.equal(pred, probs.argmax(1)) and torch.equal(tta.predict_tensor(x), pred)


def test_any_input_size_with_a_real_model():
    """The model pads to its output stride and crops back; Predictor itself does not pad."""
    model = build_model(ModelConfig(encoder="resnet18", output_stride=16)).eval()
    x = torch.randn(2, 3, 37, 53)
    out = Predictor(model, device="cpu", batch_size=1).logits(x)
    assert out.shape == (2, 19, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x)["out"])


def test_a_model_that_changes_the_size_is_a_clear_error():
    class Strided(nn.Module):
        def forward(self, x):
            return x[..., ::2, ::2]

    with pytest.raises(RuntimeError, match="any input size"):
        Predictor(Strided(), device="cpu").logits(torch.randn(1, 3, 8, 8))


def test_bad_settings_are_user_errors():
    model = PixelModel()
    for kwargs, key in [
        ({"mode": "tiles"}, "eval.mode"),
        ({"scales": ()}, "eval.scales"),
        ({"batch_size": 0}, "eval.batch_size"),
        ({"crop_size": (0, 4)}, "eval.crop_size"),
        ({"device": "tpu"}, "tpu"),
    ]:
        with pytest.raises(InferenceError, match=key):
            Predictor(model, **kwargs)
    assert issubclass(InferenceError, UserError)


def test_call_on_uint8_images_normalises_and_batches():
    model = PixelModel().eval()
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    pred = Predictor(model, device="cpu", mean=mean, std=std, batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (9, 13, 3), dtype=np.uint8) for _ in range(3)] + [
        rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    ]
    maps, probs = pred(images, return_probs=True)
    for im, m, p in zip(images, maps, probs, strict=True):
        x = torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)
        x = x / torch.tensor(std).view(1, 3, 1, 1)
        ref = model(x)["out"][0]
        assert m.dtype == np.uint8 and m.shape == im.shape[:2]
        assert np.array_equal(m, ref.argmax(0).numpy())
        np.testing.assert_allclose(p, ref.softmax(0).detach().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="uint8 RGB"):
        pred(np.zeros((4, 4), np.uint8)[None])


def randomize_statistics(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial deconvolution running statistics (a training pass on CPU takes too long for a test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("running_mean"):
                buf.add_(0.01 * torch.randn(buf.shape, generator=g))
            elif leaf == "running_deconv":
                noise = 0.02 * torch.randn(buf.shape, generator=g)
                buf.add_(noise @ noise.transpose(-1, -2))  # stays symmetric positive definite


def test_from_checkpoint_and_fold_match_the_model(tmp_path):
    cfg = Config(model=ModelConfig(encoder="resnet18", output_stride=16))
    cfg.data.mean, cfg.data.std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    model = build_model(cfg.model)
    randomize_statistics(model)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "iteration": 0}, path)

    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        ref = model.eval()(x)["out"]
    loaded = Predictor.from_checkpoint(path, device="cpu")
    assert isinstance(loaded.config, Config) and loaded.config.data.mean == [0.5, 0.5, 0.5]
    assert Predictor(model, device="cpu").config is None
    torch.testing.assert_close(
        loaded.logits(loaded.normalize([image])), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4
    )
    folded = Predictor.from_checkpoint(path, device="cpu", fold=True)
    assert not any(type(m).__name__ == "FastDeconv" for m in folded.model.modules())
    torch.testing.assert_close(
        folded.logits(folded.normalize([image])), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4
    )


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "weights.pth"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(CheckpointError, match="weights.pth: not a training checkpoint"):
        Predictor.from_checkpoint(bad, device="cpu")
    with pytest.raises(CheckpointError, match="missing.pth"):
        Predictor.from_checkpoint(tmp_path / "missing.pth", device="cpu")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        Predictor.from_checkpoint(text, device="cpu")
    # Weights that do not fit the stored config: the file is named, the mismatching keys listed.
    cfg = Config(model=ModelConfig(encoder="resnet18", output_stride=16))
    state = build_model(cfg.model).state_dict()
    del state[sorted(k for k in state if k.startswith("head."))[-1]]
    torch.save({"model": state, "config": to_dict(cfg)}, tmp_path / "cut.pth")
    with pytest.raises(UserError, match="cut.pth"):
        Predictor.from_checkpoint(tmp_path / "cut.pth", device="cpu")
