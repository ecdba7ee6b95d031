"""PNASNet-A and -B for 32x32 inputs, as the reference's ``models/pnasnet.py`` builds them.

Cells found by progressive architecture search (the kuangliu CIFAR variant): "separable" convs are a single
grouped conv (``groups=in_planes``, no pointwise conv) and a norm. Cell A: a 7x7 separable conv plus a 3x3 max
pool (1x1 conv + norm after it when the cell downsamples), summed, ReLU. Cell B: 7x7 + 3x3 separable convs and
max pool (+1x1) + 5x5 separable conv, summed pairwise, ReLU, concatenated, 1x1 conv to the width, norm, ReLU.
Network: 3x3 stem (norm, ReLU), 6 cells, a downsampling cell (x2 width), 6 cells, a downsampling cell (x2),
6 cells, pooling of the 8x8 map, classifier. Deconvolution (``--deconv True``): every conv a ``FastDeconv``
with its bias on, the grouped convs whitening each group separately, the stem frozen with 10 iterations, no
BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.cifar_zoo._layers import ClassifierLayer, Convs, Deconv

STEM_SETTINGS = {"deconv_bias": True, "freeze": True, "n_iter": 10}
CELLS_PER_STAGE = 6


class SepConv(nn.Module):
    """The reference's "separable" conv: one conv with ``groups=in_planes`` (padding keeps the size), a norm."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int, convs: Convs) -> None:
        super().__init__()
        self.conv1 = convs(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2, groups=in_planes,
                           deconv_bias=True)
        self.bn1 = convs.norm(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


class _Cell(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, convs: Convs) -> None:
        super().__init__()
        self.stride = stride
        if stride == 2:
            # The max-pooled branch changes width through a 1x1 conv only when the cell downsamples.
            self.conv1 = convs(in_planes, out_planes, 1, deconv_bias=True)
            self.bn1 = convs.norm(out_planes)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(x, kernel_size=3, stride=self.stride, padding=1)
        return self.bn1(self.conv1(y)) if self.stride == 2 else y


class CellA(_Cell):
    """ReLU(sep7x7(x) + maxpool(x))."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, convs: Convs) -> None:
        super().__init__(in_planes, out_planes, stride, convs)
        self.sep_conv1 = SepConv(in_planes, out_planes, 7, stride, convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.sep_conv1(x)
        return F.relu(y1 + self._pooled(x))


class CellB(_Cell):
    """ReLU(norm(conv1x1(cat[ReLU(sep7x7 + sep3x3), ReLU(maxpool + sep5x5)])))."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, convs: Convs) -> None:
        super().__init__(in_planes, out_planes, stride, convs)
        self.sep_conv1 = SepConv(in_planes, out_planes, 7, stride, convs)
        self.sep_conv2 = SepConv(in_planes, out_planes, 3, stride, convs)
        self.sep_conv3 = SepConv(in_planes, out_planes, 5, stride, convs)
        self.conv2 = convs(2 * out_planes, out_planes, 1, deconv_bias=True)
        self.bn2 = convs.norm(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.sep_conv1(x)
        y2 = self.sep_conv2(x)
        y3 = self._pooled(x)
        y4 = self.sep_conv3(x)
        y = torch.cat([F.relu(y1 + y2), F.relu(y3 + y4)], 1)
        return F.relu(self.bn2(self.conv2(y)))


class PNASNet(nn.Module):
    """See the module docstring.

    Args:
        cell: ``CellA`` or ``CellB``.
        planes: the first stage's width (doubled by each downsampling cell).
        num_classes: classifier outputs.
        deconv: None (BatchNorm model) or a ``FastDeconv`` factory (see :class:`Convs`).
        classifier_layer: ``nn.Linear`` or a ``Delinear`` partial.
    """

    def __init__(self, cell: type[CellA] | type[CellB], planes: int, num_classes: int,
                 deconv: Deconv | None = None, classifier_layer: ClassifierLayer = nn.Linear) -> None:
        super().__init__()
        convs = Convs(deconv)
        self.conv1 = convs(3, planes, 3, 1, 1, **STEM_SETTINGS)
        self.bn1 = convs.norm(planes)
        self.layer1 = nn.Sequential(*(cell(planes, planes, 1, convs) for _ in range(CELLS_PER_STAGE)))
        self.layer2 = cell(planes, 2 * planes, 2, convs)
        self.layer3 = nn.Sequential(*(cell(2 * planes, 2 * planes, 1, convs) for _ in range(CELLS_PER_STAGE)))
        self.layer4 = cell(2 * planes, 4 * planes, 2, convs)
        self.layer5 = nn.Sequential(*(cell(4 * planes, 4 * planes, 1, convs) for _ in range(CELLS_PER_STAGE)))
        self.num_features = 4 * planes
        self.channel_deconv: nn.Module = nn.Identity()  # the reference's optional ChannelDeconv (deconv1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # avg_pool2d(out, 8) on the 8x8 map
        self.classifier = classifier_layer(4 * planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        x = self.channel_deconv(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def pnasnet_a(num_classes: int, deconv: Deconv | None = None,
              classifier_layer: ClassifierLayer = nn.Linear) -> PNASNet:
    return PNASNet(CellA, 44, num_classes, deconv, classifier_layer)


def pnasnet_b(num_classes: int, deconv: Deconv | None = None,
              classifier_layer: ClassifierLayer = nn.Linear) -> PNASNet:
    return PNASNet(CellB, 32, num_classes, deconv, classifier_layer)
