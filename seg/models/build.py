"""``build_model``: a DeepLabV3 / DeepLabV3+ / FCN ``Segmenter`` from the ``model:`` config section.

Order matters: smp builds the encoder (its dilation patch rewrites ``nn.Conv2d`` at construction), the
heads are initialised, then the norm is applied (``deconvolve`` copies the conv weights, so both norms
start from the same weights for a given seed), and last the local pretrained weights are loaded, since
they must match the final layers (FastDeconv buffers or BatchNorm statistics).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import segmentation_models_pytorch as smp
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import convert_sync_batchnorm

from seg.config import ConfigError, DeconvConfig, ModelConfig
from seg.models.heads import DecoderHead, FCNHead
from seg.models.segmenter import Segmenter
from seg.models.weights import load_pretrained as load_pretrained_weights
from seg.nn import deconvolve

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
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _classifier_names(model: nn.Module) -> list[str]:
    return [
        n for n, m in model.named_modules() if n.split(".")[-1] == "classifier" and isinstance(m, nn.Conv2d)
    ]


def _apply_deconv(model: Segmenter, d: DeconvConfig) -> Segmenter:
    # Several processes: whiten with the statistics of the global batch, as SyncBatchNorm does.
    settings = dict(
        block=d.block, sampling_stride=d.sampling_stride, n_iter=d.n_iter, eps=d.eps, momentum=d.momentum,
        stem_n_iter=d.stem_n_iter, stem_freeze=d.stem_freeze, stem_freeze_iter=d.stem_freeze_iter,
        sync=d.sync or _world_size() > 1, stats_every=d.stats_every,
        matrix_grad=d.matrix_grad,
    )
    classifiers = _classifier_names(model)
    model = deconvolve(model, exclude=classifiers, **settings)
    if d.classifier:
        # The reference heads whiten all of the classifier's input channels together (block = C_in).
        for name in classifiers:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            conv = getattr(parent, attr)
            setattr(parent, attr, deconvolve(conv, **dict(settings, block=conv.in_channels)))
    return model


def _apply_bn(model: Segmenter) -> Segmenter:
    if _world_size() > 1:
        if torch.cuda.is_available():
            # timm's converter also handles its BatchNormAct2d (torch's would drop the activation).
            model = convert_sync_batchnorm(model)
        else:
            warnings.warn(
                "model.norm=bn with several processes on CPU: SyncBatchNorm does not run on CPU, so each "
                "process normalises with its own batch statistics",
                stacklevel=3,
            )
    return model


def build_model(cfg: ModelConfig, *, load_pretrained: bool = True) -> Segmenter:
    """Build the model described by ``cfg`` (the ``model:`` config section).

    Args:
        cfg: architecture, encoder, output stride, norm (``bn`` or ``deconv`` with ``cfg.deconv``
            settings), auxiliary head, classes and an optional local ``pretrained`` weights file.
        load_pretrained: read ``cfg.pretrained``; off when the weights come from elsewhere (a checkpoint).

    Returns:
        A :class:`Segmenter` whose ``forward(x)`` gives ``{'out': logits, 'aux': logits}`` (``aux`` only
        with ``cfg.aux_loss``) at the input resolution, and whose ``config`` is a copy of ``cfg``.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig, got {type(cfg).__name__}")
    _check_encoder(cfg.encoder)
    encoder, head = ARCHS[cfg.arch](cfg)
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
    model = _apply_deconv(model, cfg.deconv) if cfg.norm == "deconv" else _apply_bn(model)
    if load_pretrained and cfg.pretrained:
        load_pretrained_weights(model, cfg.pretrained)
    return model
