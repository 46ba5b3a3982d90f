"""Pre-flight data checks: the first training files against data.channels, spatial_dims, value_range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medgen.runs.composition import compose
from medgen.runs.validation import DataMismatchError, preflight_data
from medgen.utils.instantiate import instantiate, to_plain


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 16x16 RGB PNGs (8-bit)."""
    folder = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGB").save(folder / f"img_{i}.png")
    return folder


def _compose(tmp_path: Path, *overrides: str):
    return compose(
        "train",
        [
            f"paths.output_dir={tmp_path / 'run'}",
            "model.net.image_size=16",
            "data.batch_size=2",
            *overrides,
        ],
    )


def _rgb(folder: Path) -> list[str]:
    return ["data=image_folder", f"data.train.source={folder}", "data.val_fraction=0"]


def _datamodule(cfg):
    return instantiate(cfg.data, _recursive_=False, _convert_="all")


def test_rgb_folder_model_follows_data(rgb_folder: Path, tmp_path: Path) -> None:
    """RGB files with the default data.channels=1: the model's channels follow the files."""
    cfg = _compose(tmp_path, *_rgb(rgb_folder))
    assert cfg.data.channels == 1
    datamodule = _datamodule(cfg)
    preflight_data(cfg, datamodule)
    assert cfg.data.channels == 3 and datamodule.channels == 3
    model = instantiate(to_plain(cfg.model), _recursive_=False, _convert_="all")
    batch = next(iter(datamodule.train_dataloader()))["image"]
    assert batch.shape == (2, 3, 16, 16)
    with torch.no_grad():
        assert model.reconstruct(batch).shape == (2, 3, 16, 16)


def test_explicit_model_channels_mismatch_names_data_key_and_file(
    rgb_folder: Path, tmp_path: Path
) -> None:
    cfg = _compose(tmp_path, *_rgb(rgb_folder), "model.net.in_channels=1")
    with pytest.raises(DataMismatchError) as info:
        preflight_data(cfg, _datamodule(cfg))
    message = str(info.value)
    assert "data.channels=3" in message and "model.net.in_channels=1" in message
    assert str(rgb_folder) in message and ".png" in message


def test_spatial_dims_mismatch(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "data=phantom3d", "data.train.size=8", "data.spatial_dims=2")
    with pytest.raises(DataMismatchError, match=r"3D images .* data.spatial_dims=2"):
        preflight_data(cfg, _datamodule(cfg))


def test_value_range_far_outside_names_file(rgb_folder: Path, tmp_path: Path) -> None:
    """Counts 0-255 kept as they are while the model expects [-1, 1]: an error, not a NaN run."""
    cfg = _compose(
        tmp_path,
        "data=image_folder",
        f"data.train.source={rgb_folder}",
        "data.train.transform.out_range=[0.0,255.0]",
    )
    with pytest.raises(DataMismatchError, match=r"img_\d\.png.*far outside data.value_range"):
        preflight_data(cfg, _datamodule(cfg))


def test_matching_data_passes_unchanged(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "data.train.size=16", "data.train.length=4")
    datamodule = _datamodule(cfg)
    preflight_data(cfg, datamodule)
    assert cfg.data.channels == 1 and datamodule.channels == 1


def test_paired_rgb_folders_pix2pix_follows_data(rgb_folder: Path, tmp_path: Path) -> None:
    """The issue's case: paired RGB folders used to need data.channels=3 and failed at step 1."""
    cfg = compose(
        "train",
        [
            "experiment=pix2pix",
            "data=paired_folder",
            f"data.train.a_dir={rgb_folder}",
            f"data.train.b_dir={rgb_folder}",
            "data.batch_size=2",
            "model.generator.num_downs=4",
            f"paths.output_dir={tmp_path / 'run'}",
        ],
    )
    datamodule = _datamodule(cfg)
    preflight_data(cfg, datamodule)
    assert cfg.data.channels == 3
    model = instantiate(to_plain(cfg.model), _recursive_=False, _convert_="all").eval()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["a"].shape == (2, 3, 16, 16)
    with torch.no_grad():
        assert model.generator(batch["a"]).shape == (2, 3, 16, 16)
