"""Whole images or volumes read from files (:class:`VolumeDataset`) and their caches.

Also what the slice and patch datasets build on: :func:`volumes_from` (a
:class:`VolumeDataset` from a source, or a given one) and :class:`LastVolume` (the last volume
loaded, so consecutive items of one volume share a read).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform
from torch.utils.data import Dataset

from medgen.data.datasets.checks import (
    check_layout,
    check_spatial_dims,
    find_odd_shape,
    refuse_dicom_slices,
    scan_headers,
    shape_error,
)
from medgen.data.datasets.sources import PathLike, Source, TrainValMixin, resolve_sources
from medgen.data.io import MedgenIOError, read

ImageTransform: TypeAlias = Callable[[torch.Tensor], torch.Tensor]
CacheMode: TypeAlias = Literal["none", "memory", "disk"]

# Part of every on-disk cache key: bump it when what _ReadImage stores changes.
_CACHE_FORMAT = "medgen.datasets.read/float32/v1"


def pick_transform(transform: ImageTransform | None, specific: ImageTransform | None):
    """``specific`` (e.g. ``transform_a``) when given, else the shared ``transform``."""
    return specific if specific is not None else transform


class _ReadImage(Transform):
    """MONAI ``Transform``: ``{"image": path}`` → the image as ``float32`` with plain metadata.

    This is what the memory and disk caches store. The result holds only tensors and strings so
    that :class:`monai.data.PersistentDataset` can save it and load it back with
    ``torch.load(weights_only=True)`` (its default), which cannot rebuild a ``MetaTensor``.
    """

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        path = str(item["image"])
        image = read(path)
        values = image.as_tensor()
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            bad = int(values.numel() - torch.isfinite(values).sum())
            raise MedgenIOError(f"{path}: image contains {bad} NaN/Inf value(s)")
        return {
            "image": values.to(torch.float32),
            "affine": image.affine.to(torch.float64),
            "spacing": torch.as_tensor(np.asarray(image.meta["spacing"], dtype=np.float64)),
            "source_dtype": str(image.meta.get("source_dtype", "")),
            "path": path,
        }


def _to_meta_tensor(record: Mapping[str, Any]) -> MetaTensor:
    return MetaTensor(
        record["image"],
        affine=record["affine"],
        meta={
            "spacing": record["spacing"].numpy(),
            "source_dtype": record["source_dtype"],
            "filename_or_obj": record["path"],
        },
    )


def _find_io_error(exc: BaseException) -> MedgenIOError | None:
    """MONAI wraps errors raised inside transforms in ``RuntimeError``; dig ours back out."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, MedgenIOError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _rethrow_io(exc: BaseException) -> None:
    found = _find_io_error(exc)
    if found is not None:
        raise found.with_traceback(found.__traceback__) from None


