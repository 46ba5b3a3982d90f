"""Intensity and geometry presets: model-ready tensors in, original units back out.

A preset is a callable ``preset(image) -> image`` on one channel-first image ``(C, *spatial)``
(a :class:`torch.Tensor`, a :class:`~monai.data.MetaTensor` or a NumPy array) with an
``inverse(image) -> image`` that returns the original units: HU for CT, the scanner's arbitrary
units for MR, 0-255 for RGB histology, raw counts for 16-bit microscopy. Every preset is built from
JSON-friendly arguments, so a Hydra config builds it::

    preset:
      _target_: medgen.data.presets.CTWindow
      low: -160.0
      high: 240.0

and :meth:`Preset.config` gives that config back (``get_preset(p.config())`` rebuilds ``p``).

- Intensity presets (:class:`ScaleRange`, :class:`CTWindow`, :class:`MRPercentile`,
  :class:`HistologyRGB`, :class:`Microscopy16`) are linear maps to ``[-1, 1]`` (or another
  ``out_range``) and return float32; a MetaTensor keeps its affine, meta and applied operations.
- Geometry presets (:class:`Resample`, :class:`Orient`, :class:`CropOrPad`) are MONAI's invertible
  ``Spacing``, ``Orientation`` and ``ResizeWithPadOrCrop``: the operation applied is recorded in
  the MetaTensor's ``applied_operations``, and ``inverse`` undoes the most recent one (restoring
  shape and affine; values as far as interpolation and cropping allow). They always return a
  MetaTensor (a plain tensor is taken to have an identity affine).
- :class:`Pipeline` chains presets and inverts them in reverse order; :func:`get_preset` builds a
  preset from a registry name (:data:`PRESETS`), a config or a list of those.

Inputs containing NaN or Inf are refused with a :class:`ValueError` naming the file (from
``meta["filename_or_obj"]``) when known, as are images of the wrong dimensionality or channel
count.

Example::

    from medgen.data import read
    from medgen.data.presets import CTWindow, Orient, Pipeline, Resample

    ct = read("series_folder")                       # (1, D, H, W) in HU
    prep = Pipeline(Orient("RAS"), Resample(1.5), CTWindow(-1000, 1000))
    x = prep(ct)                                      # float32 in [-1, 1], RAS, 1.5 mm voxels
    hu = prep.inverse(x)                              # HU, original grid and affine
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = [
    "PRESETS",
    "CTWindow",
    "CropOrPad",
    "HistologyRGB",
    "Identity",
    "MRPercentile",
    "Microscopy16",
    "Orient",
    "Pipeline",
    "Preset",
    "Resample",
    "ScaleRange",
    "get_preset",
    "is_geometry_preset",
]

#: Key of ``MetaTensor.meta`` under which :class:`MRPercentile` stores the statistics it used.
META_KEY = "medgen_preset"

ImageLike = torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------------------------
# checks and helpers


def _describe(image: Any) -> str:
    """``"<file>: "`` when the image knows where it came from, else ``""``."""
    meta = getattr(image, "meta", None)
    source = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    return f"{source}: " if isinstance(source, str | bytes) and source else ""


def _as_tensor(image: Any, who: str) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(image))
    raise TypeError(f"{who}: expected a torch.Tensor, MetaTensor or numpy array, got {type(image)}")


def _check_image(
    image: Any,
    who: str,
    spatial_dims: Sequence[int] = (2, 3),
    channels: int | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Validate a channel-first image and return it as a tensor (MetaTensors stay MetaTensors)."""
    tensor = _as_tensor(image, who)
    where = _describe(tensor)
    shapes = " or ".join(
        f"({'C' if channels is None else channels}, {', '.join('DHW'[3 - d :])})"
        for d in spatial_dims
    )
    kind = "/".join(f"{d}D" for d in spatial_dims)
    if tensor.ndim - 1 not in spatial_dims:
        raise ValueError(
            f"{where}{who} expects a channel-first {kind} image {shapes}, got shape "
            f"{tuple(tensor.shape)}"
        )
    if channels is not None and tensor.shape[0] != channels:
        raise ValueError(
            f"{where}{who} expects {channels} channels {shapes}, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{where}{who} expects real numbers, got dtype {tensor.dtype}")
    if finite:
        _check_finite(tensor, who)
    return tensor


