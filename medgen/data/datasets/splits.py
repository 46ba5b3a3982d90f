"""Shape checks across the splits (train, val, test) of a data module."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medgen.data.datasets.checks import SHAPE_FIX
from medgen.data.datasets.slices import SliceDataset
from medgen.data.datasets.volumes import VolumeDataset
from medgen.data.io import MedgenIOError


def _split_shapes(dataset: Any) -> list[tuple[Path, tuple[int, ...]]]:
    """The ``(file, item shape)`` pairs a dataset has checked to be uniform (else ``[]``)."""
    if isinstance(dataset, VolumeDataset) and dataset.check_shapes:
        return [(p, s) for p, s in zip(dataset.paths, dataset.header_shapes, strict=True) if s]
    if isinstance(dataset, SliceDataset):
        return list(dataset.plane_shapes)
    return []


def check_shapes_across_splits(datasets: Mapping[str, Any]) -> None:
    """Raise when the images of one split differ in shape from those of the training split.

    Each :class:`VolumeDataset` built with ``check_shapes=True`` (and each :class:`SliceDataset`
    built with it) knows that its own images share one shape, from the file headers; this
    compares those shapes across the splits, so an odd-sized file in the validation or test split
    fails before training instead of at the end of the first epoch. Splits that do not check
    their shapes (``check_shapes=False``, random patches, pairs) are not compared.

    Args:
        datasets: ``{"train": dataset, "val": dataset or None, ...}``; the first split with
            checked shapes is the reference.

    Raises:
        MedgenIOError: naming the first file of another shape, its split and shape, and the
            shape of the reference split with one of its files.
    """
    reference: tuple[str, Path, tuple[int, ...], int] | None = None
    for split, dataset in datasets.items():
        entries = _split_shapes(dataset)
        if not entries:
            continue
        if reference is None:
            reference = (split, entries[0][0], entries[0][1], len(entries))
            continue
        ref_split, ref_path, ref_shape, count = reference
        for path, shape in entries:
            if shape != ref_shape:
                raise MedgenIOError(
                    f"{path} ({split} split): shape {shape} differs from the shape {ref_shape} "
                    f"of the {count} {ref_split} image(s) (e.g. {ref_path}); every split must "
                    f"have the size the model is trained on: {SHAPE_FIX}"
                )
