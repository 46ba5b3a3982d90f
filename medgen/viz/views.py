"""Matplotlib views of images and volumes (imported lazily: ``pip install medgen[viz]``).

Every view returns a :class:`matplotlib.figure.Figure` built without pyplot, so nothing is kept
in pyplot's global list of figures; the figure has a PNG representation (``_repr_png_``), so any
notebook front end shows it once when a cell ends with it (or through ``display(fig)``), whether
or not the inline backend is active; outside a notebook, ``fig.savefig(path)``.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medgen.viz.grids import auto_range, image_grid

__all__ = [
    "compare",
    "orientation_labels",
    "require_matplotlib",
    "show",
    "show_volume",
    "slice_slider",
]

INSTALL_HINT = "pip install 'medgen[viz]'"
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
_PLANES = {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal"}
_PLANES.update({"S": "axial", "I": "axial"})


def require_matplotlib() -> type:
    """The figure class of the views (a matplotlib ``Figure`` that renders itself as PNG in a
    notebook), or an ImportError that says how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"medgen.viz needs matplotlib to draw figures: {INSTALL_HINT}") from err
    return _inline_figure_class(Figure)


@functools.cache
def _inline_figure_class(base: type) -> type:
    class InlineFigure(base):
        """A matplotlib figure that IPython displays as a PNG (no pyplot, no inline backend)."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=80)
            return buffer.getvalue()

    InlineFigure.__name__ = InlineFigure.__qualname__ = "Figure"
    return InlineFigure


def _as_tensor(images: Any) -> torch.Tensor:
    """A float CPU tensor from a tensor, array, list of tensors/arrays, or a file path."""
    if isinstance(images, (str, os.PathLike)):
        from medgen.data.io import read

        images = read(images)
    if isinstance(images, (list, tuple)):
        images = torch.stack([_as_tensor(i) for i in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a tensor, array, list of them or a path, got {type(images)}")
    return images.detach().float().cpu().as_subclass(torch.Tensor)


def _batch(images: Any) -> torch.Tensor:
    """``(B, C, *spatial)`` from one image ``(H, W)``/``(C, H, W)`` or a batch."""
    t = _as_tensor(images)
    if t.ndim == 2:
        return t[None, None]
    if t.ndim == 3:
        return t[None] if t.shape[0] in (1, 3) else t[:, None]
    if t.ndim in (4, 5):
        return t
    raise ValueError(f"expected (H, W), (C, H, W), (B, C, H, W) or (B, C, D, H, W), got {t.shape}")


def _width(batch: torch.Tensor, nrow: int, scale: float) -> float:
    """Figure width in inches: about 2 per image of a row, at most 8 (times ``scale``)."""
    per_row = 3 if batch.ndim == 5 else min(nrow, batch.shape[0])
    return min(8.0, 2.0 * per_row) * scale


def _draw(ax: Any, grid: torch.Tensor, cmap: str, aspect: float = 1.0) -> None:
    """Draw a ``(C, H, W)`` image in [0, 1] on ``ax`` (RGB when C == 3)."""
    if grid.shape[0] == 3:
        ax.imshow(grid.permute(1, 2, 0).numpy(), vmin=0.0, vmax=1.0, aspect=aspect)
    else:
        ax.imshow(grid[0].numpy(), cmap=cmap, vmin=0.0, vmax=1.0, aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])


def show(
    images: Any,
    nrow: int = 8,
    value_range: Sequence[float] | None = None,
    title: str | None = None,
    cmap: str = "gray",
    scale: float = 1.0,
) -> Any:
    """A grid of 2D images, or of the central orthogonal slices of volumes (one row each).

    Args:
        images: ``(B, C, H, W)`` images, ``(B, C, D, H, W)`` volumes, one image ``(H, W)`` or
            ``(C, H, W)``, a list of them, or a file path. RGB when ``C == 3``.
        nrow: Images per row (2D).
        value_range: Intensities shown black to white; ``None``: the images' min and max.
        title: Figure title.
        cmap: Colour map of grey images.
        scale: Figure size factor.

    Returns:
        A matplotlib ``Figure``.
    """
    Figure = require_matplotlib()
    batch = _batch(images)
    grid = image_grid(batch, value_range, nrow=nrow)
    height, width = grid.shape[1:]
    inches = _width(batch, nrow, scale)
    fig = Figure(figsize=(inches, max(1.5, inches * height / width + (0.4 if title else 0.0))))
    ax = fig.add_axes((0, 0, 1, 0.92 if title else 1))
    _draw(ax, grid, cmap)
    ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def orientation_labels(axcodes: str, axis: int) -> dict[str, str]:
    """Labels of the slice through array ``axis`` of a volume with orientation ``axcodes``.

    The slice shows the other two axes as rows (index growing downwards) and columns (growing
    to the right), so its bottom edge lies towards the rows' axis code and its right edge
    towards the columns'.

    Args:
        axcodes: Orientation of the array axes, e.g. ``"RAS"`` (from
            :func:`medgen.data.io.axcodes_from_affine`).
        axis: The array axis the slice is taken across (0, 1 or 2).

    Returns:
        ``{"plane", "top", "bottom", "left", "right"}``, e.g. for ``"RAS"`` and axis 2: an axial
        slice with ``R`` at the bottom and ``A`` on the right.
    """
    axcodes = axcodes.upper()
    rows, cols = (a for a in range(3) if a != axis)
    return {
        "plane": _PLANES[axcodes[axis]],
        "top": _OPPOSITE[axcodes[rows]],
        "bottom": axcodes[rows],
        "left": _OPPOSITE[axcodes[cols]],
        "right": axcodes[cols],
    }


def _volume(volume: Any, affine: Any, spacing: Sequence[float] | None):
    """``(D, H, W)`` tensor, its affine (or None) and voxel spacing from a volume argument."""
    if isinstance(volume, (str, os.PathLike)):
        from medgen.data.io import read

        volume = read(volume)
    if affine is None and hasattr(volume, "affine"):
        affine = volume.affine
    t = _as_tensor(volume)
    while t.ndim > 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(
            f"expected one volume (D, H, W), (1, D, H, W) or (1, 1, D, H, W), got {tuple(t.shape)}"
        )
    if affine is not None:
        affine = torch.as_tensor(affine).double().reshape(-1, 4, 4)[0]
        if spacing is None:
            spacing = affine[:3, :3].norm(dim=0).tolist()
    spacing = tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0)))
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    return t, affine, spacing


def _axcodes(affine: torch.Tensor | None) -> str | None:
    """Orientation codes of an affine (``"RAS"``, ``"LPS"``, ...), or None without one."""
    if affine is None:
        return None
    from medgen.data.io import axcodes_from_affine

    return axcodes_from_affine(affine)


def _slice_panel(
    ax: Any,
    volume: torch.Tensor,
    axis: int,
    index: int,
    spacing: Sequence[float],
    axcodes: str | None,
    value_range: Sequence[float],
    cmap: str,
) -> None:
    rows, cols = (a for a in range(3) if a != axis)
    low, high = value_range
    plane = ((volume.select(axis, index) - low) / (high - low)).clamp(0, 1)
    # spacing-correct aspect: a pixel is spacing[rows] tall and spacing[cols] wide
    _draw(ax, plane[None], cmap, aspect=spacing[rows] / spacing[cols])
    if axcodes is None:
        ax.set_title(f"axis {axis} = {index}", fontsize=9)
        return
    labels = orientation_labels(axcodes, axis)
    ax.set_title(f"{labels['plane']} ({axis} = {index})", fontsize=9)
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.5, 0.98, labels["top"], ha="center", va="top", **style)
    ax.text(0.5, 0.02, labels["bottom"], ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, labels["left"], ha="left", va="center", **style)
    ax.text(0.98, 0.5, labels["right"], ha="right", va="center", **style)


def show_volume(
    volume: Any,
    affine: Any = None,
    spacing: Sequence[float] | None = None,
    index: Sequence[int] | None = None,
    value_range: Sequence[float] | None = None,
    title: str | None = None,
    cmap: str = "gray",
    scale: float = 1.0,
) -> Any:
    """Three orthogonal slices of a volume, labelled with the affine's orientation.

    Each panel is drawn with the aspect of its voxel spacing (a 1 x 1 x 3 mm volume is not
    squashed) and, when an affine is known, titled by its plane (axial, coronal, sagittal) with
    the anatomical direction at each edge (``R``/``L``, ``A``/``P``, ``S``/``I``).

    Args:
        volume: ``(D, H, W)``, ``(1, D, H, W)`` or ``(1, 1, D, H, W)``; a MetaTensor (as
            :func:`medgen.data.read` returns) brings its affine; or a file path.
        affine: 4x4 voxel-to-world affine (overrides the volume's own).
        spacing: Voxel spacing per array axis (default: from the affine, else 1).
        index: Slice index per axis (default: the centre).
        value_range: Intensities shown black to white (default: the volume's min and max).
        title: Figure title.
        cmap: Colour map.
        scale: Figure size factor.

    Returns:
        A matplotlib ``Figure`` with three axes.
    """
    Figure = require_matplotlib()
    t, affine, spacing = _volume(volume, affine, spacing)
    axcodes = _axcodes(affine)
    index = tuple(index) if index is not None else tuple(n // 2 for n in t.shape)
    value_range = tuple(value_range) if value_range is not None else auto_range(t)
    fig = Figure(figsize=(10.0 * scale, 3.8 * scale), layout="constrained")
    axes = fig.subplots(1, 3)
    for axis, ax in enumerate(axes):
        _slice_panel(ax, t, axis, index[axis], spacing, axcodes, value_range, cmap)
    if title:
        fig.suptitle(title)
    return fig


def compare(
    real: Any,
    fake: Any,
    nrow: int = 8,
    value_range: Sequence[float] | None = None,
    titles: Sequence[str] = ("real", "generated"),
    difference: bool = True,
    cmap: str = "gray",
    scale: float = 1.0,
) -> Any:
    """Real and generated images (or volumes' slices) on one intensity scale, one row each.

    With ``difference`` and equal shapes (a translation or a reconstruction), a third row shows
    ``|real - fake|`` on the same scale.

    Args:
        real: Images as for :func:`show`.
        fake: Images as for :func:`show`.
        nrow: Images per row (2D).
        value_range: Common intensity range (default: min and max over both).
        titles: Row titles.
        difference: Add the absolute difference row when shapes match.
        cmap: Colour map of grey images.
        scale: Figure size factor.

    Returns:
        A matplotlib ``Figure``.
    """
    Figure = require_matplotlib()
    a, b = _batch(real), _batch(fake)
    if value_range is None:
        lows, highs = zip(auto_range(a), auto_range(b), strict=True)
        value_range = (min(lows), max(highs))
    low, high = value_range
    grids = [image_grid(a, value_range, nrow), image_grid(b, value_range, nrow)]
    names = list(titles)
    if difference and a.shape == b.shape:
        grids.append(image_grid((a - b).abs(), (0.0, high - low), nrow))
        names.append(f"|{titles[0]} - {titles[1]}|")
    ratio = sum(g.shape[1] / g.shape[2] for g in grids)
    inches = _width(a, nrow, scale)
    fig = Figure(figsize=(inches, inches * ratio + 0.4 * len(grids)), layout="constrained")
    axes = fig.subplots(len(grids), 1, squeeze=False)[:, 0]
    for ax, grid, name in zip(axes, grids, names, strict=True):
        _draw(ax, grid, cmap)
        ax.set_title(name, fontsize=10)
    return fig


def slice_slider(
    volume: Any,
    axis: int = 2,
    affine: Any = None,
    spacing: Sequence[float] | None = None,
    value_range: Sequence[float] | None = None,
    cmap: str = "gray",
    scale: float = 1.0,
) -> Any:
    """A slider through the slices of a volume across ``axis`` (a Jupyter widget).

    Args:
        volume: As for :func:`show_volume`.
        axis: The array axis the slider moves along.
        affine: As for :func:`show_volume`.
        spacing: As for :func:`show_volume`.
        value_range: Fixed intensity range of all slices (default: the volume's min and max).
        cmap: Colour map.
        scale: Figure size factor.

    Returns:
        An ``ipywidgets.interactive`` widget; its ``result`` is the figure of the current slice.

    Raises:
        ImportError: without ipywidgets (use :func:`show_volume`), naming the extra to install.
    """
    try:
        import ipywidgets
    except ImportError as err:
        raise ImportError(
            f"slice_slider needs ipywidgets: {INSTALL_HINT} (or use medgen.viz.show_volume)"
        ) from err
    Figure = require_matplotlib()
    t, affine, spacing = _volume(volume, affine, spacing)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    axcodes = _axcodes(affine)
    value_range = tuple(value_range) if value_range is not None else auto_range(t)

    def draw(index: int) -> Any:
        fig = Figure(figsize=(4.0 * scale, 4.0 * scale), layout="constrained")
        _slice_panel(fig.subplots(), t, axis, index, spacing, axcodes, value_range, cmap)
        return fig

    count = t.shape[axis]
    slider = ipywidgets.IntSlider(
        value=count // 2, min=0, max=count - 1, description=f"axis {axis}", continuous_update=False
    )
    return ipywidgets.interactive(draw, index=slider)
