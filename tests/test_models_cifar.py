"""seg.models.cifar: the reference's CIFAR VGG/ResNet, checked layer by layer against lists written by hand
from github.com/yechengxi/deconvolution (main.py, models/vgg.py, models/resnet.py) and against torchvision; the
rest of Table 1 (seg.models.cifar_zoo) against layer tables generated from the reference's own models.

``tests/data/cifar_zoo_reference_layers.csv`` and ``cifar_zoo_reference_params.csv`` were generated once
(2026-12-06, torch of this venv) by a throwaway script outside the repository that imported the reference's
``models/*.py`` (commit at HEAD of github.com/yechengxi/deconvolution), built each network with ``deconv=None``
(norm ``bn``) and with ``deconv=partial(FastDeconv, bias=True, eps=1e-5, n_iter=5, block=64, sampling_stride=3)``
plus ``delinear=partial(Delinear, block=512, eps=1e-5, n_iter=5)`` (norm ``deconv``: main.py with its defaults
and ``--block-fc 512``), swapped the reference layers' forward for a plain conv/linear with the same weights,
ran one 1x3x32x32 batch in eval mode and wrote every Conv2d/FastDeconv/BatchNorm2d/Linear/Delinear call in
execution order, with the reference layer's own attributes (its ``sampling_stride`` divided by the conv's
stride, since it stores the product), and the parameter count of each model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

from seg.config import DeconvConfig, ModelConfig, load_config
from seg.models.cifar import CIFAR_ARCHS, build_cifar_model
from seg.models.classifiers import build_classification_model as build_model
from seg.nn import ChannelDeconv, Delinear, FastDeconv, IterNorm

ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50")
# The rest of the paper's Table 1, in its order.
ZOO = ("preact_resnet18", "densenet121", "resnext29_32x4d", "mobilenetv2", "dpn92", "pnasnet_a", "pnasnet_b",
       "senet18", "efficientnet_b0")
DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


def _deconv_layers(model: nn.Module) -> list[tuple]:
    return [
        (name, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.block,
         m.sampling_stride, m.n_iter, m.freeze)
        for name, m in model.named_modules() if isinstance(m, FastDeconv)
    ]


def _conv_geometry(model: nn.Module, names: bool = True) -> list[tuple]:
    return [
        ((name,) if names else ()) + (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
    ]


# --- expected layer lists, derived by hand from the reference -------------------------------------------
# Fields: (name, in, out, kernel, stride, padding, block, sampling_stride, n_iter, freeze) at the reference's
# defaults (arg_parser.py:66-73: --block 64, --stride 3, --deconv-iter 5). The block is the reference's rule
# (models/deconv.py:249-253): block > in_channels -> in_channels, so the 3-channel stem whitens blocks of 3.

# models/vgg.py:9 (cfg VGG16) and :53-64: every conv is kernel 3, padding int(3/2) = 1, stride 1, followed by
# a ReLU (2 modules), every "M" a MaxPool2d (1 module); :57-58: the conv with in_channels == 3 gets
# freeze=True, n_iter=15, the others n_iter=--deconv-iter.
VGG16_DECONV = [
    ("features.0", 3, 64, 3, 1, 1, 3, 3, 15, True),
    ("features.2", 64, 64, 3, 1, 1, 64, 3, 5, False),
    # features.4: MaxPool2d
    ("features.5", 64, 128, 3, 1, 1, 64, 3, 5, False),
    ("features.7", 128, 128, 3, 1, 1, 64, 3, 5, False),
    # features.9: MaxPool2d
    ("features.10", 128, 256, 3, 1, 1, 64, 3, 5, False),
    ("features.12", 256, 256, 3, 1, 1, 64, 3, 5, False),
    ("features.14", 256, 256, 3, 1, 1, 64, 3, 5, False),
    # features.16: MaxPool2d
    ("features.17", 256, 512, 3, 1, 1, 64, 3, 5, False),
    ("features.19", 512, 512, 3, 1, 1, 64, 3, 5, False),
    ("features.21", 512, 512, 3, 1, 1, 64, 3, 5, False),
    # features.23: MaxPool2d
    ("features.24", 512, 512, 3, 1, 1, 64, 3, 5, False),
    ("features.26", 512, 512, 3, 1, 1, 64, 3, 5, False),
    ("features.28", 512, 512, 3, 1, 1, 64, 3, 5, False),
    # features.30: MaxPool2d, features.31: AvgPool2d(1, 1)
]

# models/resnet.py:133 stem deconv(3, 64, kernel_size=3, stride=1, padding=1) with no freeze/n_iter override;
# :22-23 BasicBlock conv1 (3x3, stride s, padding 1) and conv2 (3x3, stride 1, padding 1); :46-49 the shortcut
# deconv(in, out, kernel_size=1, stride=s) (padding 0) where stride != 1 or in != out; :145-148 stages of
# 64/128/256/512 planes with strides 1/2/2/2; :181 ResNet18 = [2, 2, 2, 2]. Names are torchvision's
# (reference shortcut.0 -> downsample.0).
RESNET18_DECONV = [
    ("conv1", 3, 64, 3, 1, 1, 3, 3, 5, False),
    ("layer1.0.conv1", 64, 64, 3, 1, 1, 64, 3, 5, False),
    ("layer1.0.conv2", 64, 64, 3, 1, 1, 64, 3, 5, False),
    ("layer1.1.conv1", 64, 64, 3, 1, 1, 64, 3, 5, False),
    ("layer1.1.conv2", 64, 64, 3, 1, 1, 64, 3, 5, False),
    ("layer2.0.conv1", 64, 128, 3, 2, 1, 64, 3, 5, False),
    ("layer2.0.conv2", 128, 128, 3, 1, 1, 64, 3, 5, False),
    ("layer2.0.downsample.0", 64, 128, 1, 2, 0, 64, 3, 5, False),
    ("layer2.1.conv1", 128, 128, 3, 1, 1, 64, 3, 5, False),
    ("layer2.1.conv2", 128, 128, 3, 1, 1, 64, 3, 5, False),
    ("layer3.0.conv1", 128, 256, 3, 2, 1, 64, 3, 5, False),
    ("layer3.0.conv2", 256, 256, 3, 1, 1, 64, 3, 5, False),
    ("layer3.0.downsample.0", 128, 256, 1, 2, 0, 64, 3, 5, False),
    ("layer3.1.conv1", 256, 256, 3, 1, 1, 64, 3, 5, False),
    ("layer3.1.conv2", 256, 256, 3, 1, 1, 64, 3, 5, False),
    ("layer4.0.conv1", 256, 512, 3, 2, 1, 64, 3, 5, False),
    ("layer4.0.conv2", 512, 512, 3, 1, 1, 64, 3, 5, False),
    ("layer4.0.downsample.0", 256, 512, 1, 2, 0, 64, 3, 5, False),
    ("layer4.1.conv1", 512, 512, 3, 1, 1, 64, 3, 5, False),
    ("layer4.1.conv2", 512, 512, 3, 1, 1, 64, 3, 5, False),
]


@pytest.mark.parametrize(("arch", "expected"), [("vgg16", VGG16_DECONV), ("resnet18", RESNET18_DECONV)])
def test_deconv_layers_match_the_reference(arch, expected):
    model = build_cifar_model(arch, 10, "deconv")
    assert _deconv_layers(model) == expected
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm)) for m in model.modules())
    # every conv is a FastDeconv, with a bias (main.py:34 passes --bias, default True: arg_parser.py:72)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, FastDeconv) and m.bias is not None for m in convs)
    assert all(m.eps == 1e-5 and m.momentum == 0.1 and m.freeze_iter == 100 and not m.sync for m in convs)
    # main.py:38-43: --delinear True with --block-fc 0 -> a plain Linear
    head = model.classifier if arch.startswith("vgg") else model.fc
    assert type(head) is nn.Linear and (head.in_features, head.out_features) == (512, 10)
    assert isinstance(model.channel_deconv, nn.Identity)


def test_deconv_settings_are_passed_on():
    model = build_cifar_model("vgg11", 100, "deconv", block=16, sampling_stride=2, n_iter=7, eps=1e-3,
                              momentum=0.2, bias=False, sync=True)
    layers = [m for m in model.modules() if isinstance(m, FastDeconv)]
    stem, rest = layers[0], layers[1:]
    # the stem keeps its freeze and 15 iterations whatever n_iter is (models/vgg.py:58)
    assert (stem.block, stem.n_iter, stem.freeze) == (3, 15, True)
    assert all((m.block, m.n_iter, m.freeze) == (16, 7, False) for m in rest)
    assert all(m.sampling_stride == 2 and m.eps == 1e-3 and m.momentum == 0.2 and m.sync and m.bias is None
               for m in layers)
    assert model.classifier.out_features == 100


def test_resnet50_deconv_bottleneck_geometry():
    model = build_cifar_model("resnet50", 10, "deconv")
    layers = dict((row[0], row[1:]) for row in _deconv_layers(model))
    # models/resnet.py:75-79, :100-103: 1x1, 3x3 (stride s), 1x1 to 4x planes, 1x1 strided shortcut
    assert layers["conv1"] == (3, 64, 3, 1, 1, 3, 3, 5, False)
    assert layers["layer1.0.conv1"] == (64, 64, 1, 1, 0, 64, 3, 5, False)
    assert layers["layer1.0.conv3"] == (64, 256, 1, 1, 0, 64, 3, 5, False)
    assert layers["layer1.0.downsample.0"] == (64, 256, 1, 1, 0, 64, 3, 5, False)
    assert layers["layer2.0.conv2"] == (128, 128, 3, 2, 1, 64, 3, 5, False)
    assert layers["layer4.0.downsample.0"] == (1024, 2048, 1, 2, 0, 64, 3, 5, False)
    assert len(layers) == 1 + 3 * 16 + 4 and model.fc.in_features == 2048


# --- BatchNorm versions -----------------------------------------------------------------------------------


def _cifar_torchvision_resnet(name: str, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet with the CIFAR stem: conv1 3x3 stride 1 padding 1, no max-pool."""
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_bn_resnet_state_dict_equals_torchvision_cifar(arch):
    ours = build_cifar_model(arch, 10, "bn")
    ref = _cifar_torchvision_resnet(arch)
    assert _shapes(ours) == _shapes(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same order too
    if arch == "resnet18":
        # the well-known CIFAR ResNet-18 size: 11,689,512 (torchvision) - 9,408 + 1,728 (stem) - 507,870 (fc)
        assert sum(p.numel() for p in ours.parameters()) == 11_173_962


@pytest.mark.parametrize("arch", ["vgg11", "vgg13", "vgg16", "vgg19"])
def test_bn_vgg_features_equal_torchvision_vgg_bn(arch):
    ours = build_cifar_model(arch, 10, "bn")
    # torchvision's vgg*_bn features, without building their 120M-parameter classifier
    cfg = torchvision.models.vgg.cfgs[{"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}[arch]]
    ref = torchvision.models.vgg.make_layers(cfg, batch_norm=True)
    assert _shapes(ours.features) == _shapes(ref)
    # models/vgg.py:25-27: one Linear(512, num_classes), conv biases kept (nn.Conv2d default, :47)
    assert type(ours.classifier) is nn.Linear and (ours.classifier.in_features, ours.classifier.out_features) == (
        512, 10)
    assert isinstance(ours.features[-1], nn.AvgPool2d)


@pytest.mark.parametrize("arch", ["vgg16", "resnet18", "resnet50"])
def test_bn_has_deconv_geometry_and_a_batchnorm_after_every_conv(arch):
    bn, deconv = build_cifar_model(arch, 10, "bn"), build_cifar_model(arch, 10, "deconv")
    # VGG indices differ (BatchNorm modules in between), ResNet names are the same
    names = not arch.startswith("vgg")
    assert _conv_geometry(bn, names) == _conv_geometry(deconv, names)
    assert not any(isinstance(m, FastDeconv) for m in bn.modules())
    leaves = [m for m in bn.modules() if not list(m.children())]
    for i, m in enumerate(leaves):
        if isinstance(m, nn.Conv2d):
            assert isinstance(leaves[i + 1], nn.BatchNorm2d) and leaves[i + 1].num_features == m.out_channels
    # ResNet convs have no bias before their BatchNorm (models/resnet.py:26-27), VGG's do (models/vgg.py:47)
    convs = [m for m in bn.modules() if isinstance(m, nn.Conv2d)]
    assert all((m.bias is not None) == arch.startswith("vgg") for m in convs)


# --- classifier rules (main.py:38-49) ---------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["bn", "deconv"])
def test_block_fc_delinear(norm):
    model = build_cifar_model("resnet18", 10, norm, block_fc=512, eps=1e-4, n_iter=6)
    assert isinstance(model.fc, Delinear) and model.fc.block == 512
    assert (model.fc.in_features, model.fc.out_features, model.fc.eps, model.fc.n_iter) == (512, 10, 1e-4, 6)
    assert isinstance(model.channel_deconv, nn.Identity)
    # Delinear's block rule (models/deconv.py:174-179): clamp to in_features, else gcd
    assert build_cifar_model("vgg11", 10, norm, block_fc=1024).classifier.block == 512
    assert build_cifar_model("vgg11", 10, norm, block_fc=48).classifier.block == 16
    # block_fc = 0 (the default): a plain Linear, whatever fc_whitening says
    for fc_whitening in ("delinear", "channel_deconv"):
        model = build_cifar_model("resnet18", 10, norm, block_fc=0, fc_whitening=fc_whitening)
        assert type(model.fc) is nn.Linear and isinstance(model.channel_deconv, nn.Identity)


@pytest.mark.parametrize("norm", ["bn", "deconv"])
def test_block_fc_channel_deconv(norm):
    model = build_cifar_model("vgg11", 10, norm, block_fc=64, fc_whitening="channel_deconv", n_iter=4)
    cd = model.channel_deconv
    assert isinstance(cd, ChannelDeconv) and type(model.classifier) is nn.Linear
    # main.py:47: block=--block-fc, eps=--eps (1e-5, not ChannelDeconv's 1e-2), n_iter, sampling_stride=--stride
    assert (cd.block, cd.eps, cd.n_iter, cd.sampling_stride, cd.momentum) == (64, 1e-5, 4, 3, 0.1)
    res = build_cifar_model("resnet50", 10, norm, block_fc=512, fc_whitening="channel_deconv")
    assert isinstance(res.channel_deconv, ChannelDeconv) and type(res.fc) is nn.Linear
    # it sits before the classifier, so dropping the last child drops only the classifier
    assert list(dict(res.named_children()))[-3:] == ["channel_deconv", "avgpool", "fc"]
    with pytest.raises(ValueError, match="larger than the 512 channels"):
        build_cifar_model("resnet18", 10, norm, block_fc=1024, fc_whitening="channel_deconv")


def test_channel_deconv_runs_where_the_reference_puts_it():
    # ResNet: on layer4's 4x4 map, before pooling (models/resnet.py:172-174)
    torch.manual_seed(0)
    model = build_cifar_model("resnet18", 10, "bn", block_fc=512, fc_whitening="channel_deconv")
    seen = []
    model.channel_deconv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert seen == [(4, 512, 4, 4)] and int(model.channel_deconv.num_batches_tracked) == 1


# --- forward / backward -----------------------------------------------------------------------------------


# On CPU each whitening matrix costs an eigendecomposition of (9·block)²; blocks of 16 keep the sweep fast.
# The default block (64) runs in test_default_deconv_forward_backward.
FAST_BLOCK = 16


def _check_forward_backward(model: nn.Module, num_classes: int) -> None:
    model.train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("norm", ["bn", "deconv"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(arch, norm):
    torch.manual_seed(0)
    _check_forward_backward(build_cifar_model(arch, 7, norm, block=FAST_BLOCK), 7)


@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_default_deconv_forward_backward(arch):
    torch.manual_seed(0)
    _check_forward_backward(build_cifar_model(arch, 10, "deconv"), 10)


@pytest.mark.parametrize("fc_whitening", ["delinear", "channel_deconv"])
def test_forward_backward_with_whitened_classifier(fc_whitening):
    torch.manual_seed(0)
    model = build_cifar_model("vgg11", 10, "deconv", block=FAST_BLOCK, block_fc=16, fc_whitening=fc_whitening)
    out = model(torch.randn(4, 3, 32, 32))
    out.square().mean().backward()
    assert out.shape == (4, 10) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_names():
    with pytest.raises(ValueError, match="valid: vgg11, vgg13, vgg16, vgg19, resnet18, resnet34, resnet50"):
        build_cifar_model("resnet101", 10, "bn")
    with pytest.raises(ValueError, match="norm"):
        build_cifar_model("vgg11", 10, "gn")
    with pytest.raises(ValueError, match="fc_whitening"):
        build_cifar_model("vgg11", 10, "bn", block_fc=8, fc_whitening="iternorm")
    with pytest.raises(ValueError, match="block_fc"):
        build_cifar_model("vgg11", 10, "bn", block_fc=-1)
    assert list(CIFAR_ARCHS) == list(ARCHS + ZOO)


# --- the rest of Table 1 (seg.models.cifar_zoo) against the reference's layer tables ----------------------


def _reference_layers() -> dict[tuple[str, str], list[list[str]]]:
    table: dict[tuple[str, str], list[list[str]]] = {}
    with open(DATA / "cifar_zoo_reference_layers.csv", newline="") as f:
        for row in csv.DictReader(f):
            fields = list(row.values())[3:]  # after arch, norm, index (rows are in execution order)
            table.setdefault((row["arch"], row["norm"]), []).append(fields)
    return table


def _reference_params() -> dict[tuple[str, str], int]:
    with open(DATA / "cifar_zoo_reference_params.csv", newline="") as f:
        return {(r["arch"], r["norm"]): int(r["params"]) for r in csv.DictReader(f)}


REFERENCE_LAYERS = _reference_layers()
REFERENCE_PARAMS = _reference_params()


def _signature_row(m: nn.Module, out: torch.Tensor) -> list[str]:
    """The table's columns: kind, in, out, kernel, stride, padding, groups, bias, block, sampling_stride, n_iter,
    freeze, whitening matrix shape, output height."""
    size = out.shape[2] if out.dim() == 4 else 0
    if isinstance(m, FastDeconv):
        row = ["deconv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.groups,
               int(m.bias is not None), m.block, m.sampling_stride, m.n_iter, int(m.freeze),
               "x".join(map(str, m.running_deconv.shape)), size]
    elif isinstance(m, nn.Conv2d):
        row = ["conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.groups,
               int(m.bias is not None), "", "", "", "", "", size]
    elif isinstance(m, nn.BatchNorm2d):
        row = ["bn", m.num_features, m.num_features, "", "", "", "", 1, "", "", "", "", "", size]
    elif isinstance(m, Delinear):
        row = ["delinear", m.in_features, m.out_features, "", "", "", "", int(m.bias is not None), m.block, "",
               m.n_iter, "", "x".join(map(str, m.running_deconv.shape)), 0]
    else:
        row = ["linear", m.in_features, m.out_features, "", "", "", "", int(m.bias is not None), "", "", "", "",
               "", 0]
    return [str(v) for v in row]


def _execution_signature(model: nn.Module) -> list[list[str]]:
    rows: list[list[str]] = []
    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, Delinear)
    hooks = [m.register_forward_hook(lambda m, i, o: rows.append(_signature_row(m, o)))
             for m in model.modules() if isinstance(m, kinds)]
    model.eval()  # running statistics: no whitening to compute, the same layers run
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return rows


@pytest.mark.parametrize("norm", ["bn", "deconv"])
@pytest.mark.parametrize("arch", ZOO)
def test_zoo_layers_match_the_reference(arch, norm):
    # norm deconv at the reference's defaults with --block-fc 512 (a Delinear classifier), bn with a Linear
    model = build_cifar_model(arch, 10, norm, block_fc=512 if norm == "deconv" else 0)
    expected = REFERENCE_LAYERS[(arch, norm)]
    got = _execution_signature(model)
    assert len(got) == len(expected)
    for i, (ours, ref) in enumerate(zip(got, expected)):
        assert ours == ref, f"layer {i} of {arch} ({norm})"
    # every conv and norm of the model ran (no unused layers), and nothing else whitens
    used = sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, Delinear)) for m in model.modules())
    assert used == len(got)
    assert not any(isinstance(m, (ChannelDeconv, nn.GroupNorm)) for m in model.modules())


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_parameter_counts_equal_the_reference(arch):
    bn = sum(p.numel() for p in build_cifar_model(arch, 10, "bn").parameters())
    deconv = sum(p.numel() for p in build_cifar_model(arch, 10, "deconv", block_fc=512).parameters())
    # PreAct-ResNet-18: the reference's bn model also holds a BatchNorm2d(64) its forward never calls
    # (models/preact_resnet.py: PreActResNet.bn1), left out here.
    unused = 2 * 64 if arch == "preact_resnet18" else 0
    assert bn == REFERENCE_PARAMS[(arch, "bn")] - unused
    assert deconv == REFERENCE_PARAMS[(arch, "deconv")]


def test_zoo_deconv_settings_are_passed_on_except_where_the_reference_pins_them():
    model = build_cifar_model("mobilenetv2", 10, "deconv", block=16, sampling_stride=2, n_iter=7, eps=1e-3,
                              momentum=0.2, bias=False, sync=True)
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, FastDeconv))
    assert all(m.sampling_stride == 2 and m.eps == 1e-3 and m.momentum == 0.2 and m.sync for m in layers.values())
    # models/mobilenetv2.py pins bias=True and the stem's freeze/n_iter=10, the depthwise n_iter=1 and the
    # projection's block=in_planes, n_iter=1; the expansion conv takes the run's block and n_iter
    assert all(m.bias is not None for m in layers.values())
    assert (layers["conv1"].freeze, layers["conv1"].n_iter) == (True, 10)
    assert (layers["layers.1.conv1"].block, layers["layers.1.conv1"].n_iter) == (16, 7)
    assert (layers["layers.1.conv2"].groups, layers["layers.1.conv2"].block, layers["layers.1.conv2"].n_iter) == (
        96, 1, 1)
    assert (layers["layers.1.conv3"].block, layers["layers.1.conv3"].n_iter) == (16, 1)
    # where the reference leaves the bias to --bias (DenseNet; SENet's SE convs), bias=False removes it
    dense = build_cifar_model("densenet121", 10, "deconv", bias=False)
    assert all(m.bias is None for m in dense.modules() if isinstance(m, FastDeconv))
    se = build_cifar_model("senet18", 10, "deconv", bias=False)
    assert se.layer1[0].fc1.bias is None and se.layer1[0].conv1.bias is not None


