"""Local pretrained weights (model.pretrained) and rebuilding a model from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

from seg.checkpoint import CheckpointError, save_checkpoint
from seg.config import Config, DeconvConfig, ModelConfig, to_dict
from seg.errors import UserError
from seg.models import build_model, model_from_checkpoint
from seg.tasks import untrained_model


def cfg(**kw) -> ModelConfig:
    kw.setdefault("encoder", "resnet18")
    kw.setdefault("arch", "fcn")
    kw.setdefault("norm", "bn")
    kw.setdefault("output_stride", 16)
    kw.setdefault("deconv", DeconvConfig(block=16))
    return ModelConfig(**kw)


def build(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(cfg(**kw))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match=f"model.pretrained.*{path}"):
        build_model(cfg(pretrained=str(path)))


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not weights")
    with pytest.raises(CheckpointError, match="cannot read model.pretrained .*notes.pth"):
        build_model(cfg(pretrained=str(path)))
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pth")
    with pytest.raises(CheckpointError, match="no_tensors.pth holds no state_dict"):
        build_model(cfg(pretrained=str(tmp_path / "no_tensors.pth")))


def test_encoder_weights_with_imagenet_classifier(tmp_path: Path) -> None:
    # A torchvision-style ResNet file: encoder keys plus the ImageNet ``fc`` layer, which is dropped.
    torch.manual_seed(5)
    source = smp.encoders.get_encoder("resnet18", weights=None)
    state = dict(source.state_dict(), **{"fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "r18.pth")
    model = build(seed=0, pretrained=str(tmp_path / "r18.pth"))
    assert_same_state(model.encoder.state_dict(), source.state_dict())
    # The heads keep their own initialisation.
    assert not torch.equal(model.head.conv.weight, build(seed=1).head.conv.weight)


def test_encoder_weights_of_another_encoder_name_the_keys(tmp_path: Path) -> None:
    r34 = smp.encoders.get_encoder("resnet34", weights=None).state_dict()
    torch.save(r34, tmp_path / "r34.pth")
    extra = len(r34.keys() - build().encoder.state_dict().keys())
    pattern = rf"r34.pth does not match.*\n  unexpected keys: layer1\.2\..*\({extra} in all\)"
    with pytest.raises(CheckpointError, match=pattern):
        build_model(cfg(pretrained=str(tmp_path / "r34.pth")))


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    state = build(seed=0).encoder.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    pattern = r"layer1\.0\.conv1\.weight \(file \(64, 64, 1, 1\), model \(64, 64, 3, 3\)\)"
    with pytest.raises(CheckpointError, match=pattern):
        build_model(cfg(pretrained=str(tmp_path / "bad.pth")))


def test_whole_model_weights_from_checkpoint(tmp_path: Path) -> None:
    source = build(seed=7, aux_loss=True)
    state = {"module." + k: v for k, v in source.state_dict().items()}  # as saved around DDP
    torch.save({"model": state, "iteration": 10}, tmp_path / "ckpt.pth")
    model = build(seed=0, aux_loss=True, pretrained=str(tmp_path / "ckpt.pth"))
    assert_same_state(model.state_dict(), source.state_dict())
    # Without the aux head the file has keys the model lacks.
    with pytest.raises(CheckpointError, match=r"ckpt.pth does not match.*\n  unexpected keys: aux_head\."):
        build(seed=0, pretrained=str(tmp_path / "ckpt.pth"))


def test_batchnorm_weights_into_deconv_model_say_so(tmp_path: Path) -> None:
    torch.save(build(seed=0).state_dict(), tmp_path / "bn.pth")
    with pytest.raises(CheckpointError, match="holds BatchNorm weights, the model uses deconvolution"):
        build(norm="deconv", pretrained=str(tmp_path / "bn.pth"))


def test_deconv_whole_model_round_trip(tmp_path: Path) -> None:
    source = build(seed=2, norm="deconv")
    with torch.no_grad():
        source(torch.randn(2, 3, 32, 64))  # move the running statistics away from their start
    torch.save(source.state_dict(), tmp_path / "deconv.pth")
    model = build(seed=0, norm="deconv", pretrained=str(tmp_path / "deconv.pth"))
    assert_same_state(model.state_dict(), source.state_dict())


def test_plain_timm_file_into_timm_encoder(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = timm.create_model("resnet18", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "timm_r18.pth")
    model = build(encoder="tu-resnet18", pretrained=str(tmp_path / "timm_r18.pth"))
    torch.testing.assert_close(model.encoder.model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


def test_model_from_checkpoint_rebuilds_the_model(tmp_path: Path) -> None:
    model_cfg = cfg(norm="deconv", aux_loss=True, pretrained=str(tmp_path / "gone.pth"))
    torch.manual_seed(0)
    model = build_model(model_cfg, load_pretrained=False)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 64))
    ckpt = {"model": model.state_dict(), "config": to_dict(Config(model=model_cfg)), "iteration": 1}
    torch.save(ckpt, tmp_path / "ckpt.pth")

    rebuilt = model_from_checkpoint(tmp_path / "ckpt.pth", untrained_model)  # the recorded pretrained file: not read
    assert rebuilt.config == model.config
    x = torch.randn(1, 3, 40, 50)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["out"], model(x)["out"])
    # An already-loaded checkpoint: errors say where it came from when told.
    with pytest.raises(CheckpointError, match="run/last.pth: not a training checkpoint, key 'config' is missing"):
        model_from_checkpoint({"model": ckpt["model"]}, untrained_model, source="run/last.pth")
    rebuilt = model_from_checkpoint(torch.load(tmp_path / "ckpt.pth", weights_only=True), untrained_model)
    assert rebuilt.config == model.config


def _checkpoint(model_cfg: ModelConfig, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_model(model_cfg, load_pretrained=False)
    return {"model": model.state_dict(), "config": to_dict(Config(model=model_cfg)), "iteration": 1}


def test_wrong_checkpoints_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {path}"):
        model_from_checkpoint(path, untrained_model)

    bare = tmp_path / "state_dict.pth"
    torch.save(build().state_dict(), bare)
    with pytest.raises(CheckpointError, match=f"{bare}: not a training checkpoint"):
        model_from_checkpoint(str(bare), untrained_model)

    # Weights of one model recorded with the config of another (here: BatchNorm vs deconvolution).
    ckpt = _checkpoint(cfg(norm="bn"))
    ckpt["config"] = to_dict(Config(model=cfg(norm="deconv")))
    mismatched = save_checkpoint(ckpt, tmp_path / "mismatched.pth")
    with pytest.raises(CheckpointError, match=rf"{mismatched} does not match the model:(.|\n)*holds BatchNorm"):
        model_from_checkpoint(mismatched, untrained_model)

    ckpt = _checkpoint(cfg())
    ckpt["config"]["model"]["no_such_key"] = 1  # e.g. written by another version
    stale = save_checkpoint(ckpt, tmp_path / "stale.pth")
    with pytest.raises(CheckpointError, match=rf"{stale} \(stored config\): unknown key 'model.no_such_key'"):
        model_from_checkpoint(stale, untrained_model)

    ckpt = _checkpoint(cfg())
    ckpt["model"] = [1, 2]
    with pytest.raises(CheckpointError, match="checkpoint: key 'model' holds a list, expected a mapping"):
        model_from_checkpoint(ckpt, untrained_model)
    assert issubclass(CheckpointError, UserError)  # tools print them as "error: <message>"


def test_ddp_prefixed_checkpoint_loads(tmp_path: Path) -> None:
    ckpt = _checkpoint(cfg(aux_loss=True), seed=4)
    expected = ckpt["model"]
    ckpt["model"] = {"module." + k: v for k, v in expected.items()}
    rebuilt = model_from_checkpoint(save_checkpoint(ckpt, tmp_path / "ddp.pth"), untrained_model)
    assert_same_state(rebuilt.state_dict(), expected)
