"""The Diffusion LightningModule: sampling, guidance, conditioning, training, latent mode, export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch.utils.data import DataLoader

import medgen
from medgen.models import VAE, Diffusion
from medgen.pretrained import CheckpointError
from tests.helpers import TINY_DIFFUSION_NET, cpu_trainer, cycled_loader, phantom_images

TINY_NET = TINY_DIFFUSION_NET


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _phantoms(spatial_dims: int, size: int) -> tuple[torch.Tensor, ...]:
    return phantom_images(spatial_dims, size, 16)


def _item(i: int, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """An image with a label, a scalar and a mask (the conditions under test)."""
    return {
        "image": image,
        "label": torch.tensor(i % 2),
        "age": torch.tensor(0.3 + 0.1 * (i % 3)),
        "mask": (image > 0.2).float(),
    }


def _loader(spatial_dims: int = 2, size: int = 16, length: int = 8, batch: int = 4):
    return cycled_loader(_phantoms(spatial_dims, size), length, batch, _item)


def _model(spatial_dims: int = 2, size: int = 8, **kwargs) -> Diffusion:
    torch.manual_seed(0)
    kwargs.setdefault("schedule", {"kind": "cosine", "num_train_timesteps": 50})
    model = Diffusion(
        net=TINY_NET, spatial_dims=spatial_dims, sample_size=[size] * spatial_dims, **kwargs
    )
    # Zero-initialised layers (the output, each residual branch's last conv) make the untrained
    # net ignore its inputs; perturb them so that samples and conditions matter.
    with torch.no_grad():
        for p in model.net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_sample_shapes_and_seeds(spatial_dims, sampler):
    model = _model(spatial_dims, value_range=(-1000.0, 1000.0))
    a = model.sample(3, steps=4, sampler=sampler, seed=7, batch_size=2)
    b = model.sample(3, steps=4, sampler=sampler, seed=7, batch_size=2)
    assert a.shape == (3, 1, *(8,) * spatial_dims)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, model.sample(3, steps=4, sampler=sampler, seed=8, batch_size=2))
    assert a.min() >= -1000.0 and a.max() <= 1000.0  # clipped to the data range
    if sampler != "ddpm":  # deterministic samplers: the batch size does not matter (round-off)
        other = model.sample(3, steps=4, sampler=sampler, seed=7, batch_size=3)
        torch.testing.assert_close(other, a, rtol=1e-4, atol=1e-2)
    assert model.training  # sampling restores the mode


def test_flow_model_samples_with_euler_and_heun_and_rejects_vp_samplers():
    model = _model(prediction="flow", flow={"shift": 2.0})
    assert model.sample(2, steps=3, sampler="heun", seed=0).shape == (2, 1, 8, 8)
    torch.testing.assert_close(model.sample(2, steps=3, seed=0), model.sample(2, steps=3, seed=0))
    with pytest.raises(ValueError, match="does not fit"):
        model.sample(2, sampler="ddim")
    with pytest.raises(ValueError, match="does not fit"):
        _model().sample(2, sampler="euler")


def test_guidance_scale_one_is_the_conditional_model():
    model = _model(class_key="label", num_classes=3, scalar_keys=["age"], cond_drop_prob=0.2).eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 30])
    cond = {"class_labels": torch.tensor([0, 2]), "scalars": torch.tensor([[0.5], [math.nan]])}
    with torch.no_grad():
        conditional = model.net_forward(x, t, cond)
        unconditional = model.net_forward(x, t, model._null(cond))
        torch.testing.assert_close(
            model.guided_forward(x, t, cond, 1.0), conditional, rtol=0, atol=0
        )
        expected = unconditional + 3.0 * (conditional - unconditional)
        torch.testing.assert_close(
            model.guided_forward(x, t, cond, 3.0), expected, rtol=1e-5, atol=1e-5
        )
        assert not torch.allclose(conditional, unconditional)
    c = {"class_labels": [1, 2], "scalars": [0.4]}
    a = model.sample(2, steps=3, seed=0, condition=c, guidance=1.0)
    torch.testing.assert_close(a, model.sample(2, steps=3, seed=0, condition=c), rtol=0, atol=0)
    assert not torch.equal(a, model.sample(2, steps=3, seed=0, condition=c, guidance=4.0))
    model.sample(2, steps=2, seed=0)  # no condition: the unconditional model (null tokens)


def test_condition_errors_are_clear():
    model = _model(class_key="label", num_classes=2)  # no condition dropout
    with pytest.raises(ValueError, match="without condition dropout"):
        model.sample(2, steps=2)
    with pytest.raises(ValueError, match="class labels must be in"):
        model.sample(2, steps=2, condition={"class_labels": 5})
    with pytest.raises(ValueError, match="guidance needs"):
        _model().sample(2, steps=2, guidance=2.0)
    with pytest.raises(ValueError, match="conditioned on an image"):
        _model(condition_key="mask", condition_channels=1).sample(2, steps=2)
    with pytest.raises(ValueError, match="num_classes"):
        Diffusion(net=TINY_NET, class_key="label")
    with pytest.raises(ValueError, match="conflicts"):
        Diffusion(net={**TINY_NET, "in_channels": 3})


def test_conditional_training_steps_run_with_class_scalar_and_image_conditions():
    model = _model(
        size=16,
        class_key="label",
        num_classes=2,
        scalar_keys=["age"],
        condition_key="mask",
        condition_channels=1,
        cond_drop_prob=0.5,
        prediction="v",
        min_snr_gamma=5.0,
    )
    before = [p.detach().clone() for p in model.net.parameters()]
    cpu_trainer(max_epochs=1, limit_val_batches=0).fit(model, _loader())
    assert any(not torch.equal(p, q) for p, q in zip(before, model.net.parameters(), strict=True))
    assert not model.unconditional
    mask = _phantoms(2, 16)[0][None] > 0.2
    out = model.sample(2, steps=2, seed=0, condition={"image": mask.float(), "class_labels": 1})
    assert out.shape == (2, 1, 16, 16)


def test_inpainting_keeps_the_known_region():
    model = _model(size=16)
    known = _phantoms(2, 16)[1][None]
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1.0  # generate the centre
    for sampler, resample in (("ddim", 2), ("ddpm", 1), ("dpmpp_2m", 1)):
        out = model.sample(
            2, steps=4, sampler=sampler, seed=0, known=known, mask=mask, resample=resample
        )
        keep = mask.expand(2, 1, 16, 16) == 0
        torch.testing.assert_close(out[keep], known.expand(2, 1, 16, 16)[keep], rtol=0, atol=0)
    with pytest.raises(ValueError, match="both"):
        model.sample(1, known=known)


def test_training_loss_falls_on_phantoms():
    torch.manual_seed(0)
    model = Diffusion(
        net={**TINY_NET, "channels": [16, 32]},
        schedule={"kind": "linear", "num_train_timesteps": 1000},
        optimizer={"_target_": "torch.optim.AdamW", "lr": 2e-3},
    )
    real = torch.stack(_phantoms(2, 16))
    z = model.encode(real)

    def val_loss() -> float:
        with torch.no_grad():
            return float(model.loss(z, {}, generator=torch.Generator().manual_seed(0)))

    initial = val_loss()  # zero-initialised output: the loss is E[eps^2] = 1
    cpu_trainer(max_steps=60, limit_val_batches=0).fit(model, _loader(length=240, batch=8))
    final = val_loss()
    assert initial == pytest.approx(1.0, abs=0.15)
    assert final < 0.5 * initial, (initial, final)


def test_checkpoint_and_export_reload_sample_identically(tmp_path):
    model = _model(size=16, spacing=(0.5, 0.5))
    trainer = cpu_trainer(max_epochs=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, _loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    expected = model.sample(2, steps=3, seed=3)
    from_ckpt = medgen.load(tmp_path / "last.ckpt")
    torch.testing.assert_close(from_ckpt.sample(2, steps=3, seed=3), expected, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "export")
    exported = medgen.load(tmp_path / "export")
    assert isinstance(exported, Diffusion) and exported.sample_size == (16, 16)
    torch.testing.assert_close(exported.sample(2, steps=3, seed=3), expected, rtol=0, atol=0)


def test_spacing_comes_from_a_metatensor_batch():
    model = _model(3, size=8)
    x = MetaTensor(torch.rand(2, 1, 8, 8, 8), affine=torch.diag(torch.tensor([0.8, 0.9, 2.0, 1.0])))
    model._record_batch(x, model.encode(x.as_tensor()))
    assert model.spacing == pytest.approx((0.8, 0.9, 2.0))
    assert model.hparams["spacing"] == pytest.approx([0.8, 0.9, 2.0])
    assert model.orientation == "RAS"


def test_samples_are_written_with_the_training_datas_spacing_and_orientation(tmp_path):
    import nibabel as nib

    from medgen.api import write_images

    model = _model(3, size=8)
    affine = torch.diag(torch.tensor([-0.8, -0.9, 2.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([10.0, 20.0, -5.0], dtype=torch.float64)
    x = MetaTensor(torch.rand(2, 1, 8, 8, 8), affine=affine)
    model._record_batch(x, model.encode(x.as_tensor()))
    assert model.orientation == "LPS" and model.hparams["orientation"] == "LPS"
    (path,) = write_images(model, model.sample(1, steps=2, seed=0), tmp_path)
    written = nib.load(str(path)).affine
    assert "".join(nib.aff2axcodes(written)) == "LPS"
    np.testing.assert_allclose(np.diag(written)[:3], [-0.8, -0.9, 2.0], rtol=1e-6)
    # A permuted, flipped orientation round-trips through the axis codes.
    model = _model(3, size=8, orientation="sar", spacing=(1.0, 2.0, 3.0))
    assert model.orientation == "SAR"
    (path,) = write_images(model, model.sample(1, steps=2, seed=0), tmp_path / "b")
    image = nib.load(str(path))
    assert "".join(nib.aff2axcodes(image.affine)) == "SAR"
    np.testing.assert_allclose(image.header.get_zooms(), (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="axcodes"):
        _model(3, size=8, orientation="RAR")


# ------------------------------------------------------------------------------------------------
# Latent diffusion over a frozen autoencoder
# ------------------------------------------------------------------------------------------------
def _autoencoder(tmp_path, spatial_dims: int = 2):
    torch.manual_seed(1)
    vae = VAE(
        net={"channels": [8, 8], "latent_channels": 3, "latent_dim": None, "norm_num_groups": 4},
        spatial_dims=spatial_dims,
    )
    return vae, vae.save_pretrained(tmp_path / "vae")


def test_latent_pipeline_end_to_end(tmp_path):
    vae, folder = _autoencoder(tmp_path)
    model = Diffusion(net=TINY_NET, autoencoder=str(folder), latent_scale="auto")
    assert model.latent_channels == 3 and model.net_channels == 3
    assert not math.isfinite(float(model.latent_scale))
    trainer = cpu_trainer(max_epochs=1, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, _loader(size=16), _loader(size=16, length=4))
    # auto scale: 1 / std of the first batch's latents, kept in a buffer
    first = torch.stack(_phantoms(2, 16)[:4])
    expected = 1.0 / float(vae.encode(first).std())
    assert float(model.latent_scale) == pytest.approx(expected, rel=1e-5)
    assert model.sample_size == (8, 8)  # latent size
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    assert "val/mmd" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    samples = model.sample(2, steps=3, seed=1)
    assert samples.shape == (2, 1, 16, 16)
    assert model.sample(2, steps=3, seed=1, return_latents=True).shape == (2, 3, 8, 8)
    # Both the checkpoint and the export carry the autoencoder: delete its folder and reload.
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")
    model.save_pretrained(tmp_path / "ldm")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    for path in (tmp_path / "ldm.ckpt", tmp_path / "ldm"):
        reloaded = medgen.load(path)
        assert float(reloaded.latent_scale) == pytest.approx(expected, rel=1e-5)
        torch.testing.assert_close(reloaded.sample(2, steps=3, seed=1), samples, rtol=0, atol=0)
    # inpainting in latent space: the known pixels are pasted back exactly
    known, mask = first[:1], torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1.0
    out = model.sample(1, steps=2, seed=0, known=known, mask=mask)
    torch.testing.assert_close(out[..., 8:], known[..., 8:], rtol=0, atol=0)


def test_latent_model_without_autoencoder_explains_what_to_do(tmp_path):
    model = Diffusion(net=TINY_NET, latent_channels=4, latent_scale="auto")  # builds (configs)
    with pytest.raises(ValueError, match="model.autoencoder=PATH"):
        cpu_trainer(max_epochs=1).fit(model, _loader())
    with pytest.raises(CheckpointError, match="model.autoencoder.*no checkpoint"):
        Diffusion(net=TINY_NET, autoencoder=str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------
# Experiments and the command-line runs
# ------------------------------------------------------------------------------------------------
def test_ddpm_3d_experiment_trains_exports_and_samples_from_the_cli(tmp_path):
    from tests.conftest import tiny_overrides

    out = tmp_path / "run"
    cfg = medgen.compose(
        "train",
        [
            *tiny_overrides(out, "ddpm_3d"),
            "data.train.size=16",
            "model.net.channels=[8,16]",
            "model.net.attention_levels=[false,true]",
            "model.net.num_head_channels=8",
            "model.sampler.steps=3",
            "model.val_sampler.steps=2",
            "+model.spacing=[1.5,1.5,2.0]",
        ],
    )
    assert cfg.model.net.gradient_checkpointing and cfg.model.schedule.kind == "cosine"
    result = medgen.train(cfg)
    assert {"val/loss", "val/mmd"} <= set(result["metrics"])
    assert len(result["samples"]) == 2 and result["samples"][0].endswith(".nii.gz")
    import nibabel as nib

    assert nib.load(result["samples"][0]).header.get_zooms() == pytest.approx((1.5, 1.5, 2.0))
    sample_cfg = medgen.compose(
        "sample",
        [
            f"checkpoint={out / 'checkpoints' / 'last.ckpt'}",
            f"output_dir={tmp_path / 'cli'}",
            "num_samples=2",
            "sampler=ddim",
            "steps=2",
        ],
    )
    paths = medgen.api.sample(sample_cfg)
    assert [p.name for p in paths] == ["sample_0000.nii.gz", "sample_0001.nii.gz"]


def test_rflow_3d_experiment_composes_with_a_flow_objective():
    cfg = medgen.compose("train", ["experiment=rflow_3d"])
    model = medgen.utils.instantiate.instantiate(
        medgen.utils.instantiate.to_plain(cfg.model), _recursive_=False, _convert_="all"
    )
    assert model.is_flow and model.objective.time_sampling == "logit_normal"
    assert model.sampler_config["name"] == "euler"


def _latent_overrides(out, experiment: str, autoencoder) -> list[str]:
    from tests.conftest import tiny_overrides

    return [
        *tiny_overrides(out, experiment),
        "data.train.size=8",
        f"model.autoencoder={autoencoder}",
        "model.net.channels=[8,16]",
        "model.net.attention_levels=[false,true]",
        "model.net.num_head_channels=8",
        "model.sampler.steps=2",
        "model.val_sampler.steps=2",
        "trainer.check_val_every_n_epoch=1",
    ]


@pytest.mark.parametrize("experiment", ["ldm_3d", "medical_diffusion"])
def test_latent_experiments_train_over_their_autoencoders(experiment, tmp_path):
    from medgen.models import VQGAN, AutoencoderKL

    torch.manual_seed(0)
    tiny = {"channels": [4, 8], "norm_num_groups": 4}
    if experiment == "ldm_3d":
        ae = AutoencoderKL(
            net={**tiny, "latent_channels": 2},
            spatial_dims=3,
            discriminator=None,
            perceptual={"weight": 0},
        )
    else:
        ae = VQGAN(
            net={**tiny, "embedding_dim": 3, "num_embeddings": 16},
            discriminator=None,
            slice_discriminator=None,
            perceptual={"weight": 0},
        )
    folder = ae.save_pretrained(tmp_path / "ae")
    cfg = medgen.compose("train", _latent_overrides(tmp_path / "run", experiment, folder))
    result = medgen.train(cfg)
    assert {"val/loss", "val/mmd"} <= set(result["metrics"])
    model = medgen.load(result["model_dir"])
    assert model.latent_channels == ae.latent_channels and math.isfinite(float(model.latent_scale))
    assert model.sample(1, steps=2, seed=0).shape == (1, 1, 8, 8, 8)
    if experiment == "medical_diffusion":
        assert model.num_train_timesteps == 300 and model.objective.loss == "l1"
        assert model.decode_kwargs == {"quantize": True}


def test_latent_experiment_without_autoencoder_stops_with_instructions(tmp_path):
    from tests.conftest import tiny_overrides

    cfg = medgen.compose("train", tiny_overrides(tmp_path, "medical_diffusion"))
    with pytest.raises(ValueError, match="experiment=vqgan_3d"):
        medgen.train(cfg)


def test_pre_encoded_latents_from_medgen_encode(tmp_path):
    from medgen.api import encode
    from medgen.data import LatentDataset
    from medgen.models import AutoencoderKL

    torch.manual_seed(0)
    ae = AutoencoderKL(
        net={"channels": [4, 8], "latent_channels": 2, "norm_num_groups": 4},
        spatial_dims=3,
        discriminator=None,
        perceptual={"weight": 0},
    )
    folder = ae.save_pretrained(tmp_path / "ae")
    overrides = ["data=phantom3d", "data.train.size=8", "data.train.length=8", "data.val.length=2"]
    index = encode(
        medgen.compose(
            "encode", [f"checkpoint={folder}", f"output_dir={tmp_path / 'z'}", *overrides]
        )
    )
    model = Diffusion(
        net=TINY_NET,
        spatial_dims=3,
        autoencoder=str(folder),
        pre_encoded=True,
        latent_scale=index["scale_factor"],
    )
    loader = DataLoader(LatentDataset(tmp_path / "z", "train"), batch_size=4)
    cpu_trainer(max_epochs=1, limit_val_batches=0).fit(model, loader)
    assert model.sample_size == (4, 4, 4)
    assert model.sample(2, steps=2, seed=0).shape == (2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="scale_factor"):
        Diffusion(
            net=TINY_NET,
            spatial_dims=3,
            autoencoder=str(folder),
            pre_encoded=True,
            latent_scale="auto",
        )
    with pytest.raises(ValueError, match="3D but the diffusion model is 2D"):
        Diffusion(net=TINY_NET, spatial_dims=2, autoencoder=str(folder))
