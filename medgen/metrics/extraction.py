"""Feature protocols: which images or slices go through the extractor, exactly.

- ``"2d"``: every image ``(C, H, W)`` is one sample.
- ``"3d"``: every volume ``(C, D, H, W)`` is one sample, through a 3D extractor (MedicalNet,
  ``random_conv``, ``pixels``).
- ``"2.5d"``: as MAISI's ``scripts/compute_fid_2-5d_ct.py`` (Guo et al., "MAISI: medical AI for
  synthetic imaging", WACV 2025): each volume is cut into 2D slices along each of its three array
  axes, and every slice is one sample of that plane. With ``center_ratio=r`` only the slices with
  index in ``[int((1 - r) / 2 * n), int((1 + r) / 2 * n))`` are used (MAISI's
  ``enable_center_slices_ratio``; ``r = 1`` keeps every slice), and of those every
  ``every_k``-th (MAISI's ``sample_every_k``). The three planes give three feature sets
  (``"axis0"``, ``"axis1"``, ``"axis2"`` in array order; for RAS-oriented NIfTI read by medgen:
  sagittal, coronal, axial); a distance is computed per plane and also averaged over the planes, as
  MAISI reports it. Volumes are min-max scaled to ``[0, 1]`` over the whole volume before
  slicing (MAISI's ``radimagenet_intensity_normalisation``) when ``minmax=True``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["FEATURE_PROTOCOLS", "describe_protocol", "extract_features", "slice_indices"]

#: Feature protocols accepted by :func:`extract_features`.
FEATURE_PROTOCOLS = ("2d", "2.5d", "3d")


def slice_indices(n: int, center_ratio: float = 1.0, every_k: int = 1) -> list[int]:
    """The slice indices the 2.5D protocol uses along an axis of ``n`` slices."""
    if not 0 < center_ratio <= 1:
        raise ValueError(f"center_ratio must be in (0, 1], got {center_ratio}")
    if every_k < 1:
        raise ValueError(f"every_k must be positive, got {every_k}")
    start = int((1.0 - center_ratio) / 2.0 * n)
    stop = int((1.0 + center_ratio) / 2.0 * n)
    return list(range(start, max(stop, start + 1), every_k))


def describe_protocol(protocol: str, center_ratio: float = 1.0, every_k: int = 1) -> str:
    """One line that states what :func:`extract_features` feeds the extractor."""
    if protocol == "2d":
        return "2d: every image is one sample"
    if protocol == "3d":
        return "3d: every volume is one sample"
    return (
        "2.5d (MAISI compute_fid_2-5d_ct.py): slices along each array axis, indices "
        f"[int((1-r)/2*n), int((1+r)/2*n)) with r={center_ratio:g}, every {every_k}; each slice "
        "one sample; distances per axis and their mean"
    )


def _batches(items: list[Tensor], batch_size: int) -> Iterable[Tensor]:
    for start in range(0, len(items), batch_size):
        yield torch.stack(items[start : start + batch_size])


@torch.inference_mode()
def _run(extractor: nn.Module, items: list[Tensor], batch_size: int, device) -> Tensor:
    out = [
        extractor(x.to(device, torch.float32)).to("cpu", torch.float64)
        for x in _batches(items, batch_size)
    ]
    return torch.cat(out)


def extract_features(
    images: list[Tensor] | Tensor,
    extractor: nn.Module,
    protocol: str = "2d",
    *,
    batch_size: int = 16,
    center_ratio: float = 1.0,
    every_k: int = 1,
    minmax: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Features of ``images`` under ``protocol``.

    Args:
        images: ``(C, *spatial)`` tensors (a list, or a stacked ``(N, C, *spatial)`` tensor) in
            the extractor's input units (``[0, 1]`` for the pretrained nets). Images of different
            sizes are batched separately.
        extractor: maps ``(B, C, *spatial)`` to ``(B, F)``.
        protocol: ``"2d"``, ``"2.5d"`` or ``"3d"``.
        batch_size: images (or slices) per forward pass.
        center_ratio, every_k: the 2.5D slice selection (see the module docstring).
        minmax: 2.5D only: min-max scale each volume to ``[0, 1]`` before slicing (MAISI).
        device: where the extractor runs.

    Returns:
        ``{"all": (N, F)}`` for 2d/3d; ``{"axis0", "axis1", "axis2"}`` for 2.5d, each
        ``(slices, F)``; float64 on the CPU.
    """
    if protocol not in FEATURE_PROTOCOLS:
        raise ValueError(f"protocol must be one of {FEATURE_PROTOCOLS}, got {protocol!r}")
    items = list(images)
    want = 3 if protocol == "2d" else 4
    for i, x in enumerate(items):
        if x.ndim != want:
            kind = "2D images (C, H, W)" if want == 3 else "3D volumes (C, D, H, W)"
            raise ValueError(
                f"protocol={protocol!r} needs {kind}; item {i} has shape {tuple(x.shape)}"
            )
    if protocol != "2.5d":
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(items):
            groups.setdefault(tuple(x.shape), []).append(i)
        feats: list[Tensor | None] = [None] * len(items)
        for index in groups.values():
            out = _run(extractor, [items[i] for i in index], batch_size, device)
            for row, i in zip(out, index, strict=True):
                feats[i] = row
        return {"all": torch.stack(feats)}  # type: ignore[arg-type]
    planes: dict[str, list[Tensor]] = {"axis0": [], "axis1": [], "axis2": []}
    for volume in items:
        v = volume.float()
        if minmax:
            v = (v - v.min()) / (v.max() - v.min() + 1e-10)
        for axis, name in enumerate(planes):
            n = v.shape[axis + 1]
            for s in slice_indices(n, center_ratio, every_k):
                planes[name].append(v.select(axis + 1, s))
    result = {}
    for name, slices in planes.items():
        groups = {}
        for i, x in enumerate(slices):
            groups.setdefault(tuple(x.shape), []).append(i)
        rows: list[Tensor] = []
        for index in groups.values():
            rows.append(_run(extractor, [slices[i] for i in index], batch_size, device))
        result[name] = torch.cat(rows)
    return result
