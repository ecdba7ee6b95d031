"""PreAct-ResNet-18 for 32x32 inputs, as the reference's ``models/preact_resnet.py`` builds it.

Pre-activation blocks (norm, ReLU, conv); the shortcut projection reads the activated input. The stem is a bare
3x3 conv (no norm, no ReLU after it) and there is no final norm: the last block's sum is pooled directly.
Deconvolution (``--deconv True``): every conv a ``FastDeconv`` with its bias on, the stem frozen with 10
iterations (``freeze=True, n_iter=10``), no BatchNorm.

Deviation: the reference's BatchNorm model also registers a ``bn1`` (64 channels) after the stem that its
forward never calls; it is left out here (128 parameters fewer, and no unused parameters under DDP).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.cifar_zoo._layers import ClassifierLayer, Convs, Deconv

STEM_SETTINGS = {"deconv_bias": True, "freeze": True, "n_iter": 10}


class PreActBlock(nn.Module):
    """norm-ReLU-conv3x3(stride), norm-ReLU-conv3x3, plus the input (or its 1x1 projection)."""

    def __init__(self, in_planes: int, planes: int, stride: int, convs: Convs) -> None:
        super().__init__()
        self.bn1 = convs.norm(in_planes)
        self.conv1 = convs(in_planes, planes, 3, stride, 1, deconv_bias=True)
        self.bn2 = convs.norm(planes)
        self.conv2 = convs(planes, planes, 3, 1, 1, deconv_bias=True)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = convs(in_planes, planes, 1, stride, deconv_bias=True) if needs_projection else None

    def residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(branch output, shortcut) of the block; subclasses combine them differently (SENet)."""
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, shortcut = self.residual(x)
        return out + shortcut


class PreActResNet(nn.Module):
    """A 3x3 stem, four stages of pre-activation blocks (64..512 planes, strides 1, 2, 2, 2), pooling, classifier.

    Args:
        blocks: blocks per stage.
        num_classes: classifier outputs.
        deconv: None (BatchNorm model) or a ``FastDeconv`` factory (see :class:`Convs`).
        classifier_layer: ``nn.Linear`` or a ``Delinear`` partial.
    """

    def __init__(self, blocks: tuple[int, ...], num_classes: int, deconv: Deconv | None = None,
                 classifier_layer: ClassifierLayer = nn.Linear) -> None:
        super().__init__()
        convs = Convs(deconv)
        self.conv1 = convs(3, 64, 3, 1, 1, **STEM_SETTINGS)
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            stage = []
            for s in strides:
                stage.append(PreActBlock(in_planes, planes, s, convs))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = in_planes
        self.channel_deconv: nn.Module = nn.Identity()  # the reference's optional ChannelDeconv (deconv1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # avg_pool2d(out, 4) on the 4x4 map
        self.fc = classifier_layer(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.channel_deconv(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def preact_resnet18(num_classes: int, deconv: Deconv | None = None,
                    classifier_layer: ClassifierLayer = nn.Linear) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes, deconv, classifier_layer)
