"""The classification task's model builders (not the task: :mod:`seg.tasks.classification`), from the
``model:`` config section: the paper's CIFAR networks, torchvision or timm models.

``model.arch`` chooses the family (every classifier's ``forward(x)`` returns logits N x ``num_classes``):

* a CIFAR architecture of the paper (:data:`seg.models.cifar.CIFAR_ARCHS`: vgg11/13/16/19, resnet18/34/50 and
  the rest of Table 1: preact_resnet18, densenet121, resnext29_32x4d, mobilenetv2, dpn92, pnasnet_a/b, senet18,
  efficientnet_b0), built layer for layer as the reference's ``main.py`` does
  (:func:`seg.models.cifar.build_cifar_model`).
  ``norm: deconv`` and ``bn`` are the reference's models; every other ``model.norm`` replaces the BatchNorm
  layers of the ``bn`` model through the same :data:`seg.models.norms.NORM_APPLIERS` segmentation uses.
  ``model.block_fc`` / ``model.fc_whitening`` give the reference's classifier whitening.
* ``mlp``: the paper's MNIST / Fashion-MNIST network (:mod:`seg.models.mlp`; 784-128-128-classes with sigmoids),
  ``model.norm`` none, bn or deconv (a ``ChannelDeconv`` with the ``model.channel_deconv`` settings before every
  ``Linear``), as the reference's ``--arch mlp --method 1/2/3``.
* ``tv:<name>``: ``torchvision.models.get_model(name, weights=None, num_classes=...)`` (e.g. ``tv:resnet50``,
  the paper's ImageNet models), then ``model.norm`` applied as for segmentation: ``deconv`` runs
  :func:`seg.nn.deconvolve` with the ``model.deconv`` settings (stem settings on the conv that sees the image).
* ``timm:<name>``: ``timm.create_model(name, pretrained=False, num_classes=...)``, the same way.

For ``tv:``/``timm:`` models ``block_fc > 0`` turns the final ``nn.Linear`` into a ``Delinear`` with that
block (the reference's ImageNet ``--delinear`` default); ``fc_whitening: channel_deconv`` exists only for
the CIFAR architectures. Nothing is downloaded; ``model.pretrained`` loads local whole-model weights.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from seg.checkpoint import read_weights
from seg.config import ConfigError, DeconvConfig, ModelConfig
from seg.models.cifar import CIFAR_ARCHS, build_cifar_model
from seg.models.mlp import MLP, MLP_NORMS
from seg.models.norms import NORM_APPLIERS, sync_statistics
from seg.models.weights import check_keys
from seg.nn import Delinear

PREFIXES = ("tv:", "timm:")
MLP_ARCHS = ("mlp",)  # the paper's MNIST / Fashion-MNIST network
ARCH_EXAMPLES = (f"{', '.join(CIFAR_ARCHS)} (the paper's CIFAR networks), mlp (its MNIST network), "
                 "tv:<torchvision model> (e.g. tv:resnet18, tv:resnet50) or timm:<timm model> (e.g. timm:resnet50, "
                 "timm:densenet121)")
# model.deconv fields build_cifar_model takes; ``sync`` comes from the build's decision and ``classifier``
# (the segmentation heads' 1x1 classifier) has no counterpart here (model.block_fc is the classifier's).
CIFAR_DECONV_FIELDS = frozenset({"block", "sampling_stride", "n_iter", "eps", "momentum"})
_NOT_CIFAR = frozenset({"sync", "classifier"})


def _check_cifar_deconv(d: DeconvConfig) -> None:
    """The CIFAR networks follow the reference's fixed rules for what build_cifar_model does not take: the
    stems it freezes (VGG's with 15 iterations; most Table 1 networks' with 10, SENet's with 15; ResNet's and
    DenseNet's not), the settings it pins per layer (grouped and depthwise convs), the reference operator. A
    changed setting that would be ignored is an error instead."""
    default = DeconvConfig()
    ignored = [
        f"model.deconv.{f.name}={getattr(d, f.name)!r}"
        for f in dataclasses.fields(d)
        if f.name not in CIFAR_DECONV_FIELDS | _NOT_CIFAR and getattr(d, f.name) != getattr(default, f.name)
    ]
    if ignored:
        raise ConfigError(
            f"{', '.join(ignored)}: not available for the CIFAR architectures, which follow the reference "
            f"(model.deconv takes only {', '.join(sorted(CIFAR_DECONV_FIELDS))} there); leave these at their "
            "defaults, or use a tv:/timm: model, where every model.deconv setting applies"
        )


def _cifar(cfg: ModelConfig, sync: bool) -> nn.Module:
    d = cfg.deconv
    settings = {k: getattr(d, k) for k in CIFAR_DECONV_FIELDS}
    if cfg.norm == "deconv":
        _check_cifar_deconv(d)
    norm = "deconv" if cfg.norm == "deconv" else "bn"
    try:
        model = build_cifar_model(cfg.arch, cfg.num_classes, norm, **settings, sync=sync,
                                  block_fc=cfg.block_fc, fc_whitening=cfg.fc_whitening)
    except ValueError as e:  # e.g. a ChannelDeconv block larger than the features it whitens
        raise ConfigError(f"model.arch={cfg.arch!r} with model.block_fc={cfg.block_fc}: {e}") from e
    if norm == "deconv":
        # The reference's own model. Where it keeps BatchNorm layers (EfficientNet-B0's blocks) they normalise
        # as a bn model's do (SyncBatchNorm when the statistics sync on CUDA).
        keeps_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        return NORM_APPLIERS["bn"](model, cfg, sync) if keeps_bn else model
    # Every other norm replaces the BatchNorm layers of the bn model.
    return NORM_APPLIERS[cfg.norm](model, cfg, sync)


def _mlp(cfg: ModelConfig, sync: bool) -> nn.Module:
    if cfg.norm not in MLP_NORMS:
        raise ConfigError(f"key 'model.norm' has value {cfg.norm!r}; model.arch 'mlp' (the reference's --method "
                          f"1/2/3) takes one of {', '.join(MLP_NORMS)}")
    if cfg.block_fc > 0:
        raise ConfigError(f"key 'model.block_fc' has value {cfg.block_fc}; model.arch 'mlp' has no separate "
                          "classifier whitening (norm deconv whitens every Linear's input already), expected 0")
    c = cfg.channel_deconv
    whitening = dict(block=c.block, eps=c.eps, n_iter=c.n_iter, momentum=c.momentum,
                     sampling_stride=c.sampling_stride, sync=sync)
    return MLP(cfg.num_classes, cfg.norm, whitening=whitening)


def _library_model(cfg: ModelConfig) -> nn.Module:
    library, _, name = cfg.arch.partition(":")
    if library == "tv":
        if name not in torchvision.models.list_models():
            raise ConfigError(f"key 'model.arch' has value {cfg.arch!r}: {name!r} is not a torchvision model "
                              "(torchvision.models.list_models(); e.g. tv:resnet18, tv:resnet50, tv:vgg11_bn)")
        return torchvision.models.get_model(name, weights=None, num_classes=cfg.num_classes)
    if not timm.is_model(name):
        raise ConfigError(f"key 'model.arch' has value {cfg.arch!r}: {name!r} is not a timm model "
                          "(timm.list_models(); e.g. timm:resnet50, timm:densenet121)")
    return timm.create_model(name, pretrained=False, num_classes=cfg.num_classes)


def _final_linear(model: nn.Module, num_classes: int) -> str | None:
    """The qualified name of the last ``nn.Linear`` with ``num_classes`` outputs (the classifier), or None."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and m.out_features == num_classes]
    return names[-1] if names else None


def _delinear_classifier(model: nn.Module, cfg: ModelConfig, sync: bool) -> nn.Module:
    """Replace the final Linear by a ``Delinear`` with block ``model.block_fc`` (same weights to start)."""
    if cfg.fc_whitening != "delinear":
        raise ConfigError(f"key 'model.fc_whitening' has value {cfg.fc_whitening!r}, which only the CIFAR "
                          f"architectures ({', '.join(CIFAR_ARCHS)}) support; {cfg.arch} takes 'delinear'")
    name = _final_linear(model, cfg.num_classes)
    if name is None:
        raise ConfigError(f"key 'model.block_fc' has value {cfg.block_fc}, but {cfg.arch} has no nn.Linear "
                          f"classifier with {cfg.num_classes} outputs to whiten; set model.block_fc=0")
    linear = model.get_submodule(name)
    d = cfg.deconv
    try:
        layer = Delinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         eps=d.eps, n_iter=d.n_iter, momentum=d.momentum, block=cfg.block_fc, sync=sync)
    except ValueError as e:
        raise ConfigError(f"key 'model.block_fc' has value {cfg.block_fc}: {e}") from e
    with torch.no_grad():
        layer.weight.copy_(linear.weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layer)
    return model


