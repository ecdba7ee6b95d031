"""Every ``model.norm`` but bn/deconv (those are in test_models_build.py) on every architecture: no
BatchNorm left anywhere, the expected layers with their settings, training and eval passes, checkpoints."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d
from torch.nn.modules.batchnorm import _BatchNorm

import seg.models.norms as norms_module
from seg.checkpoint import CheckpointError
from seg.config import ChannelDeconvConfig, IterNormConfig, ModelConfig
from seg.models import build_model, model_from_checkpoint
from seg.models.weights import NORM_NAMES
from seg.nn import ChannelDeconv, IterNorm
from seg.nn.convert import replace_batchnorm
from seg.tasks import untrained_model

ARCHS = ("deeplabv3", "deeplabv3plus", "fcn")
NORMS = ("gn", "iternorm", "channel_deconv", "none")
# The layer each norm puts where a BatchNorm was (none: nothing, the conv gets a bias).
LAYER = {"gn": nn.GroupNorm, "iternorm": IterNorm, "channel_deconv": ChannelDeconv, "none": nn.Identity}


def build(norm: str, arch: str = "fcn", seed: int = 0, **kw) -> nn.Module:
    kw.setdefault("encoder", "resnet18")
    kw.setdefault("output_stride", 16)
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, norm=norm, **kw))


@functools.cache
def bn_layers(arch: str) -> dict[str, int]:
    """name -> channels of every BatchNorm of the ``norm: bn`` model (with the aux head)."""
    model = build("bn", arch, aux_loss=True)
    return {n: m.num_features for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def layers(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def test_every_config_choice_has_a_builder() -> None:
    (norm,) = [f for f in dataclasses.fields(ModelConfig) if f.name == "norm"]
    assert set(norms_module.NORM_APPLIERS) == set(norm.metadata["choices"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", NORMS)
def test_norm_replaces_every_batchnorm(norm: str, arch: str) -> None:
    model = build(norm, arch, aux_loss=True)
    assert not layers(model, _BatchNorm)
    # One new layer exactly where each BatchNorm of the bn model was, encoder and heads alike.
    replaced = layers(model, LAYER[norm])
    assert set(bn_layers(arch)) <= set(replaced) and len(bn_layers(arch)) > 0
    assert any(n.startswith("encoder.") for n in replaced) and any(n.startswith("head.") for n in replaced)
    assert any(n.startswith("aux_head.") for n in replaced)
    assert model.norm_report.replaced == list(bn_layers(arch))

    out = model(torch.randn(2, 3, 64, 128))
    assert out["out"].shape == (2, 19, 64, 128) and out["aux"].shape == (2, 19, 64, 128)
    (out["out"].logsumexp(1).mean() + 0.4 * out["aux"].logsumexp(1).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 128))
    assert out["out"].shape == (1, 19, 64, 128) and torch.isfinite(out["out"]).all()


def test_none_gives_every_conv_a_zero_bias() -> None:
    model = build("none", "deeplabv3plus", aux_loss=True)
    convs = layers(model, nn.Conv2d)
    assert all(m.bias is not None for m in convs.values())
    added = model.norm_report.conv_biases
    assert "encoder.conv1" in added and "head.decoder.block1.0" in added and len(added) > 20
    assert all(torch.count_nonzero(convs[n].bias) == 0 for n in added)
    # The classifiers had their bias already (and keep their initialisation).
    assert "head.classifier" not in added and "aux_head.classifier" not in added


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_starts_from_the_bn_models_conv_weights(norm: str) -> None:
    bn = layers(build("bn", "deeplabv3", seed=1, aux_loss=True), nn.Conv2d)
    other = layers(build(norm, "deeplabv3", seed=1, aux_loss=True), nn.Conv2d)
    assert bn.keys() == other.keys()
    for name in bn:
        assert torch.equal(bn[name].weight, other[name].weight), name


def test_gn_groups() -> None:
    assert [norms_module.gn_groups(c, 32) for c in (64, 256, 48, 40, 7)] == [32, 32, 24, 20, 7]
    assert norms_module.gn_groups(64, 5) == 4
    norms = layers(build("gn", "deeplabv3plus", aux_loss=True), nn.GroupNorm)
    # 32 groups everywhere but DeepLabV3+'s 48-channel skip projection, which gets the largest divisor.
    assert {n: m.num_groups for n, m in norms.items() if m.num_groups != 32} == {"head.decoder.block1.1": 24}
    assert all(m.num_channels % m.num_groups == 0 for m in norms.values())
    norms = layers(build("gn", "fcn", gn_groups=16, aux_loss=True), nn.GroupNorm)
    assert {m.num_groups for m in norms.values()} == {16}


@pytest.mark.parametrize("norm", ["gn", "iternorm"])
def test_head_norms_start_as_identity_affine(norm: str) -> None:
    model = build(norm, "deeplabv3", aux_loss=True)
    norms = [m for m in [*model.head.modules(), *model.aux_head.modules()] if isinstance(m, LAYER[norm])]
    assert norms
    for m in norms:
        assert torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0


def test_iternorm_settings_reach_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = IterNormConfig(num_channels=16, T=3, eps=1e-3, momentum=0.2)
    assert all(getattr(settings, f.name) != f.default for f in dataclasses.fields(IterNormConfig)), "set every field"
    norms = layers(build("iternorm", "fcn", iternorm=settings, aux_loss=True), IterNorm)
    assert norms
    for m in norms.values():
        assert (m.T, m.eps, m.momentum, m.sync) == (3, 1e-3, 0.2, False)
        assert m.num_channels <= 16
    # Several processes: synced statistics, decided by build_model.
    monkeypatch.setattr(norms_module, "world_size", lambda: 2)
    assert all(m.sync for m in layers(build("iternorm", "fcn"), IterNorm).values())


def test_channel_deconv_settings_and_block_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ChannelDeconvConfig(block=32, eps=1e-3, n_iter=3, momentum=0.2, sampling_stride=2)
    defaults = ChannelDeconvConfig()
    assert all(getattr(settings, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(settings))
    model = build("channel_deconv", "deeplabv3plus", channel_deconv=settings)
    norms = layers(model, ChannelDeconv)
    for m in norms.values():
        assert (m.eps, m.n_iter, m.momentum, m.sampling_stride) == (1e-3, 3, 0.2, 2)
    assert norms["encoder.bn1"].block == 32
    # Fewer channels than the block: all of them whitened together.
    model = build("channel_deconv", "deeplabv3plus")
    assert model.head.decoder.block1[1].block == 48 and model.encoder.bn1.block == 64
    assert not any(m.sync for m in norms.values())
    # With several processes, the statistics span them (the build's one sync decision).
    monkeypatch.setattr(norms_module, "world_size", lambda: 2)
    assert all(m.sync for m in layers(build("channel_deconv", "fcn"), ChannelDeconv).values())


@pytest.mark.parametrize("norm", NORMS)
def test_checkpoint_rebuilds_the_same_model(norm: str) -> None:
    model = build(norm, "fcn", aux_loss=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))  # running statistics away from their start
    model.eval()
    checkpoint = {"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.config)}}
    rebuilt = model_from_checkpoint(checkpoint, untrained_model).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["out"], model(x)["out"])


def test_replace_batchnorm_keeps_timm_activations() -> None:
    block = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), BatchNormAct2d(8, act_layer=nn.ReLU), nn.BatchNorm2d(8))
    block[1].eval()
    out = replace_batchnorm(block, lambda c: nn.GroupNorm(2, c))
    assert isinstance(out[1], nn.Sequential) and [type(m) for m in out[1]] == [nn.GroupNorm, nn.ReLU]
    assert not out[1][0].training and out[2].training  # each new layer keeps its predecessor's mode
    assert isinstance(out[2], nn.GroupNorm) and out[0].bias is None
    removed = replace_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU)), None)
    assert [type(m) for m in removed[1]] == [nn.ReLU]
    # A BatchNorm given directly is replaced too, in its dtype.
    assert replace_batchnorm(nn.BatchNorm2d(4).double(), lambda c: nn.GroupNorm(2, c)).weight.dtype == torch.float64


@pytest.mark.parametrize("norm", NORMS)
def test_weights_of_another_norm_say_which(norm: str, tmp_path: Path) -> None:
    name = NORM_NAMES[norm]
    torch.save(build("bn").state_dict(), tmp_path / "bn.pth")
    said = rf"holds BatchNorm weights, the model uses {name} \(model.norm: {norm}\)"
    with pytest.raises(CheckpointError, match=said):
        build(norm, pretrained=str(tmp_path / "bn.pth"))
    # The other way round; GroupNorm and plain convs leave no statistics in the file to tell them by.
    torch.save(build(norm).state_dict(), tmp_path / f"{norm}.pth")
    said = "" if norm in ("gn", "none") else rf"\n  the file holds {name} weights, the model uses BatchNorm"
    with pytest.raises(CheckpointError, match=rf"does not match the model:(.|\n)*{said}"):
        build("bn", pretrained=str(tmp_path / f"{norm}.pth"))


@pytest.mark.parametrize(
    "norm",
    ["gn", "iternorm", "none", "channel_deconv"],
)
def test_training_step_under_bf16_autocast(norm: str) -> None:
    # The trainer's amp (bf16 on CUDA); CPU autocast takes the same paths through the norms.
    model = build(norm, "deeplabv3plus", aux_loss=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 128))
    (out["out"].float().logsumexp(1).mean() + out["aux"].float().logsumexp(1).mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("norm", NORMS)
def test_timm_norm_act_layers_keep_their_activation(norm: str) -> None:
    # timm's EfficientNet puts its SiLU inside BatchNormAct2d: replacing the norm must not drop it.
    def activations(model: nn.Module) -> int:
        return sum(isinstance(m, (nn.SiLU, nn.ReLU)) for m in model.modules())

    bn = build("bn", encoder="tu-efficientnet_b0")
    assert any(isinstance(m, BatchNormAct2d) for m in bn.modules())
    model = build(norm, encoder="tu-efficientnet_b0")
    assert not layers(model, _BatchNorm) and activations(model) == activations(bn)
    out = model(torch.randn(2, 3, 64, 96))["out"]
    out.mean().backward()
    assert out.shape == (2, 19, 64, 96) and torch.isfinite(out).all()
