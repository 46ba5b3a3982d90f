"""Datasets over medical image files: volumes, 2D slices, 3D patches, paired and unpaired images.

Every dataset reads files with :func:`medgen.data.io.read` (MONAI ``LoadImage`` underneath) and
returns a dict of channel-first ``float32`` tensors plus ``"path"`` and ``"subject"`` entries.
Images stay :class:`~monai.data.MetaTensor` objects whose ``.affine`` follows every crop, slice and
flip, and whose ``meta`` keeps ``"spacing"``, ``"source_dtype"`` and ``"filename_or_obj"``.
Intensities are never rescaled here (a 16-bit PNG comes back as the same integers in ``float32``,
CT as HU): scaling belongs to the ``transform`` every dataset accepts, applied to each image tensor
after reading, so intensity presets plug in later.

Where the files come from is described once by :func:`resolve_sources` (a folder, a glob pattern, a
CSV file, a MONAI-style JSON datalist or a list) and split with :func:`split_by_subject`, which never
puts one subject on both sides (slices and patches inherit the subject of their volume).

Bad input fails early with a :class:`~medgen.data.io.MedgenIOError` that names the file: missing or
empty folders, missing listed files, images of the wrong dimensionality or channel count (checked
from the file headers at construction when ``check_shapes=True``), images of different sizes that
would not batch (within a split, and across the splits of a data module with
:func:`check_shapes_across_splits`), NaN/Inf values, unmatched or mismatched pairs. No dataset ever writes to its input
files; on-disk caches go to a separate ``cache_dir``.

Randomness (patch origins, paired crops and flips, the unpaired partner) is a pure function of
``(seed, epoch, index)`` drawn from :func:`numpy.random.default_rng`; the global RNGs are neither
read nor changed, so a resumed run sees the same samples as one that never stopped.

Example::

    from medgen.data.datasets import SliceDataset, resolve_sources, split_by_subject

    items = resolve_sources("data/t1/*.nii.gz")
    train_items, val_items = split_by_subject(items, val_fraction=0.1, seed=0)
    train = SliceDataset(items=train_items, axis=0, cache="memory")
    val = SliceDataset(items=val_items, axis=0)
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import operator
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform
from torch.utils.data import Dataset

from medgen.data.io import (
    IMAGE_SUFFIXES,
    MedgenIOError,
    dicom_series_shape,
    files_by_stem,
    image_stem,
    image_suffix,
    list_images,
    read,
)

__all__ = [
    "PairedDataset",
    "PatchDataset",
    "SliceDataset",
    "UnpairedDataset",
    "VolumeDataset",
    "bci_pairs",
    "check_shapes_across_splits",
    "resolve_sources",
    "split_by_subject",
]

PathLike: TypeAlias = str | os.PathLike
#: What :func:`resolve_sources` accepts.
Source: TypeAlias = PathLike | Sequence[PathLike | Mapping[str, Any]]
ImageTransform: TypeAlias = Callable[[torch.Tensor], torch.Tensor]
CacheMode: TypeAlias = Literal["none", "memory", "disk"]

_GLOB_CHARS = frozenset("*?[")
_MAX_LISTED = 10
# Part of every on-disk cache key: bump it when what _ReadImage stores changes.
_CACHE_FORMAT = "medgen.datasets.read/float32/v1"


# --------------------------------------------------------------------------------------------------
# small helpers


def _preview(names: Sequence[Any], limit: int = _MAX_LISTED) -> str:
    """``a, b, c`` or ``a, b, ... (and 7 more)`` for error messages."""
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... (and {len(names) - limit} more)" if len(names) > limit else "")


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def _check_seed(seed: int) -> int:
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


def _as_size(size: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    sizes = (size,) * spatial_dims if isinstance(size, int) else tuple(size)
    if len(sizes) != spatial_dims or any(operator.index(s) < 1 for s in sizes):
        raise ValueError(
            f"{name} must be a positive int or {spatial_dims} positive ints, got {size}"
        )
    return tuple(int(s) for s in sizes)


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return spatial_dims


# --------------------------------------------------------------------------------------------------
# sources


def _is_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


def _resolve_path(value: Any, base: Path | None, where: str) -> Path:
    if isinstance(value, (list, tuple)):
        raise MedgenIOError(
            f"{where}: an entry lists several files {value!r}; give one image per entry "
            "(multi-file entries are not supported)"
        )
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise MedgenIOError(f"{where}: entry has no image path (got {value!r})")
    path = Path(os.path.expanduser(str(value).strip()))
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def _make_item(
    entry: Mapping[str, Any], base: Path | None, where: str, subject_key: str
) -> dict[str, Any]:
    if "image" not in entry:
        raise MedgenIOError(f"{where}: entry {dict(entry)!r} has no 'image' key")
    path = _resolve_path(entry["image"], base, where)
    item = {k: v for k, v in entry.items() if k not in ("image", subject_key)}
    subject = entry.get(subject_key)
    subject = str(subject).strip() if subject is not None else ""
    return {"image": path, "subject": subject or image_stem(path), **item}


def _from_csv(path: Path, base: Path, subject_key: str) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "image" not in columns:
                raise MedgenIOError(
                    f"{path}: CSV has no 'image' column (columns: {', '.join(columns) or 'none'})"
                )
            # cells beyond the header come under the key None: dropped
            rows = [{k.strip(): v for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedgenIOError(f"{path}: cannot read CSV file: {exc}") from exc
    items = []
    for line, row in enumerate(rows, start=2):
        if not (row.get("image") or "").strip():
            raise MedgenIOError(f"{path}: line {line} has an empty 'image' cell")
        items.append(_make_item(row, base, f"{path} (line {line})", subject_key))
    return items


def _from_json(path: Path, key: str, base: Path, subject_key: str) -> list[dict[str, Any]]:
    # Parsed here rather than with monai.data.load_decathlon_datalist: that one raises a bare
    # ValueError without the available keys and fails on an empty "test" list of plain paths; the
    # format (and relative-path rule) is the same.
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedgenIOError(f"{path}: cannot read JSON datalist: {exc}") from exc
    if isinstance(data, list):
        entries = data
    elif isinstance(data, dict):
        if key not in data:
            lists = [k for k, v in data.items() if isinstance(v, list)]
            raise MedgenIOError(
                f"{path}: JSON datalist has no {key!r} list "
                f"(lists in the file: {', '.join(map(repr, lists)) or 'none'}); pass key=..."
            )
        entries = data[key]
    else:
        raise MedgenIOError(f"{path}: a JSON datalist is an object of lists, got {type(data)}")
    if not isinstance(entries, list):
        raise MedgenIOError(f"{path}: {key!r} must be a list, got {type(entries).__name__}")
    where = f"{path} ({key!r})"
    return [
        _make_item(e if isinstance(e, Mapping) else {"image": e}, base, where, subject_key)
        for e in entries
    ]


def _image_files(paths: Sequence[str]) -> list[Path]:
    return sorted(
        Path(p)
        for p in paths
        if Path(p).is_file()
        and not Path(p).name.startswith(".")
        and image_suffix(p) in IMAGE_SUFFIXES
    )


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _series_folder_error(folder: Path, count: int, example: str) -> MedgenIOError:
    """``folder`` holds the slices of one series where a folder of series folders was expected."""
    return MedgenIOError(
        f"{folder}: holds the DICOM slices of one series ({count} files, e.g. {example}), but "
        "volumes are read from a folder with one sub-folder per series: set source to the folder "
        f"above it (data.train.source={folder.parent}) with each series in a sub-folder of its "
        "own, or list the series folders in a CSV/JSON datalist"
    )


def _loose_dicom_files(folder: Path) -> list[Path]:
    """DICOM files without an image suffix directly in ``folder`` (the slices of a series?)."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and image_suffix(p) not in IMAGE_SUFFIXES
    )
    return [p for p in files if _is_dicom_file(p)]


