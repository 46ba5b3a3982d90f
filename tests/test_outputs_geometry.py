"""Outputs keep the training data's geometry (orientation, spacing, origin) and, on request, units."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import medgen
from medgen.data.outputs import data_info_from_batch, to_data_units, write_images
from medgen.data.presets import CTWindow, HistologyRGB, Microscopy16, MRPercentile
from medgen.models import VAE
from medgen.pretrained import CheckpointError

# LAS with an origin: an identity/RAS writer would swap left and right and move the volume.
LAS = np.diag([-1.5, 1.5, 2.0, 1.0])
LAS[:3, 3] = [10.0, -20.0, 30.0]


@pytest.fixture(scope="module")
def las_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("las")
    rng = np.random.default_rng(0)
    for i in range(6):
        volume = (rng.random((16, 16, 16)) * 1000.0).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, LAS), str(folder / f"subject{i}.nii.gz"))
    return folder


FAMILIES = {
    "vae_3d": ["model.net.channels=[4,8]", "model.net.norm_num_groups=4"],
    "autoencoder_kl_3d": [
        "model.net.channels=[4,8]",
        "model.net.norm_num_groups=4",
        "model.discriminator.ndf=4",
    ],
    "ddpm_3d": [
        "model.net.channels=[8,8]",
        "model.net.attention_levels=[false,false]",
        "model.net.num_head_channels=8",
        "model.net.norm_num_groups=4",
        "model.val_num_samples=2",
        "model.val_sampler.steps=2",
        "model.sampler.steps=2",
    ],
}


@pytest.mark.parametrize("experiment", sorted(FAMILIES))
def test_every_3d_output_of_a_run_has_the_training_datas_affine(experiment, las_folder, tmp_path):
    overrides = [
        f"experiment={experiment}",
        "data=nifti_folder",
        f"data.train.source={las_folder}",
        "data.val_fraction=0.34",
        "data.batch_size=2",
        f"paths.output_dir={tmp_path / 'run'}",
        "trainer.max_epochs=1",
        "~callbacks.progress_bar",
        "num_samples=2",
        "output_units=data",
        *FAMILIES[experiment],
    ]
    result = medgen.train(medgen.compose("train", overrides=overrides))
    written = sorted((tmp_path / "run" / "samples").glob("*.nii.gz"))
    assert any(p.name.startswith("sample_") for p in written)
    assert any(p.name.startswith("epoch") for p in written)  # per-epoch validation volumes
    for path in written:
        image = nib.load(str(path))
        np.testing.assert_allclose(image.affine, LAS, atol=1e-5, err_msg=path.name)
        assert "".join(nib.aff2axcodes(image.affine)) == "LAS"
    # data units: MR scanner units of the training scans (0..1000 here), not [-1, 1]
    sample = nib.load(str(tmp_path / "run" / "samples" / "sample_0000.nii.gz")).get_fdata()
    assert sample.max() > 100.0 and sample.min() >= -1.0
    # the record travels with the export and the checkpoint
    config = json.loads((Path(result["model_dir"]) / "config.json").read_text())
    np.testing.assert_allclose(config["data"]["affine"], LAS)
    assert config["data"]["preset"]["_target_"] == "medgen.data.presets.MRPercentile"
    for source in (result["model_dir"], result["checkpoint"]):
        model = medgen.load(source)
        np.testing.assert_allclose(model.data_info["affine"], LAS)
        images = model.sample(1, seed=0, **({"steps": 2} if experiment == "ddpm_3d" else {}))
        (path,) = write_images(model, images, tmp_path / "again", units="model")
        again = nib.load(str(path))
        np.testing.assert_allclose(again.affine, LAS, atol=1e-5)
        assert again.get_fdata().max() <= 1.0


def test_data_units_invert_the_intensity_presets(tmp_path):
    model = VAE(
        spatial_dims=2, value_range=(-1.0, 1.0), net={"channels": [4], "norm_num_groups": 4}
    )
    images = torch.linspace(-1, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)
    with pytest.raises(ValueError, match="no record of its training data's preset"):
        write_images(model, images, tmp_path / "none", units="data")

    model.data_info = {"preset": CTWindow(-160, 240).config()}
    hu = to_data_units(model, images)
    torch.testing.assert_close(hu, (images + 1) / 2 * 400 - 160)
    (path,) = write_images(model, images[:1], tmp_path / "ct", units="data")[:1]
    assert path.suffix == ".tif"  # HU do not fit an unsigned PNG: float32 TIFF
    np.testing.assert_allclose(np.asarray(Image.open(path)), hu[0, 0].numpy(), atol=1e-4)

    counts = torch.randint(0, 4096, (1, 1, 8, 8))
    model.data_info = {"preset": Microscopy16(bit_depth=12).config()}
    normalised = Microscopy16(bit_depth=12)(counts[0].float())[None]
    (path,) = write_images(model, normalised, tmp_path / "counts", units="data")
    assert np.array_equal(np.asarray(Image.open(path)).astype(np.int64), counts[0, 0].numpy())

    rgb = torch.randint(0, 256, (1, 3, 8, 8))
    model.data_info = {"preset": HistologyRGB().config()}
    (path,) = write_images(
        model, HistologyRGB()(rgb[0].float())[None], tmp_path / "he", units="data"
    )
    assert np.array_equal(np.asarray(Image.open(path)).transpose(2, 0, 1), rgb[0].numpy())

    model.data_info = {"preset": MRPercentile().config()}  # per-scan units, none recorded
    with pytest.raises(ValueError, match="percentiles"):
        to_data_units(model, images)
    with pytest.raises(ValueError, match="units must be"):
        write_images(model, images, tmp_path / "x", units="hu")


def test_the_first_batch_records_affine_preset_and_mr_statistics():
    preset = MRPercentile()
    volumes = [preset(torch.rand(1, 4, 4, 4) * k) for k in (100.0, 200.0, 300.0)]
    for v in volumes:
        v.affine = torch.as_tensor(LAS)
    from monai.data import list_data_collate

    batch = list_data_collate([{"image": v} for v in volumes])
    info = data_info_from_batch(batch, ("image",), 3, preset)
    np.testing.assert_allclose(info["affine"], LAS)
    assert info["preset"] == preset.config()
    highs = sorted(float(v.meta["medgen_preset"]["high"]) for v in volumes)
    assert info["preset_stats"]["high"] == pytest.approx(highs[1])  # the median scan
    assert "affine" not in data_info_from_batch(batch, ("image",), 2)


def test_a_malformed_or_hostile_data_record_is_refused_naming_the_file(tmp_path):
    model = VAE(
        spatial_dims=3, value_range=(-1.0, 1.0), net={"channels": [4], "norm_num_groups": 4}
    )
    folder = model.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    for bad in (
        {"affine": [[1, 0], [0, 1]]},
        {"affine": [[float("nan")] * 4] * 4},
        {"preset": {"_target_": "torch.utils.collect_env.run", "command": "true"}},
    ):
        (folder / "config.json").write_text(json.dumps({**config, "data": bad}))
        with pytest.raises(CheckpointError, match="config.json"):
            medgen.load(folder)
