"""Models from the ``model:`` config section: segmentation (DeepLabV3, DeepLabV3+ and FCN on smp encoders)
and classification (the paper's CIFAR networks, torchvision and timm classifiers), with any ``model.norm``
(BatchNorm, deconvolution, GroupNorm, IterNorm, ChannelDeconv or none) in the whole model alike."""

from seg.models.build import ARCHS, build_model, init_head, model_from_checkpoint
from seg.models.classification import build_classifier, is_classification_arch, load_classifier_weights
from seg.models.dilation import contract_dilation
from seg.models.heads import DecoderHead, FCNHead
from seg.models.segmenter import Segmenter
from seg.models.weights import load_pretrained

__all__ = [
    "ARCHS",
    "DecoderHead",
    "FCNHead",
    "Segmenter",
    "build_classifier",
    "build_model",
    "contract_dilation",
    "init_head",
    "is_classification_arch",
    "load_classifier_weights",
    "load_pretrained",
    "model_from_checkpoint",
]
