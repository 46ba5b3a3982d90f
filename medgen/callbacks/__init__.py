"""Lightning callbacks: EMA of one submodule, image/volume logging, RNG state, numerical guard."""

from medgen.callbacks.csv_logger import CSVLogger
from medgen.callbacks.ema import EMA
from medgen.callbacks.fidelity import FidelityMonitor
from medgen.callbacks.guard import NonFiniteError, NumericalGuard
from medgen.callbacks.image_logger import ImageLogger
from medgen.callbacks.preemption import Preemption
from medgen.callbacks.progress import ProgressBar
from medgen.callbacks.rng import RNGState

__all__ = [
    "CSVLogger",
    "EMA",
    "FidelityMonitor",
    "ImageLogger",
    "NonFiniteError",
    "NumericalGuard",
    "Preemption",
    "ProgressBar",
    "RNGState",
]