class VolumeDataset(TrainValMixin, Dataset):
    """Whole images or volumes read from files, one item per file.

    Items are ``{"image": (C, D, H, W) or (C, H, W) float32 MetaTensor, "path": str, "subject":
    str}``; ``image.affine`` and ``image.meta["spacing"]`` come from the file.

    Caching (of the image as read, before ``transform``, which runs on every access):

    - ``"none"``: read the file on every access.
    - ``"memory"``: :class:`monai.data.CacheDataset` around a MONAI ``Transform`` that calls our
      :func:`~medgen.data.io.read`; every file is read once at construction (in threads) and kept
      in RAM. With DataLoader workers started by fork, the cache is shared copy-on-write.
    - ``"disk"``: :class:`monai.data.PersistentDataset` in ``cache_dir``: a file is read once, then
      loaded from a ``.pt`` file (``torch.load(weights_only=True)``). The key hashes the path, the
      file size and modification time, so an edited input file gets a fresh entry.

    Args:
        source: anything :func:`resolve_sources` accepts; omit when ``items`` is given.
        spatial_dims: 3 for ``(C, D, H, W)`` volumes, 2 for ``(C, H, W)`` images.
        key: list of a JSON datalist.
        transform: applied to each image tensor after reading (and after the cache).
        cache: ``"none"``, ``"memory"`` or ``"disk"``.
        cache_dir: folder of the disk cache (required for ``cache="disk"``).
        check_shapes: at construction, read every file header (not the pixels) and raise when a
            file has the wrong dimensionality or channel count or when two files differ in shape
            (naming the odd one); :class:`~medgen.data.MedicalDataModule` then compares the
            shapes across its splits (:func:`check_shapes_across_splits`). A DICOM series
            folder's shape comes from its slice count and first header. Pass ``False`` when a
            ``transform`` makes sizes uniform.
        items: entries from :func:`resolve_sources` / :func:`split_by_subject` instead of
            ``source``.
        channels: expected channel count. ``None``: 1 for volumes (a 4D NIfTI such as a time
            series is an error), 1 or 3 (gray or RGB) for 2D images.
        base_dir: folder that relative paths of ``source`` resolve against.

    Raises:
        MedgenIOError: bad sources (see :func:`resolve_sources`); for ``spatial_dims=3``, single
            DICOM slices (``source`` set to one series folder instead of the folder of series
            folders); and, at construction with ``check_shapes`` or else when read: wrong
            dimensionality or channel count, mixed shapes, undecodable files, NaN/Inf values.
    """

    def __init__(
        self,
        source: Source | None = None,
        *,
        spatial_dims: int = 3,
        key: str = "training",
        transform: ImageTransform | None = None,
        cache: CacheMode = "none",
        cache_dir: PathLike | None = None,
        check_shapes: bool = True,
        items: Sequence[Any] | None = None,
        channels: int | None = None,
        base_dir: PathLike | None = None,
    ) -> None:
        if (source is None) == (items is None):
            raise ValueError("give exactly one of source and items")
        self.items: list[dict[str, Any]] = resolve_sources(
            source if items is None else list(items), key=key, base_dir=base_dir
        )
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if channels is not None and operator.index(channels) < 1:
            raise ValueError(f"channels must be a positive int or None, got {channels}")
        self.channels = channels
        self.transform = transform
        if cache not in ("none", "memory", "disk"):
            raise ValueError(f"cache must be 'none', 'memory' or 'disk', got {cache!r}")
        self.cache = cache
        self.check_shapes = check_shapes
        if self.spatial_dims == 3:
            refuse_dicom_slices(self.items)
        #: Shapes ``(C, *spatial)`` from the headers (``None`` where unknown or not checked).
        self.header_shapes: list[tuple[int, ...] | None] = [None] * len(self.items)
        if check_shapes:
            self.header_shapes = scan_headers(self.paths, self.spatial_dims, self.channels)
            self._check_uniform()
        self._reference = next(
            ((p, s) for p, s in zip(self.paths, self.header_shapes, strict=True) if s), None
        )
        self._reader = _ReadImage()
        self._cache: Dataset | None = None
        if cache == "memory":
            from monai.data import CacheDataset

            # MONAI's CacheDataset rather than a dict of our own: it preloads in threads and is
            # what MONAI users know. It wraps errors of its transform in RuntimeError, which
            # _rethrow_io undoes so the MedgenIOError naming the file reaches the user.
            try:
                # copy_cache=False: load() hands out the cached tensor; __getitem__ copies it.
                self._cache = CacheDataset(
                    [{"image": str(p)} for p in self.paths],
                    transform=self._reader,
                    num_workers=min(4, os.cpu_count() or 1),
                    progress=False,
                    copy_cache=False,
                )
            except RuntimeError as exc:
                _rethrow_io(exc)
                raise
        elif cache == "disk":
            from monai.data import PersistentDataset

            if cache_dir is None:
                raise ValueError("cache='disk' needs cache_dir (a folder for the cached tensors)")
            cache_path = Path(os.path.expanduser(str(cache_dir)))
            cache_path.mkdir(parents=True, exist_ok=True)
            data = []
            for p in self.paths:
                stat = p.stat()
                data.append(
                    {
                        "image": str(p),
                        "stat": f"{stat.st_size}:{stat.st_mtime_ns}",
                        "fmt": _CACHE_FORMAT,
                    }
                )
            # Entries of edited or removed files are not deleted; clear cache_dir to reclaim space.
            self._cache = PersistentDataset(data, transform=self._reader, cache_dir=cache_path)

    @property
    def paths(self) -> list[Path]:
        """The image files, in item order."""
        return [item["image"] for item in self.items]

    @property
    def subjects(self) -> list[str]:
        """The subject of each item."""
        return [item["subject"] for item in self.items]

    def _check_uniform(self) -> None:
        entries = [(p, s) for p, s in zip(self.paths, self.header_shapes, strict=True) if s]
        found = find_odd_shape(entries)
        if found is not None:
            (odd, odd_shape), (reference, reference_shape) = found
            raise shape_error(odd, odd_shape, reference, reference_shape)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> MetaTensor:
        """The image of item ``index`` as read: ``float32``, checked, before ``transform``.

        With ``cache="memory"`` this is the cached tensor itself: do not modify it in place.

        Returns:
            ``(C, *spatial)`` MetaTensor.
        """
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        path = self.paths[index]
        try:
            record = (
                self._reader({"image": str(path)}) if self._cache is None else self._cache[index]
            )
        except RuntimeError as exc:
            _rethrow_io(exc)
            raise
        image = _to_meta_tensor(record)
        check_layout(path, image.shape, self.spatial_dims, self.channels)
        reference = self._reference
        if reference is not None and tuple(image.shape) != reference[1]:
            raise shape_error(path, tuple(image.shape), reference[0], reference[1])
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.load(index)
        if self.cache == "memory":
            image = image.clone()
        if self.transform is not None:
            image = self.transform(image)
        item = self.items[operator.index(index)]
        return {"image": image, "path": str(item["image"]), "subject": item["subject"]}


