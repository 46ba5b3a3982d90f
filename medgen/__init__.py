"""medgen: generative models for medical imaging.

Quick start::

    import medgen
    cfg = medgen.compose("train", overrides=["experiment=quickstart"])
    result = medgen.train(cfg)
    model = medgen.load(result["model_dir"])
    images = model.sample(8, seed=0)
"""

from __future__ import annotations

import importlib
from typing import Any

from medgen.finetune.adapters import load  # medgen.load: exports, checkpoints, adapters
from medgen.pretrained import CheckpointError
from medgen.version import __version__

_RUNS = ("compose", "encode", "evaluate", "list_experiments", "sample", "train", "write_samples")
_SUBPACKAGES = (
    "api",
    "callbacks",
    "data",
    "diffusion",
    "inference",
    "losses",
    "metrics",
    "models",
    "nets",
    "nn",
    "runs",
    "utils",
    "viz",
)


def __getattr__(name: str) -> Any:
    # The runs and subpackages load on first use, so that ``import medgen`` stays light.
    if name in _RUNS:
        return getattr(importlib.import_module("medgen.runs"), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"medgen.{name}")
    raise AttributeError(f"module 'medgen' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "__version__",
    "compose",
    "encode",
    "evaluate",
    "list_experiments",
    "load",
    "sample",
    "train",
    "write_samples",
]
