"""Lightning callbacks: EMA of one submodule, image/volume logging, RNG state."""

from medgen.callbacks.ema import EMA
from medgen.callbacks.image_logger import ImageLogger
from medgen.callbacks.rng import RNGState

__all__ = ["EMA", "ImageLogger", "RNGState"]
