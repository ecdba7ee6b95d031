"""``build_model``: a DeepLabV3 / DeepLabV3+ / FCN ``Segmenter`` from the ``model:`` config section, and
``model_from_checkpoint``: the same model rebuilt from a training checkpoint.

Order matters: smp builds the encoder (its dilation patch rewrites ``nn.Conv2d`` at construction),
``contract_dilation`` gives a dilated ResNet torchvision's geometry, the heads are initialised, then
the norm is applied to the whole model (``deconvolve`` copies the conv weights and geometry, and the other
norms replace only the BatchNorm layers, so every norm starts from the same conv weights for a given seed),
and last the local pretrained weights are loaded, since they must match the final layers (FastDeconv
buffers or BatchNorm statistics).

``model.norm`` choices, each applied to the encoder and the heads alike (see :data:`NORMS`):

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
import dataclasses
import fnmatch
import inspect
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch.distributed as dist
import torch.nn as nn
from timm.layers import convert_sync_batchnorm

from seg.checkpoint import CheckpointError, load_checkpoint
from seg.config import SEGMENTATION_ARCHS, ConfigError, DeconvConfig, IterNormConfig, ModelConfig, from_dict
from seg.models.dilation import contract_dilation
from seg.models.heads import DecoderHead, FCNHead
from seg.models.segmenter import Segmenter
from seg.models.weights import check_keys
from seg.models.weights import load_pretrained as load_pretrained_weights
from seg.nn import ChannelDeconv, IterNorm, deconvolve
from seg.nn.convert import replace_batchnorm

logger = logging.getLogger(__name__)

# The auxiliary head reads the stride-16 stage: features[4] of an smp encoder (features[0] is the
# input), i.e. layer3 of a ResNet, as in torchvision and mmsegmentation.
AUX_FEATURE = 4
# ASPP dilation rates per output stride (DeepLabV3 paper: 6/12/18 at stride 16, doubled at stride 8).
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
DECODER_CHANNELS = 256
# Fields of ``model.deconv`` that the builder itself acts on; every other field is a ``deconvolve``
# keyword of the same name and is passed on as it is, so a new setting is not listed again here.
BUILDER_DECONV_FIELDS = frozenset({"classifier", "keep_bn"})


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


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _classifier_names(model: nn.Module) -> list[str]:
    return [
        n for n, m in model.named_modules() if n.split(".")[-1] == "classifier" and isinstance(m, nn.Conv2d)
    ]


def _keywords(section: Any, target: Callable, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A config section's fields (less ``skip``) as keywords of ``target``, which must accept them all."""
    settings = {k: v for k, v in dataclasses.asdict(section).items() if k not in skip}
    unknown = sorted(settings.keys() - inspect.signature(target).parameters.keys())
    if unknown:  # a config field nobody wired up: a bug, not a user error
        raise TypeError(f"{section._key} fields {unknown}: not {target.__name__}() keywords "
                        f"nor handled by the builder")
    return settings


def deconv_settings(d: DeconvConfig, *, sync: bool) -> dict[str, Any]:
    """The ``deconvolve`` keywords of a ``model.deconv`` section, with the build's ``sync`` decision."""
    return dict(_keywords(d, deconvolve, BUILDER_DECONV_FIELDS), sync=sync)


def iternorm_settings(c: IterNormConfig, *, sync: bool) -> dict[str, Any]:
    """The ``IterNorm`` keywords of a ``model.iternorm`` section, with the build's ``sync`` decision."""
    return dict(_keywords(c, IterNorm), sync=sync)


