"""Datasets over files: sources, subject splits, volumes, slices, patches, paired and unpaired images.

Test data are real images shipped inside installed packages: the MNI152 T1 template of nilearn
(downsampled) and scikit-image's immunohistochemistry and retina photographs (cut into tiles).
"""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch.utils.data import DataLoader

from medgen.data.datasets import (
    PairedDataset,
    PatchDataset,
    SliceDataset,
    UnpairedDataset,
    VolumeDataset,
    bci_pairs,
    resolve_sources,
    split_by_subject,
)
from medgen.data.io import MedgenIOError, read, write

skimage_data = pytest.importorskip("skimage.data")
nilearn_datasets = pytest.importorskip("nilearn.datasets")

SHAPE = (24, 28, 24)  # (D, H, W) of the downsampled MNI volumes


# --------------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="module")
def mni() -> np.ndarray:
    """The MNI152 T1 template at 2 mm, downsampled to 8 mm and cropped to ``SHAPE`` (float32)."""
    template = nilearn_datasets.load_mni152_template(resolution=2)
    volume = np.asarray(template.get_fdata(), dtype=np.float32)[::4, ::4, ::4]
    return np.ascontiguousarray(volume[: SHAPE[0], : SHAPE[1], : SHAPE[2]])


def _affine(i: int) -> np.ndarray:
    affine = np.diag([8.0 + i, 8.0, 8.0 - 0.5 * i, 1.0])
    affine[:3, 3] = [-90.0 + i, -126.0, -72.0 - 2 * i]
    return affine


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, mni) -> Path:
    """Folder of three NIfTI volumes ``sub-0{1,2,3}_T1w.nii.gz`` with different affines."""
    folder = tmp_path_factory.mktemp("volumes")
    for i in range(3):
        write((mni * (1.0 + 0.1 * i))[None], folder / f"sub-0{i + 1}_T1w.nii.gz", affine=_affine(i))
    return folder


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> tuple[Path, Path, list[int]]:
    """``a/`` holds 48x40 RGB tiles of the IHC and retina images, ``b/`` the same tiles with the
    channels permuted; the names match."""
    root = tmp_path_factory.mktemp("tiles")
    perm = [2, 0, 1]
    sources = {"ihc": skimage_data.immunohistochemistry(), "retina": skimage_data.retina()}
    for name, image in sources.items():
        for k in range(3):
            tile = np.ascontiguousarray(image[200 + 48 * k : 248 + 48 * k, 300:340])
            chw = np.moveaxis(tile, -1, 0)
            write(chw, root / "a" / f"{name}_{k}.png")
            write(np.ascontiguousarray(chw[perm]), root / "b" / f"{name}_{k}.png")
    return root / "a", root / "b", perm


def _digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _paths(items) -> list[str]:
    return [str(item["image"]) for item in items]


# --------------------------------------------------------------------------------------------------
# sources


def test_every_source_kind_resolves_the_same_items(volumes, tmp_path, monkeypatch):
    files = sorted(volumes.glob("*.nii.gz"))
    expected = [str(p) for p in files]
    subjects = [p.name.removesuffix(".nii.gz") for p in files]

    by_folder = resolve_sources(volumes)
    by_glob = resolve_sources(str(volumes / "sub-*_T1w.nii.gz"))
    by_list = resolve_sources([str(p) for p in files])
    by_dicts = resolve_sources([{"image": p} for p in files])

    # CSV with paths relative to the CSV's folder (not the working directory)
    table = volumes.parent / "lists" / "images.csv"
    table.parent.mkdir(exist_ok=True)
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image"])
        writer.writerows([[f"../{volumes.name}/{p.name}"] for p in files])
    monkeypatch.chdir(tmp_path)
    by_csv = resolve_sources(table)

    # MONAI-style datalist; `key` picks the list; relative paths against the JSON's folder
    datalist = volumes.parent / "lists" / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "name": "mni",
                "training": [{"image": f"../{volumes.name}/{p.name}"} for p in files[:2]],
                "validation": [{"image": f"../{volumes.name}/{files[2].name}"}],
            }
        )
    )
    by_json = resolve_sources(datalist) + resolve_sources(datalist, key="validation")
    # ... or against base_dir
    by_base = resolve_sources([p.name for p in files], base_dir=volumes)

    for items in (by_folder, by_glob, by_list, by_dicts, by_csv, by_json, by_base):
        assert [Path(p).resolve() for p in _paths(items)] == [Path(p) for p in expected]
        assert [item["subject"] for item in items] == subjects
        assert all(isinstance(item["image"], Path) for item in items)


