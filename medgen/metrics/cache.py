"""A disk cache of feature sets, so the real set's features are computed once per extractor.

The key is a SHA-256 over everything the features depend on: the extractor record (name, weights
file hash), the protocol and its settings, the intensity handling, and every input file's path,
size and modification time. A changed file, other weights or another protocol gives another key,
so a stale entry is never used. Entries are ``torch.save`` files of plain tensors, read back with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FeatureCache", "files_fingerprint"]


def files_fingerprint(files: Iterable[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each file, in order."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return out


class FeatureCache:
    """Feature sets on disk under ``folder`` (``None``: no caching).

    Args:
        folder: where the ``features-<key>.pt`` files go (created on first write).
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder in (None, "") else Path(folder).expanduser()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(description: dict[str, Any]) -> str:
        """The SHA-256 of the JSON-encoded ``description`` (keys sorted)."""
        text = json.dumps(description, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def get_or_compute(
        self, description: dict[str, Any], compute: Callable[[], dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Return the cached features for ``description``, computing and storing them if absent."""
        if self.folder is None:
            self.misses += 1
            return compute()
        path = self.folder / f"features-{self.key(description)[:32]}.pt"
        if path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(stored, dict) and all(isinstance(v, Tensor) for v in stored.values()):
                    self.hits += 1
                    return stored
            except Exception:  # a truncated or foreign file: recompute and replace it
                pass
        self.misses += 1
        features = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(dict(features), tmp)
        os.replace(tmp, path)
        return features