# The map (or vector) the reference's ChannelDeconv whitens (models/*.py forward, read by hand): after the last
# stage for most; DenseNet after its final norm and ReLU; EfficientNet the flattened 1x1 map.
CHANNEL_DECONV_INPUT = {
    "preact_resnet18": (512, 4, 4), "densenet121": (1024, 4, 4), "resnext29_32x4d": (1024, 8, 8),
    "mobilenetv2": (1280, 4, 4), "dpn92": (2560, 4, 4), "pnasnet_a": (176, 8, 8), "pnasnet_b": (128, 8, 8),
    "senet18": (512, 4, 4), "efficientnet_b0": (320,),
}


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_channel_deconv_sits_where_the_reference_puts_it(arch):
    model = build_cifar_model(arch, 10, "bn", block_fc=16, fc_whitening="channel_deconv").eval()
    assert isinstance(model.channel_deconv, ChannelDeconv) and type(list(model.children())[-1]) is nn.Linear
    seen = []
    model.channel_deconv.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert [tuple(x.shape[1:]) for x in seen] == [CHANNEL_DECONV_INPUT[arch]]
    if arch == "densenet121":
        assert (seen[0] >= 0).all()  # after the final ReLU


def test_efficientnet_deconv_keeps_the_reference_batchnorm():
    # models/efficientnet.py builds its blocks with deconv=None: only the stem deconvolves
    model = build_model(ModelConfig(arch="efficientnet_b0", num_classes=10, norm="deconv", block_fc=512))
    deconvs = [n for n, m in model.named_modules() if isinstance(m, FastDeconv)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert deconvs == ["conv1"] and model.conv1.freeze and len(norms) == 50
    assert isinstance(model.classifier, Delinear) and model.classifier.block == 320


# --- forward / backward of every Table 1 network under every norm ---------------------------------------

OTHER_NORMS = {"gn": nn.GroupNorm, "iternorm": IterNorm, "channel_deconv": ChannelDeconv, "none": None}


def _zoo_cases() -> list:
    """By default (about 4 s on one idle core): deconv for every network but DPN-92 (4 s alone), every norm for
    MobileNetV2; the whole matrix (9 networks x 6 norms, about 30 s) under ``-m slow``."""
    cases = []
    for arch in ZOO:
        for norm in ("bn", "deconv", *OTHER_NORMS):
            fast = (norm == "deconv" and arch != "dpn92") or arch == "mobilenetv2"
            cases.append(pytest.param(arch, norm, marks=() if fast else pytest.mark.slow, id=f"{arch}-{norm}"))
    return cases


@pytest.mark.parametrize(("arch", "norm"), _zoo_cases())
def test_zoo_forward_backward(arch, norm):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, num_classes=7, norm=norm, deconv=DeconvConfig(block=FAST_BLOCK),
                      block_fc=16 if norm == "deconv" else 0)
    model = build_model(cfg)
    batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if norm not in ("bn", "deconv"):
        assert not batchnorms and not any(isinstance(m, FastDeconv) for m in model.modules())
        if OTHER_NORMS[norm] is not None:
            assert any(isinstance(m, OTHER_NORMS[norm]) for m in model.modules())
        if norm == "none":
            assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    _check_forward_backward(model, 7)


# --- the paper's recipes reach every network ---------------------------------------------------------------


@pytest.mark.parametrize("dataset,classes", [("cifar10", 10), ("cifar100", 100)])
@pytest.mark.parametrize("arch", ZOO)
def test_every_table1_network_has_its_configs(arch, dataset, classes):
    base = load_config(REPO / "configs" / dataset / "base.yaml")
    for norm, block_fc in (("bn", 0), ("deconv", 512)):
        cfg = load_config(REPO / "configs" / dataset / f"{arch}_{norm}.yaml")
        m = cfg.model
        assert (m.arch, m.norm, m.block_fc, m.num_classes, m.fc_whitening) == (arch, norm, block_fc, classes,
                                                                                "delinear")
        assert cfg.train == base.train and cfg.data == base.data and m.deconv == base.model.deconv
        assert cfg.work_dir == f"checkpoints/{dataset}/{arch}_{norm}"