def test_subject_and_other_columns_are_kept(volumes):
    files = sorted(volumes.glob("*.nii.gz"))
    table = volumes.parent / "subjects.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "subject", "age"])
        writer.writerows(
            [[str(p), "patient-A" if i < 2 else "", 40 + i] for i, p in enumerate(files)]
        )
    items = resolve_sources(table)
    assert [item["subject"] for item in items] == ["patient-A", "patient-A", "sub-03_T1w"]
    assert [item["age"] for item in items] == ["40", "41", "42"]

    datalist = volumes.parent / "subjects.json"
    datalist.write_text(json.dumps({"training": [{"image": str(files[0]), "subject": "p7"}]}))
    assert resolve_sources(datalist)[0]["subject"] == "p7"
    assert (
        resolve_sources([{"image": files[1], "pid": "x"}], subject_key="pid")[0]["subject"] == "x"
    )


def test_bad_sources_name_the_path_and_the_problem(volumes, tmp_path):
    with pytest.raises(MedgenIOError, match="does not exist|no such"):
        resolve_sources(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedgenIOError, match=r"empty.*no image files"):
        resolve_sources(tmp_path / "empty")
    with pytest.raises(MedgenIOError, match=r"matches no image"):
        resolve_sources(str(tmp_path / "empty" / "*.nii.gz"))

    table = tmp_path / "bad.csv"
    table.write_text("path,subject\na.nii.gz,1\n")
    with pytest.raises(MedgenIOError, match=r"bad\.csv: CSV has no 'image' column.*path, subject"):
        resolve_sources(table)

    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [], "test": []}))
    with pytest.raises(
        MedgenIOError, match=r"list\.json: JSON datalist has no 'validation'.*'test'"
    ):
        resolve_sources(datalist, key="validation")

    missing = [str(tmp_path / f"gone_{i:02d}.nii.gz") for i in range(12)]
    with pytest.raises(MedgenIOError) as info:
        resolve_sources([str(next(volumes.glob("*.nii.gz"))), *missing])
    message = str(info.value)
    assert "12 listed file(s) do not exist" in message
    assert "gone_09.nii.gz" in message and "gone_10" not in message and "2 more" in message

    table = tmp_path / "missing.csv"
    table.write_text("image\nnot_here.png\n")
    with pytest.raises(MedgenIOError, match=r"missing\.csv: 1 listed file.*not_here\.png"):
        resolve_sources(table)


# --------------------------------------------------------------------------------------------------
# subject split


def test_split_by_subject_keeps_subjects_whole_and_is_deterministic(tmp_path):
    image = np.zeros((1, 4, 4), np.uint8)
    rows = []
    for s in range(10):
        for k in range(3):
            rows.append([write(image, tmp_path / f"s{s}_slice{k}.png").name, f"subject-{s}"])
    table = tmp_path / "index.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "subject"], *rows])
    items = resolve_sources(table)

    train, val = split_by_subject(items, val_fraction=0.2, seed=3)
    train_subjects = {item["subject"] for item in train}
    val_subjects = {item["subject"] for item in val}
    assert not train_subjects & val_subjects
    assert len(val_subjects) == 2 and len(train) + len(val) == len(items) == 30
    assert len(val) == 6  # whole subjects: three files each

    again = split_by_subject(items, val_fraction=0.2, seed=3)
    assert again == (train, val)
    shuffled = split_by_subject(items[::-1], val_fraction=0.2, seed=3)
    assert {i["subject"] for i in shuffled[1]} == val_subjects  # order does not matter
    others = [{i["subject"] for i in split_by_subject(items, 0.2, seed=s)[1]} for s in range(6)]
    assert len({frozenset(o) for o in others}) > 1  # the seed matters

    assert len({i["subject"] for i in split_by_subject(items, 0.01)[1]}) == 1  # at least one
    assert split_by_subject(items, 0.0) == (items, [])
    with pytest.raises(ValueError, match="one subject"):
        split_by_subject([i for i in items if i["subject"] == "subject-0"], 0.2)
    # paths work too; the subject is the file stem
    paths = sorted(tmp_path.glob("*.png"))
    train_p, val_p = split_by_subject(paths, 0.5)
    assert len(train_p) == len(val_p) == 15