def _series_folders(folder: Path) -> list[Path]:
    """Sub-folders holding DICOM files, when ``folder`` itself holds no image files."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if any(p.is_file() and image_suffix(p) in IMAGE_SUFFIXES for p in entries):
        return []
    series = []
    for sub in (p for p in entries if p.is_dir()):
        first = next((f for f in sorted(sub.iterdir()) if f.is_file()), None)
        if first is not None and _is_dicom_file(first):
            series.append(sub)
    return series


def resolve_sources(
    source: Source,
    *,
    key: str = "training",
    base_dir: PathLike | None = None,
    subject_key: str = "subject",
) -> list[dict[str, Any]]:
    """Turn a description of where images are into one entry per image.

    Accepted sources:

    - a folder: every image file in it (:func:`~medgen.data.io.list_images`, not recursive), or,
      when it holds no image files but sub-folders of DICOM files, one item per sub-folder (a
      DICOM series each, the sub-folder's name as subject). A folder that holds DICOM files
      without a suffix is one series folder, not a folder of them: an error says so;
    - a glob pattern (a string containing ``*``, ``?`` or ``[``; ``**`` recurses): the matching
      image files, sorted;
    - a ``.csv`` file with an ``image`` column and optional ``subject`` and other columns;
    - a MONAI-style ``.json`` datalist ``{"training": [{"image": "a.nii.gz", ...}], ...}``, of
      which ``key`` picks the list (entries may also be plain paths);
    - one image file;
    - a list of paths and/or dicts with an ``"image"`` key.

    Relative paths in a CSV or JSON file resolve against ``base_dir`` when given, else the file's
    folder; relative paths in a list or glob resolve against ``base_dir`` when given, else the
    working directory. The returned paths are absolute (a later change of working directory, as
    Hydra may do, leaves them valid).

    Args:
        source: one of the above.
        key: list to use from a JSON datalist (``"training"``, ``"validation"``, ...).
        base_dir: folder that relative paths resolve against.
        subject_key: column/key holding the subject id. When absent or empty, the subject is the
            file name without its image suffix (:func:`~medgen.data.io.image_stem`).

    Returns:
        ``[{"image": Path, "subject": str, **other columns}, ...]`` in source order (sorted for a
        folder or glob). Other columns keep their values (strings for a CSV).

    Raises:
        MedgenIOError: a missing or empty folder, a glob matching no image, a CSV without an
            ``image`` column, a JSON file without ``key``, an empty list, or listed files that do
            not exist (up to ten are named).
    """
    base = Path(os.path.expanduser(str(base_dir))) if base_dir is not None else None
    origin: str
    if isinstance(source, (str, os.PathLike)):
        text = os.path.expanduser(str(source))
        path = Path(text)
        origin = text
        if not path.exists() and _is_glob(text):
            pattern = text if Path(text).is_absolute() or base is None else str(base / text)
            files = _image_files(glob.glob(pattern, recursive=True))
            if not files:
                raise MedgenIOError(
                    f"{pattern}: glob pattern matches no image file "
                    f"(image suffixes: {', '.join(IMAGE_SUFFIXES)})"
                )
            items = [{"image": p, "subject": image_stem(p)} for p in files]
        elif path.is_dir():
            series = _series_folders(path)
            if series:  # a folder of DICOM series, one sub-folder per subject
                items = [{"image": p, "subject": p.name} for p in series]
            else:
                try:
                    files = list_images(path)
                except MedgenIOError:
                    loose = _loose_dicom_files(path) if path.is_dir() else []
                    if loose:  # extensionless slices: a series folder, given one level too deep
                        raise _series_folder_error(path, len(loose), loose[0].name) from None
                    raise
                items = [{"image": p, "subject": image_stem(p)} for p in files]
        elif not path.exists():
            raise MedgenIOError(f"{path}: no such file or folder")
        elif path.suffix.lower() == ".csv":
            items = _from_csv(path, base or path.parent, subject_key)
        elif path.suffix.lower() == ".json":
            items = _from_json(path, key, base or path.parent, subject_key)
        elif image_suffix(path) in IMAGE_SUFFIXES:
            items = [{"image": path, "subject": image_stem(path)}]
        else:
            raise MedgenIOError(
                f"{path}: not a folder, glob pattern, .csv, .json or image file "
                f"(image suffixes: {', '.join(IMAGE_SUFFIXES)})"
            )
    elif isinstance(source, Sequence):
        origin = "source list"
        items = [
            _make_item(
                e if isinstance(e, Mapping) else {"image": e}, base, f"{origin}[{i}]", subject_key
            )
            for i, e in enumerate(source)
        ]
    else:
        raise TypeError(
            "source must be a folder, glob pattern, .csv/.json file or a list of paths/dicts, "
            f"got {type(source).__name__}"
        )

    if not items:
        raise MedgenIOError(f"{origin}: lists no images")
    for item in items:
        item["image"] = Path(os.path.abspath(item["image"]))
    missing = [str(item["image"]) for item in items if not item["image"].exists()]
    if missing:
        raise MedgenIOError(
            f"{origin}: {len(missing)} listed file(s) do not exist: {_preview(missing)}"
        )
    return items


def _subject_of(item: Any) -> str:
    if isinstance(item, Mapping):
        subject = item.get("subject")
        return str(subject) if subject not in (None, "") else image_stem(item["image"])
    return image_stem(item)


def split_by_subject(
    items: Sequence[Any], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """Split items into training and validation sets with every subject on one side only.

    A fraction of the *subjects* (not of the items) goes to validation: ``round(val_fraction *
    n_subjects)``, at least one when ``val_fraction > 0`` and at most ``n_subjects - 1``. Subjects
    are ranked by a keyed hash of ``(seed, subject)`` (BLAKE2b), so the split depends neither on
    the order of ``items`` nor on the Python process, and adding subjects moves few old ones.

    Args:
        items: entries from :func:`resolve_sources` (dicts with ``"subject"``), or paths (the
            subject is then the file stem).
        val_fraction: fraction of subjects for validation, in ``[0, 1)``.
        seed: seed of the split.

    Returns:
        ``(train, val)`` lists of the original entries, each in the original order.

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)``, or validation requested from one subject.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    seed = _check_seed(seed)
    subjects = sorted({_subject_of(item) for item in items})
    if val_fraction == 0 or not subjects:
        return list(items), []
    if len(subjects) < 2:
        raise ValueError(
            f"cannot split by subject: all {len(items)} item(s) belong to one subject "
            f"({subjects[0]!r}); add subjects, give a separate validation source, or use "
            "val_fraction=0"
        )
    n_val = min(max(1, round(val_fraction * len(subjects))), len(subjects) - 1)

    def rank(subject: str) -> bytes:
        return hashlib.blake2b(subject.encode(), key=str(seed).encode(), digest_size=16).digest()

    val_subjects = set(sorted(subjects, key=rank)[:n_val])
    train = [item for item in items if _subject_of(item) not in val_subjects]
    val = [item for item in items if _subject_of(item) in val_subjects]
    return train, val


# --------------------------------------------------------------------------------------------------
# reading and checking


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


def _channel_rule(spatial_dims: int, channels: int | None) -> tuple[int, ...]:
    if channels is not None:
        return (channels,)
    return (1,) if spatial_dims == 3 else (1, 3)


def _check_layout(
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


def _refuse_dicom_slices(items: Sequence[Mapping[str, Any]]) -> None:
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
        raise _series_folder_error(folder, count, first.name)


def _scan_headers(
    paths: Sequence[Path], spatial_dims: int, channels: int | None
) -> list[tuple[int, ...] | None]:
    """Header shapes of ``paths``, each checked for dimensionality and channel count."""
    shapes = []
    for path in paths:
        shape = _header_shape(path)
        if shape is not None:
            _check_layout(path, shape, spatial_dims, channels)
        shapes.append(shape)
    return shapes


_SHAPE_FIX = (
    "add a resize/crop transform (e.g. medgen.data.presets.CropOrPad or "
    "monai.transforms.ResizeWithPadOrCrop) and pass check_shapes=False "
    "(data.train.check_shapes=false, and data.val/data.test.check_shapes=false where given)"
)


def _shape_error(
    odd: PathLike, odd_shape: Sequence[int], reference: PathLike, reference_shape: Sequence[int]
) -> MedgenIOError:
    """``odd`` differs in shape from ``reference``: the odd file is named first."""
    return MedgenIOError(
        f"{odd}: shape {tuple(odd_shape)} differs from {reference}: shape "
        f"{tuple(reference_shape)}; images of different sizes cannot be batched: {_SHAPE_FIX}"
    )


def _odd_shape(
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
                    f"have the size the model is trained on: {_SHAPE_FIX}"
                )


# --------------------------------------------------------------------------------------------------
# affine bookkeeping (cheap: a 4x4 matrix per item)


def _affine_rank(affine: torch.Tensor) -> int:
    return affine.shape[-1] - 1


def _translated(affine: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """Affine of a crop whose first voxel is at voxel ``offset`` of the original grid."""
    out = affine.clone()
    r, k = _affine_rank(affine), min(len(offset), _affine_rank(affine))
    shift = torch.as_tensor(offset[:k], dtype=affine.dtype)
    out[:r, r] = affine[:r, r] + affine[:r, :k] @ shift
    return out


def _flipped(affine: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Affine after reversing spatial axis ``dim`` (of length ``size``)."""
    out = affine.clone()
    r = _affine_rank(affine)
    if dim < r:
        out[:r, r] = affine[:r, r] + affine[:r, dim] * (size - 1)
        out[:r, dim] = -affine[:r, dim]
    return out


def _sliced(affine: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """Affine of the 2D slice ``index`` along spatial ``axis`` of a 3D grid.

    The in-plane axes become the first two columns; the sliced axis moves to the third, so the
    matrix stays invertible and maps ``(i, j, 0)`` of the slice to the world.
    """
    r = _affine_rank(affine)
    if r < 3:
        return affine.clone()
    out = affine.clone()
    order = [a for a in range(3) if a != axis] + [axis]
    out[:r, r] = affine[:r, r] + affine[:r, axis] * index
    out[:r, :3] = affine[:r, order]
    return out


def _with_meta(values: torch.Tensor, like: torch.Tensor, affine: torch.Tensor, **meta: Any):
    """``values`` as a MetaTensor carrying ``like``'s metadata with a new affine."""
    if not isinstance(like, MetaTensor):
        return values
    base = {
        k: like.meta[k] for k in ("spacing", "source_dtype", "filename_or_obj") if k in like.meta
    }
    return MetaTensor(values, affine=affine, meta={**base, **meta})


def _plain(image: torch.Tensor) -> torch.Tensor:
    return image.as_tensor() if isinstance(image, MetaTensor) else image


# --------------------------------------------------------------------------------------------------
# epoch state shared with DataLoader workers


class _EpochMixin:
    """``set_epoch`` whose value reaches DataLoader worker processes, persistent ones included.

    The epoch lives in a one-element tensor in shared memory: workers hold a copy of the dataset
    but share that storage (fork or spawn), so ``set_epoch`` in the main process is seen by them.
    """

    def _init_epoch(self) -> None:
        epoch = torch.zeros(1, dtype=torch.int64)
        with contextlib.suppress(RuntimeError, OSError):  # no shared memory: main process only
            epoch.share_memory_()
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        """The epoch used to seed random choices (0 until :meth:`set_epoch` is called)."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch`` (call it at the start of every epoch)."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self._epoch[0] = epoch


class _TrainValMixin:
    """``cls.train_val(source, ...)``: the two datasets of a subject-wise split."""

    @classmethod
    def train_val(
        cls,
        source: Source,
        *,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        key: str = "training",
        base_dir: PathLike | None = None,
        **kwargs: Any,
    ):
        """Resolve ``source``, split it by subject and build one dataset per side.

        Args:
            source: anything :func:`resolve_sources` accepts.
            val_fraction: fraction of subjects for validation (see :func:`split_by_subject`).
            split_seed: seed of the split.
            key: list of a JSON datalist.
            base_dir: folder relative paths resolve against.
            **kwargs: passed to both datasets (e.g. ``axis=0``, ``cache="memory"``).

        Returns:
            ``(train, val)`` datasets without a subject in common.
        """
        items = resolve_sources(source, key=key, base_dir=base_dir)
        train, val = split_by_subject(items, val_fraction=val_fraction, seed=split_seed)
        return cls(items=train, **kwargs), cls(items=val, **kwargs)


# --------------------------------------------------------------------------------------------------
# volumes


class VolumeDataset(_TrainValMixin, Dataset):
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
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        if channels is not None and operator.index(channels) < 1:
            raise ValueError(f"channels must be a positive int or None, got {channels}")
        self.channels = channels
        self.transform = transform
        if cache not in ("none", "memory", "disk"):
            raise ValueError(f"cache must be 'none', 'memory' or 'disk', got {cache!r}")
        self.cache = cache
        self.check_shapes = check_shapes
        if self.spatial_dims == 3:
            _refuse_dicom_slices(self.items)
        #: Shapes ``(C, *spatial)`` from the headers (``None`` where unknown or not checked).
        self.header_shapes: list[tuple[int, ...] | None] = [None] * len(self.items)
        if check_shapes:
            self.header_shapes = _scan_headers(self.paths, self.spatial_dims, self.channels)
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
        found = _odd_shape(entries)
        if found is not None:
            (odd, odd_shape), (reference, reference_shape) = found
            raise _shape_error(odd, odd_shape, reference, reference_shape)

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
        _check_layout(path, image.shape, self.spatial_dims, self.channels)
        reference = self._reference
        if reference is not None and tuple(image.shape) != reference[1]:
            raise _shape_error(path, tuple(image.shape), reference[0], reference[1])
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.load(index)
        if self.cache == "memory":
            image = image.clone()
        if self.transform is not None:
            image = self.transform(image)
        item = self.items[operator.index(index)]
        return {"image": image, "path": str(item["image"]), "subject": item["subject"]}


def _volumes_from(
    source: Source | VolumeDataset | None,
    items: Sequence[Any] | None,
    spatial_dims: int,
    kwargs: dict[str, Any],
    default_check: bool,
) -> VolumeDataset:
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


class _LastVolume:
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


class SliceDataset(_TrainValMixin, Dataset):
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
        self.volumes = _volumes_from(source, items, 3, dict(volume_kwargs), default_check=False)
        self._volume = _LastVolume(self.volumes)
        table = []
        reference: tuple[str, tuple[int, ...]] | None = None
        #: ``(volume file, slice shape (C, *plane))`` when ``check_shapes`` (else empty).
        self.plane_shapes: list[tuple[Path, tuple[int, ...]]] = []
        for v in range(len(self.volumes)):
            volume = _plain(self._volume(v))
            plane = tuple(s for d, s in enumerate(volume.shape) if d != self.axis + 1)
            if check_shapes:
                self.plane_shapes.append((self.volumes.paths[v], plane))
                if reference is None:
                    reference = (str(self.volumes.paths[v]), plane)
                elif plane != reference[1]:
                    raise MedgenIOError(
                        f"{self.volumes.paths[v]}: slices along axis {self.axis} have shape "
                        f"{plane} but those of {reference[0]} have shape {reference[1]}; "
                        f"{_SHAPE_FIX}"
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
        values = _plain(volume).select(self.axis + 1, k).clone()
        image = values
        if isinstance(volume, MetaTensor):
            spacing = volume.meta.get("spacing")
            extra = {}
            if spacing is not None and len(spacing) == 3:
                extra["spacing"] = np.delete(np.asarray(spacing), self.axis)
            image = _with_meta(values, volume, _sliced(volume.affine, self.axis, k), **extra)
        if self.transform is not None:
            image = self.transform(image)
        item = self.volumes.items[v]
        return {"image": image, "path": str(item["image"]), "subject": item["subject"], "slice": k}


class PatchDataset(_EpochMixin, _TrainValMixin, Dataset):
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
        spatial_dims = _check_spatial_dims(spatial_dims)
        self.patch_size = _as_size(patch_size, spatial_dims, "patch_size")
        self.patches_per_volume = operator.index(patches_per_volume)
        if self.patches_per_volume < 1:
            raise ValueError(f"patches_per_volume must be >= 1, got {patches_per_volume}")
        self.seed = _check_seed(seed)
        self.transform = transform
        self.volumes = _volumes_from(
            source, items, spatial_dims, dict(volume_kwargs), default_check=False
        )
        self._volume = _LastVolume(self.volumes)
        self._init_epoch()

    def __len__(self) -> int:
        return len(self.volumes) * self.patches_per_volume

    def origin(self, index: int, shape: Sequence[int]) -> tuple[int, ...]:
        """Origin of patch ``index`` in a volume of spatial ``shape`` at the current epoch."""
        rng = _rng(self.seed, self.epoch, index)
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
        values = _plain(volume)
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
            image = _with_meta(patch, volume, _translated(volume.affine, origin))
        if self.transform is not None:
            image = self.transform(image)
        item = self.volumes.items[v]
        return {
            "image": image,
            "path": str(item["image"]),
            "subject": item["subject"],
            "origin": origin,
        }


# --------------------------------------------------------------------------------------------------
# pairs


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
            parts.append(f"{len(only_a)} in {a_dir} without a match in {b_dir}: {_preview(names)}")
        if only_b:
            names = [b[s].name for s in only_b]
            parts.append(f"{len(only_b)} in {b_dir} without a match in {a_dir}: {_preview(names)}")
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


def _pick(transform: ImageTransform | None, specific: ImageTransform | None):
    return specific if specific is not None else transform


def _apply(image: torch.Tensor, transform: ImageTransform | None) -> torch.Tensor:
    return transform(image) if transform is not None else image


class PairedDataset(_EpochMixin, Dataset):
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
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.crop_size = (
            None if crop_size is None else _as_size(crop_size, spatial_dims, "crop_size")
        )
        self.flip = bool(flip)
        self.seed = _check_seed(seed)
        self.transform_a = _pick(transform, transform_a)
        self.transform_b = _pick(transform, transform_b)
        common = {"spatial_dims": spatial_dims, "check_shapes": False, "cache": cache}
        a_items = [{"image": a, "subject": image_stem(a)} for a, _ in pairs]
        b_items = [{"image": b, "subject": image_stem(a)} for a, b in pairs]
        if check_shapes:
            shapes_a = _scan_headers([a for a, _ in pairs], spatial_dims, None)
            shapes_b = _scan_headers([b for _, b in pairs], spatial_dims, None)
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
        rng = _rng(self.seed, self.epoch, index)
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
            values = _plain(image)
            affine = image.affine if isinstance(image, MetaTensor) else None
            if crop is not None:
                values = values[crop]
                if affine is not None:
                    affine = _translated(affine, origin)
            if flip:
                values = values.flip(-1)
                if affine is not None:
                    affine = _flipped(affine, self.spatial_dims - 1, values.shape[-1])
            values = values.clone() if not flip else values  # flip already copies
            out.append(_with_meta(values, image, affine) if affine is not None else values)
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


class UnpairedDataset(_EpochMixin, Dataset):
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
        self.a = VolumeDataset(a_source, transform=_pick(transform, transform_a), **common)
        self.b = VolumeDataset(b_source, transform=_pick(transform, transform_b), **common)
        self.seed = _check_seed(seed)
        self._init_epoch()

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def partner(self, index: int) -> int:
        """Index into ``b`` of item ``index`` at the current epoch."""
        return int(_rng(self.seed, self.epoch, index).integers(len(self.b)))

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
