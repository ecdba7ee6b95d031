"""deconvolve / fold_deconv on real model families: torchvision, smp encoders and decoders, timm."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

from seg.nn import FastDeconv, deconvolve, fold_deconv


def _convs_and_norms(model: nn.Module):
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    return convs, norms


def _train_a_little(model: nn.Module, steps: int = 3, size=(48, 64)) -> None:
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        out = model(torch.randn(2, 3, *size))
        out = out[-1] if isinstance(out, (list, tuple)) else out
        out = out["out"] if isinstance(out, dict) else out
        out.mean().backward()


def test_torchvision_resnet18_converts_and_folds():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    n_convs = len(_convs_and_norms(model)[0])
    conv1_weight = model.conv1.weight.detach().clone()
    model = deconvolve(model, block=16)  # small blocks keep the test fast; the fold does not depend on it
    convs, norms = _convs_and_norms(model)
    assert not norms
    assert len(convs) == n_convs and all(isinstance(c, FastDeconv) for c in convs)
    assert torch.equal(model.conv1.weight, conv1_weight)
    assert model.conv1.bias is not None and torch.count_nonzero(model.conv1.bias) == 0
    # the stem gets the stem settings, the rest the defaults
    assert model.conv1.n_iter == 15 and model.conv1.freeze
    assert model.layer1[0].conv1.n_iter == 5 and not model.layer1[0].conv1.freeze
    report = model.deconv_report
    assert report.stems == ["conv1"] and len(report.converted) == n_convs

    _train_a_little(model)
    model.eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ref = model(x)
        folded = fold_deconv(model)
        assert not any(isinstance(m, FastDeconv) for m in folded.modules())
        out = folded(x)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-5


def test_settings_and_exclude():
    model = torchvision.models.resnet18(weights=None)
    model = deconvolve(model, block=16, n_iter=3, sampling_stride=2, stem_n_iter=7, stem_freeze=False,
                       exclude=("layer4", "layer3.0.downsample"))
    assert model.layer1[0].conv1.block == 16 and model.layer1[0].conv1.n_iter == 3
    assert model.layer1[0].conv1.sampling_stride == 2
    assert model.conv1.n_iter == 7 and not model.conv1.freeze
    assert type(model.layer4[0].conv1) is nn.Conv2d and isinstance(model.layer4[0].bn1, nn.BatchNorm2d)
    assert type(model.layer3[0].downsample[0]) is nn.Conv2d
    assert isinstance(model.layer3[0].conv1, FastDeconv)


def test_single_conv_module_is_returned_converted():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    out = deconvolve(conv)
    assert isinstance(out, FastDeconv) and out.n_iter == 15
    assert torch.equal(out.weight, conv.weight)


def test_smp_encoder_and_decoder_with_dilation():
    torch.manual_seed(0)
    model = smp.DeepLabV3(encoder_name="resnet18", encoder_weights=None, classes=4, encoder_output_stride=8)
    dilated = {n: m.dilation for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    model = deconvolve(model, block=8)
    convs, norms = _convs_and_norms(model)
    assert not norms and all(isinstance(c, FastDeconv) for c in convs)
    for name, m in model.named_modules():
        if isinstance(m, FastDeconv):
            assert m.dilation == dilated[name]  # smp's dilation patch survives the conversion
    _train_a_little(model, steps=2)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 48, 64))).all()


def test_timm_encoder_through_smp():
    pytest.importorskip("timm")
    model = smp.Unet(encoder_name="tu-resnet18", encoder_weights=None, classes=3)
    model = deconvolve(model, block=8)
    convs, norms = _convs_and_norms(model)
    assert not norms and convs and all(isinstance(c, FastDeconv) for c in convs)
    _train_a_little(model, steps=1)


def test_timm_batchnorm_act_keeps_its_activation():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.ReLU))
    block = deconvolve(block)
    assert isinstance(block[0], FastDeconv)
    assert not any(isinstance(m, _BatchNorm) for m in block.modules())
    assert any(isinstance(m, nn.ReLU) for m in block.modules())
    assert timm is not None


def test_stem_keeps_the_reference_operator():
    # The speed options change the mathematics; the layer that sees the image never takes them.
    model = deconvolve(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)), block=4, stats_every=3,
                       matrix_grad=False, stem_freeze_iter=7, sync=True, momentum=0.3)
    stem, body = model[0], model[1]
    assert (stem.stats_every, stem.matrix_grad, stem.freeze, stem.freeze_iter) == (1, True, True, 7)
    assert (body.stats_every, body.matrix_grad, body.freeze) == (3, False, False)
    assert stem.sync and body.sync and stem.momentum == body.momentum == 0.3
