"""Classifiers from the model config (CIFAR nets, tv:/timm: models, every norm) and classification weights as
segmentation encoders (model.pretrained)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from seg.checkpoint import CheckpointError, save_checkpoint
from seg.config import Config, ConfigError, DataConfig, DeconvConfig, ModelConfig, load_config, to_dict
from seg.models import Segmenter, model_from_checkpoint
from seg.models import build_model as build_segmenter
from seg.models.cifar import CifarResNet, CifarVGG
from seg.models.classifiers import build_classification_model as build_model
from seg.nn import ChannelDeconv, Delinear, FastDeconv, IterNorm
from seg.tasks import untrained_model
from seg.tasks.classification import ClassificationTask


def classifier(arch: str = "vgg11", **kw) -> ModelConfig:
    kw.setdefault("num_classes", 10)
    kw.setdefault("deconv", DeconvConfig(block=16))
    return ModelConfig(arch=arch, **kw)


def kinds(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("arch,cls", [("vgg11", CifarVGG), ("resnet18", CifarResNet)])
def test_cifar_archs_bn_and_deconv(arch: str, cls: type) -> None:
    torch.manual_seed(0)
    bn = build_model(classifier(arch, norm="bn"))
    deconv = build_model(classifier(arch, norm="deconv", block_fc=512))
    assert isinstance(bn, cls) and isinstance(deconv, cls)
    assert nn.BatchNorm2d in kinds(bn) and FastDeconv not in kinds(bn)
    assert FastDeconv in kinds(deconv) and nn.BatchNorm2d not in kinds(deconv)
    last = deconv.classifier if arch == "vgg11" else deconv.fc
    assert isinstance(last, Delinear) and last.block == 512
    assert all(m.block == 16 for m in deconv.modules() if isinstance(m, FastDeconv) and m.in_channels > 3)
    x = torch.randn(2, 3, 32, 32)
    assert bn(x).shape == deconv(x).shape == (2, 10)  # logits, not a dict
    assert deconv.config == classifier(arch, norm="deconv", block_fc=512)


@pytest.mark.parametrize("norm,layer", [("gn", nn.GroupNorm), ("iternorm", IterNorm),
                                        ("channel_deconv", ChannelDeconv), ("none", None)])
def test_other_norms_replace_the_batchnorm_of_the_cifar_model(norm: str, layer: type | None) -> None:
    model = build_model(classifier("resnet18", norm=norm))
    assert nn.BatchNorm2d not in kinds(model) and FastDeconv not in kinds(model)
    if layer is not None:
        assert layer in kinds(model)
    else:  # no norm: every conv has a bias
        assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_model_with_deconvolution_and_delinear() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tv:resnet18", num_classes=7, norm="deconv", block_fc=64, deconv=DeconvConfig(block=16))
    model = build_model(cfg)
    assert nn.BatchNorm2d not in kinds(model)
    stem = model.conv1
    assert isinstance(stem, FastDeconv) and (stem.n_iter, stem.freeze) == (15, True)  # model.deconv stem settings
    assert isinstance(model.layer1[0].conv1, FastDeconv) and model.layer1[0].conv1.n_iter == 5
    assert isinstance(model.fc, Delinear) and (model.fc.block, model.fc.out_features) == (64, 7)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("arch,norm", [("resnet18", "deconv"), ("resnet18", "bn"), ("tv:resnet18", "deconv")])
def test_classifier_whitening_follows_the_sync_decision(monkeypatch, arch: str, norm: str) -> None:
    import seg.models.norms as norms_module

    cfg = ModelConfig(arch=arch, num_classes=10, norm=norm, block_fc=64)
    whitening = [m for m in build_model(cfg).modules() if isinstance(m, (Delinear, FastDeconv))]
    assert whitening and not any(m.sync for m in whitening)
    monkeypatch.setattr(norms_module, "world_size", lambda: 2)  # several processes: the global batch
    whitening = [m for m in build_model(cfg).modules() if isinstance(m, (Delinear, FastDeconv))]
    assert any(isinstance(m, Delinear) for m in whitening) and all(m.sync for m in whitening)


def test_imagenet_deconv_config_keeps_the_shortcut_batchnorms() -> None:
    # The reference's ImageNet ResNets keep a BatchNorm after each 1x1 shortcut conv, and only there.
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "imagenet" / "resnet18_deconv.yaml").model
    model = build_model(cfg)
    norms = sorted(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert norms == [f"layer{i}.0.downsample.1" for i in (2, 3, 4)]
    assert all(isinstance(model.get_submodule(f"layer{i}.0.downsample.0"), FastDeconv) for i in (2, 3, 4))
    assert isinstance(model.fc, Delinear)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    bad = ModelConfig(arch="tv:resnet18", num_classes=10, norm="deconv", deconv=DeconvConfig(keep_bn=["*.bn9"]))
    with pytest.raises(ConfigError, match=r"model.deconv.keep_bn.*'\*.bn9'.*layer1.0.bn1"):
        build_model(bad)


def test_timm_model_with_batchnorm() -> None:
    model = build_model(ModelConfig(arch="timm:resnet18", num_classes=3, norm="bn"))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("arch,words", [
    ("alexnet9", ["model.arch", "'alexnet9'", "tv:resnet50", "vgg16"]),
    ("tv:no_such_net", ["model.arch", "torchvision", "tv:resnet18"]),
    ("timm:no_such_net", ["model.arch", "timm", "timm:resnet50"]),
    ("tv:", ["model.arch"]),
])
def test_unknown_arch_is_a_config_error(arch: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(arch=arch, num_classes=10))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_settings_a_cifar_net_cannot_honour_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.deconv\.stats_every=2.*CIFAR"):
        build_model(classifier("vgg11", norm="deconv", deconv=DeconvConfig(block=16, stats_every=2)))
    with pytest.raises(ConfigError, match=r"model\.fc_whitening.*CIFAR"):
        build_model(ModelConfig(arch="tv:resnet18", num_classes=10, block_fc=64, fc_whitening="channel_deconv"))
    with pytest.raises(ConfigError, match=r"model\.block_fc=1024"):
        build_model(classifier("vgg11", block_fc=1024, fc_whitening="channel_deconv"))


def test_classifier_pretrained_weights_and_checkpoint_rebuild(tmp_path: Path) -> None:
    cfg = classifier("vgg11", norm="deconv", block_fc=512)
    torch.manual_seed(0)
    trained = build_model(cfg)
    trained(torch.randn(4, 3, 32, 32))  # running statistics away from their initial values
    full = Config(task="classification", model=cfg, data=DataConfig(dataset="cifar10"))
    save_checkpoint({"model": trained.state_dict(), "config": to_dict(full)}, tmp_path / "last.pth")
    torch.manual_seed(1)
    loaded = build_model(classifier("vgg11", norm="deconv", block_fc=512, pretrained=str(tmp_path / "last.pth")))
    rebuilt = model_from_checkpoint(tmp_path / "last.pth", untrained_model)
    for model in (loaded, rebuilt):
        for k, v in trained.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="missing keys"):
        build_model(classifier("vgg11", norm="bn", pretrained=str(tmp_path / "last.pth")))


# --------------------------------------------------------------------------------------------
# classification checkpoints as segmentation encoders


def _classification_checkpoint(path: Path, norm: str, block: int = 16) -> dict[str, torch.Tensor]:
    """A trained-looking tv:resnet18 classification checkpoint (statistics updated) written like the trainer's."""
    model_cfg = ModelConfig(arch="tv:resnet18", num_classes=10, norm=norm, block_fc=64 if norm == "deconv" else 0,
                            deconv=DeconvConfig(block=block))
    cfg = Config(task="classification", model=model_cfg, data=DataConfig(dataset="imagenet"))
    torch.manual_seed(3)
    model = build_model(cfg.model)
    model(torch.randn(4, 3, 64, 64))
    state = model.state_dict()
    save_checkpoint({"model": state, "config": to_dict(cfg), "iteration": 1}, path)
    return state


