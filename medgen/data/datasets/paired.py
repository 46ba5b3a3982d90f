"""Aligned image pairs for image-to-image translation (:class:`PairedDataset`, :func:`bci_pairs`)."""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset

from medgen.data.datasets.affine import flipped, plain_tensor, translated, with_meta
from medgen.data.datasets.checks import as_size, check_spatial_dims, scan_headers
from medgen.data.datasets.epochs import EpochMixin, epoch_rng
from medgen.data.datasets.sources import PathLike, check_seed, preview, resolve_sources
from medgen.data.datasets.volumes import CacheMode, ImageTransform, VolumeDataset, pick_transform
from medgen.data.io import IMAGE_SUFFIXES, MedgenIOError, files_by_stem, image_stem, list_images


def _match_folders(
    a_dir: PathLike, b_dir: PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES
) -> list[tuple[Path, Path]]:
    """Pairs of files with the same stem in two folders; any unmatched file is an error."""
    a_dir, b_dir = Path(a_dir), Path(b_dir)
    a = files_by_stem(list_images(a_dir, suffixes), a_dir)
    b = files_by_stem(list_images(b_dir, suffixes), b_dir)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        parts = []
        if only_a:
            names = [a[s].name for s in only_a]
            parts.append(f"{len(only_a)} in {a_dir} without a match in {b_dir}: {preview(names)}")
        if only_b:
            names = [b[s].name for s in only_b]
            parts.append(f"{len(only_b)} in {b_dir} without a match in {a_dir}: {preview(names)}")
        raise MedgenIOError(
            f"{a_dir} and {b_dir}: unmatched images ({'; '.join(parts)}); pairs are matched by "
            "file name without suffix"
        )
    return [(a[s], b[s]) for s in sorted(a)]


def bci_pairs(root: PathLike, split: str = "train") -> list[tuple[Path, Path]]:
    """H&E → IHC pairs of the BCI dataset layout.

    Layout: ``root/HE/{train,test}/*.png`` and ``root/IHC/{train,test}/*.png``, where an H&E tile
    and its IHC counterpart have the same file name.

    Args:
        root: dataset root folder.
        split: ``"train"`` or ``"test"`` (any sub-folder name present in both ``HE`` and ``IHC``).

    Returns:
        ``[(he_path, ihc_path), ...]`` sorted by name.

    Raises:
        MedgenIOError: a missing folder, or names present on one side only.
    """
    root = Path(os.path.expanduser(str(root)))
    he, ihc = root / "HE" / split, root / "IHC" / split
    for folder in (he, ihc):
        if not folder.is_dir():
            raise MedgenIOError(
                f"{folder}: folder does not exist (BCI layout: root/HE/{{train,test}}/*.png and "
                "root/IHC/{train,test}/*.png)"
            )
    return _match_folders(he, ihc, suffixes=(".png",))


def _apply(image: torch.Tensor, transform: ImageTransform | None) -> torch.Tensor:
    return transform(image) if transform is not None else image


