"""User-reported data faults: each one is refused with a message naming the file and the fix.

- 16-bit PNGs through ``data=image_folder``'s 8-bit range (were clipped to a constant 1.0);
- an odd-sized volume in another split than training (crashed at the end of the first epoch);
- a DICOM series with a missing slice (warned, then crashed in MONAI with OverflowError);
- ``data=dicom_folder`` with series of different sizes, or ``source`` set to one series folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import medgen
from medgen.data import MedicalDataModule, VolumeDataset, write
from medgen.data.datasets import split_by_subject
from medgen.data.io import MedgenIOError, read
from medgen.data.presets import CTWindow, ScaleRange
from medgen.utils.instantiate import instantiate

pydicom = pytest.importorskip("pydicom")
pydicom_data = pytest.importorskip("pydicom.data")

CT_SMALL = pydicom_data.get_testdata_file("CT_small.dcm")


def _datamodule(overrides: list[str]) -> MedicalDataModule:
    cfg = medgen.compose("train", overrides=overrides)
    dm = instantiate(cfg.data, _recursive_=False, _convert_="all")
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------------------------------
# 1. 16-bit PNGs and the 8-bit default range of data=image_folder


@pytest.fixture
def png16_folder(tmp_path) -> Path:
    """Three 16-bit grey PNGs (12-bit-like counts well above 255), written as real files."""
    folder = tmp_path / "png16"
    ramp = np.arange(64, dtype=np.uint16).reshape(1, 8, 8)
    for i in range(3):
        write(ramp * 500 + 100 * i, folder / f"cells_{i}.png")
    assert read(folder / "cells_0.png").meta["source_dtype"] == "uint16"
    return folder


def test_image_folder_refuses_16bit_png_in_8bit_range(png16_folder):
    dm = _datamodule(
        ["data=image_folder", f"data.train.source={png16_folder}", "data.val_fraction=0"]
    )
    with pytest.raises(ValueError) as info:
        dm.datasets["train"][0]
    message = str(info.value)
    assert message.startswith(str(png16_folder / "cells_0.png"))
    assert "uint16" in message and "[0, 255]" in message
    assert "data.train.transform.in_range=[0,65535]" in message


def test_image_folder_16bit_with_the_suggested_range_keeps_every_value(png16_folder):
    dm = _datamodule(
        [
            "data=image_folder",
            f"data.train.source={png16_folder}",
            "data.val_fraction=0",
            "data.train.transform.in_range=[0,65535]",
        ]
    )
    dataset = dm.datasets["train"]
    image = dataset[0]["image"]
    assert len(torch.unique(image)) == 64  # not a constant
    counts = dataset.transform.inverse(image)
    torch.testing.assert_close(counts.round(), read(png16_folder / "cells_0.png").float())
    # the other documented fix: the Microscopy16 preset
    dm = _datamodule(
        [
            "data=image_folder",
            f"data.train.source={png16_folder}",
            "data.val_fraction=0",
            "~data.train.transform",
            "+data.train.transform={_target_:medgen.data.presets.Microscopy16}",
        ]
    )
    assert len(torch.unique(dm.datasets["train"][1]["image"])) == 64


def test_scale_range_refuses_integer_counts_outside_in_range_only():
    counts = torch.tensor([[[0, 300]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"outside ScaleRange's in_range \[0, 255\]"):
        ScaleRange((0, 255))(counts)
    # floats (HU, MR units, [0, 1] data) are windowed and clipped as documented
    y = ScaleRange((0, 255))(counts.float())
    torch.testing.assert_close(y.flatten(), torch.tensor([-1.0, 1.0]))
    # an explicit choice either way
    torch.testing.assert_close(
        ScaleRange((0, 255), strict=False)(counts).flatten(), torch.tensor([-1.0, 1.0])
    )
    with pytest.raises(ValueError, match="in_range"):
        ScaleRange((0, 255), strict=True)(counts.float())
    assert ScaleRange((0, 255), strict=True).config()["strict"] is True
    # a CT window clips HU on purpose, whatever the file's dtype
    hu = read_like(torch.tensor([[[-3000, 0, 3000]]], dtype=torch.int16))
    torch.testing.assert_close(CTWindow()(hu).flatten(), torch.tensor([-1.0, 0.0, 1.0]))


def read_like(values: torch.Tensor):
    """``values`` as a float MetaTensor that came from an integer file, as datasets give them."""
    from monai.data import MetaTensor

    return MetaTensor(
        values.float(), meta={"source_dtype": str(values.dtype).removeprefix("torch.")}
    )


# --------------------------------------------------------------------------------------------------
# 2. shapes across splits


def _volumes(folder: Path, names: list[str], odd: str, odd_shape=(4, 4, 6)) -> None:
    for i, name in enumerate(names):
        shape = odd_shape if name == odd else (4, 4, 4)
        write(torch.rand(1, *shape) + i, folder / f"{name}.nii.gz")


def test_odd_volume_in_the_val_split_is_named_at_setup(tmp_path):
    names = [f"sub-{i:02d}" for i in range(4)]
    _, val = split_by_subject(names, val_fraction=0.25, seed=0)
    assert len(val) == 1
    _volumes(tmp_path, names, odd=val[0])
    with pytest.raises(MedgenIOError) as info:
        _datamodule(
            [
                "data=nifti_folder",
                f"data.train.source={tmp_path}",
                "data.val_fraction=0.25",
                "seed=0",
            ]
        )
    message = str(info.value)
    assert message.startswith(str(tmp_path / f"{val[0]}.nii.gz"))
    assert "(1, 4, 4, 6)" in message and "(1, 4, 4, 4)" in message and "val" in message
    assert "data.train.check_shapes=false" in message


@pytest.mark.parametrize("split", ["val", "test"])
def test_odd_volume_in_a_given_split_is_named(tmp_path, split):
    _volumes(tmp_path, ["a", "b", "c"], odd="c")
    train = VolumeDataset([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    other = VolumeDataset([tmp_path / "c.nii.gz"])
    dm = MedicalDataModule(train=train, **{split: other})
    with pytest.raises(MedgenIOError, match=rf"c\.nii\.gz \({split} split\).*\(1, 4, 4, 6\)"):
        dm.setup("fit")
    # with check_shapes=False (a crop/pad transform makes sizes uniform) the split is not compared
    other = VolumeDataset([tmp_path / "c.nii.gz"], check_shapes=False)
    MedicalDataModule(train=train, **{split: other}).setup("fit")


# --------------------------------------------------------------------------------------------------
# 3. DICOM series with a missing slice


def _ct_series(folder: Path, slices: list[int], step: float = 2.5, rows: int | None = None):
    """Copies of CT_small as one series, slice ``z`` at ``z * step`` mm from CT_small's origin."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = pydicom.uid.generate_uid()
    for z in slices:
        ds = pydicom.dcmread(CT_SMALL)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = z + 1
        x, y, z0 = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z0 + z * step, 4)]
        if rows is not None:
            ds.PixelData = ds.pixel_array[:rows, :rows].copy().tobytes()
            ds.Rows = ds.Columns = rows
        ds.save_as(folder / f"slice{z:03d}.dcm")
    return folder