# --------------------------------------------------------------------------------------------------
# volumes


def test_volume_dataset_reads_float32_with_affine(volumes, mni):
    dataset = VolumeDataset(volumes)
    assert len(dataset) == 3
    for i, item in enumerate(dataset):
        image = item["image"]
        assert isinstance(image, MetaTensor)
        assert image.shape == (1, *SHAPE) and image.dtype == torch.float32
        np.testing.assert_allclose(image.affine.numpy(), _affine(i))
        np.testing.assert_allclose(image.meta["spacing"], np.abs(np.diag(_affine(i))[:3]))
        np.testing.assert_allclose(image[0].numpy(), mni * (1.0 + 0.1 * i), rtol=1e-6)
        assert item["path"] == str(volumes / f"sub-0{i + 1}_T1w.nii.gz")
        assert item["subject"] == f"sub-0{i + 1}_T1w"

    doubled = VolumeDataset(volumes, transform=lambda x: x * 2)
    torch.testing.assert_close(doubled[1]["image"], dataset[1]["image"] * 2)
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 1, *SHAPE) and batch["subject"][0] == "sub-01_T1w"


def test_mixed_sizes_are_refused_before_reading(volumes, tmp_path, mni):
    odd = tmp_path / "odd.nii.gz"
    write(mni[None, :20], odd)
    files = sorted(volumes.glob("*.nii.gz"))
    with pytest.raises(MedgenIOError) as info:
        VolumeDataset([*files, odd])
    message = str(info.value)
    assert str(files[0]) in message and str(odd) in message
    assert "check_shapes=False" in message and "resize/crop" in message

    from monai.transforms import ResizeWithPadOrCrop

    dataset = VolumeDataset(
        [*files, odd], check_shapes=False, transform=ResizeWithPadOrCrop((16, 16, 16))
    )
    assert {tuple(item["image"].shape) for item in dataset} == {(1, 16, 16, 16)}


def test_wrong_dimensionality_and_bad_values_name_the_file(tmp_path, mni):
    series = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([mni, mni], axis=-1), np.eye(4)), series)
    for check in (True, False):  # from the header at construction, or when read
        with pytest.raises(MedgenIOError) as info:
            VolumeDataset([series], check_shapes=check)[0]
        assert str(series) in str(info.value) and f"(2, {SHAPE[0]}, {SHAPE[1]}, {SHAPE[2]})" in str(
            info.value
        )
        assert "channels=2" in str(info.value)
    assert VolumeDataset([series], channels=2)[0]["image"].shape == (2, *SHAPE)

    flat = write(np.zeros((1, 8, 8), np.uint8), tmp_path / "flat.png")
    with pytest.raises(MedgenIOError, match=r"flat\.png: expected a 3D.*got a 2D image"):
        VolumeDataset([flat])
    with pytest.raises(MedgenIOError, match=r"sub\.nii\.gz: expected a 2D.*got a 3D volume"):
        VolumeDataset([write(mni[None], tmp_path / "sub.nii.gz")], spatial_dims=2)

    broken = mni.copy()
    broken[3, 4, 5] = np.nan
    nan_file = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(broken, np.eye(4)), nan_file)
    dataset = VolumeDataset([nan_file])  # the header is fine; the values are not
    with pytest.raises(MedgenIOError, match=r"nan\.nii\.gz: image contains 1 NaN/Inf"):
        dataset[0]
    with pytest.raises(MedgenIOError, match=r"nan\.nii\.gz: image contains 1 NaN/Inf"):
        VolumeDataset([nan_file], cache="memory")  # the cache reads everything up front

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti file")
    with pytest.raises(MedgenIOError, match=r"corrupt\.nii\.gz: cannot decode"):
        VolumeDataset([corrupt])


