"""Checkpoint writing that never leaves a truncated file under the final name.

Lightning's ``TorchCheckpointIO`` serialises into memory and then writes the target file in place,
so a crash (or a full disk) during the write leaves a truncated ``last.ckpt`` — the very file a
resumed run needs. :class:`AtomicCheckpointIO` writes to a temporary file in the same folder and
renames it over the target, so the previous checkpoint stays intact until the new one is complete
(also when the process is killed mid-write). A checkpoint whose weights hold NaN/Inf is refused,
so a diverged run never overwrites the last good one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medgen.pretrained import safe_torch_load
from medgen.utils.files import atomic_path
from medgen.utils.numerics import check_finite_state


class AtomicCheckpointIO(TorchCheckpointIO):
    """A ``TorchCheckpointIO`` with atomic local writes and ``weights_only=True`` loading."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote filesystems: Lightning's
            return super().save_checkpoint(checkpoint, path, storage_options)
        check_finite_state(checkpoint.get("state_dict", {}), f"checkpoint '{path}'")
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return safe_torch_load(path, map_location=map_location or "cpu")