class PairedDataset(EpochMixin, Dataset):
    """Aligned image pairs ``(a, b)`` for image-to-image translation (pix2pix and relatives).

    Pairs are the files with the same name (without suffix) in ``a_dir`` and ``b_dir`` (any file
    without a partner is an error), or an explicit ``pairs`` list. Within a pair the spatial
    shapes must match (channels may differ, e.g. gray → RGB).

    Paired augmentation, identical for ``a`` and ``b``: a random crop of ``crop_size`` and, with
    ``flip=True``, a horizontal flip (last axis) with probability 1/2, drawn from
    ``numpy.random.default_rng([seed, epoch, index])`` (see :meth:`set_epoch`; Lightning does not
    call it on datasets). Afterwards ``transform_a`` / ``transform_b`` (default: ``transform``)
    run on each image.

    Items: ``{"a": (C_a, *spatial), "b": (C_b, *spatial) float32 MetaTensors, "path": (str, str),
    "subject": stem of a}``.

    Args:
        a_dir: folder of source-domain images.
        b_dir: folder of target-domain images.
        pairs: ``[(a_path, b_path), ...]`` instead of the folders.
        spatial_dims: 2 for images, 3 for volumes.
        transform: applied to both images after the paired augmentation.
        transform_a: applied to ``a`` instead of ``transform``.
        transform_b: applied to ``b`` instead of ``transform``.
        crop_size: paired random crop, one int or one per spatial axis; ``None`` for none.
        flip: paired random horizontal flip.
        seed: seed of the crops and flips.
        check_shapes: at construction, check dimensionality, channels and the pair shapes from
            the file headers (otherwise checked when read).
        cache: ``"none"``, ``"memory"`` or ``"disk"`` (see :class:`VolumeDataset`).
        cache_dir: folder of the disk cache.

    Raises:
        MedgenIOError: unmatched names (up to ten per side are listed), missing files, pair
            shapes that differ (both files named), images smaller than ``crop_size``.
    """

    def __init__(
        self,
        a_dir: PathLike | None = None,
        b_dir: PathLike | None = None,
        *,
        pairs: Sequence[tuple[PathLike, PathLike]] | None = None,
        spatial_dims: int = 2,
        transform: ImageTransform | None = None,
        transform_a: ImageTransform | None = None,
        transform_b: ImageTransform | None = None,
        crop_size: int | Sequence[int] | None = None,
        flip: bool = False,
        seed: int = 0,
        check_shapes: bool = True,
        cache: CacheMode = "none",
        cache_dir: PathLike | None = None,
    ) -> None:
        if pairs is None:
            if a_dir is None or b_dir is None:
                raise ValueError("give a_dir and b_dir, or pairs")
            pairs = _match_folders(a_dir, b_dir)
        elif a_dir is not None or b_dir is not None:
            raise ValueError("give either a_dir and b_dir, or pairs, not both")
        if not pairs:
            raise MedgenIOError("pairs: the list of pairs is empty")
        firsts = resolve_sources([a for a, _ in pairs])  # missing files are listed here
        seconds = resolve_sources([b for _, b in pairs])
        pairs = [(x["image"], y["image"]) for x, y in zip(firsts, seconds, strict=True)]
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.crop_size = (
            None if crop_size is None else as_size(crop_size, spatial_dims, "crop_size")
        )
        self.flip = bool(flip)
        self.seed = check_seed(seed)
        self.transform_a = pick_transform(transform, transform_a)
        self.transform_b = pick_transform(transform, transform_b)
        common = {"spatial_dims": spatial_dims, "check_shapes": False, "cache": cache}
        a_items = [{"image": a, "subject": image_stem(a)} for a, _ in pairs]
        b_items = [{"image": b, "subject": image_stem(a)} for a, b in pairs]
        if check_shapes:
            shapes_a = scan_headers([a for a, _ in pairs], spatial_dims, None)
            shapes_b = scan_headers([b for _, b in pairs], spatial_dims, None)
            for (a, b), shape_a, shape_b in zip(pairs, shapes_a, shapes_b, strict=True):
                if shape_a is not None and shape_b is not None and shape_a[1:] != shape_b[1:]:
                    raise self._pair_error(a, shape_a, b, shape_b)
        self.a = VolumeDataset(items=a_items, cache_dir=cache_dir, **common)
        self.b = VolumeDataset(items=b_items, cache_dir=cache_dir, **common)
        self._init_epoch()

    @staticmethod
    def _pair_error(a: Path, shape_a: Sequence[int], b: Path, shape_b: Sequence[int]):
        return MedgenIOError(
            f"{a} and {b}: paired images differ in spatial shape ({tuple(shape_a)} vs "
            f"{tuple(shape_b)}); the two images of a pair must be aligned voxel for voxel"
        )

    @classmethod
    def bci(cls, root: PathLike, split: str = "train", **kwargs: Any) -> PairedDataset:
        """The H&E → IHC pairs of a BCI dataset folder (see :func:`bci_pairs`).

        Args:
            root: dataset root holding ``HE`` and ``IHC``.
            split: ``"train"`` or ``"test"``.
            **kwargs: other arguments of :class:`PairedDataset` (e.g. ``crop_size=256``).
        """
        return cls(pairs=bci_pairs(root, split), **kwargs)

    @property
    def pairs(self) -> list[tuple[Path, Path]]:
        """The ``(a, b)`` file pairs, in item order."""
        return list(zip(self.a.paths, self.b.paths, strict=True))

    def __len__(self) -> int:
        return len(self.a)

    def _augment(self, index: int, a: torch.Tensor, b: torch.Tensor):
        if self.crop_size is None and not self.flip:
            return a, b
        rng = epoch_rng(self.seed, self.epoch, index)
        spatial = tuple(a.shape[1:])
        crop = None
        if self.crop_size is not None:
            if any(s < c for s, c in zip(spatial, self.crop_size, strict=True)):
                raise MedgenIOError(
                    f"{self.a.paths[index]} and {self.b.paths[index]}: image size {spatial} is "
                    f"smaller than crop_size {self.crop_size}"
                )
            origin = [
                int(rng.integers(0, s - c + 1))
                for s, c in zip(spatial, self.crop_size, strict=True)
            ]
            crop = (
                slice(None),
                *(slice(o, o + c) for o, c in zip(origin, self.crop_size, strict=True)),
            )
        flip = self.flip and bool(rng.random() < 0.5)
        out = []
        for image in (a, b):
            values = plain_tensor(image)
            affine = image.affine if isinstance(image, MetaTensor) else None
            if crop is not None:
                values = values[crop]
                if affine is not None:
                    affine = translated(affine, origin)
            if flip:
                values = values.flip(-1)
                if affine is not None:
                    affine = flipped(affine, self.spatial_dims - 1, values.shape[-1])
            values = values.clone() if not flip else values  # flip already copies
            out.append(with_meta(values, image, affine) if affine is not None else values)
        return out[0], out[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        a, b = self.a.load(index), self.b.load(index)
        path_a, path_b = self.a.paths[index], self.b.paths[index]
        if a.shape[1:] != b.shape[1:]:
            raise self._pair_error(path_a, a.shape, path_b, b.shape)
        a, b = self._augment(index, a, b)
        if self.a.cache == "memory" and self.crop_size is None and not self.flip:
            a, b = a.clone(), b.clone()
        return {
            "a": _apply(a, self.transform_a),
            "b": _apply(b, self.transform_b),
            "path": (str(path_a), str(path_b)),
            "subject": self.a.items[index]["subject"],
        }
