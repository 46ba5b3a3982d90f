"""LightningModules, one file per model family."""

from medgen.models.base import GenerativeModule
from medgen.models.gan import GAN
from medgen.models.vae import VAE

__all__ = ["GAN", "VAE", "GenerativeModule"]
