"""Latent folders written by ``medgen-encode``, and the dataset that reads them back.

A latent folder holds one ``.npy`` file per encoded image (``float32``, shape
``(C_latent, *spatial / f)``, the *unscaled* latent, loadable with ``numpy.load(...,
allow_pickle=False)``), in one sub-folder per split, and ``latents.json``::

    {
      "format": "medgen-latents/1",
      "autoencoder": "/abs/path/to/model",          # the checkpoint or exported folder used
      "autoencoder_class": "medgen.models.autoencoder.AutoencoderKL",
      "latent": "posterior_mean",                   # or "codebook" (VQ-GAN)
      "scale_factor": 1.93,                         # 1 / std of the training latents
      "latent_mean": 0.01, "latent_std": 0.52,      # statistics it was computed from
      "scale_items": 64,                            # latents it was computed over
      "shape": [4, 8, 8, 8],                        # common shape, or null if they differ
      "spatial_dims": 3, "downsample_factor": 4, "value_range": [0.0, 1.0],
      "splits": {"train": [{"file": "train/000000_sub-01.npy", "source": "/data/sub-01.nii.gz",
                            "shape": [4, 8, 8, 8], "affine": [[...]]}, ...], "val": [...]}
    }

``affine`` (3D inputs with an affine only) maps latent voxel indices to the input's world
coordinates: the input affine times ``diag(f, f, f, 1)`` with the origin moved to the centre of
the first ``f^3`` block. ``source`` is the input file (or ``phantom:<index>`` for phantoms).

The scale factor follows Rombach et al. (CVPR 2022, Sec. 4.3.2): diffusion trains on
``latent * scale_factor``, which has unit variance, and samples are divided by it before decoding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medgen.data.io import MedgenIOError

__all__ = ["LATENTS_FORMAT", "LATENTS_INDEX", "LatentDataset", "latent_affine", "read_latent_index"]

LATENTS_FORMAT = "medgen-latents/1"
LATENTS_INDEX = "latents.json"


class LatentStatistics:
    """Mean, standard deviation and scale factor of latents, accumulated one tensor at a time.

    The one place the latent scale of latent diffusion is computed (Rombach et al., CVPR 2022,
    Sec. 4.3.2: ``scale_factor = 1 / std`` over every element of the training latents), used by
    ``medgen-encode`` (streaming over a dataset) and
    :func:`medgen.models.autoencoder.latent_scale_factor`. Sums are float64.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.total_sq = 0.0
        self.count = 0
        self.items = 0

    def add(self, z: torch.Tensor) -> None:
        """Add every element of ``z``."""
        z = z.detach().double()
        self.total += float(z.sum())
        self.total_sq += float(z.square().sum())
        self.count += z.numel()
        self.items += 1

    @property
    def mean(self) -> float:
        """Mean of the elements added."""
        if self.count < 1:
            raise ValueError("no latent values were added")
        return self.total / self.count

    @property
    def std(self) -> float:
        """Sample standard deviation (``count - 1`` in the denominator)."""
        if self.count < 2:
            raise ValueError("the latent scale needs at least two latent values")
        mean = self.mean
        var = (self.total_sq - self.count * mean * mean) / (self.count - 1)
        if not var > 0:
            raise ValueError("the latents have zero variance; is the autoencoder trained?")
        return var**0.5

    @property
    def scale_factor(self) -> float:
        """``1 / std``."""
        return 1.0 / self.std


