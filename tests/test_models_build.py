"""build_model: every arch x norm (bn, deconv) x output stride, dilated geometry, padding, init, norms,
determinism. The other norms (gn, iternorm, channel_deconv, none) are in test_models_norms.py."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

import seg.models.norms as norms_module
from seg.config import ConfigError, DeconvConfig, ModelConfig, load_config
from seg.models import build_model, contract_dilation
from seg.nn import FastDeconv, deconvolve, fold_deconv

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# torchvision's replace_stride_with_dilation for layer2..layer4 at each output stride.
TORCHVISION_DILATION = {8: [False, True, True], 16: [False, False, True]}

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


def geometry(model: nn.Module) -> dict[str, tuple]:
    """name -> (kernel, stride, dilation, padding) of every conv."""
    return {n: (m.kernel_size, m.stride, m.dilation, m.padding) for n, m in convs(model).items()}


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
    # SyncBatchNorm follows the process group's backend (NCCL: CUDA), not torch.cuda.is_available(): a gloo run
    # on a GPU machine keeps BatchNorm.
    monkeypatch.setattr(norms_module, "world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    with pytest.warns(UserWarning, match="SyncBatchNorm does not run on CPU"):
        model = build(arch="fcn", norm="bn", output_stride=16)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    # Deconvolution takes global-batch statistics by itself.
    model = build(arch="fcn", norm="deconv", output_stride=16)
    assert all(m.sync for m in model.modules() if isinstance(m, FastDeconv))

    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
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


# --------------------------------------------------------------------------------------------
# dilated encoders: torchvision's geometry (the paper's code), not smp's


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("norm", ["deconv", "bn"])
@pytest.mark.parametrize("config", ["deeplab_deconv.yaml", "fcn_deconv.yaml"])
def test_config_encoders_have_torchvision_dilation(config: str, norm: str, output_stride: int) -> None:
    cfg = load_config(CONFIGS / config).model
    assert cfg.encoder == "resnet50"
    cfg = dataclasses.replace(cfg, norm=norm, output_stride=output_stride)
    torch.manual_seed(0)
    encoder = build_model(cfg).encoder
    reference = torchvision.models.resnet50(
        weights=None, replace_stride_with_dilation=TORCHVISION_DILATION[output_stride]
    )
    built = geometry(encoder)
    assert built == geometry(reference)
    # Spelled out where smp's make_dilated differs: (dilation, padding) of the first block's 3x3.
    if output_stride == 8:
        assert built["layer3.0.conv2"][2:] == ((1, 1), (1, 1))
        assert built["layer4.0.conv2"][2:] == ((2, 2), (2, 2))
        assert built["layer4.1.conv2"][2:] == ((4, 4), (4, 4))
    else:
        assert built["layer4.0.conv2"][2:] == ((1, 1), (1, 1))
        assert built["layer4.1.conv2"][2:] == ((2, 2), (2, 2))
    is_deconv = [isinstance(m, FastDeconv) for m in convs(encoder).values()]
    assert all(is_deconv) if norm == "deconv" else not any(is_deconv)

    encoder.eval()
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 64, 96))
    strides = [1, 2, 4, 8, min(16, output_stride), output_stride]
    assert [tuple(f.shape[-2:]) for f in features] == [(64 // s, 96 // s) for s in strides]


def _without_se(encoder: nn.Module) -> nn.Module:
    # Squeeze-excitation averages over the whole map, which a dilated network makes denser, so the
    # exactness below holds only without it; the convolution geometry is what is tested.
    for module in encoder.modules():
        if hasattr(module, "se_module"):
            module.se_module = nn.Identity()
    return encoder


@pytest.mark.parametrize(
    ("name", "output_stride"),
    [("resnet18", 8), ("resnet18", 16), ("resnet50", 8), ("resnet50", 16), ("se_resnet50", 8)],
)
def test_dilated_encoder_computes_the_undilated_one_densely(name: str, output_stride: int) -> None:
    # The defining property of a dilated ("a trous") network: on the positions the stride-32 network
    # computes, the dilated one gives the same values, with the same weights. smp's geometry breaks it
    # in the first block of each dilated stage.
    # float64: the dense and the strided convolutions sum in different orders.
    torch.manual_seed(0)
    plain = _without_se(smp.encoders.get_encoder(name, weights=None)).double().eval()
    dilated = _without_se(smp.encoders.get_encoder(name, weights=None, output_stride=output_stride))
    dilated = dilated.double().eval()
    dilated.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = plain(x)
        before = dilated(x)
        changed = contract_dilation(dilated, output_stride)
        after = dilated(x)
    assert changed
    step = 32 // output_stride
    torch.testing.assert_close(after[5][..., ::step, ::step], expected[5])
    torch.testing.assert_close(after[4][..., :: max(step // 2, 1), :: max(step // 2, 1)], expected[4])
    if name != "se_resnet50":  # stride on the 1x1 (Caffe layout): smp's 3x3 dilations were already right
        assert not torch.allclose(before[5][..., ::step, ::step], expected[5], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_basic_block_resnet_matches_timm(output_stride: int) -> None:
    # torchvision cannot dilate BasicBlocks; timm can, and its tu- encoders are left as timm builds them.
    smp_enc = build(arch="fcn", norm="bn", encoder="resnet18", output_stride=output_stride).encoder
    timm_enc = build(arch="fcn", norm="bn", encoder="tu-resnet18", output_stride=output_stride).encoder
    assert contract_dilation(timm_enc, output_stride) == []
    timm_geometry = {n.removeprefix("model."): g for n, g in geometry(timm_enc).items()}
    assert geometry(smp_enc) == timm_geometry
    first = "layer3.0.conv1" if output_stride == 8 else "layer4.0.conv1"
    assert geometry(smp_enc)[first][2] == (1, 1)


def test_se_resnext_matches_timm() -> None:
    # smp's SENet blocks are not torchvision's; timm's seresnext has the same layout and dilates natively.
    timm = pytest.importorskip("timm")
    encoder = smp.encoders.get_encoder("se_resnext50_32x4d", weights=None, output_stride=8)
    assert contract_dilation(encoder, 8)
    built = geometry(encoder)
    reference = geometry(timm.create_model("seresnext50_32x4d", output_stride=8))
    shared = [n for n in reference if n.startswith("layer") and ".se." not in n]
    assert len(shared) == 3 * 16 + 4 and all(n in built for n in shared)
    assert {n: built[n] for n in shared} == {n: reference[n] for n in shared}


def test_contract_dilation_leaves_undilated_and_unknown_encoders_alone() -> None:
    encoder = smp.encoders.get_encoder("resnet18", weights=None)
    before = geometry(encoder)
    assert contract_dilation(encoder, 32) == [] and geometry(encoder) == before
    dpn = smp.encoders.get_encoder("dpn68", weights=None, output_stride=16)
    before = geometry(dpn)
    assert contract_dilation(dpn, 16) == [] and geometry(dpn) == before


# --------------------------------------------------------------------------------------------
# deconvolution settings and the sync decision


def test_every_deconv_setting_reaches_the_layers() -> None:
    d = DeconvConfig(block=8, sampling_stride=2, n_iter=3, eps=1e-3, momentum=0.2, stem_n_iter=11,
                     stem_freeze=False, stem_freeze_iter=50, sync=True, classifier=False, stats_every=2,
                     matrix_grad=False, norm_type="layernorm")
    assert all(getattr(d, f.name) != f.default for f in dataclasses.fields(DeconvConfig)), "set every field"
    model = build_model(make_cfg(arch="fcn", output_stride=16, aux_loss=True, deconv=d))
    layers = {n: m for n, m in convs(model).items() if isinstance(m, FastDeconv)}
    stem, body = layers.pop("encoder.conv1"), list(layers.values())
    assert (stem.n_iter, stem.freeze, stem.freeze_iter, stem.stats_every, stem.matrix_grad) == (11, False, 50, 1, True)
    for m in [stem, *body]:
        assert (m.sampling_stride, m.eps, m.momentum, m.sync, m.norm_type) == (2, 1e-3, 0.2, True, "layernorm")
    for m in body:  # (the stem whitens its 3 input channels together, whatever the block)
        assert (m.block, m.n_iter, m.freeze, m.stats_every, m.matrix_grad) == (8, 3, False, 2, False)
    assert type(model.head.classifier) is nn.Conv2d and type(model.aux_head.classifier) is nn.Conv2d


def test_deconvolve_defaults_are_the_config_defaults() -> None:
    # deconvolve(model) by hand gives the layers of the default ``model.deconv`` section, and every field
    # of that section but the builder's own is a deconvolve keyword (build_model passes them by name).
    keywords = {n: p.default for n, p in inspect.signature(deconvolve).parameters.items() if n != "module"}
    config = dataclasses.asdict(DeconvConfig())
    for name in norms_module.BUILDER_DECONV_FIELDS:
        config.pop(name)
    assert config.keys() <= keywords.keys()
    assert {n: keywords[n] for n in config} == config


def test_a_deconv_field_nobody_wired_up_fails_the_build() -> None:
    @dataclasses.dataclass
    class WithNewField(DeconvConfig):
        new_knob: int = 1

    with pytest.raises(TypeError, match="new_knob"):
        build_model(make_cfg(arch="fcn", output_stride=16, deconv=WithNewField(block=16)))


def test_sync_is_decided_by_build_model(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(arch="fcn", output_stride=16, aux_loss=True)
    assert cfg.deconv.sync is False
    # One process: as configured, for every deconvolved layer including the classifiers.
    assert not any(m.sync for m in build_model(cfg).modules() if isinstance(m, FastDeconv))
    requested = dataclasses.replace(cfg, deconv=dataclasses.replace(cfg.deconv, sync=True))
    model = build_model(requested)
    assert all(m.sync for m in model.modules() if isinstance(m, FastDeconv))
    assert model.config.deconv.sync is True
    # Several processes: on, whatever the config says, and the recorded config is left as given.
    monkeypatch.setattr(norms_module, "world_size", lambda: 2)
    model = build_model(cfg)
    synced = [n for n, m in model.named_modules() if isinstance(m, FastDeconv) and m.sync]
    assert {"encoder.conv1", "head.classifier", "aux_head.classifier"} <= set(synced)
    assert len(synced) == sum(isinstance(m, FastDeconv) for m in model.modules())
    assert model.config.deconv.sync is False
