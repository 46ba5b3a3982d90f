"""Random fixed-size patches of volumes or large images (:class:`PatchDataset`)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from monai.data import MetaTensor
from torch.utils.data import Dataset

from medgen.data.datasets.affine import plain_tensor, translated, with_meta
from medgen.data.datasets.checks import as_size, check_spatial_dims
from medgen.data.datasets.epochs import EpochMixin, epoch_rng
from medgen.data.datasets.sources import Source, TrainValMixin, check_seed
from medgen.data.datasets.volumes import ImageTransform, LastVolume, VolumeDataset, volumes_from


class PatchDataset(EpochMixin, TrainValMixin, Dataset):
    """Random fixed-size patches of volumes, ``patches_per_volume`` per volume and epoch.

    Item ``i`` is a patch of volume ``i // patches_per_volume``; its origin is drawn from
    ``numpy.random.default_rng([seed, epoch, i])``, i.e. the patch location is a pure function of
    ``(seed, epoch, index)`` (and the volume's shape). :meth:`set_epoch` selects the epoch; note
    that Lightning calls ``set_epoch`` on samplers, not datasets, so call it yourself (e.g. from
    ``on_train_epoch_start``); the value reaches DataLoader workers, persistent ones too.

    A volume smaller than the patch along an axis is padded with its minimum; the origin is then
    negative (the volume lies at a random place inside the patch). Like :class:`SliceDataset`,
    each item needs its whole volume: use ``cache="memory"`` (or ``"disk"``) for training.

    Items: ``{"image": (C, *patch_size) float32 MetaTensor, "path": str, "subject": str,
    "origin": tuple[int, ...]}`` with ``origin`` the volume voxel of the patch's first voxel; the
    affine is shifted accordingly.

    Args:
        source: a source for :func:`resolve_sources`, or a
            :class:`VolumeDataset`; omit when ``items`` is given.
        patch_size: one int for every axis or one per spatial axis.
        patches_per_volume: patches per volume and epoch.
        seed: seed of the patch locations.
        transform: applied to each patch.
        spatial_dims: 3 (volumes) or 2 (tiles of large 2D images).
        items: entries from :func:`resolve_sources` / :func:`split_by_subject`.
        **volume_kwargs: ``key``, ``cache``, ``cache_dir``, ``channels``, ``check_shapes``
            (default ``False``: volumes may differ in size), ``base_dir`` for the
            :class:`VolumeDataset` built from a source.
    """

    def __init__(
        self,
        source: Source | VolumeDataset | None = None,
        *,
        patch_size: int | Sequence[int],
        patches_per_volume: int = 8,
        seed: int = 0,
        transform: ImageTransform | None = None,
        spatial_dims: int = 3,
        items: Sequence[Any] | None = None,
        **volume_kwargs: Any,
    ) -> None:
        spatial_dims = check_spatial_dims(spatial_dims)
        self.patch_size = as_size(patch_size, spatial_dims, "patch_size")
        self.patches_per_volume = operator.index(patches_per_volume)
        if self.patches_per_volume < 1:
            raise ValueError(f"patches_per_volume must be >= 1, got {patches_per_volume}")
        self.seed = check_seed(seed)
        self.transform = transform
        self.volumes = volumes_from(
            source, items, spatial_dims, dict(volume_kwargs), default_check=False
        )
        self._volume = LastVolume(self.volumes)
        self._init_epoch()

    def __len__(self) -> int:
        return len(self.volumes) * self.patches_per_volume

    def origin(self, index: int, shape: Sequence[int]) -> tuple[int, ...]:
        """Origin of patch ``index`` in a volume of spatial ``shape`` at the current epoch."""
        rng = epoch_rng(self.seed, self.epoch, index)
        origin = []
        for size, patch in zip(shape, self.patch_size, strict=True):
            low, high = min(0, size - patch), max(0, size - patch)
            origin.append(int(rng.integers(low, high + 1)))
        return tuple(origin)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        v = index // self.patches_per_volume
        volume = self._volume(v)
        values = plain_tensor(volume)
        spatial = tuple(values.shape[1:])
        origin = self.origin(index, spatial)
        src = [
            slice(max(o, 0), min(o + p, s))
            for o, p, s in zip(origin, self.patch_size, spatial, strict=True)
        ]
        if all(
            o >= 0 and o + p <= s for o, p, s in zip(origin, self.patch_size, spatial, strict=True)
        ):
            patch = values[(slice(None), *src)].clone()
        else:
            patch = values.new_full((values.shape[0], *self.patch_size), float(values.min()))
            dst = [slice(a.start - o, a.stop - o) for a, o in zip(src, origin, strict=True)]
            patch[(slice(None), *dst)] = values[(slice(None), *src)]
        image = patch
        if isinstance(volume, MetaTensor):
            image = with_meta(patch, volume, translated(volume.affine, origin))
        if self.transform is not None:
            image = self.transform(image)
        item = self.volumes.items[v]
        return {
            "image": image,
            "path": str(item["image"]),
            "subject": item["subject"],
            "origin": origin,
        }
