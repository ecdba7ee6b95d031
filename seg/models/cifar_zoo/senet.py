"""SENet-18 for 32x32 inputs, as the reference's ``models/senet.py`` builds it (``SENet18``).

A ResNet-18 layout whose blocks are pre-activation blocks with squeeze-and-excitation (two 1x1 convs with bias,
reduction 16) on the residual branch; unlike PreAct-ResNet the stem has a norm and a ReLU. Deconvolution
(``--deconv True``): every conv a ``FastDeconv``, the SE convs included (with the run's ``--bias``, the others
with their bias pinned on), the stem frozen with 15 iterations (``freeze=True, n_iter=15``), no BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.cifar_zoo._layers import ClassifierLayer, Convs, Deconv, squeeze_excite
from seg.models.cifar_zoo.preact import PreActBlock

STEM_SETTINGS = {"deconv_bias": True, "freeze": True, "n_iter": 15}
SE_REDUCTION = 16


class SEPreActBlock(PreActBlock):
    """The reference's ``senet.PreActBlock``: a pre-activation block whose branch is rescaled by SE weights."""

    def __init__(self, in_planes: int, planes: int, stride: int, convs: Convs) -> None:
        super().__init__(in_planes, planes, stride, convs)
        self.fc1 = convs(planes, planes // SE_REDUCTION, 1, bias=True)
        self.fc2 = convs(planes // SE_REDUCTION, planes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, shortcut = self.residual(x)
        return out * squeeze_excite(out, self.fc1, self.fc2) + shortcut


class SENet18(nn.Module):
    """Stem (3x3 conv, norm, ReLU), four stages of two SE blocks (64..512 planes), pooling, classifier.

    Args:
        num_classes: classifier outputs.
        deconv: None (BatchNorm model) or a ``FastDeconv`` factory (see :class:`Convs`).
        classifier_layer: ``nn.Linear`` or a ``Delinear`` partial.
    """

    def __init__(self, num_classes: int, deconv: Deconv | None = None,
                 classifier_layer: ClassifierLayer = nn.Linear) -> None:
        super().__init__()
        convs = Convs(deconv)
        self.conv1 = convs(3, 64, 3, 1, 1, **STEM_SETTINGS)
        self.bn1 = convs.norm(64)
        in_planes = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            first = SEPreActBlock(in_planes, planes, 1 if i == 0 else 2, convs)
            self.add_module(f"layer{i + 1}", nn.Sequential(first, SEPreActBlock(planes, planes, 1, convs)))
            in_planes = planes
        self.num_features = in_planes
        self.channel_deconv: nn.Module = nn.Identity()  # the reference's optional ChannelDeconv (deconv1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # avg_pool2d(out, 4) on the 4x4 map
        self.fc = classifier_layer(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.channel_deconv(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def senet18(num_classes: int, deconv: Deconv | None = None,
            classifier_layer: ClassifierLayer = nn.Linear) -> SENet18:
    return SENet18(num_classes, deconv, classifier_layer)
