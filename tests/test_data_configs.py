"""Every data= preset builds its datasets from real files and feeds medgen-train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import medgen
from medgen.data import write
from medgen.utils.instantiate import instantiate
from tests.conftest import tiny_overrides

pytest.importorskip("nilearn")
pydicom = pytest.importorskip("pydicom")


def _datamodule(overrides: list[str]):
    cfg = medgen.compose("train", overrides)
    dm = instantiate(cfg.data, _recursive_=False, _convert_="all")
    dm.setup("fit")
    return cfg, dm


@pytest.fixture(scope="module")
def mni_folder(tmp_path_factory) -> Path:
    """Six small volumes cut from the MNI152 T1 template shipped with nilearn."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32)[10:90:4, 12:108:4, 8:88:4]
    folder = tmp_path_factory.mktemp("mni")
    for i in range(6):
        volume = torch.from_numpy(np.roll(data, i, axis=0).copy())[None, :16, :16, :16]
        write(volume * (1 + 0.1 * i), folder / f"sub-{i:02d}.nii.gz", affine=img.affine)
    return folder


@pytest.fixture(scope="module")
def rgb_pairs(tmp_path_factory) -> Path:
    """BCI-style layout from scikit-image's immunohistochemistry image (shipped, offline)."""
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()
    root = tmp_path_factory.mktemp("bci")
    for split, rows in (("train", range(0, 3)), ("test", range(3, 4))):
        for r in rows:
            tile = torch.from_numpy(image[r * 64 : r * 64 + 64, :64].copy()).permute(2, 0, 1)
            write(tile.contiguous(), root / "HE" / split / f"{r:05d}_{split}_2+.png")
            write(tile.flip(0).contiguous(), root / "IHC" / split / f"{r:05d}_{split}_2+.png")
    return root


def test_nifti_folder_splits_by_subject_and_trains(mni_folder, tmp_path):
    overrides = tiny_overrides(tmp_path, "vae_3d")
    overrides = [o for o in overrides if not o.startswith("data.")] + [
        "data=nifti_folder",
        f"data.train.source={mni_folder}",
        "data.val_fraction=0.34",
        "data.batch_size=2",
        "model.net.norm_num_groups=4",
    ]
    cfg, dm = _datamodule(overrides)
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert len(train) + len(val) == 6 and len(val) >= 1
    assert not set(train.subjects) & set(val.subjects)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 16)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    result = medgen.train(medgen.compose("train", overrides))
    volume = medgen.data.read(result["samples"][0])
    assert volume.shape == (1, 16, 16, 16)


def test_dicom_folder_reads_series_in_hounsfield_units(tmp_path):
    source = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    for s in range(2):
        for z in range(3):
            ds = pydicom.dcmread(source)
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.{s + 1}"
            ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{z + 1}"
            ds.InstanceNumber = z + 1
            ds.ImagePositionPatient = [0.0, 0.0, float(z) * 2.5]
            (tmp_path / f"series{s}").mkdir(exist_ok=True)
            ds.save_as(tmp_path / f"series{s}" / f"slice{z}.dcm")
    _, dm = _datamodule(
        [
            "experiment=vae_3d",
            "data=dicom_folder",
            f"data.train.source={tmp_path}",
            "data.val_fraction=0.5",
        ]
    )
    item = dm.datasets["train"][0]
    assert item["image"].shape[0] == 1 and item["image"].shape[1] == 3
    ds = pydicom.dcmread(source)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip(hu, -1000, 1000) / 1000.0
    got = np.asarray(item["image"][0, 0])
    assert np.allclose(np.sort(got.ravel()), np.sort(expected.ravel()), atol=1e-5)


def test_image_folder_grey_png(tmp_path):
    from skimage.data import camera

    image = camera()
    for i in range(4):
        tile = torch.from_numpy(image[i * 64 : i * 64 + 64, 64:128].copy())[None]
        write(tile, tmp_path / "images" / f"img{i}.png")
    _, dm = _datamodule(
        [
            "data=image_folder",
            f"data.train.source={tmp_path / 'images'}",
            "data.val_fraction=0.25",
            "data.batch_size=2",
        ]
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 64, 64)
    assert float(batch["image"].min()) >= -1.0 and float(batch["image"].max()) <= 1.0
    assert len(dm.datasets["val"]) == 1


def test_bci_layout_and_paired_folder(rgb_pairs):
    _, dm = _datamodule(
        [
            "data=bci",
            f"data.train.root={rgb_pairs}",
            "data.train.crop_size=32",
            "data.num_workers=0",
            "data.batch_size=2",
        ]
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["a"].shape == (2, 3, 32, 32) and batch["b"].shape == (2, 3, 32, 32)
    # the IHC tile is the H&E tile with channels reversed: same crop and flip for both
    torch.testing.assert_close(batch["b"], batch["a"].flip(1))
    assert len(dm.datasets["val"]) == 1
    _, dm = _datamodule(
        [
            "data=paired_folder",
            f"data.train.a_dir={rgb_pairs / 'HE' / 'train'}",
            f"data.train.b_dir={rgb_pairs / 'IHC' / 'train'}",
            "data.channels=3",
            "data.train.transform._target_=medgen.data.presets.HistologyRGB",
            "~data.train.transform.in_range",
            "~data.train.transform.out_range",
        ]
    )
    assert len(dm.datasets["train"]) == 3


def test_unpaired_folder(rgb_pairs):
    _, dm = _datamodule(
        [
            "data=unpaired_folder",
            f"data.train.a_source={rgb_pairs / 'HE' / 'train'}",
            f"data.train.b_source={rgb_pairs / 'IHC' / 'test'}",
            "data.batch_size=1",
        ]
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["a"].shape == batch["b"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize("pair", ["contrast", "defocus"])
def test_phantom_pairs(pair):
    _, dm = _datamodule(["data=phantom_pairs", f"data.train.pair={pair}", "data.train.length=8"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["a"].shape == batch["b"].shape == (8, 1, 64, 64)
    assert not torch.equal(batch["a"], batch["b"])


def test_nifti_slices_and_patches(mni_folder):
    _, dm = _datamodule(
        [
            "data=nifti_slices",
            f"data.train.source={mni_folder}",
            "data.val_fraction=0.34",
            "data.batch_size=4",
        ]
    )
    train, val = dm.datasets["train"], dm.datasets["val"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16)
    assert not {s for s in train.volumes.subjects} & {s for s in val.volumes.subjects}
    _, dm = _datamodule(
        [
            "data=nifti_patches",
            f"data.train.source={mni_folder}",
            "data.val_fraction=0.34",
            "data.train.patch_size=[8,8,8]",
            "data.batch_size=2",
        ]
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 8, 8, 8)


def test_vae_trains_on_one_side_of_bci_pairs(rgb_pairs, tmp_path):
    overrides = [
        f"paths.output_dir={tmp_path}",
        "data=bci",
        f"data.train.root={rgb_pairs}",
        "data.train.crop_size=32",
        "data.num_workers=0",
        "data.batch_size=2",
        "model.image_key=b",
        "trainer.max_epochs=1",
        "~callbacks.progress_bar",
        "num_samples=2",
    ]
    result = medgen.train(medgen.compose("train", overrides))
    assert "val/psnr" in result["metrics"]
    sample = medgen.data.read(result["samples"][0])
    assert sample.shape == (3, 32, 32)  # prior samples at the training crop size
    assert sample.dtype == torch.uint8  # RGB histology is written as 8-bit RGB PNG
