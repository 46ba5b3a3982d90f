"""Feature extractors and local-weight loading, shared by the metrics and the perceptual losses.

- :mod:`~medgen.features.weights`: find a local weights file, check its SHA-256, read its state
  dict with ``torch.load(weights_only=True)`` or safetensors; errors name the file. Nothing
  downloads.
- :mod:`~medgen.features.imagenet`: the ImageNet mean and std torchvision's classifiers expect.
- :mod:`~medgen.features.extractors`: ``(B, C, *spatial) -> (B, F)`` extractors for FID / KID:
  :class:`PixelFeatures`, :class:`RandomConvFeatures`, :class:`TorchvisionFeatures`.
- :mod:`~medgen.features.vgg`: :class:`VGGFeatures`, VGG-16/19 feature maps by layer name, for
  perceptual and style losses.
"""

from medgen.features.extractors import PixelFeatures, RandomConvFeatures, TorchvisionFeatures
from medgen.features.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_mean_std
from medgen.features.vgg import DEFAULT_LAYERS, VGGFeatures, resolve_layer
from medgen.features.weights import (
    check_sha256,
    file_sha256,
    load_state_dict,
    local_weights_file,
    offline_instructions,
)

__all__ = [
    "DEFAULT_LAYERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PixelFeatures",
    "RandomConvFeatures",
    "TorchvisionFeatures",
    "VGGFeatures",
    "check_sha256",
    "file_sha256",
    "imagenet_mean_std",
    "load_state_dict",
    "local_weights_file",
    "offline_instructions",
    "resolve_layer",
]