def latent_affine(affine: torch.Tensor | np.ndarray, factor: int) -> list[list[float]]:
    """Affine of the latent grid of an image with ``affine`` (4x4) and downsampling ``factor``.

    Latent voxel ``i`` covers image voxels ``f i .. f i + f - 1``; its centre is image index
    ``f i + (f - 1) / 2``.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape}")
    grid = np.diag([float(factor)] * 3 + [1.0])
    grid[:3, 3] = (factor - 1) / 2.0
    return (a @ grid).tolist()


def read_latent_index(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``latents.json`` of a latent folder.

    Raises:
        MedgenIOError: no such folder or file, invalid JSON, or not a medgen latent index.
    """
    folder = Path(folder)
    path = folder / LATENTS_INDEX
    if not folder.is_dir():
        raise MedgenIOError(f"{folder}: latent folder not found (run medgen-encode first)")
    if not path.is_file():
        raise MedgenIOError(f"{path}: missing; not a latent folder written by medgen-encode")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MedgenIOError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(index, dict) or index.get("format") != LATENTS_FORMAT:
        raise MedgenIOError(f"{path}: not a medgen latent index (format {LATENTS_FORMAT})")
    for key in ("scale_factor", "splits"):
        if key not in index:
            raise MedgenIOError(f"{path}: has no '{key}'")
    return index


class LatentDataset(Dataset):
    """Latents cached by ``medgen-encode``, for training a diffusion model in latent space.

    Items are ``{"image": (C, *spatial) float32 tensor, "path": source file, "latent_file":
    str}``; ``image`` is the stored latent multiplied by the folder's ``scale_factor`` (unless
    ``scale=False``), so it has unit variance over the training split.

    Args:
        folder: A folder written by ``medgen-encode`` (with ``latents.json``).
        split: Which split's latents (``"train"``, ``"val"``, ...).
        scale: Multiply by ``scale_factor`` (default) or return the raw latents.
        key: Key of the latent in an item.
        cache: Keep the latents in memory after the first read.

    Raises:
        MedgenIOError: a missing or invalid index, an unknown split, and (when read) a missing,
            corrupt or wrongly shaped latent file or one with NaN/Inf values, naming the file.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        split: str = "train",
        scale: bool = True,
        key: str = "image",
        cache: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.index = read_latent_index(self.folder)
        splits = self.index["splits"]
        if split not in splits:
            raise MedgenIOError(
                f"{self.folder / LATENTS_INDEX}: no split '{split}'; it has {sorted(splits)}"
            )
        self.split = split
        self.entries: list[dict[str, Any]] = list(splits[split])
        if not self.entries:
            raise MedgenIOError(f"{self.folder}: split '{split}' holds no latents")
        self.scale_factor = float(self.index["scale_factor"]) if scale else 1.0
        self.key = key
        self.cache = cache
        self._cache: dict[int, torch.Tensor] = {}

    @property
    def autoencoder(self) -> str:
        """Path of the autoencoder that encoded the latents (decode samples with it)."""
        return str(self.index.get("autoencoder", ""))

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Common latent shape ``(C, *spatial)``, or ``None`` when the latents differ in size."""
        shape = self.index.get("shape")
        return tuple(shape) if shape else None

    @property
    def spatial_dims(self) -> int:
        return int(self.index.get("spatial_dims", len(self.entries[0]["shape"]) - 1))

    @property
    def channels(self) -> int:
        return int(self.entries[0]["shape"][0])

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> torch.Tensor:
        entry = self.entries[i]
        path = self.folder / entry["file"]
        if not path.is_file():
            raise MedgenIOError(f"{path}: latent file missing (listed in {LATENTS_INDEX})")
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as err:  # corrupt or truncated .npy
            raise MedgenIOError(f"{path}: cannot read the latent: {err}") from err
        expected = tuple(entry.get("shape", array.shape))
        if tuple(array.shape) != expected:
            raise MedgenIOError(
                f"{path}: latent has shape {tuple(array.shape)}, the index says {expected}"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not torch.isfinite(tensor).all():
            raise MedgenIOError(f"{path}: latent contains NaN/Inf values")
        return tensor

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} latents")
        i = i % len(self)
        tensor = self._cache.get(i)
        if tensor is None:
            tensor = self._load(i)
            if self.cache:
                self._cache[i] = tensor
        entry = self.entries[i]
        return {
            self.key: tensor * self.scale_factor,
            "path": str(entry.get("source", "")),
            "latent_file": str(self.folder / entry["file"]),
        }

    def latents(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Stack of (scaled) latents ``(N, C, *spatial)`` (all by default; same shape needed)."""
        indices = range(len(self)) if indices is None else indices
        return torch.stack([self[i][self.key] for i in indices])
