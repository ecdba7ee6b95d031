"""MobileNetV2 for 32x32 inputs, as the reference's ``models/mobilenetv2.py`` builds it.

The ImageNet layout with the CIFAR changes the reference makes: stem stride 1 and the second stage's stride 1
(so the 1280-channel head sees a 4x4 map). Inverted residual blocks: 1x1 expand, 3x3 depthwise (stride), 1x1
project (linear); the input is added wherever the stride is 1, through a 1x1 projection where the channels
change. Deconvolution (``--deconv True``): every conv a ``FastDeconv`` with its bias on; the depthwise conv
whitens each channel's 3x3 patch separately with 1 iteration; the projecting conv whitens blocks of the
block's *input* channel count with 1 iteration (``block=in_planes, n_iter=1``); the stem is frozen with 10
iterations; no BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.cifar_zoo._layers import ClassifierLayer, Convs, Deconv

STEM_SETTINGS = {"deconv_bias": True, "freeze": True, "n_iter": 10}
# (expansion, out_planes, blocks, stride of the first block)
CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
HEAD_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3, stride), project (1x1); plus the (projected) input where stride is 1."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, convs: Convs) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = convs(in_planes, planes, 1, deconv_bias=True)
        self.bn1 = convs.norm(planes)
        self.conv2 = convs(planes, planes, 3, stride, 1, groups=planes, deconv_bias=True, n_iter=1)
        self.bn2 = convs.norm(planes)
        self.conv3 = convs(planes, out_planes, 1, deconv_bias=True, block=in_planes, n_iter=1)
        self.bn3 = convs.norm(out_planes)
        needs_projection = stride == 1 and in_planes != out_planes
        self.shortcut = convs.shortcut(in_planes, out_planes) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride != 1:
            return out
        return out + (x if self.shortcut is None else self.shortcut(x))


class MobileNetV2(nn.Module):
    """Stem (3x3 conv to 32, norm, ReLU), 17 inverted residual blocks, 1x1 conv to 1280 (norm, ReLU), pooling,
    classifier.

    Args:
        num_classes: classifier outputs.
        deconv: None (BatchNorm model) or a ``FastDeconv`` factory (see :class:`Convs`).
        classifier_layer: ``nn.Linear`` or a ``Delinear`` partial.
    """

    def __init__(self, num_classes: int, deconv: Deconv | None = None,
                 classifier_layer: ClassifierLayer = nn.Linear) -> None:
        super().__init__()
        convs = Convs(deconv)
        self.conv1 = convs(3, 32, 3, 1, 1, **STEM_SETTINGS)
        self.bn1 = convs.norm(32)
        blocks = []
        in_planes = 32
        for expansion, out_planes, n, stride in CFG:
            for s in [stride] + [1] * (n - 1):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, s, convs))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = convs(in_planes, HEAD_CHANNELS, 1, deconv_bias=True)
        self.bn2 = convs.norm(HEAD_CHANNELS)
        self.num_features = HEAD_CHANNELS
        self.channel_deconv: nn.Module = nn.Identity()  # the reference's optional ChannelDeconv (deconv1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # avg_pool2d(out, 4) on the 4x4 map
        self.classifier = classifier_layer(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(self.layers(x))))
        x = self.channel_deconv(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobilenetv2(num_classes: int, deconv: Deconv | None = None,
                classifier_layer: ClassifierLayer = nn.Linear) -> MobileNetV2:
    return MobileNetV2(num_classes, deconv, classifier_layer)
