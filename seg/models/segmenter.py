"""``Segmenter``: encoder + head (+ auxiliary head) for inputs of any size, returning a dict of logits.

:func:`pad_to_multiple` is the one place where inputs are padded to the output stride: the Segmenter
calls it on every forward pass, so ``Predictor`` and the exported graphs just call the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.config import ModelConfig


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an N,C,H,W batch at the bottom/right so that H and W are multiples of ``multiple``.

    ``F.pad`` is called even when nothing is missing: the amounts are computed from the tensor's shape,
    so TorchScript tracing and ``torch.export`` record them as functions of the input size instead of
    freezing a Python ``if`` at the example's size (exported graphs keep dynamic H, W). The unneeded pad
    costs one copy of the input, small next to the network.
    """
    h, w = x.shape[-2], x.shape[-1]
    return F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple))


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
        h, w = x.shape[-2], x.shape[-1]
        x = pad_to_multiple(x, self.size_divisor)
        size = x.shape[-2:]
        features = self.encoder(x)
        result = {"out": _upsample_crop(self.head(features), size, h, w)}
        if self.aux_head is not None:
            result["aux"] = _upsample_crop(self.aux_head(features), size, h, w)
        return result


def _upsample_crop(logits: torch.Tensor, size: torch.Size, h: int, w: int) -> torch.Tensor:
    # Unconditional, like the padding: a shape test here would be frozen by tracing. Heads predict at the
    # output stride, so the resize is needed anyway (and is an identity at equal sizes).
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits[..., :h, :w]
