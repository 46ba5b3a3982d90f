"""Losses: the method math that LightningModules combine."""

from medgen.losses.perceptual import PerceptualLoss, VGGFeatures, gram_matrix
from medgen.losses.pyramid import PyramidL1Loss

__all__ = [
    "PerceptualLoss",
    "PyramidL1Loss",
    "VGGFeatures",
    "gram_matrix",
]
