"""Reading and writing medical image files without losing what makes them medical.

:func:`read` goes through MONAI's :class:`~monai.transforms.LoadImage` with one explicit reader per
file suffix (nibabel for NIfTI, PIL for PNG/JPEG/TIFF, pydicom for a single DICOM file, numpy for
``.npy``) and returns a channel-first :class:`~monai.data.MetaTensor` whose ``.affine`` and
``.meta["spacing"]`` describe the voxel grid. :func:`write` is the inverse: NIfTI keeps dtype and
affine, PNG/TIFF keep 8- or 16-bit integers exactly, floats are only quantised when the caller names
the intensity window, and every file is written atomically (temporary file + :func:`os.replace`).

Conventions:

- Arrays are ``(C, *spatial)``. A 2D image is ``(C, H, W)`` in ordinary array order (``H`` = rows),
  so ``read("x.png")[0]`` equals ``np.array(PIL.Image.open("x.png"))``. MONAI's PIL reader swaps the
  two axes by default (ITK convention); we switch that off. DICOM is read likewise as
  ``(C, rows, columns)`` with an affine that matches this order, and a folder holding one DICOM
  series as a volume ``(C, slices, rows, columns)``, slices ordered along the slice normal.
- PyTorch has almost no arithmetic for ``torch.uint16`` (no add, max or clamp on CPU), so 16-bit
  data comes back as ``torch.int32`` (exact, as MONAI does it). The dtype stored in the file is kept
  as ``meta["source_dtype"]`` (e.g. ``"uint16"``); :func:`write` uses it to write a 16-bit PNG again.
- Every error about a file is a :class:`MedgenIOError` (a :class:`ValueError`) whose message starts
  with the path and says what is wrong with it.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader, PydicomReader

__all__ = [
    "IMAGE_SUFFIXES",
    "MedgenIOError",
    "affine_from_axcodes",
    "axcodes_from_affine",
    "dicom_series_shape",
    "image_stem",
    "files_by_stem",
    "image_suffix",
    "list_images",
    "read",
    "write",
]

#: Suffixes understood by :func:`read` (lower case; ``.nii.gz`` counts as one suffix).
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".nii.gz",
    ".nii",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".dcm",
    ".npy",
)
_WRITE_SUFFIXES = (".nii.gz", ".nii", ".png", ".tif", ".tiff", ".npy")
_COMPOUND_SUFFIXES = (".nii.gz",)
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class MedgenIOError(ValueError):
    """A file could not be read or written; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# names


def image_suffix(path: str | Path) -> str:
    """Return the lower-case image suffix of ``path``, treating ``.nii.gz`` as one suffix.

    Example:
        >>> image_suffix("sub-01_T1w.nii.gz"), image_suffix("scan.PNG")
        ('.nii.gz', '.png')
    """
    name = Path(path).name.lower()
    for compound in _COMPOUND_SUFFIXES:
        if name.endswith(compound) and len(name) > len(compound):
            return compound
    return Path(name).suffix


