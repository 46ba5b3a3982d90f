"""Affine bookkeeping for crops, flips and slices (cheap: a 4x4 matrix per item)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor


def _affine_rank(affine: torch.Tensor) -> int:
    return affine.shape[-1] - 1


def translated(affine: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """Affine of a crop whose first voxel is at voxel ``offset`` of the original grid."""
    out = affine.clone()
    r, k = _affine_rank(affine), min(len(offset), _affine_rank(affine))
    shift = torch.as_tensor(offset[:k], dtype=affine.dtype)
    out[:r, r] = affine[:r, r] + affine[:r, :k] @ shift
    return out


def flipped(affine: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Affine after reversing spatial axis ``dim`` (of length ``size``)."""
    out = affine.clone()
    r = _affine_rank(affine)
    if dim < r:
        out[:r, r] = affine[:r, r] + affine[:r, dim] * (size - 1)
        out[:r, dim] = -affine[:r, dim]
    return out


def sliced(affine: torch.Tensor, axis: int, index: int) -> torch.Tensor:
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


def with_meta(values: torch.Tensor, like: torch.Tensor, affine: torch.Tensor, **meta: Any):
    """``values`` as a MetaTensor carrying ``like``'s metadata with a new affine."""
    if not isinstance(like, MetaTensor):
        return values
    base = {
        k: like.meta[k] for k in ("spacing", "source_dtype", "filename_or_obj") if k in like.meta
    }
    return MetaTensor(values, affine=affine, meta={**base, **meta})


def plain_tensor(image: torch.Tensor) -> torch.Tensor:
    """``image`` as a plain tensor (its values without the MetaTensor metadata)."""
    return image.as_tensor() if isinstance(image, MetaTensor) else image
