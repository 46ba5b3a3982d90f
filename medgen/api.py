"""The runs behind the command line, importable: compose, train, sample, evaluate, encode.

A thin re-export of :mod:`medgen.runs` (one module per job), loaded on first use. From a
notebook::

    import medgen
    cfg = medgen.compose("train", overrides=["experiment=quickstart", "trainer.max_epochs=1"])
    result = medgen.train(cfg)
    model = medgen.load(result["model_dir"])
"""

from __future__ import annotations

import importlib
from typing import Any

from medgen.finetune.adapters import load as load
from medgen.pretrained import CheckpointError as CheckpointError

#: Public name -> module that defines it.
_EXPORTS = {
    **dict.fromkeys(
        (
            "LEGACY_TILING_KEYS",
            "compose",
            "encode",
            "evaluate",
            "list_configs",
            "list_experiments",
            "read_references",
            "sample",
            "tiling_from_config",
            "train",
            "write_samples",
        ),
        "medgen.runs",
    ),
    "write_images": "medgen.data.outputs",
}

__all__ = sorted([*_EXPORTS, "CheckpointError", "load"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medgen.api' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
