"""Models from the ``model:`` config section: segmentation (DeepLabV3, DeepLabV3+ and FCN on smp encoders)
and classification (the paper's CIFAR networks, torchvision and timm classifiers), with any ``model.norm``
(BatchNorm, deconvolution, GroupNorm, IterNorm, ChannelDeconv or none) in the whole model alike."""

from seg.models.build import build_model, model_from_checkpoint
from seg.models.dilation import contract_dilation
from seg.models.segmenter import Segmenter

__all__ = ["Segmenter", "build_model", "contract_dilation", "model_from_checkpoint"]
