"""DICOM through medgen.data.io.read: CT_small in HU, series folders, clear errors for bad folders."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
pydicom_data = pytest.importorskip("pydicom.data")

from medgen.data.io import MedgenIOError, read, write  # noqa: E402

CT_SMALL = pydicom_data.get_testdata_file("CT_small.dcm")
if CT_SMALL is None:  # pragma: no cover - the file ships inside the pydicom wheel
    pytest.skip("pydicom's CT_small.dcm is not available", allow_module_level=True)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _hu(ds) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _oblique(angle: float, tilt: float) -> np.ndarray:
    """Row and column direction cosines (6 values) of an oblique plane."""
    ca, sa, cb, sb = np.cos(angle), np.sin(angle), np.cos(tilt), np.sin(tilt)
    return np.array([ca, sa, 0.0, -sa * cb, ca * cb, -sb])


def _write_series(
    folder: Path,
    n: int = 5,
    step: float = 2.5,
    orientation: np.ndarray | None = None,
    suffix: str = ".dcm",
    uid: str | None = None,
    gaps: list[float] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Write ``n`` modified copies of CT_small as one series, in shuffled file order.

    Slice ``k`` lies ``k * step`` mm along the slice normal from CT_small's position and holds
    CT_small's pixels + 10 k. InstanceNumbers run *against* the positions, and file names follow
    neither, so only ordering by position gives the slices back in order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(CT_SMALL)
    iop = (
        np.array([float(v) for v in base.ImageOrientationPatient])
        if orientation is None
        else orientation
    )
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([float(v) for v in base.ImagePositionPatient])
    uid = uid or pydicom.uid.generate_uid()
    offsets = np.concatenate([[0.0], np.cumsum(gaps)]) if gaps else np.arange(n) * step
    order = list(range(len(offsets)))
    random.Random(seed).shuffle(order)
    slices = []
    for name_index, k in enumerate(order):
        ds = pydicom.dcmread(CT_SMALL)
        position = origin + offsets[k] * normal
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.InstanceNumber = 100 - k
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        pixels = ds.pixel_array.astype(np.int32) + 10 * k
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
        path = folder / f"IM{name_index:04d}{suffix}"
        ds.save_as(path)
        slices.append({"k": k, "path": path, "position": position, "hu": _hu(ds)})
    return sorted(slices, key=lambda s: s["k"])


def _world(affine: torch.Tensor, index: tuple[float, ...]) -> np.ndarray:
    return (affine.numpy() @ np.array([*index, 1.0]))[:3]


def test_ct_small_single_file_in_hu():
    ds = pydicom.dcmread(CT_SMALL)
    image = read(CT_SMALL)
    assert image.shape == (1, 128, 128)
    expected = ds.pixel_array * ds.RescaleSlope + ds.RescaleIntercept
    np.testing.assert_array_equal(image[0].numpy(), expected)
    assert float(image.min()) < -800  # air in HU, not raw stored values
    np.testing.assert_allclose(image.meta["spacing"], [float(v) for v in ds.PixelSpacing])


def test_series_is_ordered_along_the_normal(tmp_path):
    slices = _write_series(tmp_path / "ct", n=5, step=2.5)
    volume = read(tmp_path / "ct")
    assert volume.shape == (1, 5, 128, 128)
    assert volume.meta["filename_or_obj"] == str(tmp_path / "ct")
    for s in slices:
        np.testing.assert_array_equal(volume[0, s["k"]].numpy(), s["hu"])
    np.testing.assert_allclose(volume.meta["spacing"], [2.5, 0.661468, 0.661468], rtol=1e-6)
    # voxel (k, 0, 0) sits at the ImagePositionPatient of slice k (in RAS)
    for s in slices:
        np.testing.assert_allclose(
            _world(volume.affine, (s["k"], 0, 0)), LPS_TO_RAS @ s["position"], atol=1e-4
        )


def test_series_in_plane_order_matches_single_file(tmp_path):
    slices = _write_series(tmp_path / "ct", n=3)
    volume = read(tmp_path / "ct")
    for s in slices:
        single = read(s["path"])
        np.testing.assert_array_equal(volume[0, s["k"]].numpy(), single[0].numpy())
    single = read(slices[0]["path"])
    # rows and columns point the same way in world space as for one file read on its own
    np.testing.assert_allclose(volume.affine[:3, 1:3].numpy(), single.affine[:3, :2].numpy())


def test_extensionless_files_and_non_slices_ignored(tmp_path):
    folder = tmp_path / "series"
    slices = _write_series(folder, n=4, suffix="")
    (folder / "DICOMDIR").write_bytes(b"an index, not a slice")
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    volume = read(folder)
    assert volume.shape == (1, 4, 128, 128)
    for s in slices:
        np.testing.assert_array_equal(volume[0, s["k"]].numpy(), s["hu"])


def test_oblique_series_affine(tmp_path):
    iop = _oblique(0.3, 0.2)
    slices = _write_series(tmp_path / "oblique", n=4, step=3.0, orientation=iop)
    volume = read(tmp_path / "oblique")
    dr, dc = 0.661468, 0.661468  # PixelSpacing: between rows, between columns
    row_dir, col_dir = iop[:3], iop[3:]
    for s in slices:
        for i, j in ((0, 0), (5, 0), (0, 7), (100, 60)):
            expected = s["position"] + j * dc * row_dir + i * dr * col_dir
            np.testing.assert_allclose(
                _world(volume.affine, (s["k"], i, j)), LPS_TO_RAS @ expected, atol=1e-3
            )
    np.testing.assert_allclose(volume.meta["spacing"], [3.0, dr, dc], rtol=1e-5)


def test_one_file_folder_is_a_one_slice_volume(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    ds = pydicom.dcmread(CT_SMALL)
    ds.save_as(folder / "slice.dcm")
    volume = read(folder)
    assert volume.shape == (1, 1, 128, 128)
    np.testing.assert_array_equal(volume[0, 0].numpy(), _hu(ds))
    # slice axis along the normal, SliceThickness (5 mm) long
    np.testing.assert_allclose(volume.meta["spacing"], [5.0, 0.661468, 0.661468], rtol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 0].numpy(), [0.0, 0.0, 5.0], atol=1e-9)


def test_series_round_trips_through_nifti(tmp_path):
    _write_series(tmp_path / "ct", n=3, orientation=_oblique(0.1, -0.3))
    volume = read(tmp_path / "ct")
    again = read(write(volume, tmp_path / "ct.nii.gz"))
    assert again.shape == volume.shape
    np.testing.assert_allclose(again.affine.numpy(), volume.affine.numpy(), atol=1e-5)
    np.testing.assert_array_equal(again.numpy(), volume.numpy())


def test_missing_slice_is_refused_with_its_position(tmp_path):
    slices = _write_series(tmp_path / "gap", gaps=[2.0, 2.0, 4.0])  # a missing slice
    with pytest.raises(MedgenIOError, match="1 slice missing between") as info:
        read(tmp_path / "gap")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "gap"))
    normal = np.cross(
        *np.split(
            np.array([float(v) for v in pydicom.dcmread(CT_SMALL).ImageOrientationPatient]), 2
        )
    )
    expected = slices[2]["position"] + 2.0 * normal
    assert "(" + ", ".join(f"{v:.2f}" for v in expected) + ")" in message
    assert slices[2]["path"].name in message and slices[3]["path"].name in message


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedgenIOError, match="empty") as info:
        read(empty)
    assert str(empty) in str(info.value)


def test_mixed_series_lists_the_uids(tmp_path):
    folder = tmp_path / "mixed"
    _write_series(folder, n=3, uid="1.2.3.4.1")
    ds = pydicom.dcmread(CT_SMALL)
    ds.SeriesInstanceUID = "1.2.3.4.2"
    ds.save_as(folder / "other.dcm")
    with pytest.raises(MedgenIOError, match="2 DICOM series") as info:
        read(folder)
    message = str(info.value)
    assert "1.2.3.4.1 (3 files)" in message and "1.2.3.4.2 (1 files)" in message
    assert message.startswith(str(folder))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "header_only"])
def test_corrupt_file_is_named(tmp_path, damage):
    folder = tmp_path / "bad"
    slices = _write_series(folder, n=4)
    victim = slices[2]["path"]
    raw = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        victim.write_bytes(b"not a dicom file at all" * 50)
    else:
        victim.write_bytes(raw[:200])  # the file meta survives, the data set does not
    with pytest.raises(MedgenIOError) as info:
        read(folder)
    assert str(info.value).startswith(str(victim))


def test_two_slices_at_one_position(tmp_path):
    folder = tmp_path / "dup"
    slices = _write_series(folder, n=3)
    ds = pydicom.dcmread(slices[1]["path"])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "echo2.dcm")
    with pytest.raises(MedgenIOError, match="same position"):
        read(folder)


def test_slices_of_different_sizes(tmp_path):
    folder = tmp_path / "sizes"
    _write_series(folder, n=3, uid="1.2.3.9")
    ds = pydicom.dcmread(CT_SMALL)
    ds.SeriesInstanceUID = "1.2.3.9"
    ds.ImagePositionPatient = [0.0, 0.0, 50.0]
    ds.PixelData = ds.pixel_array[:64, :64].copy().tobytes()
    ds.Rows, ds.Columns = 64, 64
    ds.save_as(folder / "small.dcm")
    with pytest.raises(MedgenIOError, match="64x64") as info:
        read(folder)
    assert str(info.value).startswith(str(folder / "small.dcm"))


def test_plain_files_still_need_a_known_suffix(tmp_path):
    # a file without suffix is not guessed to be DICOM: only folders are
    path = tmp_path / "scan"
    path.write_bytes(Path(CT_SMALL).read_bytes())
    with pytest.raises(MedgenIOError, match="unsupported file type"):
        read(path)