def build_classifier(cfg: ModelConfig, sync: bool) -> nn.Module:
    """The classifier described by ``cfg`` (see the module docstring); ``sync``: the build's decision on
    cross-process statistics (:func:`seg.models.norms.sync_statistics`).

    The model gets a ``config`` attribute (a copy of ``cfg``), as a segmentation model does. ``model.pretrained``
    is not read here (see :func:`load_classifier_weights`).
    """
    if cfg.arch in CIFAR_ARCHS:
        model = _cifar(cfg, sync)
    elif cfg.arch in MLP_ARCHS:
        model = _mlp(cfg, sync)
    elif cfg.arch.startswith(PREFIXES) and cfg.arch.partition(":")[2]:
        model = _library_model(cfg)
        if cfg.block_fc > 0:
            model = _delinear_classifier(model, cfg, sync)
        # The same conversion as a segmentation model's; deconv: every conv a FastDeconv with the model.deconv
        # settings, the stem settings on the conv that sees the image.
        model = NORM_APPLIERS[cfg.norm](model, cfg, sync)
    else:
        raise ConfigError(f"key 'model.arch' has value {cfg.arch!r}: not a classification model; expected "
                          f"{ARCH_EXAMPLES}")
    model.config = copy.deepcopy(cfg)
    return model


def load_classifier_weights(model: nn.Module, path: str | Path) -> None:
    """Load whole-model weights (a training checkpoint or a state_dict) into a classifier; every key must
    match (:class:`seg.checkpoint.CheckpointError` lists the ones that do not)."""
    state = read_weights(path, "model.pretrained weights file")
    check_keys(model, state, f"model.pretrained: classifier weights {path}")
    model.load_state_dict(state)


def build_classification_model(cfg: ModelConfig, *, load_pretrained: bool = True) -> nn.Module:
    """The classifier of ``cfg`` (:func:`build_classifier`, statistics synced under a process group), with the
    local ``model.pretrained`` weights when set and ``load_pretrained`` (off when a checkpoint supplies them)."""
    model = build_classifier(cfg, sync_statistics(cfg))
    if load_pretrained and cfg.pretrained:
        load_classifier_weights(model, cfg.pretrained)
    return model
