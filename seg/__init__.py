"""deconvseg: network deconvolution instead of BatchNorm, for Cityscapes semantic segmentation and for the paper's
image classification runs (CIFAR, MNIST, ImageNet-style folders)."""

import os

# albumentations looks for a newer release over the network at import; nothing here may phone home.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
