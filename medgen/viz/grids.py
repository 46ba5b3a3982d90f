"""Image grids from tensors (torch only, no plotting library): what the viewers and the image
logger draw."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import make_grid

__all__ = ["auto_range", "image_grid", "orthogonal_slices", "to_unit"]


def auto_range(images: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of ``images`` (finite values), a range of width > 0."""
    finite = images[torch.isfinite(images)]
    if finite.numel() == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    return (low, high) if high > low else (low, low + 1.0)


def to_unit(images: torch.Tensor, value_range: Sequence[float] | None = None) -> torch.Tensor:
    """``images`` mapped from ``value_range`` (default: their own min and max) to [0, 1], clipped."""
    low, high = value_range if value_range is not None else auto_range(images)
    return ((images.float() - low) / (high - low)).clamp(0.0, 1.0)


def orthogonal_slices(volume: torch.Tensor) -> torch.Tensor:
    """The three central orthogonal slices of ``(C, D, H, W)`` side by side: ``(C, S, 3 * S)``.

    Each slice is zero-padded to a square of side ``S = max(D, H, W)``.
    """
    c, d, h, w = volume.shape
    side = max(d, h, w)
    slices = [volume[:, d // 2], volume[:, :, h // 2], volume[:, :, :, w // 2]]
    padded = []
    for s in slices:
        canvas = volume.new_zeros((c, side, side))
        canvas[:, : s.shape[1], : s.shape[2]] = s
        padded.append(canvas)
    return torch.cat(padded, dim=-1)


def image_grid(
    images: torch.Tensor, value_range: Sequence[float] | None = None, nrow: int = 8
) -> torch.Tensor:
    """A ``(C, H', W')`` grid in [0, 1] of 2D images, or of the orthogonal slices of 3D volumes.

    Args:
        images: ``(B, C, H, W)`` images or ``(B, C, D, H, W)`` volumes (one row per volume).
        value_range: Range mapped to [0, 1]; ``None``: the images' own min and max.
        nrow: Images per row (2D).
    """
    unit = to_unit(images, value_range)
    if unit.ndim == 5:
        unit = torch.stack([orthogonal_slices(v) for v in unit])
        nrow = 1
    grid = make_grid(unit, nrow=nrow, padding=2, pad_value=0.0)
    return grid[:1] if unit.shape[1] == 1 else grid  # make_grid turns grey into RGB
