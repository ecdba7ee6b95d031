"""The paper's MNIST / Fashion-MNIST network: the reference's ``--arch mlp`` (``models/simple.py``, ``MLP``).

784 inputs (a flattened 1 x 28 x 28 image), two hidden layers of 128 sigmoid units, ``num_classes`` outputs;
three ``Linear`` layers. The reference's ``--method`` picks what precedes each ``Linear``; here
``model.norm`` does:

* ``none`` (``--method 1``): plain ``Linear`` layers with bias (biases start at 0);
* ``bn`` (``--method 2``): ``BatchNorm1d`` after each hidden ``Linear`` (bias-free ``Linear`` layers);
* ``deconv`` (``--method 3``, the reference's default): a ``ChannelDeconv`` (block 32 in the reference;
  ``model.channel_deconv`` here) whitening the input of every ``Linear`` (bias-free), the image included.

The reference's ``--method 4`` (BatchNorm and ``ChannelDeconv`` together) is not offered.
"""

from __future__ import annotations

import torch
from torch import nn

from seg.nn import ChannelDeconv

IN_FEATURES = 28 * 28
HIDDEN = 128
HIDDEN_LAYERS = 3  # the reference's hidden_layers=3: three Linear layers, two hidden activations
MLP_NORMS = ("none", "bn", "deconv")


class MLP(nn.Module):
    """Flatten, then ``Linear`` layers with sigmoids between them; ``norm`` as in the module docstring.
    ``whitening``: keyword arguments of each ``ChannelDeconv`` (``norm="deconv"`` only)."""

    def __init__(self, num_classes: int = 10, norm: str = "deconv", in_features: int = IN_FEATURES,
                 hidden: int = HIDDEN, whitening: dict | None = None) -> None:
        super().__init__()
        if norm not in MLP_NORMS:
            raise ValueError(f"the MLP takes norm {', '.join(MLP_NORMS)}, got {norm!r}")
        self.in_features = in_features
        widths = [in_features] + [hidden] * (HIDDEN_LAYERS - 1) + [num_classes]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0:
                if norm == "bn":
                    layers.append(nn.BatchNorm1d(n_in))
                layers.append(nn.Sigmoid())
            if norm == "deconv":
                layers.append(ChannelDeconv(**(whitening or {})))
            layers.append(nn.Linear(n_in, n_out, bias=norm == "none"))
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)  # as the reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"the MLP takes {self.in_features} input values per image (1 x 28 x 28), "
                             f"got {x.shape[1]}")
        return self.layers(x)