def image_stem(path: str | Path) -> str:
    """Return the file name without its image suffix (``a.nii.gz`` → ``a``, ``b.v2.png`` → ``b.v2``)."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def files_by_stem(files: Iterable[Path], folder: str | Path) -> dict[str, Path]:
    """Map each file's stem (:func:`image_stem`) to its path, refusing two files with one stem.

    Raises:
        MedgenIOError: naming ``folder`` and both files when two files share a stem (for example
            ``a.png`` and ``a.nii.gz``), since pairs are matched by file name without suffix.
    """
    table: dict[str, Path] = {}
    for path in files:
        stem = image_stem(path)
        if stem in table:
            raise MedgenIOError(
                f"{folder}: two files share the name {stem!r} ({table[stem].name}, {path.name}); "
                "pairs are matched by file name without suffix"
            )
        table[stem] = path
    return table


def list_images(
    folder: str | Path,
    suffixes: Iterable[str] = IMAGE_SUFFIXES,
    *,
    recursive: bool = False,
) -> list[Path]:
    """List the image files in ``folder``, sorted by path.

    Hidden files (name starting with ``.``, e.g. half-written temporary files or macOS ``._*``
    files) are skipped.

    Args:
        folder: directory to list.
        suffixes: accepted suffixes, compared case-insensitively; ``.nii.gz`` is one suffix.
        recursive: also look in sub-folders.

    Returns:
        Sorted list of paths.

    Raises:
        MedgenIOError: if ``folder`` does not exist, is not a directory, or holds no matching file.
    """
    folder = Path(folder)
    wanted = {s.lower() if s.startswith(".") else f".{s.lower()}" for s in suffixes}
    if not folder.exists():
        raise MedgenIOError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise MedgenIOError(f"{folder}: not a folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(
        p
        for p in candidates
        if p.is_file() and not p.name.startswith(".") and image_suffix(p) in wanted
    )
    if not files:
        raise MedgenIOError(
            f"{folder}: folder holds no image files (looked for {', '.join(sorted(wanted))})"
        )
    return files


# --------------------------------------------------------------------------------------------------
# reading


class _SourceDtypeReader(ImageReader):
    """Wrap a MONAI reader and record the dtype of the array as decoded from the file.

    MONAI converts ``uint16`` to ``int32`` when it builds the tensor; recording the dtype before
    that lets :func:`write` and the metrics know the file was 16-bit.
    """

    def __init__(self, inner: ImageReader, suffix: str) -> None:
        super().__init__()
        self.inner = inner
        self.suffix = suffix

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return self.inner.verify_suffix(filename)

    def read(self, data: Any, **kwargs: Any) -> Any:
        return self.inner.read(data, **kwargs)

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        array, meta = self.inner.get_data(img)
        dtype = np.dtype(array.dtype)
        # A PNG holds at most 16 bits per sample; some Pillow versions decode 16-bit gray as "I".
        if self.suffix == ".png" and dtype.kind in "iu" and dtype.itemsize > 2:
            dtype = np.dtype(np.uint16)
        meta["source_dtype"] = dtype.name
        return array, meta


def _make_reader(suffix: str) -> ImageReader:
    # Imported here: building MONAI readers probes optional packages, which we only want to pay for
    # (and hear about) when a file of that kind is actually read.
    from monai.data import NibabelReader, NumpyReader, PILReader, PydicomReader

    if suffix in (".nii", ".nii.gz"):
        return NibabelReader()
    if suffix in _PIL_SUFFIXES:
        return PILReader(reverse_indexing=False)  # (H, W) array order, not MONAI's (W, H)
    if suffix == ".dcm":
        return PydicomReader(swap_ij=False)  # (rows, columns), affine adjusted by MONAI
    if suffix == ".npy":
        return NumpyReader(channel_dim=0)
    raise AssertionError(suffix)  # pragma: no cover - guarded by the caller


def _spacing_from_affine(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    rows = affine.shape[0] - 1
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:rows, :spatial_dims] ** 2).sum(axis=0))


def axcodes_from_affine(affine: Any) -> str:
    """The anatomical axis codes (``"RAS"``, ``"LPS"``, ...) of a 4x4 voxel-to-world affine.

    World coordinates follow NIfTI's RAS+ convention (what :func:`read` returns for every
    format). Each array axis gets the world direction its column is closest to, so an oblique
    affine is rounded to the nearest orthogonal orientation (nibabel's ``aff2axcodes``).
    """
    from nibabel.orientations import aff2axcodes

    matrix = np.asarray(torch.as_tensor(affine).detach().cpu().double(), dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {matrix.shape}")
    codes = aff2axcodes(matrix)
    if None in codes:
        raise ValueError(f"affine has a degenerate (zero) axis: {matrix.tolist()}")
    return "".join(codes)


_AXIS_CODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0)}
_AXIS_CODES.update({"S": (2, 1.0), "I": (2, -1.0)})


def affine_from_axcodes(spacing: Sequence[float], axcodes: str = "RAS") -> torch.Tensor:
    """A 4x4 float64 affine whose array axes point along ``axcodes`` with voxel size ``spacing``.

    The inverse of :func:`axcodes_from_affine` for orthogonal affines; the origin is 0.

    Example:
        >>> affine_from_axcodes((1.0, 1.0, 2.5), "LPS").diagonal().tolist()
        [-1.0, -1.0, 2.5, 1.0]
    """
    codes = str(axcodes).upper()
    if len(codes) != 3 or any(c not in _AXIS_CODES for c in codes):
        raise ValueError(f"axcodes must be three of R/L, A/P, S/I like 'RAS', got {axcodes!r}")
    if sorted(_AXIS_CODES[c][0] for c in codes) != [0, 1, 2]:
        raise ValueError(f"axcodes {axcodes!r} name a world axis twice")
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, got {spacing!r}")
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = 0.0
    for column, (code, size) in enumerate(zip(codes, spacing, strict=True)):
        row, sign = _AXIS_CODES[code]
        affine[row, column] = sign * float(size)
    return affine


@functools.cache
def _loader() -> Any:
    """One shared ``LoadImage``; we always pass the reader at call time.

    Built lazily and once: ``LoadImage`` instantiates every MONAI reader on construction, which is
    slow and, without nvImageCodec, warns each time.
    """
    from monai.transforms import LoadImage

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
        return LoadImage(image_only=True, ensure_channel_first=False, dtype=None)


# --------------------------------------------------------------------------------------------------
# DICOM series folders

#: Files in a series folder that are not slices: the DICOMDIR index of a DICOM medium.
_DICOM_INDEX_NAMES = frozenset({"dicomdir"})


class _DicomSeriesReader(PydicomReader):
    """MONAI's :class:`~monai.data.PydicomReader`, given slices that are already read and ordered.

    On a folder, MONAI's reader stacks the slices in ``InstanceNumber`` order and skips (with a
    warning) any file it cannot parse. We want the order along the slice normal and an error for
    any bad file, so :func:`_dicom_series_slices` reads, checks and orders the files, and this
    reader hands those datasets to MONAI's stacking, per-slice rescaling and affine code, which
    orders them by ``InstanceNumber`` -- renumbered (in memory only) to the position order.
    """

    def __init__(self, datasets: list[Any], files: list[str]) -> None:
        super().__init__(swap_ij=False)  # (rows, columns), as for a single file
        self._datasets = datasets
        self._files = files

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return True

    def read(self, data: Any, **kwargs: Any) -> Any:
        # The state PydicomReader.read leaves for get_data when it has read a series folder.
        self.has_series = True
        self.filenames = [list(self._files)]
        return [_SliceForMonai(ds) for ds in self._datasets]


class _SliceForMonai:
    """A slice as MONAI's series code sees it: the pydicom dataset, ``PixelSpacing`` a plain list.

    MONAI appends the mean slice distance to the first slice's ``PixelSpacing`` in place. On
    pydicom's ``MultiValue`` of DS that append checks the float as a DS string, which raises
    ``OverflowError`` under pydicom's strict validation (``RAISE``) whenever the distance needs
    more than 16 characters (``2.5000000000000036``), even for a regular series; and it would
    change the dataset. A list of floats takes the append; everything else is the dataset's.
    """

    def __init__(self, ds: Any) -> None:
        self._ds = ds
        spacing = _dicom_float(ds, "PixelSpacing", 2)
        if spacing is not None:
            self.PixelSpacing = spacing.tolist()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)


def _dicom_float(ds: Any, keyword: str, count: int) -> np.ndarray | None:
    """``count`` finite floats from a DICOM element, or ``None`` when absent or malformed."""
    value = ds.get(keyword)
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (count,) and np.isfinite(array).all() else None


def _dicom_length(ds: Any, keyword: str) -> float | None:
    """A positive finite length from a one-valued DICOM element, or ``None``."""
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _series_files(folder: Path) -> list[Path]:
    """The slice files of a series folder, sorted: no hidden files, no DICOMDIR, no sub-folders."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower() not in _DICOM_INDEX_NAMES
    )
    if not files:
        raise MedgenIOError(
            f"{folder}: folder is empty; expected the DICOM files of one series "
            "(sub-folders are not searched)"
        )
    return files