def _check_finite(tensor: torch.Tensor, who: str) -> None:
    if tensor.is_floating_point():
        finite = torch.isfinite(tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise ValueError(
                f"{_describe(tensor)}{who}: image contains {bad} NaN/Inf values; refusing it"
            )


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def _float(tensor: torch.Tensor) -> torch.Tensor:
    """The values as float32 (float64 is kept during arithmetic only where asked)."""
    return _plain(tensor).to(torch.float32)


def _like(result: torch.Tensor, reference: torch.Tensor, drop_stats: bool = False) -> torch.Tensor:
    """``result`` as a MetaTensor carrying ``reference``'s affine, meta and applied operations."""
    if not isinstance(reference, MetaTensor):
        return result
    meta = dict(reference.meta)
    if drop_stats:
        meta.pop(META_KEY, None)
    meta.pop("affine", None)
    return MetaTensor(
        result,
        affine=reference.affine,
        meta=meta,
        applied_operations=list(reference.applied_operations),
    )


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be two finite numbers with low < high, got {value!r}")
    return lo, hi


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------
# base classes


class Preset:
    """Base of all presets: ``preset(image)``, ``preset.inverse(image)`` and ``preset.config()``.

    Subclasses call :meth:`_remember` with their constructor arguments, which :meth:`config`
    returns (with the ``_target_``) and ``__repr__`` shows.
    """

    #: The nominal value range of the output, or ``None`` when it keeps the input's units.
    output_range: tuple[float, float] | None = None

    def _remember(self, **kwargs: Any) -> None:
        self._args = {k: _jsonable(v) for k, v in kwargs.items()}

    def config(self) -> dict[str, Any]:
        """The JSON-friendly config that rebuilds this preset (``get_preset(config)``)."""
        from medgen.utils.targets import public_name

        return {"_target_": public_name(type(self), strict=False), **copy.deepcopy(self._args)}

    def __call__(self, image: ImageLike) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, image: ImageLike) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config() == self.config()

    def __hash__(self) -> int:
        return hash(repr(self))


class Identity(Preset):
    """Leaves the image as it is (the ``"none"`` preset); still refuses NaN/Inf and bad shapes."""

    def __init__(self) -> None:
        self._remember()

    def __call__(self, image: ImageLike) -> torch.Tensor:
        return _check_image(image, "Identity")

    def inverse(self, image: ImageLike) -> torch.Tensor:
        tensor = _as_tensor(image, "Identity.inverse")
        _check_finite(tensor, "Identity.inverse")
        return tensor


# ----------------------------------------------------------------------------------------------
# intensity presets


def _linear(
    x: torch.Tensor, src: tuple[Any, Any], dst: tuple[Any, Any], clip: tuple[Any, Any] | None
) -> torch.Tensor:
    """``(x - src_lo) / (src_hi - src_lo) * (dst_hi - dst_lo) + dst_lo``, clipped to ``clip``.

    Bounds are floats or tensors that broadcast against ``x``; computed in float32 (float64 if
    ``x`` is float64), in that order of operations so that the inverse map undoes it to within
    float rounding.
    """
    scale = (dst[1] - dst[0]) / (src[1] - src[0])
    y = (x - src[0]) * scale + dst[0]
    if clip is not None:
        y = torch.maximum(y, torch.as_tensor(clip[0], dtype=y.dtype, device=y.device))
        y = torch.minimum(y, torch.as_tensor(clip[1], dtype=y.dtype, device=y.device))
    return y


def _integer_dtype(tensor: torch.Tensor) -> np.dtype | None:
    """The integer dtype the values were stored as: the file's, else the tensor's, else ``None``.

    Images from :func:`medgen.data.io.read` name the file's dtype in ``meta["source_dtype"]``
    (``"uint16"`` for a 16-bit PNG, which is read as ``int32`` and reaches presets from the
    datasets as ``float32``).
    """
    meta = getattr(tensor, "meta", None)
    names = [meta.get("source_dtype")] if isinstance(meta, Mapping) else []
    if not tensor.is_floating_point():
        names.append(str(tensor.dtype).removeprefix("torch."))
    for name in names:
        try:
            dtype = np.dtype(str(name))
        except (TypeError, ValueError):
            continue
        if dtype.kind in "iu":
            return dtype
    return None


