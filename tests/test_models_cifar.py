"""seg.models.cifar: the reference's CIFAR VGG/ResNet, checked layer by layer against lists written by hand
from github.com/yechengxi/deconvolution (main.py, models/vgg.py, models/resnet.py) and against torchvision."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

from seg.models.cifar import CIFAR_ARCHS, build_cifar_model
from seg.nn import ChannelDeconv, Delinear, FastDeconv

ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50")


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
    assert set(CIFAR_ARCHS) == set(ARCHS)
