"""Where images come from: folders, globs, CSV files, JSON datalists, lists; splits by subject.

:func:`resolve_sources` turns any of those into one entry per image and :func:`split_by_subject`
splits entries so that no subject is on both sides. :class:`TrainValMixin` gives datasets their
``train_val`` constructor on top of the two.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from medgen.data.io import IMAGE_SUFFIXES, MedgenIOError, image_stem, image_suffix, list_images

PathLike: TypeAlias = str | os.PathLike
#: What :func:`resolve_sources` accepts.
Source: TypeAlias = PathLike | Sequence[PathLike | Mapping[str, Any]]

_GLOB_CHARS = frozenset("*?[")
_MAX_LISTED = 10


def preview(names: Sequence[Any], limit: int = _MAX_LISTED) -> str:
    """``a, b, c`` or ``a, b, ... (and 7 more)`` for error messages."""
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... (and {len(names) - limit} more)" if len(names) > limit else "")


def check_seed(seed: int) -> int:
    """``seed`` as a non-negative int, else a ValueError."""
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


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


def series_folder_error(folder: Path, count: int, example: str) -> MedgenIOError:
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
                        raise series_folder_error(path, len(loose), loose[0].name) from None
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
            f"{origin}: {len(missing)} listed file(s) do not exist: {preview(missing)}"
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
    seed = check_seed(seed)
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


class TrainValMixin:
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