def test_memory_and_disk_caches_match_the_files(volumes, tmp_path):
    plain = VolumeDataset(volumes)
    memory = VolumeDataset(volumes, cache="memory")
    cache_dir = tmp_path / "cache"
    disk = VolumeDataset(volumes, cache="disk", cache_dir=cache_dir)
    for i in range(len(plain)):
        expected = plain[i]["image"]
        for dataset in (memory, disk, VolumeDataset(volumes, cache="disk", cache_dir=cache_dir)):
            image = dataset[i]["image"]
            assert isinstance(image, MetaTensor) and image.dtype == torch.float32
            torch.testing.assert_close(image.as_tensor(), expected.as_tensor(), rtol=0, atol=0)
            torch.testing.assert_close(image.affine, expected.affine)
    assert len(list(cache_dir.glob("*.pt"))) == 3
    memory[0]["image"].mul_(0)  # items are copies: the cache is not touched
    assert memory[0]["image"].abs().sum() > 0
    with pytest.raises(ValueError, match="cache_dir"):
        VolumeDataset(volumes, cache="disk")


def test_16_bit_png_becomes_float32_with_the_same_values(tmp_path):
    values = (np.arange(20 * 30, dtype=np.uint16).reshape(1, 20, 30) * 97) % 65535
    path = write(values.astype(np.uint16), tmp_path / "x16.png")
    item = VolumeDataset([path], spatial_dims=2)[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 20, 30)
    np.testing.assert_array_equal(item["image"].numpy(), values.astype(np.float32))
    assert item["image"].meta["source_dtype"] == "uint16"


# --------------------------------------------------------------------------------------------------
# slices and patches


def test_slice_dataset_skips_empty_slices(tmp_path, mni):
    padded = np.zeros((SHAPE[0] + 6, *SHAPE[1:]), np.float32)
    padded[3:-3] = mni + 10.0  # no slice of the MNI crop is all background
    path = write(padded[None], tmp_path / "padded.nii.gz", affine=_affine(1))
    dataset = SliceDataset([path], axis=0, min_foreground=0.01)
    assert dataset.index[:, 1].tolist() == list(range(3, SHAPE[0] + 3))
    item = dataset[0]
    assert item["slice"] == 3 and item["image"].shape == (1, *SHAPE[1:])
    assert item["subject"] == "padded" and item["path"] == str(path)
    np.testing.assert_array_equal(item["image"][0].numpy(), padded[3])
    # the slice affine maps slice voxel (i, j) to the world point of volume voxel (3, i, j)
    world = _affine(1) @ np.array([3, 5, 7, 1.0])
    np.testing.assert_allclose(item["image"].affine.numpy() @ np.array([5, 7, 0, 1.0]), world)

    everything = SliceDataset([path], axis=0, min_foreground=0.0)
    assert len(everything) == SHAPE[0] + 6
    assert len(SliceDataset([path], axis=0, threshold=1e9, min_foreground=0.0)) == SHAPE[0] + 6
    with (
        pytest.warns(UserWarning, match=r"padded\.nii\.gz: no slice"),
        pytest.raises(MedgenIOError, match="no slice"),
    ):
        SliceDataset([path], axis=0, threshold=1e9)


@pytest.mark.parametrize(
    ("axis", "plane"),
    [(0, SHAPE[1:]), (1, (SHAPE[0], SHAPE[2])), (2, SHAPE[:2]), (-1, SHAPE[:2]), (-3, SHAPE[1:])],
)
def test_slice_dataset_axes(volumes, axis, plane):
    dataset = SliceDataset(volumes, axis=axis, min_foreground=0.0)
    assert len(dataset) == 3 * SHAPE[axis]
    item = dataset[len(dataset) - 1]
    assert item["image"].shape == (1, *plane) and item["image"].dtype == torch.float32
    assert item["subject"] == "sub-03_T1w" and item["slice"] == SHAPE[axis] - 1


