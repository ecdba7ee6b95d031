"""``Segmenter``: encoder + head (+ auxiliary head) for inputs of any size, returning a dict of logits."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.config import ModelConfig


class Segmenter(nn.Module):
    """Runs ``encoder -> head`` (and ``aux_head``) and returns logits at the input resolution.

    The input is zero-padded at the bottom/right to a multiple of ``size_divisor`` (the encoder's output
    stride: dilated encoders and the DeepLabV3+ skip connection need exact divisibility) and the logits
    are cropped back, so any ``H, W`` works. Zero is the dataset mean after normalisation.

    Attributes:
        config: the :class:`ModelConfig` the model was built from (a checkpoint can rebuild it).
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        aux_head: nn.Module | None,
        size_divisor: int,
        config: ModelConfig,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.aux_head = aux_head
        self.size_divisor = int(size_divisor)
        self.config = config

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"expected an image batch of shape N,C,H,W, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.size_divisor, (-w) % self.size_divisor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        size = x.shape[-2:]
        features = self.encoder(x)
        result = {"out": _upsample_crop(self.head(features), size, h, w)}
        if self.aux_head is not None:
            result["aux"] = _upsample_crop(self.aux_head(features), size, h, w)
        return result


def _upsample_crop(logits: torch.Tensor, size: torch.Size, h: int, w: int) -> torch.Tensor:
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits[..., :h, :w]
