"""build_model: every arch x norm x output stride, padding, init, norms, determinism."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import seg.models.build as build_module
from seg.config import ConfigError, DeconvConfig, ModelConfig
from seg.models import build_model
from seg.nn import FastDeconv, fold_deconv

# A small whitening block keeps the Newton-Schulz matrices (9*block wide for 3x3 convs) cheap on CPU.
SMALL_DECONV = DeconvConfig(block=16)


def make_cfg(**kw) -> ModelConfig:
    kw.setdefault("encoder", "resnet18")
    kw.setdefault("deconv", SMALL_DECONV)
    return ModelConfig(**kw)


def build(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(make_cfg(**kw))


def convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("norm", ["bn", "deconv"])
@pytest.mark.parametrize("arch", ["deeplabv3", "deeplabv3plus", "fcn"])
def test_forward_backward(arch: str, norm: str, output_stride: int) -> None:
    model = build(arch=arch, norm=norm, output_stride=output_stride, aux_loss=True)
    seen = {}
    model.encoder.register_forward_hook(lambda m, i, o: seen.update(features=o))
    out = model(torch.randn(2, 3, 64, 128))
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == (2, 19, 64, 128)
    assert out["aux"].shape == (2, 19, 64, 128)
    (out["out"].logsumexp(1).mean() + 0.4 * out["aux"].logsumexp(1).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert model.head.classifier.weight.grad.abs().sum() > 0

    layers = convs(model)
    if norm == "deconv":
        assert not [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        assert [n for n, m in layers.items() if not isinstance(m, FastDeconv)] == []
        for name in ("head.classifier", "aux_head.classifier"):
            clf = model.get_submodule(name)
            assert clf.block == clf.in_channels, name
    else:
        assert not any(isinstance(m, FastDeconv) for m in layers.values())
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    # The auxiliary head reads layer3 (nominal stride 16, dilated to 8 at output stride 8), the main head
    # the last stage.
    feats = seen["features"]
    aux_stride = min(16, output_stride)
    assert feats[4].shape[-2:] == (64 // aux_stride, 128 // aux_stride)
    assert feats[-1].shape[-2:] == (64 // output_stride, 128 // output_stride)


def test_deeplabv3_image_pooling_branch_deconvolved() -> None:
    # The image-pooling branch whitens a 1x1 map: with batch 2 its statistics rest on very few samples.
    model = build(arch="deeplabv3", norm="deconv", output_stride=16)
    pool_branch = model.head.decoder.aspp.convs[-1]
    pool_convs = [m for m in pool_branch.modules() if isinstance(m, nn.Conv2d)]
    assert len(pool_convs) == 1 and isinstance(pool_convs[0], FastDeconv)
    seen = {}
    pool_convs[0].register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    out = model(torch.randn(2, 3, 64, 128))["out"]
    out.mean().backward()
    assert seen["inp"].shape[-2:] == (1, 1)
    assert torch.isfinite(seen["out"]).all()
    assert torch.isfinite(pool_convs[0].weight.grad).all() and pool_convs[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["bn", "deconv"])
def test_odd_input_size_is_padded_and_cropped(norm: str) -> None:
    model = build(arch="deeplabv3plus", norm=norm, output_stride=16, aux_loss=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 63, 127))  # one training-mode pass: running statistics move
    model.eval()
    x = torch.randn(1, 3, 63, 127)
    with torch.no_grad():
        out = model(x)
        padded = model(F.pad(x, (0, 1, 0, 1)))  # the same zero padding, done by hand
    assert out["out"].shape == (1, 19, 63, 127)
    assert out["aux"].shape == (1, 19, 63, 127)
    assert torch.isfinite(out["out"]).all()
    # Cropping keeps the top-left block, aligned with the input pixels.
    torch.testing.assert_close(out["out"], padded["out"][..., :63, :127])
    torch.testing.assert_close(out["aux"], padded["aux"][..., :63, :127])


def test_no_aux_head_without_aux_loss() -> None:
    model = build(arch="fcn", norm="bn", output_stride=16)
    assert model.aux_head is None
    assert set(model(torch.randn(1, 3, 32, 32))) == {"out"}


def test_build_is_deterministic_for_a_seed() -> None:
    a = build(seed=3, arch="deeplabv3", norm="deconv", output_stride=16, aux_loss=True).state_dict()
    b = build(seed=3, arch="deeplabv3", norm="deconv", output_stride=16, aux_loss=True).state_dict()
    c = build(seed=4, arch="deeplabv3", norm="deconv", output_stride=16, aux_loss=True).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["head.decoder.conv.weight"], c["head.decoder.conv.weight"])
    assert not torch.equal(a["encoder.layer1.0.conv1.weight"], c["encoder.layer1.0.conv1.weight"])


@pytest.mark.parametrize("arch", ["deeplabv3", "fcn"])
def test_both_norms_start_from_the_same_conv_weights(arch: str) -> None:
    bn = convs(build(seed=1, arch=arch, norm="bn", output_stride=16, aux_loss=True))
    dc = convs(build(seed=1, arch=arch, norm="deconv", output_stride=16, aux_loss=True))
    assert bn.keys() == dc.keys()
    for name in bn:
        assert torch.equal(bn[name].weight, dc[name].weight), name


def test_head_initialisation() -> None:
    model = build(arch="fcn", norm="bn", output_stride=16, aux_loss=True)
    head = model.head
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k)).
    expected = (2.0 / (head.conv.out_channels * 9)) ** 0.5
    assert abs(head.conv.weight.std().item() - expected) / expected < 0.05
    assert head.classifier.weight.std().item() < 0.02
    assert torch.count_nonzero(head.classifier.bias) == 0
    assert torch.all(head.bn.weight == 1) and torch.count_nonzero(head.bn.bias) == 0


def test_config_recorded_and_deconv_settings_applied() -> None:
    cfg = make_cfg(arch="deeplabv3", norm="deconv", output_stride=8,
                   deconv=DeconvConfig(block=8, n_iter=3, eps=1e-3, stem_n_iter=11, sampling_stride=2))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.config == cfg and model.config is not cfg
    layers = convs(model)
    stem = layers["encoder.conv1"]
    assert (stem.n_iter, stem.freeze) == (11, True)
    body = layers["encoder.layer1.0.conv1"]
    assert (body.block, body.n_iter, body.eps, body.sampling_stride, body.freeze) == (8, 3, 1e-3, 2, False)
    assert not any(m.sync for m in layers.values())
    assert all(m.stats_every == 1 for m in layers.values())


def test_speed_options_reach_every_layer_but_the_stem() -> None:
    deconv = DeconvConfig(block=16, stats_every=4, matrix_grad=False)
    model = build_model(make_cfg(arch="fcn", output_stride=16, deconv=deconv))
    layers = convs(model)
    assert (layers["encoder.conv1"].stats_every, layers["encoder.conv1"].matrix_grad) == (1, True)
    assert all(m.stats_every == 4 and not m.matrix_grad for n, m in layers.items() if n != "encoder.conv1")
    assert all(m.matrix_grad for m in convs(build_model(make_cfg(arch="fcn", output_stride=16))).values())
    model(torch.randn(1, 3, 64, 64)).get("out").sum().backward()
    with pytest.raises(ConfigError, match="model.deconv.stats_every"):
        DeconvConfig(stats_every=0)


def test_classifier_can_stay_plain() -> None:
    cfg = make_cfg(arch="fcn", norm="deconv", output_stride=16, aux_loss=True,
                   deconv=DeconvConfig(block=16, classifier=False))
    model = build_model(cfg)
    for name in ("head.classifier", "aux_head.classifier"):
        assert type(model.get_submodule(name)) is nn.Conv2d
    assert isinstance(model.head.conv, FastDeconv)


def test_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="SyncBatchNorm does not run on CPU"):
        model = build(arch="fcn", norm="bn", output_stride=16)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    # Deconvolution takes global-batch statistics by itself.
    model = build(arch="fcn", norm="deconv", output_stride=16)
    assert all(m.sync for m in model.modules() if isinstance(m, FastDeconv))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = build(arch="fcn", norm="bn", output_stride=16)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_single_process_keeps_plain_bn_silently() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build(arch="fcn", norm="bn", output_stride=16)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_timm_encoder_under_deconv() -> None:
    model = build(arch="deeplabv3plus", encoder="tu-resnet18", norm="deconv", output_stride=16, aux_loss=True)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert all(isinstance(m, FastDeconv) for m in convs(model).values())
    out = model(torch.randn(2, 3, 64, 96))
    assert out["out"].shape == (2, 19, 64, 96) and out["aux"].shape == (2, 19, 64, 96)
    out["out"].mean().backward()
    assert torch.isfinite(model.encoder.model.conv1.weight.grad).all()


def test_unknown_encoder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.encoder.*'resnet19'"):
        build_model(make_cfg(encoder="resnet19"))
    with pytest.raises(ConfigError, match="tu-no_such_net"):
        build_model(make_cfg(encoder="tu-no_such_net"))


def test_folded_deconv_model_matches_in_eval_mode() -> None:
    model = build(arch="deeplabv3", norm="deconv", output_stride=16, aux_loss=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))  # running statistics away from identity
    model.eval()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        expected = model(x)["out"]
        folded = fold_deconv(model)
        assert not any(isinstance(m, FastDeconv) for m in folded.modules())
        torch.testing.assert_close(folded(x)["out"], expected, rtol=1e-4, atol=1e-5)
