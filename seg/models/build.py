"""``build_model``: the segmentation model of the ``model:`` config section (a DeepLabV3 / DeepLabV3+ / FCN
``Segmenter``; classifiers are :mod:`seg.models.classifiers`'s), and ``model_from_checkpoint``: any task's
model rebuilt from a training checkpoint.

Order matters: smp builds the encoder (its dilation patch rewrites ``nn.Conv2d`` at construction),
``contract_dilation`` gives a dilated ResNet torchvision's geometry, the heads are initialised, then
the norm is applied to the whole model (``deconvolve`` copies the conv weights and geometry, and the other
norms replace only the BatchNorm layers, so every norm starts from the same conv weights for a given seed),
and last the local pretrained weights are loaded, since they must match the final layers (FastDeconv
buffers or BatchNorm statistics).

``model.norm`` choices, each applied to the encoder and the heads alike (see :data:`seg.models.norms.NORM_APPLIERS`):

* ``bn``: BatchNorm as the libraries build it; SyncBatchNorm under a process group on CUDA.
* ``deconv``: every conv becomes a ``FastDeconv``, every BatchNorm is removed.
* ``gn``: ``GroupNorm`` with ``model.gn_groups`` groups, or, where those do not divide the channels, the
  largest number below that does (DeepLabV3+'s 48-channel skip projection gets 24 at the default 32).
* ``iternorm``: ``IterNorm`` with the ``model.iternorm`` settings.
* ``channel_deconv``: the reference's ``ChannelDeconv`` (channel-only whitening, no affine) with the
  ``model.channel_deconv`` settings; a layer with fewer channels than ``block`` whitens all of them
  together, as the reference's heads do (block = channels).
* ``none``: BatchNorm removed and every conv given a (zero-initialised) bias: the paper's "Original".
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch.nn as nn

from seg.checkpoint import CheckpointError, load_checkpoint
from seg.config import Config, ConfigError, ModelConfig, check_choice, from_dict
from seg.models.dilation import contract_dilation
from seg.models.heads import DecoderHead, FCNHead
from seg.models.norms import NORM_APPLIERS, sync_statistics
from seg.models.segmenter import Segmenter
from seg.models.weights import check_keys
from seg.models.weights import load_pretrained as load_pretrained_weights
from seg.nn import IterNorm

# The auxiliary head reads the stride-16 stage: features[4] of an smp encoder (features[0] is the
# input), i.e. layer3 of a ResNet, as in torchvision and mmsegmentation.
AUX_FEATURE = 4
# ASPP dilation rates per output stride (DeepLabV3 paper: 6/12/18 at stride 16, doubled at stride 8).
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
DECODER_CHANNELS = 256

def _check_encoder(name: str) -> None:
    known = timm.is_model(name[3:]) if name.startswith("tu-") else name in smp.encoders.get_encoder_names()
    if not known:
        raise ConfigError(
            f"key 'model.encoder' has value {name!r}: not an smp encoder "
            f"(e.g. resnet18, resnet50, resnet101) nor 'tu-<timm model>' (e.g. tu-resnet50d)"
        )


def _deeplab(cfg: ModelConfig, plus: bool) -> tuple[nn.Module, nn.Module]:
    cls = smp.DeepLabV3Plus if plus else smp.DeepLabV3
    net = cls(
        encoder_name=cfg.encoder,
        encoder_weights=None,  # never download; pretrained weights come from a local file
        encoder_output_stride=cfg.output_stride,
        decoder_channels=DECODER_CHANNELS,
        decoder_atrous_rates=ATROUS_RATES[cfg.output_stride],
        classes=cfg.num_classes,
    )
    # smp's segmentation head (conv + align_corners upsampling) is replaced by our classifier; the
    # Segmenter upsamples the logits itself.
    return net.encoder, DecoderHead(net.decoder, DECODER_CHANNELS, cfg.num_classes)


def _build_deeplabv3(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    return _deeplab(cfg, plus=False)


def _build_deeplabv3plus(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    return _deeplab(cfg, plus=True)


def _build_fcn(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    encoder = smp.encoders.get_encoder(cfg.encoder, weights=None, output_stride=cfg.output_stride)
    return encoder, FCNHead(encoder.out_channels[-1], cfg.num_classes)


ARCHS: dict[str, Callable[[ModelConfig], tuple[nn.Module, nn.Module]]] = {
    "deeplabv3": _build_deeplabv3,
    "deeplabv3plus": _build_deeplabv3plus,
    "fcn": _build_fcn,
}


def init_head(head: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), zero biases, unit norms, small-normal classifiers.

    Encoders keep their library's initialisation (torchvision/timm ResNets use this same rule); smp's
    DeepLabV3 never calls its own ``initialize()``, so the heads are initialised here explicitly.
    """
    for name, m in head.named_modules():
        if isinstance(m, nn.Conv2d):
            if name.split(".")[-1] == "classifier":
                nn.init.normal_(m.weight, std=0.01)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, IterNorm)):
            if getattr(m, "weight", None) is not None:  # affine=False layers have none
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def build_model(cfg: ModelConfig, *, load_pretrained: bool = True) -> nn.Module:
    """Build the segmentation model described by ``cfg`` (the ``model:`` config section).

    Args:
        cfg: architecture, encoder, output stride, norm (one of :data:`seg.models.norms.NORM_APPLIERS`, with
            its section of settings), auxiliary head, classes and an optional local ``pretrained`` weights file.
        load_pretrained: read ``cfg.pretrained``; off when the weights come from elsewhere (a checkpoint).

    Returns:
        A :class:`Segmenter` whose ``forward(x)`` gives ``{'out': logits, 'aux': logits}`` (``aux`` only
        with ``cfg.aux_loss``) at the input resolution, and whose ``config`` is a copy of ``cfg``.

    Raises:
        ConfigError: ``cfg.arch`` is not one of :data:`ARCHS` (the segmentation task's rule), or the encoder
            does not fit.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig, got {type(cfg).__name__}")
    check_choice("model.arch", cfg.arch, ARCHS)
    _check_encoder(cfg.encoder)
    encoder, head = ARCHS[cfg.arch](cfg)
    # Before the norm is applied, so that BatchNorm and FastDeconv models get the same geometry.
    contract_dilation(encoder, cfg.output_stride)
    # features[0] is the input, then one entry per stage; five stages are needed.
    if len(encoder.out_channels) < AUX_FEATURE + 2 or encoder.output_stride != cfg.output_stride:
        raise ConfigError(
            f"key 'model.encoder' has value {cfg.encoder!r}: it gives {len(encoder.out_channels) - 1} stages "
            f"at output stride {encoder.output_stride}; five stages at stride {cfg.output_stride} are needed"
        )
    aux_head = None
    if cfg.aux_loss:
        aux_head = FCNHead(encoder.out_channels[AUX_FEATURE], cfg.num_classes, feature_index=AUX_FEATURE)
    for module in (head, aux_head):
        if module is not None:
            init_head(module)
    model = Segmenter(encoder, head, aux_head, size_divisor=encoder.output_stride, config=copy.deepcopy(cfg))
    model = NORM_APPLIERS[cfg.norm](model, cfg, sync_statistics(cfg))
    if load_pretrained and cfg.pretrained:
        load_pretrained_weights(model, cfg.pretrained)
    return model


def model_from_checkpoint(
    checkpoint: Mapping[str, Any] | str | Path,
    build: Callable[[Config], nn.Module],
    *,
    source: str | None = None,
) -> nn.Module:
    """Rebuild the model recorded in a training checkpoint and load its weights.

    ``model.pretrained`` is not read again (the checkpoint already holds the trained weights); whether
    statistics are synced is decided anew by the builder for the current launch.

    Args:
        checkpoint: a checkpoint file (read with :func:`seg.checkpoint.load_checkpoint`) or its
            already-loaded contents, a mapping with ``model`` (a state_dict) and ``config``.
        build: the stored config -> the untrained model, without ``model.pretrained``; the stored task's
            builder, :func:`seg.tasks.untrained_model` (or ``build_model(cfg.model, load_pretrained=False)`` for
            a segmentation model).
        source: how errors name an already-loaded checkpoint, e.g. the file it came from.

    Returns:
        The model in training mode, on the CPU.

    Raises:
        CheckpointError: the file is missing or unreadable, is not a training checkpoint, its stored
            config is invalid, or its weights do not match the model the config describes.
    """
    if isinstance(checkpoint, (str, Path)):
        source = source or str(checkpoint)
        checkpoint = load_checkpoint(checkpoint)
    source = source or "checkpoint"
    if not isinstance(checkpoint, Mapping):
        kind = type(checkpoint).__name__
        raise CheckpointError(f"{source}: not a training checkpoint (expected a mapping, got {kind})")
    for key in ("model", "config"):
        if key not in checkpoint:
            raise CheckpointError(f"{source}: not a training checkpoint, key '{key}' is missing")
    for key in ("model", "config"):
        if not isinstance(checkpoint[key], Mapping):
            kind = type(checkpoint[key]).__name__
            raise CheckpointError(f"{source}: key '{key}' holds a {kind}, expected a mapping")
    try:
        cfg = from_dict(dict(checkpoint["config"]), f"{source} (stored config)")
    except ConfigError as e:  # e.g. a checkpoint of an older version with keys that no longer exist
        raise CheckpointError(str(e)) from e
    model = build(cfg)
    state = {k.removeprefix("module."): v for k, v in checkpoint["model"].items()}
    check_keys(model, state, source)
    model.load_state_dict(state)
    return model