def gn_groups(channels: int, groups: int) -> int:
    """``groups`` if it divides ``channels``, else the largest number of groups below it that does."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def _sync_statistics(cfg: ModelConfig) -> bool:
    """Whether normalisation statistics span all processes; the one place this is decided.

    With several processes, always (the global batch, as SyncBatchNorm does): BatchNorm, FastDeconv,
    IterNorm, ChannelDeconv and Delinear act on it; GroupNorm and ``none`` have no batch statistics. In one
    process, only when ``model.deconv.sync`` asks for it (then the layers sync once a process group exists).
    """
    return _world_size() > 1 or (cfg.norm == "deconv" and cfg.deconv.sync)


def _apply_deconv(model: Segmenter, cfg: ModelConfig, sync: bool) -> Segmenter:
    d = cfg.deconv
    settings = deconv_settings(d, sync=sync)
    classifiers = _classifier_names(model)
    kept = _kept_batchnorms(model, d.keep_bn, cfg.arch)
    model = deconvolve(model, exclude=classifiers + kept, **settings)
    if d.classifier:
        # The reference heads whiten all of the classifier's input channels together (block = C_in).
        for name in classifiers:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            conv = getattr(parent, attr)
            setattr(parent, attr, deconvolve(conv, **dict(settings, block=conv.in_channels)))
    # The BatchNorms kept normalise like those of a bn model, over all processes when the statistics sync.
    return _apply_bn(model, cfg, sync) if kept else model


def _kept_batchnorms(model: nn.Module, patterns: list[str], arch: str) -> list[str]:
    """Names of the BatchNorm layers that ``model.deconv.keep_bn`` keeps; a pattern matching none is an error."""
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = []
    for pattern in patterns:
        found = [n for n in norms if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            raise ConfigError(f"key 'model.deconv.keep_bn' has pattern {pattern!r}, which matches no BatchNorm "
                              f"layer of {arch}; its BatchNorm layers are named like {norms[:3]}")
        kept += [n for n in found if n not in kept]
    return kept


def _group_on_cuda() -> bool:
    """Whether the process group reduces CUDA tensors (NCCL): ``init_distributed`` makes one for ``--device cuda``
    and a gloo group for ``cpu``, so this follows the run's chosen device, not the machine
    (``torch.cuda.is_available()`` is also true for a CPU run on a GPU machine, where SyncBatchNorm fails)."""
    return dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend())


def _apply_bn(model: Segmenter, cfg: ModelConfig, sync: bool) -> Segmenter:
    if sync:
        if _group_on_cuda():
            # timm's converter also handles its BatchNormAct2d (torch's would drop the activation).
            model = convert_sync_batchnorm(model)
        else:
            warnings.warn(
                "model.norm=bn with several processes on CPU: SyncBatchNorm does not run on CPU, so each "
                "process normalises with its own batch statistics",
                stacklevel=3,
            )
    return model


def _apply_gn(model: Segmenter, cfg: ModelConfig, sync: bool) -> Segmenter:
    fewer: dict[int, int] = {}  # channels -> groups, where model.gn_groups does not divide them

    def make(channels: int) -> nn.GroupNorm:
        groups = gn_groups(channels, cfg.gn_groups)
        if groups != cfg.gn_groups:
            fewer[channels] = groups
        return nn.GroupNorm(groups, channels)

    model = replace_batchnorm(model, make)
    if fewer:
        logger.info("model.gn_groups=%d does not divide every layer: channels -> groups %s", cfg.gn_groups, fewer)
    return model


def _apply_iternorm(model: Segmenter, cfg: ModelConfig, sync: bool) -> Segmenter:
    settings = iternorm_settings(cfg.iternorm, sync=sync)
    return replace_batchnorm(model, lambda channels: IterNorm(channels, **settings))


def _apply_channel_deconv(model: Segmenter, cfg: ModelConfig, sync: bool) -> Segmenter:
    settings = dict(_keywords(cfg.channel_deconv, ChannelDeconv), sync=sync)
    # Fewer channels than the block: whiten them all together (the reference's heads use block = C).
    return replace_batchnorm(model, lambda c: ChannelDeconv(**dict(settings, block=min(settings["block"], c))))


def _apply_none(model: Segmenter, cfg: ModelConfig, sync: bool) -> Segmenter:
    # Without a norm after it, a conv needs its own bias (the norm's shift did that job).
    return replace_batchnorm(model, None, conv_bias=True)


# model.norm -> what turns the model built with the libraries' BatchNorm into that norm's model.
NORMS: dict[str, Callable[[Segmenter, ModelConfig, bool], Segmenter]] = {
    "bn": _apply_bn,
    "deconv": _apply_deconv,
    "gn": _apply_gn,
    "iternorm": _apply_iternorm,
    "channel_deconv": _apply_channel_deconv,
    "none": _apply_none,
}


def build_model(cfg: ModelConfig, *, load_pretrained: bool = True) -> nn.Module:
    """Build the model described by ``cfg`` (the ``model:`` config section).

    Args:
        cfg: architecture, encoder, output stride, norm (one of :data:`NORMS`, with its section of
            settings), auxiliary head, classes and an optional local ``pretrained`` weights file.
        load_pretrained: read ``cfg.pretrained``; off when the weights come from elsewhere (a checkpoint).

    Returns:
        A :class:`Segmenter` whose ``forward(x)`` gives ``{'out': logits, 'aux': logits}`` (``aux`` only
        with ``cfg.aux_loss``) at the input resolution, and whose ``config`` is a copy of ``cfg``. When
        ``cfg.arch`` is not a segmentation architecture, the classifier of
        :func:`seg.models.classification.build_classifier` (logits N x classes; ``config`` too).
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig, got {type(cfg).__name__}")
    if cfg.arch not in SEGMENTATION_ARCHS:
        # Classifiers (seg.models.classification imports NORMS from here, hence the late import).
        from seg.models.classification import build_classifier, load_classifier_weights

        model = build_classifier(cfg, _sync_statistics(cfg))
        if load_pretrained and cfg.pretrained:
            load_classifier_weights(model, cfg.pretrained)
        return model
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
    model = NORMS[cfg.norm](model, cfg, _sync_statistics(cfg))
    if load_pretrained and cfg.pretrained:
        load_pretrained_weights(model, cfg.pretrained)
    return model


def model_from_checkpoint(
    checkpoint: Mapping[str, Any] | str | Path, *, source: str | None = None
) -> nn.Module:
    """Rebuild the model recorded in a training checkpoint and load its weights.

    ``model.pretrained`` is not read again (the checkpoint already holds the trained weights); whether
    statistics are synced is decided anew by :func:`build_model` for the current launch.

    Args:
        checkpoint: a checkpoint file (read with :func:`seg.checkpoint.load_checkpoint`) or its
            already-loaded contents, a mapping with ``model`` (a state_dict) and ``config``.
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
    model = build_model(cfg.model, load_pretrained=False)
    state = {k.removeprefix("module."): v for k, v in checkpoint["model"].items()}
    check_keys(model, state, source)
    model.load_state_dict(state)
    return model
