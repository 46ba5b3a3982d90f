"""LightningModules, one file per model family."""

from medgen.models.aggrgan import AGGrGAN
from medgen.models.autoencoder import VQGAN, AutoencoderKL
from medgen.models.base import GenerativeModule
from medgen.models.diffusion import Diffusion
from medgen.models.gan import GAN
from medgen.models.stylegan2 import StyleGAN2
from medgen.models.translation import CycleGAN, Pix2Pix
from medgen.models.vae import VAE

__all__ = [
    "AGGrGAN",
    "AutoencoderKL",
    "VQGAN",
    "CycleGAN",
    "Diffusion",
    "GAN",
    "Pix2Pix",
    "StyleGAN2",
    "VAE",
    "GenerativeModule",
]
