"""Complete networks assembled from :mod:`medgen.nn` blocks."""

from medgen.nets.autoencoder import Decoder, Encoder
from medgen.nets.diffusion_unet import DiffusionUNet
from medgen.nets.gan import DCGANDiscriminator, DCGANGenerator, WGANCritic
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
    "DCGANDiscriminator",
    "DCGANGenerator",
    "Decoder",
    "DiffusionUNet",
    "Encoder",
    "NLayerDiscriminator",
    "PixelDiscriminator",
    "ResnetGenerator",
    "UnetGenerator",
    "VAENet",
    "VQGANNet",
    "WGANCritic",
    "init_weights",
    "receptive_field",
]