def dicom_series_shape(folder: str | Path) -> tuple[int, ...] | None:
    """The shape ``(1, slices, rows, columns)`` :func:`read` gives a series folder, from one header.

    Counts the slice files (as :func:`read` selects them) and reads the header of the first one,
    without pixels, so checking the shapes of many series stays cheap. Slices that differ from the
    first one, and files that are not slices, are found (and named) when the series is read.

    Args:
        folder: a folder holding the DICOM files of one series.

    Returns:
        The channel-first shape, or ``None`` when the first file holds several frames or colour
        samples (which :func:`read` refuses in a series, with a message).

    Raises:
        MedgenIOError: an empty folder, or a first file that is not a readable DICOM header.
    """
    import pydicom

    folder = Path(folder)
    files = _series_files(folder)
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except MemoryError:
        raise
    except Exception as exc:
        raise MedgenIOError(
            f"{files[0]}: not a readable DICOM image header in series folder {folder}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if frames > 1 or samples != 1:
        return None
    return (1, len(files), rows, columns)


def _position_text(position: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in position) + ")"


def _spacing_error(
    folder: Path, files: list[Path], positions: list[np.ndarray], normal: np.ndarray
) -> MedgenIOError | None:
    """The error for slices (in position order) that are not evenly spaced, or ``None``.

    The step is the smallest distance between neighbours. A distance of ``n`` steps means
    ``n - 1`` missing slices, whose positions are named; any other distance is irregular spacing.
    """
    distance = np.array([float(p @ normal) for p in positions])
    gaps = np.diff(distance)
    if gaps.size == 0 or gaps.max() - gaps.min() <= 0.01 * gaps.mean() + 1e-4:
        return None
    step = float(gaps.min())
    tolerance = 0.01 * step + 1e-4
    missing: list[str] = []
    holes: list[str] = []
    irregular: list[str] = []
    for k, gap in enumerate(gaps):
        if abs(gap - step) <= tolerance:
            continue
        between = f"between {files[k].name} and {files[k + 1].name}"
        n = round(gap / step)
        if n >= 2 and abs(gap - n * step) <= n * tolerance:
            missing += [_position_text(positions[k] + j * step * normal) for j in range(1, n)]
            holes.append(f"{n - 1} {between}")
        else:
            irregular.append(f"{gap:.4g} mm {between}")
    parts = []
    if missing:
        where = holes[0][2:] if len(missing) == 1 else f"({'; '.join(holes)})"
        parts.append(
            f"{len(missing)} slice{'' if len(missing) == 1 else 's'} missing {where}: no slice "
            f"at ImagePositionPatient (LPS, mm) {', '.join(missing[:10])}"
            + (f" ... (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        )
    if irregular:
        parts.append(f"slice spacing is not uniform: {'; '.join(irregular[:10])}")
    return MedgenIOError(
        f"{folder}: {'; '.join(parts)}, where the other slices lie {step:.4g} mm apart. A volume "
        "needs evenly spaced slices: restore the missing files (or export the series again), or "
        "resample the series to uniform spacing first"
    )


def _dicom_series_slices(folder: Path) -> tuple[list[Any], list[str], np.ndarray | None]:
    """Read and check every slice of a series folder and order them along the slice normal.

    Returns:
        The pydicom datasets (pixel data decoded and cached) and their file names, ordered, and
        the slice step as an LPS vector when it is known from the orientation (else ``None``).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = _series_files(folder)

    datasets = []
    for file in files:
        try:
            ds = pydicom.dcmread(file)
        except InvalidDicomError as exc:
            raise MedgenIOError(
                f"{file}: not a DICOM file ({exc}); the series folder {folder} must hold only the "
                "DICOM files of one series"
            ) from exc
        except MemoryError:
            raise
        except Exception as exc:
            raise MedgenIOError(
                f"{file}: corrupt or truncated DICOM file in series folder {folder}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if "PixelData" not in ds:
            raise MedgenIOError(
                f"{file}: DICOM file has no pixel data (truncated, or not an image) in series "
                f"folder {folder}"
            )
        try:
            pixels = ds.pixel_array  # decoded once here; pydicom caches it for MONAI
        except MemoryError:
            raise
        except Exception as exc:
            raise MedgenIOError(
                f"{file}: cannot decode the pixel data (corrupt or truncated?): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if pixels.ndim != 2:
            raise MedgenIOError(
                f"{file}: a series folder must hold single-frame grayscale slices, but this file "
                f"holds an array of shape {pixels.shape} (multi-frame or colour); read it on its own"
            )
        datasets.append(ds)

    uids: dict[str, int] = {}
    for ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", "(no SeriesInstanceUID)"))
        uids[uid] = uids.get(uid, 0) + 1
    if len(uids) > 1:
        listing = "; ".join(f"{uid} ({n} files)" for uid, n in sorted(uids.items()))
        raise MedgenIOError(
            f"{folder}: folder mixes {len(uids)} DICOM series (SeriesInstanceUID: {listing}); "
            "put each series in its own folder"
        )

    shape = datasets[0].pixel_array.shape
    for file, ds in zip(files, datasets, strict=True):
        if ds.pixel_array.shape != shape:
            raise MedgenIOError(
                f"{file}: slice of {ds.pixel_array.shape[0]}x{ds.pixel_array.shape[1]} pixels in "
                f"a series of {shape[0]}x{shape[1]} slices ({files[0].name})"
            )

    orientations = [_dicom_float(ds, "ImageOrientationPatient", 6) for ds in datasets]
    positions = [_dicom_float(ds, "ImagePositionPatient", 3) for ds in datasets]
    step = None
    if all(o is not None for o in orientations) and all(p is not None for p in positions):
        for file, o in zip(files, orientations, strict=True):
            if not np.allclose(o, orientations[0], atol=1e-4):
                raise MedgenIOError(
                    f"{file}: ImageOrientationPatient {o.tolist()} differs from that of "
                    f"{files[0].name} ({orientations[0].tolist()}) in series folder {folder}"
                )
        normal = np.cross(orientations[0][:3], orientations[0][3:])
        normal /= max(float(np.linalg.norm(normal)), 1e-12)
        distance = np.array([float(p @ normal) for p in positions])
        order = np.argsort(distance, kind="stable")
        gaps = np.diff(distance[order])
        if gaps.size:
            k = int(np.argmin(gaps))
            if gaps[k] < 1e-3:
                a, b = files[order[k]].name, files[order[k + 1]].name
                raise MedgenIOError(
                    f"{folder}: slices {a} and {b} lie at the same position along the slice normal "
                    "(two acquisitions, e.g. echoes or phases, in one series?); separate them"
                )
            error = _spacing_error(
                folder, [files[i] for i in order], [positions[i] for i in order], normal
            )
            if error is not None:
                raise error
        # The slice step of a one-slice series (more slices: the positions give it).
        thickness = _dicom_length(datasets[0], "SpacingBetweenSlices")
        thickness = thickness or _dicom_length(datasets[0], "SliceThickness") or 1.0
        step = normal * thickness
    else:
        numbers = []
        for file, ds in zip(files, datasets, strict=True):
            try:
                numbers.append(int(ds.InstanceNumber))
            except (AttributeError, TypeError, ValueError):
                raise MedgenIOError(
                    f"{file}: slice has neither ImagePositionPatient/ImageOrientationPatient nor "
                    f"InstanceNumber, so the slices of {folder} cannot be ordered"
                ) from None
        if len(set(numbers)) != len(numbers):
            raise MedgenIOError(
                f"{folder}: slices lack ImagePositionPatient and their InstanceNumbers repeat; "
                "the slices cannot be ordered"
            )
        order = np.argsort(numbers, kind="stable")

    ordered = [datasets[i] for i in order]
    for rank, ds in enumerate(ordered):
        ds.InstanceNumber = rank  # in memory: MONAI stacks in InstanceNumber order
    return ordered, [str(files[i]) for i in order], step


def _read_dicom_series(folder: Path) -> MetaTensor:
    """Read a folder holding one DICOM series as ``(1, slices, rows, columns)``; see :func:`read`."""
    datasets, files, step = _dicom_series_slices(folder)
    reader = _SourceDtypeReader(_DicomSeriesReader(datasets, files), ".dcm")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            image = _loader()(str(folder), reader=reader)
    except MemoryError:
        raise
    except Exception as exc:
        raise MedgenIOError(
            f"{folder}: cannot assemble the DICOM series: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(image, MetaTensor):  # pragma: no cover - LoadImage always returns one
        image = MetaTensor(image)

    affine = image.affine.detach().cpu().numpy().astype(np.float64)
    array = image.as_tensor()
    if array.ndim == 2:  # one slice: MONAI gives (rows, columns) and no slice direction
        array = array[..., None]
        if step is not None:
            affine[:3, 2] = np.array([-1.0, -1.0, 1.0]) * step  # LPS -> RAS
    # (rows, columns, slices) -> (slices, rows, columns); affine columns permuted to match.
    array = array.permute(2, 0, 1).unsqueeze(0).contiguous()
    affine = affine[:, [2, 0, 1, 3]]
    meta = dict(image.meta)
    meta["spatial_shape"] = np.asarray(array.shape[1:])
    meta["original_affine"] = affine.copy()
    meta["original_channel_dim"] = float("nan")
    meta["spacing"] = _spacing_from_affine(affine, 3)
    meta["filename_or_obj"] = str(folder)
    meta.pop("affine", None)
    return MetaTensor(array, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def read(path: str | Path) -> MetaTensor:
    """Read an image or volume as a channel-first tensor with its affine.

    Readers (through :class:`monai.transforms.LoadImage`): nibabel for ``.nii``/``.nii.gz``, PIL for
    ``.png``/``.jpg``/``.jpeg``/``.tif``/``.tiff`` (first frame), pydicom for a single ``.dcm`` file
    (rescale slope/intercept applied, so CT comes back in HU as float), numpy for ``.npy``
    (channel-first as written by :func:`write`; a 2D array is one channel).

    A *folder* is read as one DICOM series (files named ``*.dcm`` or without extension alike; a
    ``DICOMDIR`` index and hidden files are ignored, sub-folders are not searched): a volume
    ``(1, D, H, W)`` = ``(1, slices, rows, columns)``, its slices ordered by position along the
    slice normal (``ImageOrientationPatient``, ``ImagePositionPatient``; by ``InstanceNumber``
    only when positions are missing), each slice rescaled to HU/physical units by its own slope
    and intercept, with an affine (RAS, as MONAI's readers give) whose slice axis runs from the
    first to the last slice position. A folder with one file gives ``(1, 1, H, W)`` with the slice
    axis along the normal, ``SpacingBetweenSlices`` (or ``SliceThickness``, else 1) long.

    Args:
        path: file to read, or a folder holding the DICOM files of one series.

    Returns:
        ``MetaTensor`` of shape ``(C, *spatial)``. Its dtype is the file's (``uint8`` stays
        ``uint8``, ``float32`` stays ``float32``) except ``uint16``, which becomes ``int32`` because
        torch lacks ``uint16`` arithmetic; ``meta["source_dtype"]`` holds the file's dtype name.
        ``.affine`` is the 4x4 voxel-to-world matrix (identity for PNG/TIFF/NPY) and
        ``meta["spacing"]`` the voxel size along each spatial axis.

    Raises:
        MedgenIOError: missing file, unsupported suffix, or a file that cannot be decoded
            (corrupt, truncated, wrong format); for a folder also: no files, a file that is not
            a readable single-frame DICOM image (named), several series (their
            ``SeriesInstanceUID`` listed), slices of different sizes or orientations, two
            slices at one position, or slices that are not evenly spaced (a missing slice: its
            position is named).
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path)
    suffix = image_suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise MedgenIOError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(IMAGE_SUFFIXES)}"
        )
    if not path.exists():
        raise MedgenIOError(f"{path}: file not found")
    if not path.is_file():
        raise MedgenIOError(f"{path}: not a regular file")

    reader = _SourceDtypeReader(_make_reader(suffix), suffix)
    loader = _loader()
    try:
        with warnings.catch_warnings():
            # PIL hands out read-only arrays; we copy below, so torch's warning is noise.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            image = loader(str(path), reader=reader)  # runtime reader: its errors reach us as is
    except MemoryError:
        raise
    except PermissionError as exc:
        raise MedgenIOError(f"{path}: permission denied: {exc}") from exc
    except Exception as exc:
        raise MedgenIOError(
            f"{path}: cannot decode {suffix} file (corrupt, truncated or not a {suffix} file): "
            f"{type(exc).__name__}: {exc}"
        ) from exc

    if not isinstance(image, MetaTensor):  # pragma: no cover - LoadImage always returns one
        image = MetaTensor(image)
    if suffix == ".npy" and image.ndim == 2:
        image = image.unsqueeze(0)
    elif suffix != ".npy":
        from monai.transforms import EnsureChannelFirst

        image = EnsureChannelFirst()(image)
    if suffix in _PIL_SUFFIXES:
        image = image.clone()  # detach from PIL's read-only buffer
    if image.ndim < 3:
        raise MedgenIOError(
            f"{path}: expected at least 2 spatial dimensions, got {tuple(image.shape)}"
        )

    spatial_dims = image.ndim - 1
    image.meta["spacing"] = _spacing_from_affine(image.affine.numpy(), min(spatial_dims, 3))
    image.meta["filename_or_obj"] = str(path)
    return image


