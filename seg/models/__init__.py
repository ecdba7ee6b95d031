"""Segmentation models: DeepLabV3, DeepLabV3+ and FCN on smp encoders, with any ``model.norm`` (BatchNorm,
deconvolution, GroupNorm, IterNorm, ChannelDeconv or none) in the encoder and heads alike."""

from seg.models.build import ARCHS, build_model, init_head, model_from_checkpoint
from seg.models.dilation import contract_dilation
from seg.models.heads import DecoderHead, FCNHead
from seg.models.segmenter import Segmenter
from seg.models.weights import load_pretrained

__all__ = [
    "ARCHS",
    "DecoderHead",
    "FCNHead",
    "Segmenter",
    "build_model",
    "contract_dilation",
    "init_head",
    "load_pretrained",
    "model_from_checkpoint",
]
