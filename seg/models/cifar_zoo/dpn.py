"""DPN-92 for 32x32 inputs, as the reference's ``models/dpn.py`` builds it (``DPN92``).

Dual path blocks: 1x1 conv, grouped 3x3 conv (32 groups, stride), 1x1 conv to ``out + dense`` channels; the
first ``out`` channels are added to the (projected) input's (the residual path), the rest are concatenated
after the input's remaining channels (the dense path). Four stages (3, 4, 20, 3 blocks; strides 1, 2, 2, 2);
the first block of each projects its input. Deconvolution (``--deconv True``): every conv a ``FastDeconv`` with
its bias on, the grouped conv whitening each group separately, the stem frozen with 10 iterations
(``freeze=True, n_iter=10``), no BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.cifar_zoo._layers import ClassifierLayer, Convs, Deconv

STEM_SETTINGS = {"deconv_bias": True, "freeze": True, "n_iter": 10}
GROUPS = 32
# DPN92's stages: (bottleneck planes, residual planes, blocks, dense depth)
DPN92_CFG = ((96, 256, 3, 16), (192, 512, 4, 32), (384, 1024, 20, 24), (768, 2048, 3, 128))


class DualPathBlock(nn.Module):
    """See the module docstring; ``first``: the stage's first block, which projects its input."""

    def __init__(self, last_planes: int, in_planes: int, out_planes: int, dense_depth: int, stride: int,
                 first: bool, convs: Convs) -> None:
        super().__init__()
        self.out_planes = out_planes
        self.conv1 = convs(last_planes, in_planes, 1, deconv_bias=True)
        self.bn1 = convs.norm(in_planes)
        self.conv2 = convs(in_planes, in_planes, 3, stride, 1, groups=GROUPS, deconv_bias=True)
        self.bn2 = convs.norm(in_planes)
        self.conv3 = convs(in_planes, out_planes + dense_depth, 1, deconv_bias=True)
        self.bn3 = convs.norm(out_planes + dense_depth)
        self.shortcut = convs.shortcut(last_planes, out_planes + dense_depth, stride) if first else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            x = self.shortcut(x)
        d = self.out_planes
        return F.relu(torch.cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]], 1))


class DPN(nn.Module):
    """Stem (3x3 conv to 64, norm, ReLU), four stages of dual path blocks, pooling, classifier.

    Args:
        cfg: per stage (bottleneck planes, residual planes, blocks, dense depth).
        num_classes: classifier outputs.
        deconv: None (BatchNorm model) or a ``FastDeconv`` factory (see :class:`Convs`).
        classifier_layer: ``nn.Linear`` or a ``Delinear`` partial.
    """

    def __init__(self, cfg: tuple[tuple[int, int, int, int], ...], num_classes: int, deconv: Deconv | None = None,
                 classifier_layer: ClassifierLayer = nn.Linear) -> None:
        super().__init__()
        convs = Convs(deconv)
        self.conv1 = convs(3, 64, 3, 1, 1, **STEM_SETTINGS)
        self.bn1 = convs.norm(64)
        last = 64
        for i, (in_planes, out_planes, n, dense) in enumerate(cfg):
            stage = []
            for j, s in enumerate([1 if i == 0 else 2] + [1] * (n - 1)):
                stage.append(DualPathBlock(last, in_planes, out_planes, dense, s, j == 0, convs))
                last = out_planes + (j + 2) * dense
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = last
        self.channel_deconv: nn.Module = nn.Identity()  # the reference's optional ChannelDeconv (deconv1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # avg_pool2d(out, 4) on the 4x4 map
        self.fc = classifier_layer(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.channel_deconv(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def dpn92(num_classes: int, deconv: Deconv | None = None, classifier_layer: ClassifierLayer = nn.Linear) -> DPN:
    return DPN(DPN92_CFG, num_classes, deconv, classifier_layer)