class ScaleRange(Preset):
    """Linear map of ``in_range`` onto ``out_range``, the generic intensity preset.

    ``y = (x - a) / (b - a) * (d - c) + c`` for ``in_range = (a, b)`` and ``out_range = (c, d)``;
    with ``clip=True`` the result is clipped to ``out_range`` (so values outside ``in_range``
    cannot be recovered: they come back at the nearest edge of ``in_range``), and ``inverse``
    also clips its input to ``out_range`` before mapping back, so that model outputs slightly out
    of range stay within ``in_range``.

    Integer counts (an integer tensor, or an image read from an integer file, whose
    ``meta["source_dtype"]`` says so) outside ``in_range`` are refused by default rather than
    clipped: they mean that ``in_range`` does not fit the files (16-bit PNGs through the 8-bit
    range ``[0, 255]`` would all come out as the constant ``1.0``). The error names the file and
    the range that fits its dtype. Float data (HU, MR units, ``[0, 1]`` images) is windowed and
    clipped as above.

    Args:
        in_range: ``(low, high)`` of the input, in its units.
        out_range: ``(low, high)`` it is mapped to.
        clip: clip to ``out_range`` (forward) and before the inverse.
        strict: refuse input values outside ``in_range`` with a ``ValueError``: ``None`` (the
            default) for integer counts only, ``True`` for every input, ``False`` never (clip, or
            map beyond ``out_range`` with ``clip=False``, on purpose).

    Shapes:
        ``(C, *spatial)`` → ``(C, *spatial)`` float32. ``inverse`` is elementwise and accepts any
        shape (a batch ``(B, C, *spatial)`` too).
    """

    def __init__(
        self,
        in_range: Sequence[float],
        out_range: Sequence[float] = (-1.0, 1.0),
        clip: bool = True,
        strict: bool | None = None,
    ) -> None:
        self.in_range = _pair(in_range, "in_range")
        self.out_range = _pair(out_range, "out_range")
        self.clip = bool(clip)
        if strict is not None and not isinstance(strict, bool):
            raise ValueError(f"strict must be True, False or None, got {strict!r}")
        self.strict = strict
        self.output_range = self.out_range
        args = {"in_range": self.in_range, "out_range": self.out_range, "clip": self.clip}
        if strict is not None:  # configs (and checkpoints) from before strict stay as they were
            args["strict"] = strict
        self._remember(**args)

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _check_in_range(self, tensor: torch.Tensor) -> None:
        """Refuse values outside ``in_range`` when :attr:`strict` asks for it (see the class)."""
        integer = _integer_dtype(tensor)
        if self.strict is False or (self.strict is None and integer is None):
            return
        x = _plain(tensor)
        if not x.numel():
            return
        low, high = float(x.min()), float(x.max())
        a, b = self.in_range
        if a <= low and high <= b:
            return
        if integer is not None:
            info = np.iinfo(integer)
            fit = (0 if low >= 0 else int(info.min), int(info.max))
            stored = f" (stored as {integer.name}, {8 * integer.itemsize}-bit)"
        else:
            fit = (math.floor(low), math.ceil(high))
            stored = ""
        raise ValueError(
            f"{_describe(tensor)}values in [{low:g}, {high:g}]{stored} lie outside {self._name}'s "
            f"in_range [{a:g}, {b:g}]; they would be clipped to constants and lost. Set in_range "
            f"to the data's range, e.g. in_range=[{fit[0]},{fit[1]}] (on the command line: "
            f"data.train.transform.in_range=[{fit[0]},{fit[1]}]), or pass strict=False "
            "(+data.train.transform.strict=false) to clip on purpose"
        )

    def __call__(self, image: ImageLike) -> torch.Tensor:
        tensor = _check_image(image, self._name)
        self._check_in_range(tensor)
        clip = self.out_range if self.clip else None
        return _like(_linear(_float(tensor), self.in_range, self.out_range, clip), tensor)

    def inverse(self, image: ImageLike) -> torch.Tensor:
        tensor = _as_tensor(image, f"{self._name}.inverse")
        _check_finite(tensor, f"{self._name}.inverse")
        clip = self.in_range if self.clip else None
        return _like(_linear(_float(tensor), self.out_range, self.in_range, clip), tensor)


class CTWindow(ScaleRange):
    """Clip CT to an HU window and scale it to ``[-1, 1]``.

    ``y = 2 (clip(x, low, high) - low) / (high - low) - 1``. ``inverse`` maps ``[-1, 1]`` back to
    HU; voxels that the window clipped stay at its edges (air below ``low`` comes back as ``low``),
    and inputs of ``inverse`` outside ``[-1, 1]`` are clipped to it first.

    Args:
        low: lower edge of the window in HU (default -1000, air).
        high: upper edge in HU (default 1000, dense bone is above it).

    Shapes:
        ``(C, *spatial)`` in HU → ``(C, *spatial)`` float32 in ``[-1, 1]``.
    """

    def __init__(self, low: float = -1000.0, high: float = 1000.0) -> None:
        # A window clips on purpose: HU outside it are not an error, whatever the file's dtype.
        super().__init__((low, high), (-1.0, 1.0), clip=True, strict=False)
        self._remember(low=self.in_range[0], high=self.in_range[1])