def test_slice_dataset_reuses_a_cache_and_splits_by_volume(volumes):
    cached = VolumeDataset(volumes, cache="memory")
    a = SliceDataset(cached, axis=0, min_foreground=0.2)
    b = SliceDataset(volumes, axis=0, min_foreground=0.2)
    assert len(a) == len(b) < 3 * SHAPE[0]
    torch.testing.assert_close(a[5]["image"].as_tensor(), b[5]["image"].as_tensor())

    train, val = SliceDataset.train_val(volumes, val_fraction=0.34, axis=0, min_foreground=0.2)
    train_subjects = {train[i]["subject"] for i in range(len(train))}
    val_subjects = {val[i]["subject"] for i in range(len(val))}
    assert len(val_subjects) == 1 and len(train_subjects) == 2
    assert not train_subjects & val_subjects


def test_patch_dataset_is_deterministic_per_seed_epoch_index(volumes):
    dataset = PatchDataset(volumes, patch_size=(8, 12, 10), patches_per_volume=4, seed=1)
    assert len(dataset) == 12
    items = [dataset[i] for i in range(len(dataset))]
    assert all(item["image"].shape == (1, 8, 12, 10) for item in items)
    assert [item["subject"] for item in items[:5]] == ["sub-01_T1w"] * 4 + ["sub-02_T1w"]

    volume = read(items[5]["path"])
    d, h, w = items[5]["origin"]
    np.testing.assert_allclose(
        items[5]["image"][0].numpy(), volume[0, d : d + 8, h : h + 12, w : w + 10].numpy()
    )
    world = volume.affine.numpy() @ np.array([d, h, w, 1.0])
    np.testing.assert_allclose(items[5]["image"].affine.numpy()[:, 3], world)

    same = PatchDataset(volumes, patch_size=(8, 12, 10), patches_per_volume=4, seed=1)
    origins = [item["origin"] for item in items]
    assert [same[i]["origin"] for i in range(12)] == origins
    assert [dataset[i]["origin"] for i in range(12)] == origins  # repeatable
    assert len(set(origins)) > 6
    dataset.set_epoch(1)
    epoch1 = [dataset[i]["origin"] for i in range(12)]
    assert epoch1 != origins
    dataset.set_epoch(0)
    assert [dataset[i]["origin"] for i in range(12)] == origins
    other_seed = PatchDataset(volumes, patch_size=(8, 12, 10), patches_per_volume=4, seed=2)
    assert [other_seed[i]["origin"] for i in range(12)] != origins


def test_patch_dataset_pads_small_volumes_with_their_minimum(tmp_path):
    small = np.arange(4 * 5 * 30, dtype=np.float32).reshape(1, 4, 5, 30) - 7.0
    path = write(small, tmp_path / "small.nii.gz")
    dataset = PatchDataset([path], patch_size=8, patches_per_volume=6)
    for item in dataset:
        patch, (d, h, w) = item["image"][0].numpy(), item["origin"]
        assert patch.shape == (8, 8, 8)
        assert -4 <= d <= 0 and -3 <= h <= 0 and 0 <= w <= 22
        inside = patch[-d : -d + 4, -h : -h + 5]
        np.testing.assert_array_equal(inside, small[0, :, :, w : w + 8])
        assert (patch == -7.0).sum() == 8 * 8 * 8 - 4 * 5 * 8 + (w == 0)
    assert len({item["origin"] for item in dataset}) > 1


def test_set_epoch_reaches_persistent_workers(volumes):
    dataset = PatchDataset(volumes, patch_size=8, patches_per_volume=2)
    loader = DataLoader(
        dataset, batch_size=6, num_workers=1, persistent_workers=True, collate_fn=lambda b: b
    )
    first = [item["origin"] for item in next(iter(loader))]
    dataset.set_epoch(3)
    second = [item["origin"] for item in next(iter(loader))]
    expected = [dataset.origin(i, SHAPE) for i in range(6)]
    assert second == expected != first


# --------------------------------------------------------------------------------------------------
# paired and unpaired