def _segmenter(pretrained: Path, norm: str = "deconv", block: int = 16) -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter(ModelConfig(arch="deeplabv3", encoder="resnet18", output_stride=16, norm=norm,
                                       deconv=DeconvConfig(block=block), pretrained=str(pretrained)))


def test_deconv_classification_checkpoint_is_a_segmentation_encoder(tmp_path: Path) -> None:
    state = _classification_checkpoint(tmp_path / "cls.pth", "deconv")
    model = _segmenter(tmp_path / "cls.pth")
    encoder = model.encoder.state_dict()
    assert any(k.endswith("running_deconv") for k in encoder)  # the deconvolution statistics came along
    assert encoder.keys() == {k for k in state if not k.startswith("fc.")}  # the classifier was dropped
    for k, v in encoder.items():
        assert torch.equal(v, state[k]), k
    assert isinstance(model.encoder.conv1, FastDeconv)


def test_mismatching_classification_weights_list_the_keys(tmp_path: Path) -> None:
    _classification_checkpoint(tmp_path / "bn.pth", "bn")
    with pytest.raises(CheckpointError) as e:
        _segmenter(tmp_path / "bn.pth")  # BatchNorm weights into a deconvolution encoder
    text = str(e.value)
    assert "bn.pth" in text and "missing keys" in text and "conv1.running_deconv" in text
    assert "unexpected keys" in text and "bn1.running_var" in text and "BatchNorm" in text
    _classification_checkpoint(tmp_path / "b32.pth", "deconv", block=32)
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*running_deconv"):
        _segmenter(tmp_path / "b32.pth")  # another deconvolution block size


def test_the_task_builds_the_configured_classifier() -> None:
    cfg = Config(task="classification", model=classifier("vgg11", norm="bn"), data=DataConfig(dataset="cifar10"))
    assert isinstance(ClassificationTask(cfg).build_model(), CifarVGG)
