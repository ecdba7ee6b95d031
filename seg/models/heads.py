"""Segmentation heads: the FCN head (torchvision layout) and the DeepLab head (smp decoder + classifier).

Every head maps the encoder's feature list to logits at the resolution of the feature it reads, and
names its last 1x1 convolution ``classifier`` so the model builder can treat all classifiers alike.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class FCNHead(nn.Module):
    """3x3 conv to ``in_channels // 4``, BatchNorm, ReLU, dropout, 1x1 classifier.

    Args:
        in_channels: channels of the feature it reads.
        num_classes: output channels.
        feature_index: which entry of the encoder's feature list it reads (-1: the last).
        dropout: dropout probability before the classifier (0.1 as in torchvision).
    """

    def __init__(
        self, in_channels: int, num_classes: int, feature_index: int = -1, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if in_channels < 4:
            raise ValueError(f"FCNHead needs in_channels >= 4 (it keeps a quarter), got {in_channels}")
        inter = in_channels // 4
        self.feature_index = feature_index
        self.conv = nn.Conv2d(in_channels, inter, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(inter)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(inter, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[self.feature_index]
        return self.classifier(self.dropout(self.relu(self.bn(self.conv(x)))))


class DecoderHead(nn.Module):
    """An smp decoder (feature list -> one feature map) followed by a 1x1 classifier."""

    def __init__(self, decoder: nn.Module, decoder_channels: int, num_classes: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.classifier = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.decoder(features))
