"""DenseNet-121 for 32x32 inputs, as the reference's ``models/densenet.py`` builds it (``DenseNet121``).

Growth rate 32, blocks of 6/12/24/16 pre-activation bottleneck layers (norm-ReLU-1x1 conv to 4x growth,
norm-ReLU-3x3 conv to the growth), each concatenating its new features *before* its input; transitions halve
the channels (1x1 conv) and the map (2x2 average pool). The stem is one 3x3 conv to 64 channels (no norm, no
pooling); a final norm and ReLU precede the pooling. Deconvolution (``--deconv True``): every conv a
``FastDeconv`` with the run's settings (the stem included: the reference does not freeze it), no BatchNorm, the
final ReLU kept.

Deviation: with a ``ChannelDeconv`` before the classifier (``--delinear False --block-fc N``) the reference
builds it only for the deconvolution model and silently drops it from the BatchNorm one; here it is applied to
either, as for every other network.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.cifar_zoo._layers import ClassifierLayer, Convs, Deconv


class DenseLayer(nn.Module):
    """norm-ReLU-conv1x1 (4 x growth), norm-ReLU-conv3x3 (growth); output ``cat([new, input])``."""

    def __init__(self, in_planes: int, growth: int, convs: Convs) -> None:
        super().__init__()
        self.bn1 = convs.norm(in_planes)
        self.conv1 = convs(in_planes, 4 * growth, 1)
        self.bn2 = convs.norm(4 * growth)
        self.conv2 = convs(4 * growth, growth, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """norm-ReLU-conv1x1, then a 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int, convs: Convs) -> None:
        super().__init__()
        self.bn = convs.norm(in_planes)
        self.conv = convs(in_planes, out_planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """Stem, four dense blocks with three transitions, final norm + ReLU, pooling, classifier.

    Args:
        blocks: layers per dense block.
        growth: channels each layer adds.
        num_classes: classifier outputs.
        deconv: None (BatchNorm model) or a ``FastDeconv`` factory (see :class:`Convs`).
        classifier_layer: ``nn.Linear`` or a ``Delinear`` partial.
        reduction: the transitions' channel factor (rounded down).
    """

    def __init__(self, blocks: tuple[int, ...], growth: int, num_classes: int, deconv: Deconv | None = None,
                 classifier_layer: ClassifierLayer = nn.Linear, reduction: float = 0.5) -> None:
        super().__init__()
        convs = Convs(deconv)
        planes = 2 * growth
        self.conv1 = convs(3, planes, 3, padding=1)
        for i, n in enumerate(blocks):
            self.add_module(f"dense{i + 1}", nn.Sequential(*(DenseLayer(planes + j * growth, growth, convs)
                                                             for j in range(n))))
            planes += n * growth
            if i < len(blocks) - 1:
                out_planes = math.floor(planes * reduction)
                self.add_module(f"trans{i + 1}", Transition(planes, out_planes, convs))
                planes = out_planes
        self.bn = convs.norm(planes)
        self.num_features = planes
        self.channel_deconv: nn.Module = nn.Identity()  # the reference's optional ChannelDeconv
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # avg_pool2d(out, 4) on the 4x4 map
        self.classifier = classifier_layer(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.trans3(self.dense3(x))
        x = F.relu(self.bn(self.dense4(x)))
        x = self.channel_deconv(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def densenet121(num_classes: int, deconv: Deconv | None = None,
                classifier_layer: ClassifierLayer = nn.Linear) -> DenseNet:
    return DenseNet((6, 12, 24, 16), 32, num_classes, deconv, classifier_layer)
