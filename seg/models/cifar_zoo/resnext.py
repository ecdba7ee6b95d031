"""ResNeXt-29 (32x4d) for 32x32 inputs, as the reference's ``models/resnext.py`` builds it (its ``--arch resnext``).

A 1x1 stem to 64 channels, three stages of three grouped bottleneck blocks (cardinality 32; bottleneck width 4,
8, 16; strides 1, 2, 2; output 2 x 32 x width channels), pooling of the 8x8 map, classifier on 1024 features.
Deconvolution (``--deconv True``): every conv a ``FastDeconv`` with its bias on; the grouped 3x3 conv whitens
each group separately (block = its 4..16 input channels) with 3 iterations; the 1x1 stem is frozen with 10
iterations (``freeze=True, n_iter=10``); no BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.cifar_zoo._layers import ClassifierLayer, Convs, Deconv

STEM_SETTINGS = {"deconv_bias": True, "freeze": True, "n_iter": 10}
GROUPED_N_ITER = 3
EXPANSION = 2


class ResNeXtBlock(nn.Module):
    """conv1x1, grouped conv3x3 (stride), conv1x1 to ``2 x cardinality x width``, plus the (projected) input."""

    def __init__(self, in_planes: int, cardinality: int, width: int, stride: int, convs: Convs) -> None:
        super().__init__()
        group_width = cardinality * width
        out_planes = EXPANSION * group_width
        self.conv1 = convs(in_planes, group_width, 1, deconv_bias=True)
        self.bn1 = convs.norm(group_width)
        self.conv2 = convs(group_width, group_width, 3, stride, 1, groups=cardinality, deconv_bias=True,
                           n_iter=GROUPED_N_ITER)
        self.bn2 = convs.norm(group_width)
        self.conv3 = convs(group_width, out_planes, 1, deconv_bias=True)
        self.bn3 = convs.norm(out_planes)
        needs_projection = stride != 1 or in_planes != out_planes
        self.shortcut = convs.shortcut(in_planes, out_planes, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNeXt(nn.Module):
    """Stem (1x1 conv, norm, ReLU), three stages of ResNeXt blocks, pooling, classifier.

    Args:
        blocks: blocks per stage.
        cardinality: groups of the 3x3 convs.
        width: channels per group in the first stage (doubled in each next one).
        num_classes: classifier outputs.
        deconv: None (BatchNorm model) or a ``FastDeconv`` factory (see :class:`Convs`).
        classifier_layer: ``nn.Linear`` or a ``Delinear`` partial.
    """

    def __init__(self, blocks: tuple[int, ...], cardinality: int, width: int, num_classes: int,
                 deconv: Deconv | None = None, classifier_layer: ClassifierLayer = nn.Linear) -> None:
        super().__init__()
        convs = Convs(deconv)
        self.conv1 = convs(3, 64, 1, **STEM_SETTINGS)
        self.bn1 = convs.norm(64)
        in_planes = 64
        for i, n in enumerate(blocks):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            stage = []
            for s in strides:
                stage.append(ResNeXtBlock(in_planes, cardinality, width, s, convs))
                in_planes = EXPANSION * cardinality * width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            width *= 2
        self.num_features = in_planes
        self.channel_deconv: nn.Module = nn.Identity()  # the reference's optional ChannelDeconv (deconv1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # avg_pool2d(out, 8) on the 8x8 map
        self.fc = classifier_layer(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.channel_deconv(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnext29_32x4d(num_classes: int, deconv: Deconv | None = None,
                    classifier_layer: ClassifierLayer = nn.Linear) -> ResNeXt:
    return ResNeXt((3, 3, 3), 32, 4, num_classes, deconv, classifier_layer)
