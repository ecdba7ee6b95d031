"""EfficientNet-B0 for 32x32 inputs, as the reference's ``models/efficientnet.py`` builds it (``EfficientNetB0``).

The reference's simplified B0: ReLU throughout, 3x3 kernels only, no head conv, no dropout; blocks of 1x1
expand, 3x3 depthwise (stride), 1x1 project, then squeeze-and-excitation (1x1 convs with bias, reduction 16) on
the projected output. Its quirks are kept: where the stride is 1 the input (or its 1x1 projection) is added to
the SE-weighted output, where it is 2 the *unweighted* output is (``out * w + out``); the five stride-2 stages
bring 32x32 to 1x1, which the classifier reads flattened (no pooling).

Deconvolution (``--deconv True``): the reference builds only the stem as a ``FastDeconv`` (frozen, 10
iterations) and the blocks *with BatchNorm* (``_make_layers(..., deconv=None)``), so that is what
``norm: deconv`` gives here too: 1 FastDeconv and the blocks' 50 BatchNorm layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.cifar_zoo._layers import ClassifierLayer, Convs, Deconv, squeeze_excite

STEM_SETTINGS = {"deconv_bias": True, "freeze": True, "n_iter": 10}
# (expansion, out_planes, blocks, stride of the first block)
CFG = ((1, 16, 1, 2), (6, 24, 2, 1), (6, 40, 2, 2), (6, 80, 3, 2), (6, 112, 3, 1), (6, 192, 4, 2), (6, 320, 1, 2))
SE_REDUCTION = 16


class MBConv(nn.Module):
    """Expand, depthwise, project, SE; plus the (projected) input at stride 1, the output itself at stride 2."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, convs: Convs) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = convs(in_planes, planes, 1, deconv_bias=True)
        self.bn1 = convs.norm(planes)
        self.conv2 = convs(planes, planes, 3, stride, 1, groups=planes, deconv_bias=True)
        self.bn2 = convs.norm(planes)
        self.conv3 = convs(planes, out_planes, 1, deconv_bias=True)
        self.bn3 = convs.norm(out_planes)
        needs_projection = stride == 1 and in_planes != out_planes
        self.shortcut = convs.shortcut(in_planes, out_planes) if needs_projection else None
        self.fc1 = convs(out_planes, out_planes // SE_REDUCTION, 1, bias=True)
        self.fc2 = convs(out_planes // SE_REDUCTION, out_planes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride != 1:
            shortcut = out
        else:
            shortcut = x if self.shortcut is None else self.shortcut(x)
        return out * squeeze_excite(out, self.fc1, self.fc2) + shortcut


class EfficientNetB0(nn.Module):
    """Stem (3x3 conv to 32, norm, ReLU), 16 MBConv blocks with BatchNorm, flatten, classifier.

    Args:
        num_classes: classifier outputs.
        deconv: None (BatchNorm model) or a ``FastDeconv`` factory, used for the stem only (see the module
            docstring).
        classifier_layer: ``nn.Linear`` or a ``Delinear`` partial.
    """

    def __init__(self, num_classes: int, deconv: Deconv | None = None,
                 classifier_layer: ClassifierLayer = nn.Linear) -> None:
        super().__init__()
        stem = Convs(deconv)
        self.conv1 = stem(3, 32, 3, 1, 1, **STEM_SETTINGS)
        self.bn1 = stem.norm(32)
        blocks = []
        in_planes = 32
        plain = Convs(None)  # the reference's blocks never deconvolve
        for expansion, out_planes, n, stride in CFG:
            for s in [stride] + [1] * (n - 1):
                blocks.append(MBConv(in_planes, out_planes, expansion, s, plain))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.num_features = in_planes
        # The reference's optional ChannelDeconv (deconv1) whitens the flattened 320-vector.
        self.channel_deconv: nn.Module = nn.Identity()
        self.classifier = classifier_layer(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.flatten(self.layers(x), 1)
        return self.classifier(self.channel_deconv(x))


def efficientnet_b0(num_classes: int, deconv: Deconv | None = None,
                    classifier_layer: ClassifierLayer = nn.Linear) -> EfficientNetB0:
    return EfficientNetB0(num_classes, deconv, classifier_layer)
