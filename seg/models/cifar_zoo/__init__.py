"""The rest of the paper's CIFAR Table 1 networks, built as the reference's ``models/*.py`` build them.

Each builder is called as ``builder(num_classes, deconv=None | FastDeconv factory, classifier_layer=...)``
(:func:`seg.models.cifar.build_cifar_model` does this); each model has ``num_features`` (the classifier's
input), a ``channel_deconv`` placeholder (``nn.Identity``) where the reference applies its optional
``ChannelDeconv``, and the classifier as its last child.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from seg.models.cifar_zoo.densenet import densenet121
from seg.models.cifar_zoo.dpn import dpn92
from seg.models.cifar_zoo.efficientnet import efficientnet_b0
from seg.models.cifar_zoo.mobilenetv2 import mobilenetv2
from seg.models.cifar_zoo.pnasnet import pnasnet_a, pnasnet_b
from seg.models.cifar_zoo.preact import preact_resnet18
from seg.models.cifar_zoo.resnext import resnext29_32x4d
from seg.models.cifar_zoo.senet import senet18

__all__ = ["ZOO_ARCHS"]

# In the order of the paper's Table 1 (the reference's --arch names in comments).
ZOO_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": preact_resnet18,  # preact
    "densenet121": densenet121,  # densenet121
    "resnext29_32x4d": resnext29_32x4d,  # resnext
    "mobilenetv2": mobilenetv2,  # mobilev2
    "dpn92": dpn92,  # dpn
    "pnasnet_a": pnasnet_a,  # pnasnetA (the replication's PNASNet row)
    "pnasnet_b": pnasnet_b,  # pnasnetB
    "senet18": senet18,  # senet
    "efficientnet_b0": efficientnet_b0,  # efficient
}
