"""Complete networks assembled from :mod:`medgen.nn` blocks."""

from medgen.nets.autoencoder import Decoder, Encoder
from medgen.nets.diffusion_unet import DiffusionUNet
from medgen.nets.translation import (
    NLayerDiscriminator,
    PixelDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    init_weights,
    receptive_field,
)
from medgen.nets.vae import VAENet

__all__ = [
    "Decoder",
    "DiffusionUNet",
    "Encoder",
    "NLayerDiscriminator",
    "PixelDiscriminator",
    "ResnetGenerator",
    "UnetGenerator",
    "VAENet",
    "init_weights",
    "receptive_field",
]
