"""medgen: generative models for medical imaging.

Quick start::

    import medgen
    cfg = medgen.compose("train", overrides=["experiment=quickstart"])
    result = medgen.train(cfg)
    model = medgen.load(result["model_dir"])
    images = model.sample(8, seed=0)
"""

from __future__ import annotations

__version__ = "0.1.0"

from medgen.api import compose, evaluate, sample, train, write_samples
from medgen.pretrained import CheckpointError, load

__all__ = [
    "CheckpointError",
    "__version__",
    "compose",
    "evaluate",
    "load",
    "sample",
    "train",
    "write_samples",
]