# --------------------------------------------------------------------------------------------------
# writing


def _to_numpy(image: Any) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """Return ``(array, affine or None, source dtype name or None)`` for tensor/ndarray input."""
    affine = None
    source_dtype = None
    if isinstance(image, MetaTensor):
        affine = image.affine.detach().cpu().numpy()
        source_dtype = image.meta.get("source_dtype")
        image = image.as_tensor()
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        array = tensor.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"expected a torch.Tensor, MetaTensor or numpy array, got {type(image)}")
    return array, affine, source_dtype if isinstance(source_dtype, str) else None


def _file_mode(path: Path) -> int:
    """Permissions for a new file: those of the file being replaced, else 0o666 minus the umask."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o7777
    umask = 0o022
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    return 0o666 & ~umask


def _atomic_write(path: Path, write_fn: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write_fn`` into a temporary file beside ``path``, then rename it over ``path``.

    Readers never see a half-written file, and on any error the temporary file is removed and an
    existing ``path`` is left untouched.
    """
    mode = _file_mode(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _quantise(
    array: np.ndarray, value_range: tuple[float, float], bits: int, path: Path
) -> np.ndarray:
    lo, hi = (float(v) for v in value_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise MedgenIOError(
            f"{path}: value_range must be two finite numbers lo < hi, got {value_range}"
        )
    top = 2**bits - 1
    scaled = (array.astype(np.float64) - lo) / (hi - lo)
    out = np.rint(np.clip(scaled, 0.0, 1.0) * top)
    return out.astype(np.uint8 if bits == 8 else np.uint16)


def _encode_pil(
    array: np.ndarray,
    path: Path,
    fmt: str,
    value_range: tuple[float, float] | None,
    bit_depth: int | None,
    source_dtype: str | None,
) -> Callable[[IO[bytes]], None]:
    from PIL import Image

    kind = "PNG" if fmt == "PNG" else "TIFF"
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise MedgenIOError(
            f"{path}: {kind} holds a 2D gray (1, H, W) or RGB (3, H, W) image, got shape "
            f"{tuple(array.shape)} (write volumes as .nii.gz, other channel counts as .npy)"
        )
    allowed = (8, 16, 32) if kind == "TIFF" else (8, 16)
    if bit_depth is not None and bit_depth not in allowed:
        raise MedgenIOError(
            f"{path}: bit_depth must be one of {allowed} for {kind}, got {bit_depth}"
        )

    if value_range is not None:
        if bit_depth == 32:
            raise MedgenIOError(
                f"{path}: bit_depth=32 writes float32 values unscaled; do not pass value_range"
            )
        pixels = _quantise(array, value_range, bit_depth or 16, path)
    elif array.dtype.kind in "biu":
        natural = {"bool": 8, "uint8": 8, "uint16": 16}.get(array.dtype.name)
        if natural is None:
            natural = {"uint8": 8, "uint16": 16}.get(source_dtype or "", 16)
        bits = bit_depth or natural
        if bits == 32:
            raise MedgenIOError(f"{path}: bit_depth=32 is for float images; got {array.dtype.name}")
        if array.size:
            low, high = int(array.min()), int(array.max())
            if low < 0 or high > 2**bits - 1:
                raise MedgenIOError(
                    f"{path}: integer values in [{low}, {high}] do not fit a {bits}-bit {kind}; "
                    "pass value_range=(lo, hi) to rescale, or write .nii.gz/.npy to keep them"
                )
        pixels = array.astype(np.uint8 if bits == 8 else np.uint16)
    elif array.dtype.kind == "f":
        if kind == "TIFF" and bit_depth == 32:
            if array.shape[0] != 1:
                raise MedgenIOError(
                    f"{path}: float32 TIFF supports one channel, got {array.shape[0]}"
                )
            pixels = array.astype(np.float32)
        else:
            extra = " or bit_depth=32 to store float32 as is" if kind == "TIFF" else ""
            raise MedgenIOError(
                f"{path}: float image needs value_range=(lo, hi) to be written as a {kind} "
                f"(values are clipped to it and scaled to bit_depth, 16 by default){extra}; "
                "write .nii.gz or .npy to keep floats"
            )
    else:
        raise MedgenIOError(f"{path}: cannot write dtype {array.dtype} as {kind}")

    if pixels.shape[0] == 3 and pixels.dtype != np.uint8:
        raise MedgenIOError(
            f"{path}: Pillow cannot write 16-bit RGB {kind}; pass bit_depth=8 to quantise to 8 bits "
            "explicitly, or write .npy/.nii.gz to keep the full depth"
        )
    hwc = pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)
    pil_image = Image.fromarray(np.ascontiguousarray(hwc))

    def write_fn(handle: IO[bytes]) -> None:
        pil_image.save(handle, format=fmt)

    return write_fn


def _as_affine(affine: Any, path: Path) -> np.ndarray:
    matrix = np.asarray(
        affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine,
        dtype=np.float64,
    )
    if matrix.shape == (3, 3):  # 2D affine: embed into 3D
        full = np.eye(4)
        full[:2, :2] = matrix[:2, :2]
        full[:2, 3] = matrix[:2, 2]
        matrix = full
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise MedgenIOError(f"{path}: affine must be a finite 4x4 matrix, got shape {matrix.shape}")
    return matrix


def _encode_nifti(array: np.ndarray, path: Path, affine: np.ndarray, compress: bool):
    import nibabel as nib

    spatial = array.ndim - 1
    if array.shape[0] == 1:
        data = array[0]
    elif spatial == 3:
        data = np.moveaxis(array, 0, -1)  # (X, Y, Z, C): MONAI reads the 4th axis as channels
    else:
        raise MedgenIOError(
            f"{path}: a 2D multi-channel NIfTI would read back as a 3D volume; got shape "
            f"{tuple(array.shape)}; write one file per channel or use .npy"
        )
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    elif data.dtype == np.float16:
        data = data.astype(np.float32)  # NIfTI has no float16
    try:
        image = nib.Nifti1Image(np.ascontiguousarray(data), affine, dtype=data.dtype)
    except Exception as exc:
        raise MedgenIOError(f"{path}: cannot store dtype {data.dtype} in NIfTI: {exc}") from exc
    with contextlib.suppress(Exception):  # qform cannot hold shears; sform always holds the affine
        image.set_qform(affine, code=2)
    image.header.set_xyzt_units("mm")
    payload = image.to_bytes()
    if compress:
        # mtime=0 (and no file name in the header): identical input gives identical bytes.
        payload = gzip.compress(payload, compresslevel=6, mtime=0)

    def write_fn(handle: IO[bytes]) -> None:
        handle.write(payload)

    return write_fn


def write(
    image: torch.Tensor | np.ndarray | MetaTensor,
    path: str | Path,
    *,
    affine: torch.Tensor | np.ndarray | None = None,
    value_range: tuple[float, float] | None = None,
    bit_depth: int | None = None,
) -> Path:
    """Write a channel-first image or volume atomically; the format follows the suffix.

    - ``.png`` / ``.tif`` / ``.tiff``: 2D gray ``(1, H, W)`` or RGB ``(3, H, W)``. Integer input is
      written as is, never rescaled: ``uint8`` → 8-bit, ``uint16`` → 16-bit, other integer dtypes
      (e.g. the ``int32`` that :func:`read` returns for 16-bit files) → the ``meta["source_dtype"]``
      depth of a MetaTensor, else 16-bit; values that do not fit raise. Float input requires
      ``value_range=(lo, hi)``: values are clipped to it and scaled to ``2**bit_depth - 1`` with
      ``bit_depth`` 16 by default (8 only when asked). ``value_range`` also rescales integer input
      when given. TIFF alone accepts ``bit_depth=32``: one float32 channel stored unscaled. Pillow
      cannot write 16-bit RGB, so RGB needs ``bit_depth=8`` (or ``uint8`` input).
    - ``.nii`` / ``.nii.gz``: nibabel, dtype kept (``float16`` → ``float32``, ``bool`` → ``uint8``),
      affine from ``affine``, else from a MetaTensor, else identity; sform and qform set, units mm.
      ``(1, *spatial)`` is stored as a 2D/3D image, ``(C, X, Y, Z)`` as a 4D ``(X, Y, Z, C)`` image.
      ``.nii.gz`` is gzip with ``mtime=0``, so the same input always gives the same bytes.
    - ``.npy``: the array as is (no affine).

    No patient metadata is ever written. The file appears atomically (temporary file in the same
    folder, then :func:`os.replace`); parent folders are created.

    Args:
        image: ``(C, *spatial)`` tensor, MetaTensor or numpy array.
        path: destination file.
        affine: 4x4 (or 2D 3x3) voxel-to-world matrix, NIfTI only.
        value_range: intensity window mapped to the full integer range (PNG/TIFF only).
        bit_depth: 8 or 16 (PNG/TIFF), or 32 (float TIFF).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        MedgenIOError: unsupported suffix, bad shape, NaN/Inf values, float PNG without
            ``value_range``, or values that do not fit the requested format.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in _WRITE_SUFFIXES:
        raise MedgenIOError(
            f"{path}: cannot write {suffix or '(no suffix)'!r} files; "
            f"supported: {', '.join(_WRITE_SUFFIXES)}"
        )
    array, meta_affine, source_dtype = _to_numpy(image)
    if array.ndim not in (3, 4):
        raise MedgenIOError(
            f"{path}: expected a channel-first array (C, H, W) or (C, D, H, W), "
            f"got shape {tuple(array.shape)}"
        )
    if array.dtype.kind not in "biuf":
        raise MedgenIOError(f"{path}: cannot write dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise MedgenIOError(f"{path}: image contains {bad} NaN/Inf values; refusing to write it")

    if suffix in (".png", ".tif", ".tiff"):
        if affine is not None:
            raise MedgenIOError(f"{path}: PNG/TIFF cannot store an affine; write .nii.gz instead")
        fmt = "PNG" if suffix == ".png" else "TIFF"
        write_fn = _encode_pil(array, path, fmt, value_range, bit_depth, source_dtype)
    else:
        if value_range is not None or bit_depth is not None:
            raise MedgenIOError(
                f"{path}: value_range/bit_depth apply to PNG/TIFF only; {suffix} keeps values as is"
            )
        if suffix == ".npy":
            data = np.ascontiguousarray(array)

            def write_fn(handle: IO[bytes]) -> None:
                np.save(handle, data, allow_pickle=False)

        else:
            chosen = affine if affine is not None else meta_affine
            matrix = np.eye(4) if chosen is None else _as_affine(chosen, path)
            write_fn = _encode_nifti(array, path, matrix, compress=suffix == ".nii.gz")

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, write_fn)
    return path
