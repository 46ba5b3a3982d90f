"""Complete networks assembled from :mod:`medgen.nn` blocks."""

from medgen.nets.autoencoder import Decoder, Encoder
from medgen.nets.vae import VAENet

__all__ = ["Decoder", "Encoder", "VAENet"]