@pytest.fixture
def strict_pydicom(monkeypatch):
    """pydicom validating DS values strictly, as the reporting user's installation did."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)


def test_series_with_a_missing_slice_names_the_position(tmp_path, strict_pydicom):
    folder = _ct_series(tmp_path / "ct", [0, 1, 3, 4])
    with pytest.raises(MedgenIOError) as info:
        read(folder)
    message = str(info.value)
    z0 = float(pydicom.dcmread(CT_SMALL).ImagePositionPatient[2])
    assert message.startswith(str(folder)) and "1 slice missing" in message
    assert f"{z0 + 5.0:.2f}" in message  # the missing position (z of slice 2)
    assert "slice001.dcm" in message and "slice003.dcm" in message


def test_series_with_irregular_spacing_is_refused(tmp_path):
    folder = _ct_series(tmp_path / "ct", [0, 1, 2], step=2.5)
    ds = pydicom.dcmread(folder / "slice002.dcm")
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1]
    ds.save_as(folder / "slice002.dcm")
    with pytest.raises(MedgenIOError, match=r"not uniform.*3\.5 mm between slice001\.dcm"):
        read(folder)


def test_regular_series_reads_under_strict_ds_validation(tmp_path, strict_pydicom):
    # MONAI appends the mean slice distance (2.5000000000000036 here) to a DS value in place
    volume = read(_ct_series(tmp_path / "ct", [0, 1, 2, 3]))
    assert volume.shape == (1, 4, 128, 128)
    np.testing.assert_allclose(volume.meta["spacing"][0], 2.5, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# 4. data=dicom_folder: series of different sizes, and source at the wrong level


def test_dicom_folder_series_of_different_sizes(tmp_path):
    _ct_series(tmp_path / "root" / "s1", [0, 1, 2])
    _ct_series(tmp_path / "root" / "s2", [0, 1, 2], rows=64)
    with pytest.raises(MedgenIOError) as info:
        _datamodule(
            ["data=dicom_folder", f"data.train.source={tmp_path / 'root'}", "data.val_fraction=0"]
        )
    message = str(info.value)
    assert str(tmp_path / "root" / "s2") in message and "(1, 3, 64, 64)" in message
    assert "(1, 3, 128, 128)" in message and "check_shapes" in message


def test_dicom_folder_odd_series_in_the_val_split(tmp_path):
    names = ["s1", "s2", "s3"]
    _, val = split_by_subject(names, val_fraction=0.34, seed=3)
    for name in names:
        _ct_series(tmp_path / name, [0, 1, 2, 3] if name == val[0] else [0, 1, 2])
    with pytest.raises(MedgenIOError) as info:
        _datamodule(
            [
                "data=dicom_folder",
                f"data.train.source={tmp_path}",
                "data.val_fraction=0.34",
                "seed=3",
            ]
        )
    assert str(info.value).startswith(f"{tmp_path / val[0]} (val split): shape (1, 4, 128, 128)")


@pytest.mark.parametrize("suffix", [".dcm", ""])
def test_dicom_folder_source_at_one_series_folder(tmp_path, suffix):
    series = _ct_series(tmp_path / "patients" / "s1", [0, 1, 2])
    if not suffix:
        for file in series.iterdir():
            file.rename(file.with_suffix(""))
    with pytest.raises(MedgenIOError) as info:
        _datamodule(["data=dicom_folder", f"data.train.source={series}", "data.val_fraction=0"])
    message = str(info.value)
    assert message.startswith(str(series)) and "one sub-folder per series" in message
    assert f"data.train.source={tmp_path / 'patients'}" in message
