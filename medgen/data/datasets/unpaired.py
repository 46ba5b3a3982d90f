"""Images from two unaligned domains (:class:`UnpairedDataset`)."""

from __future__ import annotations

import operator
from typing import Any

from torch.utils.data import Dataset

from medgen.data.datasets.epochs import EpochMixin, epoch_rng
from medgen.data.datasets.sources import PathLike, Source, check_seed
from medgen.data.datasets.volumes import CacheMode, ImageTransform, VolumeDataset, pick_transform


class UnpairedDataset(EpochMixin, Dataset):
    """Images from two unaligned domains ``a`` and ``b`` (CycleGAN and relatives).

    ``len`` is the larger of the two domains. Item ``i`` holds ``a[i % len_a]`` and a ``b``
    image drawn from ``numpy.random.default_rng([seed, epoch, i])``: a pure function of
    ``(seed, epoch, index)`` (see :meth:`set_epoch`; Lightning does not call it on datasets).

    Items: ``{"a": tensor, "b": tensor, "path": (str, str), "subject": subject of a,
    "subject_b": subject of b}``.

    Args:
        a_source: images of domain ``a`` (anything :func:`resolve_sources` accepts).
        b_source: images of domain ``b``.
        spatial_dims: 2 for images, 3 for volumes.
        transform: applied to both images.
        transform_a: applied to ``a`` instead of ``transform``.
        transform_b: applied to ``b`` instead of ``transform``.
        seed: seed of the ``b`` draws.
        key: list of JSON datalists.
        check_shapes: check each domain's headers at construction (see :class:`VolumeDataset`).
        cache: ``"none"``, ``"memory"`` or ``"disk"`` (see :class:`VolumeDataset`).
        cache_dir: folder of the disk cache.
    """

    def __init__(
        self,
        a_source: Source,
        b_source: Source,
        *,
        spatial_dims: int = 2,
        transform: ImageTransform | None = None,
        transform_a: ImageTransform | None = None,
        transform_b: ImageTransform | None = None,
        seed: int = 0,
        key: str = "training",
        check_shapes: bool = True,
        cache: CacheMode = "none",
        cache_dir: PathLike | None = None,
    ) -> None:
        common = {
            "spatial_dims": spatial_dims,
            "key": key,
            "check_shapes": check_shapes,
            "cache": cache,
            "cache_dir": cache_dir,
        }
        self.a = VolumeDataset(a_source, transform=pick_transform(transform, transform_a), **common)
        self.b = VolumeDataset(b_source, transform=pick_transform(transform, transform_b), **common)
        self.seed = check_seed(seed)
        self._init_epoch()

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def partner(self, index: int) -> int:
        """Index into ``b`` of item ``index`` at the current epoch."""
        return int(epoch_rng(self.seed, self.epoch, index).integers(len(self.b)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        a = self.a[index % len(self.a)]
        b = self.b[self.partner(index)]
        return {
            "a": a["image"],
            "b": b["image"],
            "path": (a["path"], b["path"]),
            "subject": a["subject"],
            "subject_b": b["subject"],
        }
