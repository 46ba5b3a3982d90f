"""Tests for medgen.data.io: exact round trips, orientation, determinism, clear errors, atomicity."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from medgen.data import io as mio  # noqa: E402
from medgen.data.io import (  # noqa: E402
    MedgenIOError,
    image_stem,
    image_suffix,
    list_images,
    read,
    write,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def camera16() -> np.ndarray:
    """A real 16-bit image: scikit-image's camera, non-square, spread over 0..65535."""
    cam = skimage_data.camera()[40:200, 100:350].astype(np.uint16)
    return cam * 257  # 0..65535, most values > 255


def test_png16_round_trip_bit_exact(tmp_path, camera16):
    path = write(camera16[None], tmp_path / "cam16.png")
    assert path == tmp_path / "cam16.png"
    with Image.open(path) as im:
        assert im.mode == "I;16"
    image = read(path)
    assert isinstance(image, MetaTensor)
    assert image.shape == (1, *camera16.shape)
    assert image.dtype == torch.int32  # torch has no uint16 arithmetic; documented
    assert image.meta["source_dtype"] == "uint16"
    assert int(image.max()) > 255
    np.testing.assert_array_equal(image[0].numpy(), camera16)
    np.testing.assert_array_equal(image.meta["spacing"], [1.0, 1.0])
    # Writing what we read gives the same file again (the int32 tensor remembers it was 16-bit).
    again = write(image, tmp_path / "again.png")
    assert _sha(again) == _sha(path)


def test_png8_gray_and_rgb_round_trip(tmp_path):
    gray = skimage_data.camera()[:120, :200]
    rgb = skimage_data.retina()[200:300, 300:460]  # (100, 160, 3) uint8
    read_gray = read(write(gray[None], tmp_path / "gray.png"))
    assert read_gray.dtype == torch.uint8 and read_gray.shape == (1, 120, 200)
    np.testing.assert_array_equal(read_gray[0].numpy(), gray)
    read_rgb = read(write(np.moveaxis(rgb, -1, 0), tmp_path / "rgb.png"))
    assert read_rgb.dtype == torch.uint8 and read_rgb.shape == (3, 100, 160)
    np.testing.assert_array_equal(np.moveaxis(read_rgb.numpy(), 0, -1), rgb)


def test_read_orientation_matches_pil(tmp_path):
    array = (np.arange(7 * 13).reshape(7, 13) * 3).astype(np.uint8)  # non-square, asymmetric
    path = tmp_path / "orient.png"
    Image.fromarray(array).save(path)
    image = read(path)
    assert image.shape == (1, 7, 13)
    with Image.open(path) as im:
        np.testing.assert_array_equal(image[0].numpy(), np.array(im))


def test_float_png_needs_value_range_and_scales_to_16_bit(tmp_path):
    x = torch.linspace(-0.5, 1.5, 64).reshape(1, 8, 8)
    with pytest.raises(MedgenIOError, match="value_range") as info:
        write(x, tmp_path / "f.png")
    assert str(tmp_path / "f.png") in str(info.value)
    assert not (tmp_path / "f.png").exists()
    out = read(write(x, tmp_path / "f.png", value_range=(0.0, 1.0)))
    assert out.meta["source_dtype"] == "uint16"  # 16-bit by default, never silently 8-bit
    expected = np.rint(np.clip(x.numpy(), 0, 1) * 65535)
    np.testing.assert_array_equal(out.numpy(), expected)
    out8 = read(write(x, tmp_path / "f8.png", value_range=(0.0, 1.0), bit_depth=8))
    assert out8.dtype == torch.uint8


def test_tiff_16_bit_and_float32(tmp_path, camera16):
    out = read(write(camera16[None], tmp_path / "cam.tif"))
    np.testing.assert_array_equal(out[0].numpy(), camera16)
    values = np.random.default_rng(0).normal(size=(1, 9, 11)).astype(np.float32)
    out = read(write(values, tmp_path / "f.tiff", bit_depth=32))
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), values)


