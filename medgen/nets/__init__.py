"""Complete networks assembled from :mod:`medgen.nn` blocks."""

from medgen.nets.autoencoder import AutoencoderKLNet, Decoder, Encoder
from medgen.nets.diffusion_unet import DiffusionUNet
from medgen.nets.gan import DCGANDiscriminator, DCGANGenerator, WGANCritic
from medgen.nets.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
from medgen.nets.translation import (
    NLayerDiscriminator,
    PixelDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    init_weights,
    receptive_field,
)
from medgen.nets.vae import VAENet
from medgen.nets.vqgan import VQGANNet

__all__ = [
    "AutoencoderKLNet",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "Decoder",
    "DiffusionUNet",
    "Encoder",
    "NLayerDiscriminator",
    "PixelDiscriminator",
    "ResnetGenerator",
    "StyleGAN2Discriminator",
    "StyleGAN2Generator",
    "UnetGenerator",
    "VAENet",
    "VQGANNet",
    "WGANCritic",
    "init_weights",
    "receptive_field",
]
