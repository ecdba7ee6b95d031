"""configs/paper/*.yaml build the paper's code's models (github.com/yechengxi/deconvolution, Segmentation/) and
train for two iterations on CPU on a generated Cityscapes.

The ND models are checked against the reference's per-layer signature, generated below from its
``models/resnetd.py`` (``_make_layer`` with ``replace_stride_with_dilation=[False, True, True]``) and its heads
(``models/segmentation/deeplabv3.py``, ``fcn.py``); the BN models against torchvision's own
``deeplabv3_resnet50`` / ``fcn_resnet50``, which the reference's BN models are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.nn as nn
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

from seg.config import load_config
from seg.models import build_model
from seg.nn import FastDeconv

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"

# resnetd.py ResNet(Bottleneck, [3, 4, 6, 3]): (planes, blocks, stride, dilate) per stage.
STAGES = [(64, 3, 1, False), (128, 4, 2, False), (256, 6, 2, True), (512, 3, 2, True)]
# Every FastDeconv of the reference: block 64 (or the input channels when fewer, resnetd.py conv3x3 /
# FastDeconv.__init__), sampling stride 3, 5 iterations, no freeze, with a bias (--bias True) but the stem:
# deconv(3, 64, kernel_size=7, stride=2, padding=3, freeze=True, n_iter=15, sampling_stride=3).
# A row: name, in, out, kernel, stride, dilation, padding, block, sampling stride, iterations, freeze, bias.
STEM = ("encoder.conv1", 3, 64, 7, 2, 1, 3, 3, 3, 15, True, True)


def _row(name: str, cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1, padding: int = 0,
         block: int = 64) -> tuple:
    return (name, cin, cout, k, stride, dilation, padding, min(block, cin), 3, 5, False, True)


def reference_resnet50d() -> list[tuple]:
    rows, inplanes, dilation = [STEM], 64, 1
    for i, (planes, blocks, stride, dilate) in enumerate(STAGES, 1):
        previous = dilation
        if dilate:
            dilation, stride = dilation * stride, 1
        for b in range(blocks):
            s, d = (stride, previous) if b == 0 else (1, dilation)  # torchvision: block 0 keeps the old dilation
            p = f"encoder.layer{i}.{b}"
            rows += [_row(f"{p}.conv1", inplanes, planes, 1), _row(f"{p}.conv2", planes, planes, 3, s, d, d),
                     _row(f"{p}.conv3", planes, planes * 4, 1)]
            if b == 0 and (stride != 1 or inplanes != planes * 4):
                rows.append(_row(f"{p}.downsample.0", inplanes, planes * 4, 1, stride))
            inplanes = planes * 4
    return rows


# DeepLabHead_deconv(2048, 21): ASPP(2048, [12, 24, 36]) (1x1, three dilated 3x3, pooling 1x1, 1x1 projection
# of 5 x 256), a 3x3 deconv, and the classifier deconv(256, 21, 1, block=256).
DEEPLAB_HEAD = [
    _row("head.decoder.aspp.convs.0.0", 2048, 256, 1),
    *[_row(f"head.decoder.aspp.convs.{j}.0", 2048, 256, 3, 1, r, r) for j, r in ((1, 12), (2, 24), (3, 36))],
    _row("head.decoder.aspp.convs.4.1", 2048, 256, 1),
    _row("head.decoder.aspp.project.0", 1280, 256, 1),
    _row("head.decoder.conv", 256, 256, 3, padding=1),
    _row("head.classifier", 256, 21, 1, block=256),
]
# FCNHead_deconv(2048, 21): deconv(2048, 512, 3, padding=1), then deconv(512, 21, 1, block=512).
FCN_HEAD = [_row("head.conv", 2048, 512, 3, padding=1), _row("head.classifier", 512, 21, 1, block=512)]
KEPT_BN = [(f"encoder.layer{i}.0.downsample.1", c) for i, c in zip((1, 2, 3, 4), (256, 512, 1024, 2048), strict=True)]


def _deconv_signature(model: nn.Module) -> list[tuple]:
    return [(n, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.dilation[0], m.padding[0], m.block,
             m.sampling_stride, m.n_iter, m.freeze, m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, FastDeconv)]


@pytest.mark.parametrize(("arch", "head"), [("deeplabv3", DEEPLAB_HEAD), ("fcn", FCN_HEAD)])
def test_nd_models_hold_the_reference_layers_and_its_4_batchnorms(arch: str, head: list[tuple]) -> None:
    model = build_model(load_config(PAPER / f"{arch}_resnet50_deconv.yaml").model)
    assert _deconv_signature(model) == reference_resnet50d() + head
    assert all(isinstance(m, FastDeconv) for m in model.modules() if isinstance(m, nn.Conv2d))
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm))]
    assert [(n, m.num_features) for n, m in norms] == KEPT_BN
    assert all(type(m) is nn.BatchNorm2d and m.affine and m.track_running_stats for _, m in norms)


@pytest.mark.parametrize("arch", ["deeplabv3", "fcn"])
def test_bn_models_are_torchvisions(arch: str) -> None:
    def layers(model: nn.Module) -> list[tuple]:
        return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.dilation, m.padding, m.bias is not None)
                if isinstance(m, nn.Conv2d) else (type(m).__name__, m.num_features)
                for m in model.modules() if isinstance(m, (nn.Conv2d, _BatchNorm))]

    ours = build_model(load_config(PAPER / f"{arch}_resnet50_bn.yaml").model)
    builder = getattr(torchvision.models.segmentation, f"{arch}_resnet50")
    reference = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
    assert layers(ours) == layers(reference)


PAPER_RUNS = ["deeplabv3_resnet50_bn", "deeplabv3_resnet50_deconv", "fcn_resnet50_bn", "fcn_resnet50_deconv"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_RUNS)
def test_paper_config_trains_two_iterations_on_cpu(name: str, synthetic_root: Path, tmp_path: Path) -> None:
    from tools.train import main as train_main

    # Smaller sizes than the paper's so that a ResNet-50 at output stride 8 fits a CPU test; the pipeline's kind
    # (short-side range, square crop, the 21 reference classes, short-side validation) is the config's own, and
    # the paper's metric is still reported (the masks are in its ids) without resizing the images to 520.
    argv = [str(PAPER / f"{name}.yaml"), "--device", "cpu", "--no-progress", "--work-dir", str(tmp_path / "run"),
            "--opts", f"data.root={synthetic_root}", "data.num_workers=0", "data.short_side_range=[32, 96]",
            "data.crop_size=[48, 48]", "data.val_short_side=48", "eval.reference_compat=false",
            "train.batch_size=2", "train.iterations=2", "train.val_interval=2", "train.checkpoint_interval=2",
            "train.log_interval=1"]
    try:
        code = train_main(argv)
    except SystemExit as e:  # a single process may leave through sys.exit
        code = int(e.code or 0)
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "miou_reference" in r]
    assert val, records
    last = val[-1]
    assert len(last["iou"]) == 19 and len(last["iou_reference"]) == 21
    assert math.isfinite(last["miou_reference"]) and 0 <= last["miou_reference"] <= 1
    assert (tmp_path / "run" / "last.pth").is_file()


@pytest.mark.slow
def test_readme_pretrain_then_segment(synthetic_root: Path, tmp_path: Path) -> None:
    """README: train configs/imagenet/resnet50_deconv.yaml, then configs/deeplab_deconv.yaml with
    model.pretrained=<its checkpoint>; the segmentation encoder holds every tensor of the pretrained one."""
    import cv2
    import numpy as np
    import torch

    from seg.checkpoint import load_checkpoint
    from tools.train import main as train_main

    def train(argv: list[str]) -> None:
        try:
            code = train_main([*argv, "--device", "cpu", "--no-progress"])
        except SystemExit as e:
            code = int(e.code or 0)
        assert code == 0

    rng = np.random.default_rng(0)
    folder = tmp_path / "imagenet"
    for split, n in (("train", 2), ("val", 1)):
        for name in ("cat", "dog"):
            (folder / split / name).mkdir(parents=True)
            for i in range(n):
                cv2.imwrite(str(folder / split / name / f"{i}.png"), rng.integers(0, 256, (240, 256, 3), np.uint8))
    configs = Path(__file__).resolve().parents[1] / "configs"
    train([str(configs / "imagenet" / "resnet50_deconv.yaml"), "--work-dir", str(tmp_path / "pretrain"), "--opts",
           f"data.root={folder}", "data.num_workers=0", "model.num_classes=2", "train.batch_size=2",
           "train.iterations=1", "train.val_interval=1", "train.checkpoint_interval=1", "eval.batch_size=2"])
    pretrained = tmp_path / "pretrain" / "last.pth"
    encoder_state = {k: v for k, v in load_checkpoint(pretrained)["model"].items() if not k.startswith("fc.")}
    assert any(k.endswith("downsample.1.running_var") for k in encoder_state)  # the shortcut BatchNorm is in it

    cfg = load_config(configs / "deeplab_deconv.yaml", [f"model.pretrained={pretrained}"])
    model = build_model(cfg.model)
    held = model.encoder.state_dict()
    assert held.keys() == encoder_state.keys()
    assert all(torch.equal(held[k], v) for k, v in encoder_state.items())

    # The README's command itself, a couple of iterations at a small size on the synthetic set.
    train([str(configs / "deeplab_deconv.yaml"), "--work-dir", str(tmp_path / "segment"), "--opts",
           f"model.pretrained={pretrained}", f"data.root={synthetic_root}", "data.num_workers=0",
           "data.crop_size=[48, 48]", "train.batch_size=2", "train.iterations=2", "train.val_interval=100",
           "train.checkpoint_interval=2", "train.val_max_images=1"])
    assert (tmp_path / "segment" / "last.pth").is_file()
