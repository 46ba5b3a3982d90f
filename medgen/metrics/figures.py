"""PNG figures of an evaluation report (matplotlib, drawn without pyplot, so no display is used).

- :func:`save_pairs`: rows of (synthetic sample, nearest training image) side by side;
- :func:`save_grid`: a grid of samples (the central axial slice of volumes);
- :func:`save_orthogonal`: the three central orthogonal slices of a few volumes;
- :func:`save_histograms`: intensity histograms of real and synthetic images on one axis;
- :func:`save_table`: a metric table as an image.

Images are shown in the units they are given, scaled per figure to the 0.5-99.5 percentile of the
values shown (colour images are clipped to ``[0, 1]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["save_grid", "save_histograms", "save_orthogonal", "save_pairs", "save_table"]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _plane(x: Tensor, axis: int = 0) -> np.ndarray:
    """A ``(H, W)`` or ``(H, W, 3)`` array of a ``(C, *spatial)`` image (volumes: central slice)."""
    x = x.detach().float().cpu()
    if x.ndim == 4:
        x = x.select(axis + 1, x.shape[axis + 1] // 2)
    if x.shape[0] == 3:
        return x.clamp(0, 1).permute(1, 2, 0).numpy()
    return x.mean(dim=0).numpy()


def _limits(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([a.ravel() for a in arrays])
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def _show(ax, array: np.ndarray, limits: tuple[float, float], title: str = "") -> None:
    if array.ndim == 3:
        ax.imshow(array)
    else:
        ax.imshow(array, cmap="gray", vmin=limits[0], vmax=limits[1])
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=7)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def save_pairs(path: str | Path, rows: Sequence[tuple[Tensor, Tensor, str]]) -> Path:
    """One row per ``(sample, training image, label)``: the two images side by side."""
    n = max(len(rows), 1)
    fig = _figure(5, 2.4 * n)
    arrays = [_plane(t) for s, r, _ in rows for t in (s, r)]
    limits = _limits(arrays) if arrays else (0.0, 1.0)
    for i, (sample, ref, label) in enumerate(rows):
        _show(fig.add_subplot(n, 2, 2 * i + 1), _plane(sample), limits, label)
        _show(fig.add_subplot(n, 2, 2 * i + 2), _plane(ref), limits, "nearest training image")
    return _save(fig, path)


def save_grid(path: str | Path, images: Sequence[Tensor], title: str = "", ncol: int = 8) -> Path:
    """A grid of up to 32 images (central axial slice of volumes)."""
    images = list(images)[:32]
    ncol = min(ncol, max(len(images), 1))
    nrow = max(1, -(-len(images) // ncol))
    fig = _figure(1.5 * ncol, 1.5 * nrow + 0.4)
    arrays = [_plane(x) for x in images]
    limits = _limits(arrays) if arrays else (0.0, 1.0)
    for i, array in enumerate(arrays):
        _show(fig.add_subplot(nrow, ncol, i + 1), array, limits)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_orthogonal(path: str | Path, volumes: Sequence[Tensor], title: str = "") -> Path:
    """The central slices along the three array axes of up to 4 volumes, one row each."""
    volumes = list(volumes)[:4]
    fig = _figure(6, 2 * max(len(volumes), 1) + 0.4)
    arrays = [[_plane(v, a) for a in range(3)] for v in volumes]
    limits = _limits([a for row in arrays for a in row]) if arrays else (0.0, 1.0)
    for i, row in enumerate(arrays):
        for a, array in enumerate(row):
            _show(fig.add_subplot(len(arrays), 3, 3 * i + a + 1), array, limits, f"axis {a}")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_histograms(
    path: str | Path, sets: dict[str, Sequence[Tensor]], bins: int = 100, units: str = ""
) -> Path:
    """Normalised intensity histograms of each named set on one axis (shared bins)."""
    values = {
        name: torch.cat([x.detach().float().flatten().cpu() for x in items]).numpy()
        for name, items in sets.items()
    }
    low = min(float(np.percentile(v, 0.1)) for v in values.values())
    high = max(float(np.percentile(v, 99.9)) for v in values.values())
    edges = np.linspace(low, high if high > low else low + 1, bins + 1)
    fig = _figure(6, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for name, v in values.items():
        ax.hist(v, bins=edges, density=True, histtype="step", label=name)
    ax.set_xlabel(f"intensity{f' ({units})' if units else ''}")
    ax.set_ylabel("density")
    ax.legend()
    return _save(fig, path)


def save_table(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    """A table of strings drawn as an image."""
    fig = _figure(min(2.2 * len(header), 16), 0.35 * (len(rows) + 1) + 0.3)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    table = ax.table(cellText=[list(r) for r in rows], colLabels=list(header), loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(header))))
    return _save(fig, path)
