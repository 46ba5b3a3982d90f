"""The jobs behind the command line: train, sample, translate, encode, evaluate.

Each job is one module (``training``, ``sampling``, ``translation``, ``encoding``, ``evaluation``;
``composition`` composes configs); a job asks a model what it can do
(:meth:`medgen.models.GenerativeModule.supports`) rather than probing its attributes. Imports point
down only: ``runs`` uses models, data, inference and utilities, and nothing below imports it.
The names below load their module on first use, so ``import medgen`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> module of :mod:`medgen.runs` that defines it.
_EXPORTS = {
    "LEGACY_TILING_KEYS": "common",
    "tiling_from_config": "common",
    "compose": "composition",
    "register_resolvers": "composition",
    "encode": "encoding",
    "evaluate": "evaluation",
    "list_configs": "discovery",
    "list_experiments": "discovery",
    "read_references": "sampling",
    "sample": "sampling",
    "write_samples": "sampling",
    "train": "training",
    "translate": "translation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medgen.runs.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medgen.runs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