def test_paired_dataset_matches_by_stem(tiles):
    a_dir, b_dir, perm = tiles
    dataset = PairedDataset(a_dir, b_dir)
    assert len(dataset) == 6
    item = dataset[4]
    assert item["subject"] == "retina_1"
    assert item["path"] == (str(a_dir / "retina_1.png"), str(b_dir / "retina_1.png"))
    assert item["a"].shape == item["b"].shape == (3, 48, 40)
    assert item["a"].dtype == item["b"].dtype == torch.float32
    torch.testing.assert_close(item["b"].as_tensor(), item["a"].as_tensor()[perm])

    explicit = PairedDataset(
        pairs=[(a_dir / "ihc_0.png", b_dir / "ihc_0.png")], transform=lambda x: x / 255
    )
    assert float(explicit[0]["a"].max()) <= 1.0
    halves = PairedDataset(a_dir, b_dir, transform_a=lambda x: x * 0, transform_b=lambda x: x + 1)
    assert float(halves[0]["a"].abs().max()) == 0 and float(halves[0]["b"].min()) >= 1


def test_paired_dataset_errors_name_the_files(tiles, tmp_path):
    a_dir, b_dir, _ = tiles
    lonely_a, lonely_b = tmp_path / "a", tmp_path / "b"
    image = np.zeros((1, 6, 6), np.uint8)
    for k in range(12):
        write(image, lonely_a / f"only_a_{k:02d}.png")
        write(image, lonely_b / f"only_b_{k:02d}.png")
    write(image, lonely_a / "both.png")
    write(image, lonely_b / "both.png")
    with pytest.raises(MedgenIOError) as info:
        PairedDataset(lonely_a, lonely_b)
    message = str(info.value)
    assert str(lonely_a) in message and str(lonely_b) in message
    assert "only_a_00.png" in message and "only_a_09.png" in message and "only_a_10" not in message
    assert "only_b_00.png" in message and "12 in" in message and "2 more" in message
    assert "both" not in message

    big = write(np.zeros((3, 50, 40), np.uint8), tmp_path / "big.png")
    with pytest.raises(MedgenIOError) as info:
        PairedDataset(pairs=[(a_dir / "ihc_0.png", big)])
    assert str(a_dir / "ihc_0.png") in str(info.value) and str(big) in str(info.value)
    with pytest.raises(MedgenIOError, match=r"big\.png"):  # also when only found at read time
        PairedDataset(pairs=[(a_dir / "ihc_0.png", big)], check_shapes=False)[0]
    with pytest.raises(MedgenIOError, match="smaller than crop_size"):
        PairedDataset(a_dir, b_dir, crop_size=64)[0]


def test_paired_crop_and_flip_are_shared_and_deterministic(tiles):
    a_dir, _, _ = tiles
    dataset = PairedDataset(a_dir, a_dir, crop_size=(32, 24), flip=True, seed=5)
    flips = 0
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["a"].shape == item["b"].shape == (3, 32, 24)
        torch.testing.assert_close(item["a"], item["b"])
        full = read(item["path"][0]).float()
        found = []
        for flipped in (False, True):
            source = full.flip(-1) if flipped else full
            for y in range(48 - 32 + 1):
                for x in range(40 - 24 + 1):
                    if torch.equal(source[:, y : y + 32, x : x + 24], item["a"].as_tensor()):
                        found.append(flipped)
        assert found, "the crop is a window of the (possibly flipped) image"
        flips += found[0]
    assert 0 < flips < len(dataset)
    again = PairedDataset(a_dir, a_dir, crop_size=(32, 24), flip=True, seed=5)
    for i in range(len(dataset)):
        torch.testing.assert_close(again[i]["a"], dataset[i]["a"])
    before = [dataset[i]["a"].clone() for i in range(len(dataset))]
    dataset.set_epoch(1)
    assert any(not torch.equal(dataset[i]["a"], before[i]) for i in range(len(dataset)))