def _percentile(values: torch.Tensor, q: float) -> float:
    """``numpy.percentile(values, q)`` (linear interpolation) by :func:`torch.kthvalue`.

    Selection is linear in the number of voxels and has no size limit (``torch.quantile``
    refuses more than 2**24 elements, common for CT/MR volumes), on any device.
    """
    flat = values.reshape(-1)
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    pos = q / 100.0 * (flat.numel() - 1)
    k = math.floor(pos)
    frac = pos - k
    low = float(flat.kthvalue(k + 1).values)
    if frac == 0.0 or k + 1 >= flat.numel():
        return low
    high = float(flat.kthvalue(k + 2).values)
    return low + (high - low) * frac


class MRPercentile(Preset):
    """Per-volume percentile normalisation for MR (and other arbitrary-unit images).

    The ``lower`` and ``upper`` percentiles ``p_lo, p_hi`` of the volume (of each channel with
    ``channel_wise=True``) are mapped to ``out_range`` linearly, as in the intensity
    normalisation of Nyúl & Udupa ("On standardizing the MR image intensity scale", Magn. Reson.
    Med. 42(6), 1999) reduced to two landmarks and one volume.

    By default (``clip=True``) the output is clipped to ``out_range``, the value range that
    medgen's data modules declare and that ``tanh``-headed generators produce: the ``100 - upper``
    percent brightest voxels (and ``lower`` percent darkest) saturate, and come back from
    :meth:`inverse` at ``p_hi`` (``p_lo``), as clipped HU do in :class:`CTWindow`; every other voxel
    comes back to within float rounding. With ``clip=False`` nothing is lost: the tails go beyond
    ``out_range`` and the round trip is exact everywhere. The statistics used are stored in ``output.meta["medgen_preset"] = {"name": "MRPercentile", "low": p_lo,
    "high": p_hi, "out_range": [c, d]}`` (a MetaTensor is returned even for a plain tensor), and
    :meth:`inverse` reads them from there, or takes them explicitly.

    When ``p_hi == p_lo`` (a nearly constant volume), the minimum and maximum are used instead;
    for a constant volume ``high = low + 1``. The values stored are the ones used.

    Args:
        lower: lower percentile in ``[0, 100]``.
        upper: upper percentile in ``[0, 100]``, above ``lower``.
        out_range: ``(low, high)`` the percentiles are mapped to.
        clip: clip the output to ``out_range``, and the input of :meth:`inverse` too (the
            clipped tails come back at the percentiles).
        channel_wise: statistics per channel instead of over the whole image.

    Shapes:
        ``(C, *spatial)`` → ``(C, *spatial)`` float32 MetaTensor.
    """

    def __init__(
        self,
        lower: float = 0.5,
        upper: float = 99.5,
        out_range: Sequence[float] = (-1.0, 1.0),
        clip: bool = True,
        channel_wise: bool = False,
    ) -> None:
        self.lower, self.upper = _pair((lower, upper), "(lower, upper)")
        if not 0.0 <= self.lower < self.upper <= 100.0:
            raise ValueError(
                f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}"
            )
        self.out_range = _pair(out_range, "out_range")
        self.output_range = self.out_range
        self.clip = bool(clip)
        self.channel_wise = bool(channel_wise)
        self._remember(
            lower=self.lower,
            upper=self.upper,
            out_range=self.out_range,
            clip=self.clip,
            channel_wise=self.channel_wise,
        )

    def statistics(self, image: ImageLike) -> dict[str, Any]:
        """The statistics :meth:`__call__` would use for ``image`` (``low``/``high``: float, or a
        list of floats per channel with ``channel_wise=True``)."""
        tensor = _check_image(image, "MRPercentile")
        parts = list(_plain(tensor)) if self.channel_wise else [_plain(tensor)]
        lows, highs = [], []
        for part in parts:
            lo, hi = _percentile(part, self.lower), _percentile(part, self.upper)
            if not hi > lo:
                lo, hi = float(part.min()), float(part.max())
            if not hi > lo:
                hi = lo + 1.0
            lows.append(lo)
            highs.append(hi)
        if not self.channel_wise:
            lows, highs = lows[0], highs[0]
        return {
            "name": "MRPercentile",
            "low": lows,
            "high": highs,
            "out_range": list(self.out_range),
        }

    def _bounds(self, stats: dict[str, Any], ndim: int, like: torch.Tensor) -> tuple[Any, Any]:
        low, high = stats["low"], stats["high"]
        if isinstance(low, Sequence):
            shape = (len(low),) + (1,) * (ndim - 1)
            low = torch.tensor(low, dtype=like.dtype, device=like.device).reshape(shape)
            high = torch.tensor(high, dtype=like.dtype, device=like.device).reshape(shape)
        return low, high

    def __call__(self, image: ImageLike) -> MetaTensor:
        tensor = _check_image(image, "MRPercentile")
        stats = self.statistics(tensor)
        x = _float(tensor)
        src = self._bounds(stats, x.ndim, x)
        y = _linear(x, src, self.out_range, self.out_range if self.clip else None)
        out = _like(y, tensor) if isinstance(tensor, MetaTensor) else MetaTensor(y)
        out.meta[META_KEY] = stats
        return out

    def inverse(
        self,
        image: ImageLike,
        stats: Mapping[str, Any] | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Map back to the original units of the volume.

        Args:
            image: output of :meth:`__call__` (or a model output in the same range), any shape
                that broadcasts with the statistics (``(C, *spatial)`` for channel-wise ones).
            stats: the statistics, as stored in ``meta["medgen_preset"]`` (a mapping with
                ``low`` and ``high``) or a ``(low, high)`` pair; by default read from
                ``image.meta["medgen_preset"]``.

        Returns:
            The image in the original units (float32), without the ``medgen_preset`` entry.

        Raises:
            ValueError: when no statistics are given or found, or on NaN/Inf.
        """
        tensor = _as_tensor(image, "MRPercentile.inverse")
        _check_finite(tensor, "MRPercentile.inverse")
        if stats is None:
            found = tensor.meta.get(META_KEY) if isinstance(tensor, MetaTensor) else None
            if not isinstance(found, Mapping) or found.get("name") != "MRPercentile":
                raise ValueError(
                    f"{_describe(tensor)}MRPercentile.inverse needs the percentiles of the original "
                    f"volume: pass the MetaTensor that MRPercentile returned (they are in its "
                    f"meta[{META_KEY!r}]) or give stats={{'low': ..., 'high': ...}} explicitly"
                )
            stats = found
        elif not isinstance(stats, Mapping):
            low, high = stats
            stats = {"low": low, "high": high}
        if "low" not in stats or "high" not in stats:
            raise ValueError(f"MRPercentile.inverse: stats need 'low' and 'high', got {stats!r}")
        out_range = tuple(stats.get("out_range", self.out_range))
        y = _float(tensor)
        if self.clip:
            y = y.clamp(min(out_range), max(out_range))
        dst = self._bounds(dict(stats), y.ndim, y)
        x = _linear(y, out_range, dst, None)
        return _like(x, tensor, drop_stats=True)


class HistologyRGB(Preset):
    """8-bit RGB histology (0-255) to ``[-1, 1]`` and back.

    ``y = x / 127.5 - 1``; ``inverse`` rounds ``127.5 (y + 1)`` to the nearest integer, clips to
    0-255 and returns ``uint8``, so a ``uint8`` image comes back exactly.

    Shapes:
        ``(3, H, W)`` with values in ``[0, 255]`` (``uint8`` or any real dtype) → ``(3, H, W)``
        float32 in ``[-1, 1]``.
    """

    output_range = (-1.0, 1.0)

    def __init__(self) -> None:
        self._remember()

    def __call__(self, image: ImageLike) -> torch.Tensor:
        tensor = _check_image(image, "HistologyRGB", spatial_dims=(2,), channels=3)
        x = _plain(tensor)
        if x.dtype != torch.uint8 and x.numel() and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                f"{_describe(tensor)}HistologyRGB expects 8-bit RGB values in [0, 255], got "
                f"[{float(x.min()):g}, {float(x.max()):g}] (rescale floats in [0, 1] by 255 first)"
            )
        return _like(x.to(torch.float32) / 127.5 - 1.0, tensor)

    def inverse(self, image: ImageLike) -> torch.Tensor:
        tensor = _as_tensor(image, "HistologyRGB.inverse")
        _check_finite(tensor, "HistologyRGB.inverse")
        x = torch.round((_float(tensor) + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)
        return _like(x, tensor)


class Microscopy16(Preset):
    """Integer microscopy images of ``bit_depth`` bits to ``[-1, 1]`` and back exactly.

    ``y = 2 x / (2**bit_depth - 1) - 1``; ``inverse`` rounds back to integers in
    ``[0, 2**bit_depth - 1]`` and returns ``int32`` (what :func:`medgen.data.read` returns for
    16-bit files, since torch has no ``uint16`` arithmetic). Float32 resolves every 16-bit level,
    so integer input comes back exactly. 2D images and 3D stacks, any number of channels.

    Args:
        bit_depth: bits per sample of the camera/file, 1 to 16 (12-bit cameras: 12).

    Shapes:
        ``(C, *spatial)`` integers → ``(C, *spatial)`` float32 in ``[-1, 1]``.
    """

    output_range = (-1.0, 1.0)

    def __init__(self, bit_depth: int = 16) -> None:
        if isinstance(bit_depth, bool) or not isinstance(bit_depth, int | np.integer):
            raise ValueError(f"bit_depth must be an integer from 1 to 16, got {bit_depth!r}")
        if not 1 <= int(bit_depth) <= 16:
            raise ValueError(f"bit_depth must be from 1 to 16, got {bit_depth}")
        self.bit_depth = int(bit_depth)
        self.top = 2**self.bit_depth - 1
        self._remember(bit_depth=self.bit_depth)

    def __call__(self, image: ImageLike) -> torch.Tensor:
        tensor = _check_image(image, "Microscopy16")
        x = _plain(tensor)
        if x.numel() and (x.min() < 0 or x.max() > self.top):
            raise ValueError(
                f"{_describe(tensor)}Microscopy16 expects {self.bit_depth}-bit values in "
                f"[0, {self.top}], got [{float(x.min()):g}, {float(x.max()):g}]"
            )
        return _like(_linear(x.to(torch.float32), (0.0, self.top), (-1.0, 1.0), None), tensor)

    def inverse(self, image: ImageLike) -> torch.Tensor:
        tensor = _as_tensor(image, "Microscopy16.inverse")
        _check_finite(tensor, "Microscopy16.inverse")
        x = _linear(_float(tensor), (-1.0, 1.0), (0.0, self.top), None)
        return _like(torch.round(x).clamp_(0, self.top).to(torch.int32), tensor)


# ----------------------------------------------------------------------------------------------
# geometry presets (MONAI invertible transforms)


class _Geometry(Preset):
    """A MONAI invertible spatial transform as a preset.

    MONAI records each applied transform in the MetaTensor's ``applied_operations`` together with
    the ``id`` of the transform object, and its ``inverse`` insists on that very object. We check
    the most recent record ourselves (it must come from the same MONAI class) and let any instance
    of the preset invert it, e.g. one rebuilt from the config in another process. The input's
    record list is never changed: ``inverse`` works on a shallow copy.
    """

    #: Class names MONAI records for the transform (``Spacing`` records ``SpatialResample``).
    _monai_classes: tuple[str, ...]

    def _build(self, spatial_dims: int) -> Any:
        raise NotImplementedError

    def _transform(self, spatial_dims: int) -> Any:
        cache = self.__dict__.setdefault("_transforms", {})
        if spatial_dims not in cache:
            cache[spatial_dims] = self._build(spatial_dims)
        return cache[spatial_dims]

    def __call__(self, image: ImageLike) -> MetaTensor:
        name = type(self).__name__
        tensor = _check_image(image, name)
        if not isinstance(tensor, MetaTensor):
            tensor = MetaTensor(tensor)  # identity affine
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"axcodes .* length is smaller")
            out = self._transform(tensor.ndim - 1)(tensor)
        if not isinstance(out, MetaTensor) or not out.applied_operations:
            raise RuntimeError(
                f"{name}: MONAI did not record the transform (is monai.data.set_track_meta(False) "
                "in effect?); the result could not be inverted"
            )
        return out

    def inverse(self, image: ImageLike) -> MetaTensor:
        name = type(self).__name__
        tensor = _as_tensor(image, f"{name}.inverse")
        ops = tensor.applied_operations if isinstance(tensor, MetaTensor) else []
        last = ops[-1] if ops else {}
        if not ops or last.get("class") not in self._monai_classes:
            found = last.get("class", "nothing") if ops else "nothing"
            raise ValueError(
                f"{_describe(tensor)}{name}.inverse: the image's most recent recorded operation is "
                f"{found}, not {self._monai_classes[0]}; invert presets in reverse order on the "
                f"MetaTensor they returned (Pipeline.inverse does this)"
            )
        from monai.utils import TraceKeys

        copy_ = MetaTensor(
            _plain(tensor),
            affine=tensor.affine,
            meta={k: v for k, v in tensor.meta.items() if k != "affine"},
            applied_operations=[*ops[:-1], {**last, TraceKeys.ID: TraceKeys.NONE}],
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"axcodes .* length is smaller")
            return self._transform(tensor.ndim - 1).inverse(copy_)


def is_geometry_preset(step: Any) -> bool:
    """Whether ``step`` changes the grid (:class:`Resample`, :class:`Orient`, :class:`CropOrPad`)
    rather than intensities."""
    return isinstance(step, _Geometry)


class Resample(_Geometry):
    """Resample to a voxel spacing (MONAI :class:`~monai.transforms.Spacing`), invertibly.

    The field of view is kept; the grid changes. ``inverse`` resamples back onto the original
    grid (shape and affine exactly; values up to interpolation).

    Args:
        spacing: target voxel size in mm, one number for every axis or one per spatial axis.
        mode: interpolation, ``"bilinear"`` (trilinear in 3D), ``"nearest"`` (label maps) or a
            spline order 0-5.
        padding_mode: ``"border"``, ``"zeros"`` or ``"reflection"``.
        align_corners: as in :func:`torch.nn.functional.grid_sample`.
    """

    _monai_classes = ("Spacing", "SpatialResample")

    def __init__(
        self,
        spacing: float | Sequence[float],
        mode: str | int = "bilinear",
        padding_mode: str = "border",
        align_corners: bool = False,
    ) -> None:
        values = [spacing] if isinstance(spacing, int | float) else list(spacing)
        if not values or not all(
            isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values
        ):
            raise ValueError(f"spacing must be positive numbers, got {spacing!r}")
        self.spacing = float(values[0]) if isinstance(spacing, int | float) else tuple(values)
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, bool(align_corners)
        self._remember(
            spacing=self.spacing,
            mode=mode,
            padding_mode=padding_mode,
            align_corners=self.align_corners,
        )

    def _build(self, spatial_dims: int) -> Any:
        from monai.transforms import Spacing

        pixdim = self.spacing
        if isinstance(pixdim, tuple):
            if len(pixdim) < spatial_dims:
                raise ValueError(
                    f"Resample: spacing {pixdim} has fewer values than the image's "
                    f"{spatial_dims} spatial axes"
                )
            pixdim = pixdim[:spatial_dims]
        return Spacing(
            pixdim=pixdim,
            mode=self.mode,
            padding_mode=self.padding_mode,
            align_corners=self.align_corners,
        )


class Orient(_Geometry):
    """Reorient to axis codes (MONAI :class:`~monai.transforms.Orientation`), invertibly.

    Only flips and axis permutations: ``inverse`` restores values, shape and affine exactly. A
    2D image uses the first two codes (``"RAS"`` → ``"RA"``).

    Args:
        axcodes: the anatomical direction each array axis should point to, e.g. ``"RAS"``
            (MONAI/NIfTI convention: labels follow the MetaTensor's space, RAS for our readers).
    """

    _monai_classes = ("Orientation",)

    def __init__(self, axcodes: str = "RAS") -> None:
        if not isinstance(axcodes, str) or len(axcodes) not in (2, 3):
            raise ValueError(
                f"axcodes must be a string of 2 or 3 codes like 'RAS', got {axcodes!r}"
            )
        self.axcodes = axcodes.upper()
        self._remember(axcodes=self.axcodes)

    def _build(self, spatial_dims: int) -> Any:
        from monai.transforms import Orientation

        if len(self.axcodes) < spatial_dims:
            raise ValueError(
                f"Orient: axcodes {self.axcodes!r} name fewer axes than the image's "
                f"{spatial_dims} spatial axes"
            )
        return Orientation(axcodes=self.axcodes[:spatial_dims], labels=None)


class CropOrPad(_Geometry):
    """Centre-crop and/or pad to a size (MONAI :class:`~monai.transforms.ResizeWithPadOrCrop`).

    The affine follows the crop/pad, so voxels keep their world positions. ``inverse`` restores
    the shape and affine exactly, and the values where the forward pass only padded; a cropped
    border comes back as ``value``.

    Args:
        size: spatial size, one int per spatial axis (``-1`` keeps that axis) or one int for all.
        value: constant used for padding, in the image's units (e.g. ``-1024`` for CT in HU,
            ``-1`` after a ``[-1, 1]`` preset).
    """

    _monai_classes = ("ResizeWithPadOrCrop",)

    def __init__(self, size: int | Sequence[int], value: float = 0.0) -> None:
        values = [size] if isinstance(size, int) else list(size)
        if not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and (v > 0 or v == -1) for v in values
        ):
            raise ValueError(f"size must be positive ints (or -1 to keep an axis), got {size!r}")
        self.size = values[0] if isinstance(size, int) else tuple(values)
        self.value = float(value)
        self._remember(size=self.size, value=self.value)

    def _build(self, spatial_dims: int) -> Any:
        from monai.transforms import ResizeWithPadOrCrop

        size = self.size
        if isinstance(size, tuple) and len(size) != spatial_dims:
            raise ValueError(
                f"CropOrPad: size {size} does not match the image's {spatial_dims} spatial axes"
            )
        return ResizeWithPadOrCrop(spatial_size=size, mode="constant", value=self.value)


# ----------------------------------------------------------------------------------------------
# composition and registry


class Pipeline(Preset):
    """Apply presets in order; ``inverse`` applies their inverses in reverse order.

    Args:
        *steps: presets (anything with ``__call__`` and ``inverse``), or names/configs that
            :func:`get_preset` understands.

    Example::

        prep = Pipeline(Orient("RAS"), Resample((1.0, 1.0, 1.0)), MRPercentile())
        x = prep(volume)
        back = prep.inverse(x)    # MRPercentile.inverse, then Resample's, then Orient's
    """

    def __init__(self, *steps: Any) -> None:
        self.steps = [get_preset(s) for s in steps]
        self._args = {}

    @property
    def output_range(self) -> tuple[float, float] | None:  # type: ignore[override]
        for step in reversed(self.steps):
            found = getattr(step, "output_range", None)
            if found is not None:
                return found
        return None

    def config(self) -> dict[str, Any]:
        """``{"_target_": ".../Pipeline", "_args_": [step configs]}`` (Hydra's positional form)."""
        steps = [s.config() if hasattr(s, "config") else repr(s) for s in self.steps]
        return {"_target_": f"{__name__}.Pipeline", "_args_": steps}

    def __call__(self, image: ImageLike) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return image

    def inverse(self, image: ImageLike) -> torch.Tensor:
        for step in reversed(self.steps):
            image = step.inverse(image)
        return image

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> Any:
        return self.steps[i]

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(repr(s) for s in self.steps)})"


