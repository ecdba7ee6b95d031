"""The conv/norm factory every ``cifar_zoo`` network is built with: the reference's ``deconv`` argument.

The reference's ``models/*.py`` take ``deconv=None`` (Conv2d + BatchNorm) or ``deconv=partial(FastDeconv, ...)``
(a ``FastDeconv`` in place of every Conv2d + BatchNorm), and pin some settings per layer (a frozen stem with
more iterations, fewer iterations in depthwise convs, ...). :class:`Convs` is that argument with the per-layer
settings spelled out at each call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

# ``deconv(in, out, kernel_size, stride=, padding=, groups=, **settings)``: a FastDeconv partial.
Deconv = Callable[..., nn.Module]
# ``classifier_layer(in_features, num_classes)``: ``nn.Linear`` or a ``Delinear`` partial.
ClassifierLayer = Callable[[int, int], nn.Module]


class Convs:
    """Makes one network's convs and norms, plain (``deconv=None``) or deconvolving.

    Args:
        deconv: None for ``nn.Conv2d`` followed by ``nn.BatchNorm2d`` (the reference's ``--deconv False``), or
            a ``FastDeconv`` factory (its ``--deconv True``): every conv whitens its input and the norms are
            ``nn.Identity`` (no state, so a state_dict has only the reference's layers).
    """

    def __init__(self, deconv: Deconv | None) -> None:
        self.deconv = deconv

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, *, bias: bool = False, deconv_bias: bool | None = None,
                 **deconv_settings: Any) -> nn.Module:
        """A conv with this geometry.

        Args:
            bias: the plain conv's bias (the reference's BatchNorm model: False before a norm).
            deconv_bias: the ``FastDeconv``'s bias where the reference pins it (``bias=True`` in its call);
                None leaves the run's ``--bias`` setting.
            deconv_settings: other ``FastDeconv`` settings the reference pins for this layer (``freeze``,
                ``n_iter``, ``block``); ignored by the plain conv.
        """
        if self.deconv is None:
            return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        if deconv_bias is not None:
            deconv_settings["bias"] = deconv_bias
        return self.deconv(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                           **deconv_settings)

    def norm(self, channels: int) -> nn.Module:
        """The BatchNorm of the plain model; an ``nn.Identity`` where the conv whitens."""
        return nn.BatchNorm2d(channels) if self.deconv is None else nn.Identity()

    def shortcut(self, in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
        """A projection shortcut: a 1x1 conv (bias pinned on when it deconvolves) and its norm."""
        return nn.Sequential(self(in_channels, out_channels, 1, stride, deconv_bias=True), self.norm(out_channels))


def squeeze_excite(x: torch.Tensor, fc1: nn.Module, fc2: nn.Module) -> torch.Tensor:
    """Squeeze-and-excitation weights as the reference computes them: the map's mean, ``fc1``, ReLU, ``fc2``,
    sigmoid (both "fc" layers are 1x1 convs)."""
    w = torch.nn.functional.adaptive_avg_pool2d(x, 1)
    return torch.sigmoid(fc2(torch.relu(fc1(w))))