def test_bci_layout(tmp_path, tiles):
    a_dir, b_dir, _ = tiles
    for split in ("train", "test"):
        for k, tile in enumerate(sorted(a_dir.glob("*.png"))[: 3 if split == "train" else 2]):
            for domain, folder in (("HE", a_dir), ("IHC", b_dir)):
                target = tmp_path / "BCI" / domain / split / f"{k:05d}_{split}_1+.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((folder / tile.name).read_bytes())
    pairs = bci_pairs(tmp_path / "BCI", "train")
    assert [(a.parent.parent.name, b.parent.parent.name) for a, b in pairs] == [("HE", "IHC")] * 3
    assert all(a.name == b.name for a, b in pairs)
    test = PairedDataset.bci(tmp_path / "BCI", "test", crop_size=32)
    assert len(test) == 2 and test[1]["a"].shape == (3, 32, 32)
    assert test[1]["subject"] == "00001_test_1+"
    with pytest.raises(MedgenIOError, match=r"HE.val: folder does not exist"):
        bci_pairs(tmp_path / "BCI", "val")


def test_unpaired_dataset_lengths_and_determinism(tiles, volumes):
    a_dir, b_dir, _ = tiles
    few = sorted(b_dir.glob("ihc_*.png"))[:2]
    dataset = UnpairedDataset(a_dir, few, seed=3)
    assert len(dataset) == 6 and len(UnpairedDataset(few, a_dir)) == 6
    items = [dataset[i] for i in range(6)]
    assert [Path(item["path"][0]).name for item in items] == sorted(p.name for p in a_dir.glob("*"))
    assert {item["path"][1] for item in items} <= {str(p) for p in few}
    assert items[0]["subject"] == "ihc_0" and items[0]["subject_b"] in ("ihc_0", "ihc_1")
    assert items[0]["a"].dtype == torch.float32 and items[0]["b"].shape == (3, 48, 40)

    partners = [dataset.partner(i) for i in range(6)]
    assert [UnpairedDataset(a_dir, few, seed=3).partner(i) for i in range(6)] == partners
    epochs = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        epochs.append(tuple(dataset.partner(i) for i in range(6)))
    assert epochs[0] == tuple(partners) and len(set(epochs)) > 1

    both = UnpairedDataset(a_dir, b_dir, transform_a=lambda x: x * 0)
    assert float(both[0]["a"].abs().max()) == 0 and float(both[0]["b"].max()) > 0
    with pytest.raises(MedgenIOError, match="expected a 2D"):
        UnpairedDataset(a_dir, volumes)


def test_datasets_survive_pickling_for_spawned_workers(volumes, tiles, tmp_path):
    a_dir, b_dir, _ = tiles
    datasets = [
        VolumeDataset(volumes, cache="memory"),
        VolumeDataset(volumes, cache="disk", cache_dir=tmp_path / "cache"),
        SliceDataset(volumes, axis=0),
        PatchDataset(volumes, patch_size=8, patches_per_volume=2, seed=4),
        PairedDataset(a_dir, b_dir, crop_size=16, flip=True),
        UnpairedDataset(a_dir, b_dir),
    ]
    for dataset in datasets:
        dataset[1]  # fills per-process state such as the last volume
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(2)
        copy = pickle.loads(pickle.dumps(dataset))
        assert len(copy) == len(dataset)
        item, expected = copy[1], dataset[1]
        for key in ("image", "a", "b"):
            if key in item:
                torch.testing.assert_close(item[key].as_tensor(), expected[key].as_tensor())


# --------------------------------------------------------------------------------------------------
# inputs are never modified


def test_no_dataset_modifies_its_input_files(volumes, tiles, tmp_path):
    a_dir, b_dir, _ = tiles
    before = {**_digest(volumes), **_digest(a_dir), **_digest(b_dir)}
    datasets = [
        VolumeDataset(volumes),
        VolumeDataset(volumes, cache="memory"),
        VolumeDataset(volumes, cache="disk", cache_dir=tmp_path / "cache"),
        SliceDataset(volumes, axis=1),
        PatchDataset(volumes, patch_size=8, patches_per_volume=2),
        PairedDataset(a_dir, b_dir, crop_size=16, flip=True),
        UnpairedDataset(a_dir, b_dir),
    ]
    for dataset in datasets:
        for i in range(len(dataset)):
            item = dataset[i]
            for key in ("image", "a", "b"):
                if key in item:
                    item[key].mul_(0)  # even in-place edits of items stay in memory
    after = {**_digest(volumes), **_digest(a_dir), **_digest(b_dir)}
    assert after == before
