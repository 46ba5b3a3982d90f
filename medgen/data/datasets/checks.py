"""Checks of dataset arguments and of image files from their headers.

Dimensionality and channel rules (:func:`check_layout`), header shapes read without decoding the
pixels (:func:`scan_headers`), DICOM slices given where series are expected
(:func:`refuse_dicom_slices`) and the error for images of different sizes (:func:`shape_error`).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgen.data.datasets.sources import PathLike, series_folder_error
from medgen.data.io import MedgenIOError, dicom_series_shape, image_suffix, read


def check_spatial_dims(spatial_dims: int) -> int:
    """``spatial_dims`` if it is 2 or 3, else a ValueError."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return spatial_dims


def as_size(size: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    """``size`` (one int, or one per axis) as ``spatial_dims`` positive ints; ``name`` names it."""
    sizes = (size,) * spatial_dims if isinstance(size, int) else tuple(size)
    if len(sizes) != spatial_dims or any(operator.index(s) < 1 for s in sizes):
        raise ValueError(
            f"{name} must be a positive int or {spatial_dims} positive ints, got {size}"
        )
    return tuple(int(s) for s in sizes)


def _channel_rule(spatial_dims: int, channels: int | None) -> tuple[int, ...]:
    if channels is not None:
        return (channels,)
    return (1,) if spatial_dims == 3 else (1, 3)


def check_layout(
    path: PathLike, shape: Sequence[int], spatial_dims: int, channels: int | None
) -> None:
    """Raise unless ``shape`` (channel-first, as :func:`read` returns) fits the dataset."""
    shape = tuple(int(s) for s in shape)
    got_dims = len(shape) - 1
    if got_dims != spatial_dims:
        kind = {2: "a 2D image", 3: "a 3D volume"}.get(got_dims, f"{got_dims} spatial dimensions")
        want = "(C, D, H, W) volume" if spatial_dims == 3 else "(C, H, W) image"
        raise MedgenIOError(
            f"{path}: expected a {spatial_dims}D {want}, got {kind} of shape {shape}"
            + (" (slice it with SliceDataset)" if got_dims == 3 and spatial_dims == 2 else "")
        )
    allowed = _channel_rule(spatial_dims, channels)
    if shape[0] not in allowed:
        if channels is None and spatial_dims == 3:
            hint = (
                f"a 4D file (e.g. a time series) reads as {shape[0]} channels; pass "
                f"channels={shape[0]} if they are channels, or split it into 3D files"
            )
        elif channels is None:
            hint = f"2D images must be gray (1) or RGB (3); pass channels={shape[0]} to accept it"
        else:
            hint = f"the dataset was given channels={channels}"
        raise MedgenIOError(
            f"{path}: {shape[0]} channel(s) in an image of shape {shape}, expected "
            f"{' or '.join(map(str, allowed))}; {hint}"
        )


def _header_shape(path: Path) -> tuple[int, ...] | None:
    """Channel-first shape as :func:`read` would return it, from the file header only.

    ``None`` when the header alone cannot tell (multi-frame DICOM, NIfTI with more than four
    dimensions, other kinds of source); those files are checked when read. A DICOM series folder
    gives ``(1, number of slice files, rows, columns)`` from its first slice's header. A header
    that cannot be parsed raises the same :class:`MedgenIOError` as :func:`read` would.
    """
    suffix = image_suffix(path)
    try:
        if path.is_dir():  # a DICOM series: (1, slices, rows, columns)
            return dicom_series_shape(path)
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            dims = tuple(int(s) for s in nib.load(str(path)).shape)  # header only; data is lazy
            if len(dims) in (2, 3):
                return (1, *dims)
            if len(dims) == 4:
                return (dims[3], *dims[:3])
            return None
        if suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
            from PIL import Image

            with Image.open(path) as image:  # reads the header; pixels are decoded lazily
                width, height = image.size
                return (len(image.getbands()), height, width)
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return (1, *array.shape) if array.ndim == 2 else tuple(array.shape)
        if suffix == ".dcm":
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                return None
            return (int(ds.get("SamplesPerPixel", 1) or 1), int(ds.Rows), int(ds.Columns))
    except MedgenIOError:
        raise
    except Exception:
        return tuple(read(path).shape)  # raises a MedgenIOError naming the problem
    return None


def refuse_dicom_slices(items: Sequence[Mapping[str, Any]]) -> None:
    """Raise when the files of a 3D dataset are single DICOM slices (a series, one level deep).

    Only the first DICOM file's header is read: a single-frame file is one slice, and a volume
    from a series is read from its folder.
    """
    first = next((item["image"] for item in items if image_suffix(item["image"]) == ".dcm"), None)
    if first is None or not first.is_file():
        return
    shape = _header_shape(first)
    if shape is not None and len(shape) == 3:
        folder = first.parent
        count = sum(1 for p in folder.iterdir() if p.is_file() and image_suffix(p) == ".dcm")
        raise series_folder_error(folder, count, first.name)


def scan_headers(
    paths: Sequence[Path], spatial_dims: int, channels: int | None
) -> list[tuple[int, ...] | None]:
    """Header shapes of ``paths``, each checked for dimensionality and channel count."""
    shapes = []
    for path in paths:
        shape = _header_shape(path)
        if shape is not None:
            check_layout(path, shape, spatial_dims, channels)
        shapes.append(shape)
    return shapes


SHAPE_FIX = (
    "add a resize/crop transform (e.g. medgen.data.presets.CropOrPad or "
    "monai.transforms.ResizeWithPadOrCrop) and pass check_shapes=False "
    "(data.train.check_shapes=false, and data.val/data.test.check_shapes=false where given)"
)


def shape_error(
    odd: PathLike, odd_shape: Sequence[int], reference: PathLike, reference_shape: Sequence[int]
) -> MedgenIOError:
    """``odd`` differs in shape from ``reference``: the odd file is named first."""
    return MedgenIOError(
        f"{odd}: shape {tuple(odd_shape)} differs from {reference}: shape "
        f"{tuple(reference_shape)}; images of different sizes cannot be batched: {SHAPE_FIX}"
    )


def find_odd_shape(
    entries: Sequence[tuple[Path, tuple[int, ...]]],
) -> tuple[tuple[Path, tuple[int, ...]], tuple[Path, tuple[int, ...]]] | None:
    """``(odd, reference)`` entries when shapes differ: the reference has the most common shape
    (the first file's on a tie), the odd one is the first file of another shape."""
    counts: dict[tuple[int, ...], int] = {}
    for _, shape in entries:
        counts[shape] = counts.get(shape, 0) + 1
    if len(counts) < 2:
        return None
    common = max(counts, key=lambda shape: (counts[shape], shape == entries[0][1]))
    reference = next(e for e in entries if e[1] == common)
    odd = next(e for e in entries if e[1] != common)
    return odd, reference
