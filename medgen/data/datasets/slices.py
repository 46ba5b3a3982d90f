"""2D slices of 3D volumes, without the near-empty ones (:class:`SliceDataset`)."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset

from medgen.data.datasets.affine import plain_tensor, sliced, with_meta
from medgen.data.datasets.checks import SHAPE_FIX
from medgen.data.datasets.sources import Source, TrainValMixin
from medgen.data.datasets.volumes import ImageTransform, LastVolume, VolumeDataset, volumes_from
from medgen.data.io import MedgenIOError


class SliceDataset(TrainValMixin, Dataset):
    """2D slices ``(C, H, W)`` of 3D volumes, without the near-empty ones.

    A slice is kept when the fraction of its voxels above ``threshold`` (in any channel) is at
    least ``min_foreground``; by default the threshold is the volume's minimum plus 1% of its
    range, so air and zero padding count as empty whatever the units (HU, MR, ``[0, 1]``).

    The table of kept ``(volume, slice)`` pairs is built once at construction, which **reads every
    volume once** (through the volume dataset, so a ``cache="memory"``/``"disk"`` cache is filled
    and reused). An item then needs its whole volume: without a cache each item reads the file
    again, except that the last volume loaded is remembered per process, which makes sequential
    access (validation) cheap. For shuffled training, use ``cache="memory"`` (or ``"disk"``).

    A volume-level ``transform`` of a given :class:`VolumeDataset` runs before slicing and must be
    deterministic (the slice table is computed from its output).

    Subjects are those of the volumes, so split the *volumes* (:func:`split_by_subject` on the
    source items, or :meth:`train_val`) and build one SliceDataset per side with ``items=``.

    Items: ``{"image": (C, *plane) float32 MetaTensor, "path": str, "subject": str, "slice":
    int}``; the affine maps slice voxel ``(i, j, 0)`` to the world.

    Args:
        source: a source for :func:`resolve_sources`, or a 3D
            :class:`VolumeDataset`; omit when ``items`` is given.
        axis: spatial axis to slice along: 0, 1, 2 for ``D``, ``H``, ``W`` (negatives count from
            the end). Slices along 0 are ``(C, H, W)``, along 1 ``(C, D, W)``, along 2 ``(C, D, H)``.
        min_foreground: least fraction of foreground voxels of a kept slice, in ``[0, 1]``.
        threshold: foreground threshold in image units (default: per volume, see above).
        transform: applied to each slice.
        check_shapes: raise at construction when slices of two volumes differ in shape (the
            number of slices may differ).
        items: entries from :func:`resolve_sources` / :func:`split_by_subject`.
        **volume_kwargs: ``key``, ``cache``, ``cache_dir``, ``channels``, ``base_dir`` for the
            :class:`VolumeDataset` built from a source.

    Raises:
        MedgenIOError: volume errors (see :class:`VolumeDataset`), slices of different shapes, or
            no slice passing ``min_foreground`` in any volume.
    """

    def __init__(
        self,
        source: Source | VolumeDataset | None = None,
        *,
        axis: int = -1,
        min_foreground: float = 0.05,
        threshold: float | None = None,
        transform: ImageTransform | None = None,
        check_shapes: bool = True,
        items: Sequence[Any] | None = None,
        **volume_kwargs: Any,
    ) -> None:
        axis = operator.index(axis)
        if not -3 <= axis < 3:
            raise ValueError(f"axis must be in [-3, 2] (spatial axes D, H, W), got {axis}")
        if not 0.0 <= float(min_foreground) <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], got {min_foreground}")
        self.axis = axis % 3
        self.min_foreground = float(min_foreground)
        self.threshold = threshold
        self.transform = transform
        self.volumes = volumes_from(source, items, 3, dict(volume_kwargs), default_check=False)
        self._volume = LastVolume(self.volumes)
        table = []
        reference: tuple[str, tuple[int, ...]] | None = None
        #: ``(volume file, slice shape (C, *plane))`` when ``check_shapes`` (else empty).
        self.plane_shapes: list[tuple[Path, tuple[int, ...]]] = []
        for v in range(len(self.volumes)):
            volume = plain_tensor(self._volume(v))
            plane = tuple(s for d, s in enumerate(volume.shape) if d != self.axis + 1)
            if check_shapes:
                self.plane_shapes.append((self.volumes.paths[v], plane))
                if reference is None:
                    reference = (str(self.volumes.paths[v]), plane)
                elif plane != reference[1]:
                    raise MedgenIOError(
                        f"{self.volumes.paths[v]}: slices along axis {self.axis} have shape "
                        f"{plane} but those of {reference[0]} have shape {reference[1]}; "
                        f"{SHAPE_FIX}"
                    )
            kept = torch.nonzero(self._keep(volume)).flatten().tolist()
            if not kept:
                warnings.warn(
                    f"{self.volumes.paths[v]}: no slice along axis {self.axis} has "
                    f"{self.min_foreground:.0%} foreground; volume skipped",
                    stacklevel=2,
                )
            table.extend((v, k) for k in kept)
        self._volume.clear()
        if not table:
            raise MedgenIOError(
                f"{self.volumes.paths[0]}"
                + (f" and {len(self.volumes) - 1} other volume(s)" if len(self.volumes) > 1 else "")
                + f": no slice along axis {self.axis} has {self.min_foreground:.0%} foreground; "
                "lower min_foreground or set threshold"
            )
        #: ``(N, 2)`` int64 table of ``(volume index, slice index)``.
        self.index = torch.tensor(table, dtype=torch.int64)

    def _keep(self, volume: torch.Tensor) -> torch.Tensor:
        """Boolean mask over the slices along ``axis`` of a ``(C, D, H, W)`` volume."""
        if self.threshold is None:
            low, high = float(volume.min()), float(volume.max())
            threshold = low + 0.01 * (high - low)
        else:
            threshold = float(self.threshold)
        foreground = (volume > threshold).any(dim=0)  # (D, H, W)
        others = tuple(d for d in range(3) if d != self.axis)
        fraction = foreground.float().mean(dim=others)
        return fraction >= self.min_foreground

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        v, k = (int(x) for x in self.index[operator.index(index)])
        volume = self._volume(v)
        values = plain_tensor(volume).select(self.axis + 1, k).clone()
        image = values
        if isinstance(volume, MetaTensor):
            spacing = volume.meta.get("spacing")
            extra = {}
            if spacing is not None and len(spacing) == 3:
                extra["spacing"] = np.delete(np.asarray(spacing), self.axis)
            image = with_meta(values, volume, sliced(volume.affine, self.axis, k), **extra)
        if self.transform is not None:
            image = self.transform(image)
        item = self.volumes.items[v]
        return {"image": image, "path": str(item["image"]), "subject": item["subject"], "slice": k}
