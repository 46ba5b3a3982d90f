"""LightningModules, one file per model family."""

from medgen.models.aggrgan import AGGrGAN
from medgen.models.base import GenerativeModule
from medgen.models.gan import GAN
from medgen.models.translation import CycleGAN, Pix2Pix
from medgen.models.vae import VAE

__all__ = ["AGGrGAN", "CycleGAN", "GAN", "Pix2Pix", "VAE", "GenerativeModule"]
