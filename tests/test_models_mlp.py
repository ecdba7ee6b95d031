"""The paper's MNIST network (seg/models/mlp.py) against the reference's ``models/simple.py`` MLP
(``--arch mlp``, hidden_nodes=128, hidden_layers=3) for ``--method 1/2/3``, built through ``model:``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from seg.config import ConfigError, ModelConfig, load_config
from seg.models.classifiers import build_classification_model as build_model
from seg.nn import ChannelDeconv

# The reference's layer sequence per --method (models/simple.py, MLP.__init__ with input_nodes=784,
# hidden_nodes=128, hidden_layers=3, num_outputs=10), one entry per module in forward order.
REFERENCE = {
    "none": ["Linear(784,128,bias)", "Sigmoid", "Linear(128,128,bias)", "Sigmoid", "Linear(128,10,bias)"],
    "bn": ["Linear(784,128)", "BatchNorm1d(128)", "Sigmoid", "Linear(128,128)", "BatchNorm1d(128)", "Sigmoid",
           "Linear(128,10)"],
    "deconv": ["ChannelDeconv(32)", "Linear(784,128)", "Sigmoid", "ChannelDeconv(32)", "Linear(128,128)", "Sigmoid",
               "ChannelDeconv(32)", "Linear(128,10)"],
}


def _signature(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features},{m.out_features}{',bias' if m.bias is not None else ''})"
    if isinstance(m, nn.BatchNorm1d):
        return f"BatchNorm1d({m.num_features})"
    if isinstance(m, ChannelDeconv):
        return f"ChannelDeconv({m.block})"
    return type(m).__name__


def _mlp(norm: str, **changes) -> nn.Module:
    cfg = load_config("configs/mnist/base.yaml", [f"model.norm={norm}"]).model
    return build_model(dataclasses.replace(cfg, **changes))


@pytest.mark.parametrize("norm", sorted(REFERENCE))
def test_layers_match_the_reference_method(norm: str) -> None:
    model = _mlp(norm)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert [_signature(m) for m in leaves] == REFERENCE[norm]
    for m in leaves:
        if isinstance(m, ChannelDeconv):  # the reference's ChannelDeconv defaults
            assert (m.eps, m.n_iter, m.momentum) == (1e-2, 5, 0.1)
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert not m.bias.any()  # the reference zeroes every bias
    linear = (784 * 128 + 128 * 128 + 128 * 10)
    params = {"none": linear + 128 + 128 + 10, "bn": linear + 2 * 2 * 128, "deconv": linear}[norm]
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("norm", sorted(REFERENCE))
def test_forward_backward_on_a_batch_of_images(norm: str) -> None:
    torch.manual_seed(0)
    model = _mlp(norm)
    x = torch.randn(64, 1, 28, 28)
    out = model(x)
    assert out.shape == (64, 10)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x[:3])).all()
    with pytest.raises(ValueError, match="784 input values"):
        model(torch.randn(2, 3, 32, 32))


def test_other_norms_and_classifier_whitening_are_refused() -> None:
    for norm in ("gn", "iternorm", "channel_deconv"):
        with pytest.raises(ConfigError, match="model.norm.*mlp.*none, bn, deconv"):
            _mlp(norm)
    with pytest.raises(ConfigError, match="model.block_fc"):
        _mlp("deconv", block_fc=512)
    assert isinstance(build_model(ModelConfig(arch="mlp", norm="bn", num_classes=3)), nn.Module)
