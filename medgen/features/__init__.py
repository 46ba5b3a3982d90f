"""Feature extractors and local-weight loading, shared by the metrics and the perceptual losses.

- :mod:`~medgen.features.weights`: find a local weights file, check its SHA-256, read its state
  dict with ``torch.load(weights_only=True)`` or safetensors; errors name the file. Nothing
  downloads.
- :mod:`~medgen.features.imagenet`: the ImageNet mean and std torchvision's classifiers expect.
- :mod:`~medgen.features.extractors`: ``(B, C, *spatial) -> (B, F)`` extractors for FID / KID:
  :class:`PixelFeatures`, :class:`RandomConvFeatures`, :class:`TorchvisionFeatures`.
- :mod:`~medgen.features.vgg`: :class:`VGGFeatures`, VGG-16/19 feature maps by layer name, for
  perceptual and style losses.
- :mod:`~medgen.features.resnets`: :class:`RadImageNetFeatures` (2D, MAISI's 2.5D FID) and
  :class:`MedicalNetFeatures` (3D ResNet-10/18/50), loading the upstream state dicts.
- :mod:`~medgen.features.dinov2`: :class:`DINOv2Features` (FD_DINOv2) from a torch.hub-format file.
- :mod:`~medgen.features.inception`: :class:`TFInceptionFeatures`, the FID-standard TF-Inception.
- :mod:`~medgen.features.registry`: :func:`build_extractor` by name, with a comparability record.
"""

from medgen.features.dinov2 import DINOv2Features, DINOv2ViT
from medgen.features.extractors import PixelFeatures, RandomConvFeatures, TorchvisionFeatures
from medgen.features.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_mean_std
from medgen.features.inception import TFInceptionFeatures
from medgen.features.registry import EXTRACTORS, WEIGHT_FILES, build_extractor
from medgen.features.resnets import (
    MedicalNetFeatures,
    MedicalNetResNet,
    RadImageNetFeatures,
    RadImageNetResNet50,
)
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
    "DINOv2Features",
    "DINOv2ViT",
    "EXTRACTORS",
    "MedicalNetFeatures",
    "MedicalNetResNet",
    "RadImageNetFeatures",
    "RadImageNetResNet50",
    "TFInceptionFeatures",
    "WEIGHT_FILES",
    "build_extractor",
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