#: Named presets for ``get_preset(name)``; ``get_preset`` returns a fresh copy of each.
PRESETS: dict[str, Preset] = {
    "ct": CTWindow(),
    "mr": MRPercentile(),
    "histology": HistologyRGB(),
    "microscopy16": Microscopy16(),
    "phantom": ScaleRange((0.0, 1.0), (-1.0, 1.0)),
    "none": Identity(),
}


def _from_config(config: Any) -> Any:
    from medgen.utils.instantiate import instantiate

    return instantiate(config, _convert_="all")


def get_preset(name_or_config: Any) -> Any:
    """Build a preset from a name, a config, a list of those, or return a preset as is.

    Args:
        name_or_config: one of

            - a key of :data:`PRESETS` (case-insensitive): ``"ct"``, ``"mr"``, ``"histology"``,
              ``"microscopy16"``, ``"phantom"``, ``"none"``; ``None`` means ``"none"``;
            - a mapping with ``name`` (a key of :data:`PRESETS`) and constructor arguments that
              override the registered ones, e.g. ``{"name": "ct", "low": -160, "high": 240}``;
            - a Hydra-style mapping or ``DictConfig`` with ``_target_`` (checked against
              medgen's allowlist of target prefixes);
            - a list of any of these: a :class:`Pipeline`;
            - a preset object (anything with ``__call__`` and ``inverse``), returned unchanged.

    Returns:
        The preset.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a config that does not
            build a preset.
    """
    if name_or_config is None:
        name_or_config = "none"
    if callable(name_or_config) and hasattr(name_or_config, "inverse"):
        return name_or_config
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(name_or_config, DictConfig | ListConfig):
            name_or_config = OmegaConf.to_container(name_or_config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        pass
    if isinstance(name_or_config, str):
        key = name_or_config.strip().lower()
        if key not in PRESETS:
            raise ValueError(
                f"unknown preset {name_or_config!r}; known presets: {', '.join(PRESETS)} "
                "(or a config with _target_)"
            )
        return _from_config(PRESETS[key].config())
    if isinstance(name_or_config, Mapping):
        config = dict(name_or_config)
        if "_target_" in config:
            preset = _from_config(config)
        elif "name" in config:
            base = get_preset(config.pop("name"))
            preset = _from_config({**base.config(), **config})
        else:
            raise ValueError(
                f"a preset config needs '_target_' or 'name', got keys {sorted(config)}"
            )
        if not (callable(preset) and hasattr(preset, "inverse")):
            raise ValueError(f"config {name_or_config!r} built {preset!r}, which is not a preset")
        return preset
    if isinstance(name_or_config, Sequence) and not isinstance(name_or_config, bytes):
        return Pipeline(*name_or_config)
    raise ValueError(
        f"cannot build a preset from {type(name_or_config).__name__} {name_or_config!r}; give a "
        f"name ({', '.join(PRESETS)}), a config or a list of those"
    )
