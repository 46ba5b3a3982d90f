"""Inline views of images and volumes for notebooks: grids, orthogonal slices, comparisons.

``show`` (grids of 2D images or of volumes' central slices), ``show_volume`` (three orthogonal
slices labelled with the affine's orientation, drawn with the voxel spacing's aspect),
``compare`` (real vs generated, with their difference) and ``slice_slider`` (an ipywidgets slider
through a volume). They return matplotlib figures, which a notebook shows when a cell ends with
one; matplotlib (and ipywidgets for the slider) come with ``pip install medgen[viz]`` and are
imported only when a view is drawn. The grid helpers (:func:`image_grid`) need torch only.
"""

from __future__ import annotations

from medgen.viz.grids import auto_range, image_grid, orthogonal_slices, to_unit
from medgen.viz.views import (
    compare,
    orientation_labels,
    require_matplotlib,
    show,
    show_volume,
    slice_slider,
)

__all__ = [
    "auto_range",
    "compare",
    "image_grid",
    "orientation_labels",
    "orthogonal_slices",
    "require_matplotlib",
    "show",
    "show_volume",
    "slice_slider",
    "to_unit",
]
