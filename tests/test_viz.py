"""medgen.viz: grids, orthogonal views with orientation labels and spacing, compare, slider."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

import medgen.viz as viz
from medgen.data.io import read, write

matplotlib.use("Agg")


def _shown(ax) -> np.ndarray:
    return np.asarray(ax.images[0].get_array())


def test_show_grid_of_2d_images_matches_image_grid() -> None:
    images = torch.rand(4, 1, 16, 16) * 100 - 50
    fig = viz.show(images, nrow=2, title="four")
    (ax,) = fig.axes
    expected = viz.image_grid(images, None, nrow=2)[0].numpy()
    assert _shown(ax).shape == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    np.testing.assert_allclose(_shown(ax), expected, atol=1e-6)
    assert expected.min() == 0.0 and expected.max() == pytest.approx(1.0)  # own min/max range
    assert fig._suptitle.get_text() == "four"


def test_show_rgb_and_volumes() -> None:
    rgb = viz.show(torch.rand(3, 8, 8))  # one RGB image (C, H, W)
    assert _shown(rgb.axes[0]).shape == (8, 8, 3)  # one image: no grid padding
    volumes = viz.show(torch.rand(2, 1, 6, 8, 4))  # one row of 3 central slices per volume
    side = 8
    assert _shown(volumes.axes[0]).shape == (2 * side + 3 * 2, 3 * side + 2 * 2)


@pytest.mark.parametrize(
    ("axcodes", "axis", "expected"),
    [
        ("RAS", 2, {"plane": "axial", "top": "L", "bottom": "R", "left": "P", "right": "A"}),
        ("RAS", 0, {"plane": "sagittal", "top": "P", "bottom": "A", "left": "I", "right": "S"}),
        ("LPS", 1, {"plane": "coronal", "top": "R", "bottom": "L", "left": "I", "right": "S"}),
    ],
)
def test_orientation_labels(axcodes: str, axis: int, expected: dict[str, str]) -> None:
    assert viz.orientation_labels(axcodes, axis) == expected


def _texts(ax) -> list[str]:
    return sorted(t.get_text() for t in ax.texts)


def test_show_volume_labels_and_spacing_aspect_from_file(tmp_path: Path) -> None:
    """A 1 x 1 x 3 mm LPS volume written to NIfTI and read back: labels and aspect follow it."""
    volume = torch.rand(1, 10, 12, 6)
    affine = torch.diag(torch.tensor([-1.0, -1.0, 3.0, 1.0], dtype=torch.float64))  # LPS
    path = write(volume, tmp_path / "vol.nii.gz", affine=affine)
    fig = viz.show_volume(read(path), title="LPS")
    assert len(fig.axes) == 3
    sagittal, coronal, axial = fig.axes
    assert sagittal.get_title().startswith("sagittal (0 = 5)")
    assert coronal.get_title().startswith("coronal (1 = 6)")
    assert axial.get_title().startswith("axial (2 = 3)")
    # axial slice: rows along axis 0 (towards L), columns along axis 1 (towards P)
    assert _texts(axial) == sorted(["R", "L", "A", "P"])
    assert axial.texts[1].get_text() == "L" and axial.texts[3].get_text() == "P"
    # pixels are spacing[rows] tall and spacing[cols] wide
    assert sagittal.get_aspect() == pytest.approx(1.0 / 3.0)  # rows axis 1, columns axis 2
    assert coronal.get_aspect() == pytest.approx(1.0 / 3.0)
    assert axial.get_aspect() == pytest.approx(1.0)
    assert _shown(axial).shape == (10, 12)
    assert _shown(sagittal).shape == (12, 6)


def test_show_volume_without_affine_uses_spacing_and_array_axes() -> None:
    fig = viz.show_volume(torch.rand(8, 8, 8), spacing=(2.0, 1.0, 1.0), index=(1, 2, 3))
    assert [ax.get_title() for ax in fig.axes] == ["axis 0 = 1", "axis 1 = 2", "axis 2 = 3"]
    assert fig.axes[2].get_aspect() == pytest.approx(2.0) and not fig.axes[2].texts
    with pytest.raises(ValueError, match="one volume"):
        viz.show_volume(torch.rand(2, 1, 8, 8, 8))


def test_compare_with_difference_on_one_scale() -> None:
    real = torch.zeros(2, 1, 8, 8)
    fake = torch.full((2, 1, 8, 8), 4.0)
    fake[:, :, 0, 0] = 2.0
    fig = viz.compare(real, fake, titles=("real", "fake"))  # common scale [0, 4]
    assert [ax.get_title() for ax in fig.axes] == ["real", "fake", "|real - fake|"]
    assert _shown(fig.axes[0])[3:10, 3:10].max() == 0.0
    assert _shown(fig.axes[1])[3:10, 3:10].min() == 1.0
    assert _shown(fig.axes[1])[2, 2] == 0.5
    assert _shown(fig.axes[2])[3:10, 3:10].min() == 1.0  # |0 - 4| = the full range
    unequal = viz.compare(real, torch.rand(3, 1, 8, 8))
    assert len(unequal.axes) == 2


def test_slice_slider_moves_through_the_volume() -> None:
    volume = torch.arange(5 * 4 * 3, dtype=torch.float32).reshape(5, 4, 3)
    widget = viz.slice_slider(volume, axis=0)
    slider = widget.children[0]
    assert (slider.min, slider.max, slider.value) == (0, 4, 2)
    assert widget.result.axes[0].get_title() == "axis 0 = 2"
    slider.value = 4
    assert widget.result.axes[0].get_title() == "axis 0 = 4"
    shown = _shown(widget.result.axes[0])
    np.testing.assert_allclose(shown, (volume[4] / volume.max()).numpy(), atol=1e-6)


def test_missing_matplotlib_and_ipywidgets_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(ImportError, match=r"medgen\[viz\]"):
        viz.slice_slider(torch.rand(4, 4, 4))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"matplotlib.*medgen\[viz\]"):
        viz.show(torch.rand(1, 1, 4, 4))


def test_image_logger_draws_viz_grids() -> None:
    from medgen.callbacks import image_logger

    assert image_logger.image_grid is viz.image_grid
    assert image_logger.orthogonal_slices is viz.orthogonal_slices


def test_figures_render_as_png_for_notebooks() -> None:
    """No pyplot and no inline backend needed: IPython displays figures through _repr_png_."""
    from matplotlib.figure import Figure

    fig = viz.show(torch.rand(2, 1, 8, 8))
    assert isinstance(fig, Figure)
    png = fig._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 100
