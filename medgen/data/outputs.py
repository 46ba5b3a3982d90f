"""What a model writes keeps what it read: the training data's geometry and, on request, its units.

Every model family records, from its first training batch, the voxel-to-world affine of the data
(orientation, spacing and origin, after the dataset's preset) and the intensity preset the data went
through (:func:`data_info_from_batch`). Models store this record in checkpoints and exports, and
:func:`write_images` uses it:

- 3D outputs are NIfTI files with the training data's affine (not an identity/RAS one);
- ``units="data"`` maps outputs back through the preset's inverse (HU for CT, 0-255 for RGB
  histology, raw counts for 16-bit microscopy, the training set's typical scanner units for MR,
  whose percentiles differ per scan), instead of the model's normalised range.

Models trained before this record existed fall back to their ``spacing`` / ``orientation``
settings.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgen.utils.files import ensure_writable_dir

__all__ = [
    "OUTPUT_UNITS",
    "batch_affine",
    "check_data_info",
    "data_info_from_batch",
    "output_affine",
    "to_data_units",
    "write_images",
]

#: Accepted values of ``units`` / ``output_units``.
OUTPUT_UNITS = ("model", "data")


def batch_affine(value: Any) -> torch.Tensor | None:
    """The ``(B, 4, 4)`` float64 affines of a batched MetaTensor, or ``None`` if it has none."""
    affine = getattr(value, "affine", None)
    if not isinstance(affine, torch.Tensor) or affine.shape[-2:] != (4, 4) or affine.numel() == 0:
        return None
    affine = affine.detach().double().cpu().reshape(-1, 4, 4)
    return affine if torch.isfinite(affine).all() else None


def _preset_config(transform: Any) -> dict[str, Any] | None:
    config = getattr(transform, "config", None)
    if not callable(config) or not hasattr(transform, "inverse"):
        return None
    try:
        return dict(config())
    except Exception:  # a preset-like object without a JSON config: no data units
        return None


def _mr_stats(value: Any) -> dict[str, float] | None:
    """Median MRPercentile statistics over a batch (MR units are per scan)."""
    from medgen.data.presets import META_KEY

    meta = getattr(value, "meta", None)
    found = meta.get(META_KEY) if isinstance(meta, Mapping) else None
    if not isinstance(found, Mapping) or "low" not in found or "high" not in found:
        return None
    try:
        low = [float(v) for v in torch.as_tensor(found["low"]).double().flatten()]
        high = [float(v) for v in torch.as_tensor(found["high"]).double().flatten()]
    except (TypeError, ValueError):
        return None
    if not low or not high:
        return None
    return {"low": statistics.median(low), "high": statistics.median(high)}


def data_info_from_batch(
    batch: Any, keys: Sequence[str], spatial_dims: int, transform: Any = None
) -> dict[str, Any]:
    """What a model records of its training data from one batch (and the dataset's transform).

    Args:
        batch: A training batch (a mapping of tensors, MetaTensors among them).
        keys: Batch keys to look at, in order (the model's image or target key first).
        spatial_dims: The model's dimensionality; the affine is recorded for 3D only.
        transform: The training dataset's ``transform`` (a preset), if known.

    Returns:
        ``{"affine": 4x4 list (3D), "preset": config, "preset_stats": {...}}``, the keys present
        only when found.
    """
    info: dict[str, Any] = {}
    values = [batch.get(k) for k in keys] if isinstance(batch, Mapping) else [batch]
    for value in values:
        affine = batch_affine(value) if spatial_dims == 3 else None
        if affine is not None and "affine" not in info:
            info["affine"] = affine[0].tolist()
        stats = _mr_stats(value)
        if stats is not None and "preset_stats" not in info:
            info["preset_stats"] = stats
    preset = _preset_config(transform)
    if preset is not None:
        info["preset"] = preset
    return info


def check_data_info(info: Any, source: str | os.PathLike) -> dict[str, Any]:
    """Validate a data record read from a checkpoint or export (untrusted input).

    Raises:
        ValueError: naming ``source`` when the record is malformed.
    """
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise ValueError(f"'{source}': the data record is not a mapping")
    info = dict(info)
    affine = info.get("affine")
    if affine is not None:
        array = np.asarray(affine, dtype=object)
        ok = array.shape == (4, 4) and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in array.flatten()
        )
        if not ok:
            raise ValueError(f"'{source}': the data affine must be 4x4 finite numbers")
    if info.get("preset") is not None:
        from medgen.utils.instantiate import check_targets

        check_targets(info["preset"])
    return info


def output_affine(model: Any) -> torch.Tensor:
    """The 4x4 affine of a model's 3D outputs: the training data's, else spacing/orientation."""
    from medgen.data.io import affine_from_axcodes

    affine = (getattr(model, "data_info", None) or {}).get("affine")
    if affine is not None:
        return torch.tensor(affine, dtype=torch.float64)
    spacing = list(getattr(model, "spacing", None) or (1.0, 1.0, 1.0))
    return affine_from_axcodes(spacing, getattr(model, "orientation", None) or "RAS")


def _intensity_steps(preset: Any) -> list[Any]:
    """The steps of a preset whose inverse changes intensities (not the grid)."""
    from medgen.data.presets import Pipeline, is_geometry_preset

    steps = list(preset.steps) if isinstance(preset, Pipeline) else [preset]
    return [s for s in steps if not is_geometry_preset(s)]


def to_data_units(model: Any, images: torch.Tensor) -> torch.Tensor:
    """Map ``images`` ``(N, C, *spatial)`` from the model's range to the training data's units.

    Applies the inverse of the training dataset's intensity preset (geometry steps are left out:
    generated images have no original grid). For :class:`~medgen.data.presets.MRPercentile`,
    whose units are per scan, the median percentiles of the first training batch are used.

    Raises:
        ValueError: the model has no recorded preset (trained before presets were recorded, or
            on data without one), or MR statistics are missing.
    """
    from medgen.data.presets import MRPercentile, get_preset

    info = getattr(model, "data_info", None) or {}
    if info.get("preset") is None:
        raise ValueError(
            f"{type(model).__name__} has no record of its training data's preset, so it cannot "
            "write data units; use units=model (the model's range "
            f"{tuple(getattr(model, 'value_range', ()))})"
        )
    preset = get_preset(info["preset"])
    out = images.detach().float().cpu()
    results = []
    for image in out:
        for step in reversed(_intensity_steps(preset)):
            if isinstance(step, MRPercentile):
                stats = info.get("preset_stats")
                if stats is None:
                    raise ValueError(
                        "MRPercentile data units need the training scans' percentiles, which "
                        "this model did not record; use units=model"
                    )
                image = step.inverse(image, stats=stats)
            else:
                image = step.inverse(image)
        results.append(torch.as_tensor(image).float())
    return torch.stack(results)


def _data_unit_format(model: Any) -> tuple[str, int | None, tuple[float, float] | None]:
    """(suffix, bit depth, value range) for 2D images in data units."""
    from medgen.data.presets import HistologyRGB, Microscopy16, ScaleRange, get_preset

    steps = _intensity_steps(get_preset(model.data_info["preset"]))
    first = steps[0] if steps else None
    if isinstance(first, HistologyRGB):
        return ".png", 8, (0.0, 255.0)
    if isinstance(first, Microscopy16):  # raw counts, stored unscaled in a 16-bit PNG
        return ".png", 16, (0.0, 65535.0)
    if type(first) is ScaleRange:
        low, high = (float(v) for v in first.config()["in_range"])
        if low == 0.0 and high in (255.0, 65535.0):
            return ".png", 8 if high == 255.0 else 16, (low, high)
    return ".tif", 32, None


def write_images(
    model: Any,
    images: torch.Tensor,
    output_dir: str | os.PathLike,
    prefix: str = "sample",
    units: str = "model",
) -> list[Path]:
    """Write generated images ``(N, C, *spatial)`` in ``model``'s data units, one file each.

    3D images become float32 NIfTI ``.nii.gz`` files with the training data's affine (orientation,
    spacing, origin; see :func:`output_affine`). 2D images in the model's range become PNG files
    scaled from its ``value_range`` (16-bit grey, 8-bit RGB).

    Args:
        model: The model (its ``value_range``, ``data_info``, ``spacing``, ``orientation``).
        images: ``(N, C, *spatial)`` in the model's range.
        output_dir: Destination folder (created).
        prefix: File name prefix (``prefix_0000.png`` ...).
        units: ``"model"`` (the normalised range the model works in) or ``"data"`` (the inverse
            of the training preset: HU, scanner units, 0-255, raw counts). 2D data-unit images
            are written as the original format where it holds them exactly (8-bit RGB, 16-bit
            counts) and as float32 TIFF otherwise (e.g. HU).
    """
    from medgen.data.io import write

    if units not in OUTPUT_UNITS:
        raise ValueError(f"units must be one of {OUTPUT_UNITS}, got {units!r}")
    output_dir = ensure_writable_dir(output_dir, "sample folder")
    value_range = tuple(model.value_range)
    images = images.detach().float().cpu().clamp(*value_range)
    if units == "data":
        data = to_data_units(model, images)
        suffix, bit_depth, data_range = _data_unit_format(model) if images.ndim == 4 else ("", 0, 0)
    paths = []
    for i, image in enumerate(images):
        if image.ndim == 4:
            path = output_dir / f"{prefix}_{i:04d}.nii.gz"
            volume = data[i] if units == "data" else image
            paths.append(write(volume, path, affine=output_affine(model)))
        elif units == "data":
            path = output_dir / f"{prefix}_{i:04d}{suffix}"
            if bit_depth == 32 and data[i].shape[0] != 1:
                raise ValueError(
                    f"{path}: {data[i].shape[0]}-channel images in float data units cannot be "
                    "written as TIFF; use units=model"
                )
            paths.append(write(data[i], path, value_range=data_range, bit_depth=bit_depth))
        else:
            path = output_dir / f"{prefix}_{i:04d}.png"
            bit_depth = 16 if image.shape[0] == 1 else 8  # PNG has no 16-bit RGB in Pillow
            paths.append(write(image, path, value_range=value_range, bit_depth=bit_depth))
    return paths
