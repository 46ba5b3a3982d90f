"""medgen-encode: latent files, the scale factor, LatentDataset, and clear errors for bad inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import medgen
from medgen.api import encode
from medgen.data import LatentDataset, MedgenIOError, write
from medgen.models import VAE, AutoencoderKL
from medgen.pretrained import CheckpointError

TINY = {"channels": [4, 8], "latent_channels": 2, "norm_num_groups": 4}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AutoencoderKL(net=TINY, spatial_dims=3, discriminator=None, perceptual={"weight": 0})
    return model.save_pretrained(tmp_path_factory.mktemp("ae") / "model")


@pytest.fixture(scope="module")
def nifti_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("volumes")
    generator = torch.Generator().manual_seed(0)
    affine = torch.tensor(
        [[2.0, 0, 0, -10], [0, 2.0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]], dtype=torch.float64
    )
    for i in range(5):
        volume = torch.rand(1, 8, 8, 8, generator=generator) * (i + 1)
        write(volume, folder / f"sub-{i:02d}.nii.gz", affine=affine)
    return folder


def _cfg(overrides: list[str]):
    return medgen.compose("encode", overrides)


def test_encode_phantoms_writes_latents_and_scale_factor(autoencoder, tmp_path):
    out = tmp_path / "latents"
    cfg = _cfg(
        [
            f"checkpoint={autoencoder}",
            "data=phantom3d",
            "data.train.size=8",
            "data.train.length=4",
            "data.val.length=2",
            f"output_dir={out}",
        ]
    )
    index = encode(cfg)
    saved = json.loads((out / "latents.json").read_text())
    assert saved["format"] == "medgen-latents/1"
    assert saved["autoencoder"] == str(autoencoder.resolve())
    assert saved["shape"] == [2, 4, 4, 4] and saved["downsample_factor"] == 2
    assert [e["source"] for e in saved["splits"]["train"]] == [f"phantom:{i}" for i in range(4)]
    assert len(saved["splits"]["val"]) == 2
    train = np.stack([np.load(out / e["file"]) for e in saved["splits"]["train"]])
    assert saved["scale_factor"] == pytest.approx(1.0 / train.astype(np.float64).std(ddof=1))
    assert index["scale_factor"] == saved["scale_factor"]
    # the files are the model's latents
    model = medgen.load(autoencoder)
    first = medgen.data.PhantomDataset(spatial_dims=3, size=8, length=1)[0]["image"][None]
    np.testing.assert_array_equal(train[0], model.encode(first)[0].numpy())
    # read back scaled: unit variance over the training split
    dataset = LatentDataset(out, split="train")
    assert len(dataset) == 4 and dataset.autoencoder == str(autoencoder.resolve())
    scaled = dataset.latents()
    assert float(scaled.double().std()) == pytest.approx(1.0, rel=1e-6)
    raw = LatentDataset(out, split="val", scale=False)[0]["image"]
    assert raw.shape == (2, 4, 4, 4)


def test_encode_nifti_keeps_sources_and_latent_affine(autoencoder, nifti_folder, tmp_path):
    out = tmp_path / "latents"
    cfg = _cfg(
        [
            f"checkpoint={autoencoder}",
            "data=nifti_folder",
            f"data.train.source={nifti_folder}",
            "data.val_fraction=0.4",
            "data.train.transform=null",
            f"output_dir={out}",
            "tile=[8,8,6]",
        ]
    )
    index = encode(cfg)
    entries = index["splits"]["train"] + index["splits"]["val"]
    assert sorted(Path(e["source"]).name for e in entries) == [
        f"sub-{i:02d}.nii.gz" for i in range(5)
    ]
    assert all(
        e["file"].endswith(Path(e["source"]).name.removesuffix(".nii.gz") + ".npy") for e in entries
    )
    affine = np.array(entries[0]["affine"])
    # latent voxel i covers image voxels 2i, 2i+1: centre at 2i + 0.5
    np.testing.assert_allclose(affine[:3, :3], np.diag([4.0, 4.0, 6.0]))
    np.testing.assert_allclose(affine[:3, 3], [-10 + 1.0, -20 + 1.0, 5 + 1.5])


def test_corrupt_input_is_reported_by_name(autoencoder, nifti_folder, tmp_path):
    folder = tmp_path / "volumes"
    folder.mkdir()
    for p in nifti_folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "sub-03.nii.gz").write_bytes(b"not a nifti file at all")
    cfg = _cfg(
        [
            f"checkpoint={autoencoder}",
            "data=nifti_folder",
            f"data.train.source={folder}",
            f"output_dir={tmp_path / 'latents'}",
        ]
    )
    with pytest.raises(MedgenIOError, match="sub-03.nii.gz"):
        encode(cfg)


def test_wrong_input_size_and_wrong_model_are_clear_errors(autoencoder, tmp_path):
    cfg = _cfg(
        [
            f"checkpoint={autoencoder}",
            "data=phantom3d",
            "data.train.size=9",
            "data.train.length=1",
            f"output_dir={tmp_path / 'a'}",
        ]
    )
    with pytest.raises(MedgenIOError, match=r"phantom:0.*not divisible by the downsampling"):
        encode(cfg)
    vae = VAE(net={"channels": [4, 8], "norm_num_groups": 4}, spatial_dims=3)
    path = vae.save_pretrained(tmp_path / "vae")
    cfg = _cfg([f"checkpoint={path}", "data=phantom3d", f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(CheckpointError, match="not an autoencoder"):
        encode(cfg)


def test_latent_dataset_errors_name_the_file(autoencoder, tmp_path):
    with pytest.raises(MedgenIOError, match="latents.json"):
        LatentDataset(tmp_path)
    out = tmp_path / "latents"
    cfg = _cfg(
        [
            f"checkpoint={autoencoder}",
            "data=phantom3d",
            "data.train.size=8",
            "data.train.length=2",
            "splits=[train]",
            f"output_dir={out}",
        ]
    )
    encode(cfg)
    with pytest.raises(MedgenIOError, match="no split 'val'"):
        LatentDataset(out, split="val")
    dataset = LatentDataset(out, cache=False)
    bad = out / dataset.entries[1]["file"]
    bad.write_bytes(b"garbage")
    with pytest.raises(MedgenIOError, match=bad.name):
        dataset[1]


def test_cli_entry_point(autoencoder, tmp_path, monkeypatch):
    from medgen.cli import encode_main

    out = tmp_path / "latents"
    args = [
        "medgen-encode",
        f"checkpoint={autoencoder}",
        "data=phantom3d",
        "data.train.size=8",
        "data.train.length=2",
        "splits=[train]",
        f"output_dir={out}",
    ]
    monkeypatch.setattr(sys, "argv", args)
    encode_main()
    assert (out / "latents.json").is_file() and len(list((out / "train").glob("*.npy"))) == 2
