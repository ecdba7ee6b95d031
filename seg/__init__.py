"""deconvseg: Cityscapes semantic segmentation with network deconvolution instead of BatchNorm."""

import os

# albumentations looks for a newer release over the network at import; nothing here may phone home.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