def test_nifti_round_trip_keeps_values_dtype_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(40.0, 300.0, size=(1, 9, 10, 6)).astype(np.float32)
    affine = np.array(
        [
            [-0.8, 0.0, 0.0, 90.5],
            [0.0, 0.0, 2.0, -126.0],
            [0.0, 0.8, 0.0, -72.25],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    path = write(volume, tmp_path / "ct.nii.gz", affine=affine)
    image = read(path)
    assert image.dtype == torch.float32 and image.shape == volume.shape
    np.testing.assert_array_equal(image.numpy(), volume)
    # NIfTI stores the affine as float32: exact up to that representation.
    np.testing.assert_array_equal(image.affine.numpy(), affine.astype(np.float32))
    np.testing.assert_allclose(image.meta["spacing"], [0.8, 0.8, 2.0], rtol=1e-6)
    header = nib.load(path).header
    assert header.get_data_dtype() == np.float32
    assert header["sform_code"] > 0 and header["qform_code"] > 0

    # The MetaTensor carries the affine to the next write; integer dtypes are kept too.
    again = read(write(image, tmp_path / "copy.nii"))
    np.testing.assert_array_equal(again.affine.numpy(), image.affine.numpy())
    labels = read(write(volume.astype(np.int16), tmp_path / "labels.nii.gz", affine=affine))
    assert labels.dtype == torch.int16


def test_nii_gz_is_byte_identical(tmp_path):
    volume = torch.randn(1, 6, 7, 8)
    a = write(volume, tmp_path / "a" / "v.nii.gz", affine=np.diag([0.8, 0.8, 2.0, 1.0]))
    b = write(volume, tmp_path / "b" / "v.nii.gz", affine=np.diag([0.8, 0.8, 2.0, 1.0]))
    assert a.read_bytes() == b.read_bytes()
    with gzip.open(a) as handle:  # a valid gzip stream
        assert len(handle.read()) > 352


def test_nan_is_refused_with_path(tmp_path):
    x = torch.zeros(1, 4, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    target = tmp_path / "nan.nii.gz"
    with pytest.raises(MedgenIOError, match="NaN") as info:
        write(x, target)
    assert str(target) in str(info.value)
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["cam.png", "vol.nii.gz"])
def test_truncated_files_raise_naming_the_file(tmp_path, name, camera16):
    good = tmp_path / f"good_{name}"
    if name.endswith(".png"):
        write(camera16[None], good)
    else:
        write(torch.randn(1, 16, 16, 16), good)
    data = good.read_bytes()
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedgenIOError) as info:
        read(bad)
    assert str(bad) in str(info.value)


def test_unsupported_suffix_and_missing_file(tmp_path):
    gif = tmp_path / "x.gif"
    gif.write_bytes(b"GIF89a")
    with pytest.raises(MedgenIOError, match="unsupported") as info:
        read(gif)
    assert str(gif) in str(info.value)
    with pytest.raises(MedgenIOError, match="cannot write"):
        write(np.zeros((1, 4, 4), np.uint8), tmp_path / "x.gif")
    with pytest.raises(MedgenIOError, match="not found") as info:
        read(tmp_path / "missing.png")
    assert "missing.png" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_write_errors_are_explicit(tmp_path):
    with pytest.raises(MedgenIOError, match="16-bit RGB"):
        write(np.zeros((3, 4, 4), np.uint16), tmp_path / "rgb16.png")
    with pytest.raises(MedgenIOError, match="do not fit"):
        write(np.full((1, 4, 4), 70000, np.int32), tmp_path / "big.png")
    with pytest.raises(MedgenIOError, match="channel-first"):
        write(np.zeros((4, 4), np.uint8), tmp_path / "flat.png")
    with pytest.raises(MedgenIOError, match="PNG/TIFF only"):
        write(np.zeros((1, 4, 4), np.float32), tmp_path / "x.nii.gz", value_range=(0, 1))


def test_atomic_write_leaves_nothing_behind(tmp_path, monkeypatch, camera16):
    target = tmp_path / "out.png"
    write(camera16[None], target)
    before = _sha(target)

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write(np.zeros((1, 8, 8), np.uint8), target)
    with pytest.raises(OSError, match="disk full"):
        write(np.zeros((1, 8, 8), np.uint8), tmp_path / "new.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp file, no new.png
    assert _sha(target) == before  # the old file is intact

    def failing_nifti(*args, **kwargs):
        raise OSError("no space")

    monkeypatch.setattr(mio.gzip, "compress", failing_nifti)
    with pytest.raises(OSError, match="no space"):
        write(torch.zeros(1, 4, 4, 4), tmp_path / "v.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_reading_does_not_modify_inputs(tmp_path, camera16):
    paths = [
        write(camera16[None], tmp_path / "a.png"),
        write(torch.randn(1, 5, 6, 7), tmp_path / "b.nii.gz"),
        write(np.arange(24, dtype=np.float32).reshape(2, 3, 4), tmp_path / "c.npy"),
    ]
    hashes = [_sha(p) for p in paths]
    for p in paths:
        image = read(p)
        image += 1  # the tensor is ours: changing it must not touch the file
    assert [_sha(p) for p in paths] == hashes
    assert read(paths[2]).shape == (2, 3, 4)


def test_dicom_reads_in_array_order():
    pydicom_data = pytest.importorskip("pydicom.data")
    pydicom = pytest.importorskip("pydicom")
    path = pydicom_data.get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom test file not available offline")
    image = read(path)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert image.shape == (1, *hu.shape)
    np.testing.assert_allclose(image[0].numpy(), hu)
    np.testing.assert_allclose(image.meta["spacing"], [float(s) for s in ds.PixelSpacing])


def test_names_and_listing(tmp_path):
    assert image_suffix("a/sub-01_T1w.NII.GZ") == ".nii.gz"
    assert image_stem("sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert image_stem("scan.v2.png") == "scan.v2"
    assert image_stem("plain.nii") == "plain"
    for name in ["b.nii.gz", "a.png", "c.npy", "notes.txt", ".a.png.tmp"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.nii.gz", "c.npy"]
    assert [p.name for p in list_images(tmp_path, suffixes=[".nii.gz"])] == ["b.nii.gz"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedgenIOError, match="no image files") as info:
        list_images(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(MedgenIOError, match="does not exist"):
        list_images(tmp_path / "nowhere")


def test_mni152_template_round_trip_is_exact(tmp_path):
    """The MNI152 T1 template shipped with nilearn: read -> write -> read keeps values and affine."""
    nilearn = pytest.importorskip("nilearn")
    path = (
        Path(nilearn.__file__).parent
        / "datasets"
        / "data"
        / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    before = _sha(path)
    original = read(path)
    copy = read(write(original, tmp_path / "mni.nii.gz"))
    assert copy.shape == original.shape == (1, 197, 233, 189)
    assert copy.dtype == original.dtype
    assert torch.equal(copy.as_tensor(), original.as_tensor())
    assert np.array_equal(np.asarray(copy.affine), np.asarray(original.affine))
    assert _sha(path) == before, "the input file must not change"
