"""Losses: the method math that LightningModules combine."""

from medgen.losses.adversarial import (
    ADV_LOSSES,
    AdversarialObjective,
    adversarial_loss,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    r1_penalty,
    resolve_adv_loss,
)
from medgen.losses.perceptual import PerceptualLoss, VGGFeatures, gram_matrix
from medgen.losses.pyramid import PyramidL1Loss

__all__ = [
    "ADV_LOSSES",
    "AdversarialObjective",
    "PerceptualLoss",
    "PyramidL1Loss",
    "VGGFeatures",
    "adversarial_loss",
    "discriminator_loss",
    "generator_loss",
    "gradient_penalty",
    "gram_matrix",
    "r1_penalty",
    "resolve_adv_loss",
]