def volumes_from(
    source: Source | VolumeDataset | None,
    items: Sequence[Any] | None,
    spatial_dims: int,
    kwargs: dict[str, Any],
    default_check: bool,
) -> VolumeDataset:
    """``source`` if it is a :class:`VolumeDataset` (checked), else one built from it.

    Args:
        source: a :class:`VolumeDataset`, a source for :func:`resolve_sources`, or ``None``.
        items: entries instead of ``source``.
        spatial_dims: the dimensionality the caller needs.
        kwargs: other :class:`VolumeDataset` arguments (none allowed with a dataset).
        default_check: ``check_shapes`` unless ``kwargs`` sets it.
    """
    if isinstance(source, VolumeDataset):
        if items is not None or kwargs:
            raise ValueError(
                "a VolumeDataset was given: pass items, cache, key, ... to it, not here "
                f"(got {sorted([*kwargs, *(['items'] if items is not None else [])])})"
            )
        if source.spatial_dims != spatial_dims:
            raise ValueError(
                f"expected a VolumeDataset with spatial_dims={spatial_dims}, "
                f"got spatial_dims={source.spatial_dims}"
            )
        return source
    kwargs.setdefault("check_shapes", default_check)
    return VolumeDataset(source, items=items, spatial_dims=spatial_dims, **kwargs)


class LastVolume:
    """The volumes of a :class:`VolumeDataset`, remembering the last one loaded in this process.

    Consecutive slices or patches of one volume then share one read. Without a volume transform
    the image is taken from :meth:`VolumeDataset.load` without a copy: callers must not modify it
    in place (slices and patches are copied out of it).
    """

    def __init__(self, volumes: VolumeDataset) -> None:
        self.volumes = volumes
        self._last: tuple[int, MetaTensor | torch.Tensor] | None = None

    def __call__(self, index: int) -> MetaTensor | torch.Tensor:
        if self._last is None or self._last[0] != index:
            if self.volumes.transform is None:
                volume = self.volumes.load(index)
            else:
                volume = self.volumes[index]["image"]
            self._last = (index, volume)
        return self._last[1]

    def clear(self) -> None:
        self._last = None

    def __getstate__(self) -> dict[str, Any]:  # do not ship a volume to every worker
        return {"volumes": self.volumes, "_last": None}
