"""Translate image files and folders with a translation model, keeping each file's format.

Each output has its input's size, dtype and geometry (see :func:`translate_files`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medgen.inference.settings import Tiling

log = logging.getLogger(__name__)

__all__ = ["translate_files"]

_OUTPUT_SUFFIX = {".dcm": ".nii.gz", "": ".nii.gz", ".jpg": ".png", ".jpeg": ".png"}
_INTEGER_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def _cast_like(y: Tensor, dtype_name: str) -> Tensor | Any:
    """``y`` in the file's dtype: floats as float32/64, integers rounded and clipped to range."""
    import numpy as np

    dtype = np.dtype(dtype_name) if dtype_name else np.dtype(np.float32)
    array = y.detach().cpu().double().numpy()
    if dtype.kind == "f":
        return torch.from_numpy(array.astype(np.float64 if dtype.itemsize == 8 else np.float32))
    if dtype.kind == "b":
        return torch.from_numpy(array > 0.5)
    info = np.iinfo(dtype)
    return np.clip(np.rint(array), info.min, info.max).astype(dtype)  # numpy: keeps uint16


def _file_units(image: Any, model: Any, preset: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """The model-unit tensor of a read image, and the map of outputs back to the file's units."""
    source = str(image.meta.get("source_dtype", "")) or "float32"
    suffix = Path(str(image.meta.get("filename_or_obj", ""))).suffix.lower()
    low, high = model.value_range
    if preset is not None:
        x = preset(image)
        x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
        return x.float(), lambda y: _cast_like(preset.inverse(y), source)
    tensor = image.as_tensor().float()
    if suffix in _INTEGER_IMAGE_SUFFIXES and source in ("uint8", "uint16"):
        peak = 255.0 if source == "uint8" else 65535.0

        def back(y: Tensor) -> Any:
            return _cast_like((y - low) / (high - low) * peak, source)

        return low + tensor / peak * (high - low), back
    return tensor, lambda y: _cast_like(y, source)


def translate_files(
    model: Any,
    source: str | Path,
    output_dir: str | Path,
    *,
    direction: str = "a2b",
    tiling: Tiling | Mapping[str, Any] | int | Sequence[int] | str | None = None,
    deterministic: bool = True,
    input_preset: Any = None,
    **options: Any,
) -> list[Path]:
    """Translate an image file, or every image file of a folder, with a translation model.

    Each output has its input's size, dtype and geometry: PNG/TIFF keep their bit depth (8-bit in,
    8-bit out; 16-bit in, 16-bit out), NIfTI keeps its dtype and affine; DICOM input (a file, or
    for a 3D model a folder of one series) is written as NIfTI with the series' affine, JPEG as
    PNG. Intensities: integer PNG/TIFF/JPEG values are scaled from the dtype's full range onto
    the model's ``value_range`` and back; other files are taken in data units (e.g. HU). Give
    ``input_preset`` (a :mod:`medgen.data.presets` preset or its config, e.g. the training data's
    ``MRPercentile``) to map file intensities to model units and back with its inverse instead.

    A file that cannot be read or translated (corrupt, wrong dimensionality or channels, NaN) is
    reported by name and skipped; the others are still translated and written. When any file
    failed, a :class:`~medgen.data.io.MedgenIOError` listing them is raised at the end.

    Args:
        model: A :class:`~medgen.models.translation.TranslationModule` (``Pix2Pix``,
            ``CycleGAN``), e.g. from :func:`medgen.load`.
        source: An image file, or a folder of them.
        output_dir: Output folder (created); it may not be the input folder.
        direction: ``"a2b"`` or, for a CycleGAN, ``"b2a"``.
        tiling: How to tile (:class:`~medgen.inference.Tiling`, a dict, or the tile size; see
            :meth:`~medgen.models.translation.TranslationModule.translate` for the defaults).
        deterministic: Eval-mode translation (default); ``False`` for the reference code's
            stochastic test mode.
        input_preset: Optional intensity preset (object or config) applied to inputs, inverted on
            outputs.
        **options: Tiling settings as keywords (``tile=256``, ``layerwise=True``).

    Returns:
        The written files, in input order.
    """
    from medgen.data.io import MedgenIOError, image_stem, image_suffix, list_images, read, write
    from medgen.data.presets import get_preset
    from medgen.utils.files import ensure_writable_dir

    if not hasattr(model, "translate"):
        raise TypeError(f"{type(model).__name__} is not a translation model (no translate())")
    source = Path(source)
    if not source.exists():
        raise MedgenIOError(f"{source}: no such file or folder")
    preset = get_preset(input_preset) if input_preset is not None else None
    if source.is_dir():
        files = list_images(source)
        if model.spatial_dims == 3 and all(image_suffix(f) == ".dcm" for f in files):
            files = [source]  # one DICOM series
        if Path(output_dir).resolve() == source.resolve():
            raise MedgenIOError(
                f"{output_dir}: output folder is the input folder; choose another so that no "
                "input is overwritten"
            )
    else:
        files = [source]
    output_dir = ensure_writable_dir(output_dir, "output folder")

    written: list[Path] = []
    failures: list[str] = []
    for path in files:
        try:
            image = read(path)
            if image.ndim - 1 != model.spatial_dims:
                raise MedgenIOError(
                    f"{path}: {image.ndim - 1}D image {tuple(image.shape)}, but the model "
                    f"translates {model.spatial_dims}D images"
                )
            expected = model.in_channels if direction == "a2b" else model.out_channels
            if image.shape[0] != expected:
                raise MedgenIOError(
                    f"{path}: {image.shape[0]} channel(s), but the model translates images with "
                    f"{expected} ({direction})"
                )
            x, back = _file_units(image, model, preset)
            if not torch.isfinite(x).all():
                raise MedgenIOError(f"{path}: image contains NaN/Inf values")
            y = model.translate(x, direction, tiling, deterministic=deterministic, **options)
            suffix = image_suffix(path) if path.is_file() else ""
            suffix = _OUTPUT_SUFFIX.get(suffix, suffix)
            stem = image_stem(path) if path.is_file() else path.name
            dest = output_dir / f"{stem}{suffix}"
            if dest.exists() and dest.resolve() == path.resolve():
                raise MedgenIOError(f"{path}: the output would overwrite the input")
            affine = image.affine if suffix in (".nii", ".nii.gz") else None
            written.append(write(back(y), dest, affine=affine))
            log.info("translated %s -> %s", path, dest)
        except (MedgenIOError, ValueError, RuntimeError) as exc:
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            log.error("could not translate %s", message)
            failures.append(message)
    if failures:
        raise MedgenIOError(
            f"translated {len(written)} of {len(files)} files into {output_dir}; could not "
            "translate:\n  " + "\n  ".join(failures)
        )
    return written
