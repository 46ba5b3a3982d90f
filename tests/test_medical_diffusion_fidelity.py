"""Medical Diffusion (Khader et al. 2023, FirasGit/medicaldiffusion) and MONAI-default fidelity.

Each test checks one fact against its formula or upstream's number: the VQ-GAN's feature-matching
weight, the scaled-linear default betas (MONAI's) with old checkpoints keeping theirs, the cosine
clip, the EMA schedule, the codebook latent normalisation with the x0 clamp, and the
``*_full`` presets' settings.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medgen
from medgen.callbacks import EMA
from medgen.diffusion.schedules import (
    STABLE_DIFFUSION_BETAS,
    NoiseSchedule,
    make_betas,
    resolve_schedule,
    upgrade_stored_schedule,
)
from medgen.models import VQGAN, Diffusion
from medgen.models.autoencoder import feature_matching_loss
from tests.helpers import TINY_DIFFUSION_NET

TINY_NET = {**TINY_DIFFUSION_NET, "attention_levels": [False, False]}


# --------------------------------------------------------------------------------------------------
# VQ-GAN feature matching: 4 / (n_layers + 1) per intermediate layer (upstream 4 / (3 + 1))
# --------------------------------------------------------------------------------------------------
def test_feature_matching_loss_formula():
    g = torch.Generator().manual_seed(0)
    fake = [torch.randn(2, 3, 5, 5, generator=g) for _ in range(4)]  # n_layers = 3: 4 maps
    real = [torch.randn(2, 3, 5, 5, generator=g) for _ in range(4)]
    expected = sum(4.0 / (3 + 1) * (f - r).abs().mean() for f, r in zip(fake, real, strict=True))
    torch.testing.assert_close(feature_matching_loss(fake, real), expected)
    with pytest.raises(ValueError, match="matching"):
        feature_matching_loss(fake, real[:3])


@pytest.mark.parametrize("n_layers,gan_weight", [(3, 1.0), (2, 0.5), (2, 0.0)])
def test_vqgan_feature_matching_term(n_layers, gan_weight):
    """The model's term: 4 / (n_layers + 1) per layer, switched (not scaled) by the GAN weight."""
    torch.manual_seed(0)
    model = VQGAN(
        net={"channels": [4, 8], "norm_num_groups": 4, "embedding_dim": 3, "num_embeddings": 16},
        spatial_dims=2,
        perceptual={"weight": 0},
        discriminator={
            "_target_": "medgen.nets.NLayerDiscriminator",
            "ndf": 4,
            "n_layers": n_layers,
            "norm": "instance",
        },
        image_gan_weight=gan_weight,
        adv_start_step=0,
    )
    x = torch.rand(2, 1, 32, 32)
    terms = model.autoencoder_terms(x)
    d = model.image_discriminator
    fake, real = d.features(terms["recon_x"]), d.features(x)
    assert len(fake) == n_layers + 2  # n_layers + 1 intermediate maps, then the logits
    expected = sum(
        4.0 / (n_layers + 1) * F.l1_loss(f, r) for f, r in zip(fake[:-1], real[:-1], strict=True)
    )
    if gan_weight == 0:
        expected = expected * 0
    torch.testing.assert_close(terms["feature_matching"], expected.detach(), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------
def test_scaled_linear_defaults_are_monais():
    from monai.networks.schedulers import DDPMScheduler

    monai = DDPMScheduler(1000, schedule="scaled_linear_beta")  # no betas given: 1e-4 .. 0.02
    assert torch.equal(make_betas("scaled_linear", 1000), monai.betas.float())
    sd = make_betas("scaled_linear", 1000, *STABLE_DIFFUSION_BETAS)
    torch.testing.assert_close(
        sd.double(), torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    )
    assert resolve_schedule({"kind": "scaled_linear"}) == {
        "kind": "scaled_linear",
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
    }
    assert resolve_schedule({"kind": "cosine", "num_train_timesteps": 300})["max_beta"] == 0.999


def _upstream_cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Medical Diffusion's cosine_beta_schedule (ddpm/diffusion.py), as published: float64,
    ``alpha_bar`` sampled at ``linspace(0, T, T + 1) / T``, betas clipped to [0, 0.9999]."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return torch.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.9999)


def test_cosine_clip_matches_medical_diffusion_and_nichol_dhariwal():
    upstream = _upstream_cosine_betas(300)
    assert float(upstream[-1]) == pytest.approx(0.9999)  # the clip is active at T = 300
    ours = NoiseSchedule("cosine", 300, max_beta=0.9999)
    assert torch.equal(ours.betas, upstream.float())  # bit for bit
    torch.testing.assert_close(
        ours.alphas_cumprod, torch.cumprod(1 - upstream, 0).float(), rtol=0, atol=1e-6
    )
    default = NoiseSchedule("cosine", 300)  # Nichol & Dhariwal / MONAI / diffusers: 0.999
    assert float(default.betas[-1]) == pytest.approx(0.999)
    assert torch.equal(default.betas[:-1], ours.betas[:-1])  # only the clipped end differs
    with pytest.raises(ValueError, match="max_beta"):
        make_betas("cosine", 10, max_beta=1.0)


def _tiny_diffusion(**kwargs) -> Diffusion:
    return Diffusion(net=TINY_NET, spatial_dims=2, sample_size=(8, 8), **kwargs)


def test_models_record_their_betas_and_old_checkpoints_keep_theirs(tmp_path):
    model = _tiny_diffusion(schedule={"kind": "scaled_linear", "num_train_timesteps": 50})
    assert model.hparams["schedule"]["beta_start"] == 1e-4  # stored: immune to default changes
    torch.testing.assert_close(model.schedule.betas, make_betas("scaled_linear", 50))

    # A checkpoint of medgen 0.1.0: its stored schedule has no betas and meant Stable Diffusion's.
    old_hparams = {
        **dict(model.hparams),
        "schedule": {"kind": "scaled_linear", "num_train_timesteps": 50},
    }
    assert Diffusion.upgrade_init_args(old_hparams)["schedule"]["beta_end"] == 0.012
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": old_hparams,
        "medgen_target": "medgen.models.Diffusion",
    }
    torch.save(ckpt, tmp_path / "old.ckpt")
    loaded = medgen.load(tmp_path / "old.ckpt")
    expected = make_betas("scaled_linear", 50, *STABLE_DIFFUSION_BETAS)
    assert torch.equal(loaded.schedule.betas, expected)
    assert loaded.hparams["schedule"]["beta_start"] == 0.00085  # re-saved explicitly
    # The same for an exported folder of medgen 0.1.0 (config.json without betas).
    model.save_pretrained(tmp_path / "old_export")
    config_file = tmp_path / "old_export" / "config.json"
    config = json.loads(config_file.read_text())
    config["init_args"]["schedule"] = {"kind": "scaled_linear", "num_train_timesteps": 50}
    config_file.write_text(json.dumps(config))
    assert torch.equal(medgen.load(tmp_path / "old_export").schedule.betas, expected)
    # What needs no upgrade is left alone.
    assert (
        upgrade_stored_schedule({"kind": "scaled_linear", "beta_start": 1e-3, "beta_end": 0.02})
        is None
    )
    assert upgrade_stored_schedule({"kind": "cosine"}) is None


# --------------------------------------------------------------------------------------------------
# EMA: every 10 steps, copying until step 2000 (upstream Trainer.step_ema)
# --------------------------------------------------------------------------------------------------
def test_ema_every_10_steps_from_2000_follows_upstreams_rule():
    decay, every, start, steps = 0.995, 10, 2000, 2100
    module = SimpleNamespace(net=nn.Linear(1, 1, bias=False))
    module.get_submodule = lambda name: getattr(module, name)
    ema = EMA("net", decay=decay, every_n_steps=every, start_step=start)
    ema._init_shadow(module.net)
    upstream = module.net.weight.detach().clone()
    for step in range(1, steps + 1):
        with torch.no_grad():
            module.net.weight.fill_(math.sin(step))  # the weights after this optimiser step
        ema.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, 0)
        # upstream: `if step % update_ema_every == 0: step_ema()`, which copies the weights
        # while step < step_start_ema and averages with ema_decay after
        if step % every == 0:
            w = module.net.weight.detach()
            upstream = w.clone() if step < start else decay * upstream + (1 - decay) * w
        assert torch.allclose(ema.shadow["weight"], upstream, atol=1e-6), step


# --------------------------------------------------------------------------------------------------
# latent normalisation by the codebook's range, x0 clamp
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vq_folder(tmp_path_factory):
    torch.manual_seed(0)
    ae = VQGAN(
        net={"channels": [4, 8], "norm_num_groups": 4, "embedding_dim": 3, "num_embeddings": 16},
        discriminator=None,
        slice_discriminator=None,
        perceptual={"weight": 0},
    )
    with torch.no_grad():
        ae.net.quantizer.embedding.copy_(torch.randn(16, 3) * 3)
    return ae.save_pretrained(tmp_path_factory.mktemp("vq") / "ae")


def test_codebook_latent_normalisation_and_x0_clamp(vq_folder, tmp_path):
    model = Diffusion(
        net=TINY_NET,
        spatial_dims=3,
        autoencoder=str(vq_folder),
        latent_scale="codebook",
        clip_sample=True,
        decode_kwargs={"quantize": True},
        schedule={"kind": "cosine", "num_train_timesteps": 8, "max_beta": 0.9999},
        sampler={"name": "ddpm", "steps": 8},
        sample_size=(4, 4, 4),
    )
    ae = model.autoencoder
    codes = ae.net.quantizer.embedding
    lo, hi = float(codes.min()), float(codes.max())
    x = torch.rand(2, 1, 8, 8, 8)
    z = model.encode(x)
    raw = ae.encode(x)  # quantised codes
    torch.testing.assert_close(z, 2 * (raw - lo) / (hi - lo) - 1)  # upstream's normalisation
    assert float(z.min()) >= -1 - 1e-6 and float(z.max()) <= 1 + 1e-6
    torch.testing.assert_close(model.decode(z), ae.decode(raw), rtol=1e-5, atol=1e-5)
    # With the clamp, the last DDPM step returns the clamped x0 prediction: inside [-1, 1];
    # without it the same (zero-output) net's x0 = x_t / sqrt(alpha_bar) leaves that range.
    latents = model.sample(2, seed=0, return_latents=True)
    assert latents.shape == (2, 3, 4, 4, 4) and latents.abs().max() <= 1 + 1e-6
    model.clip_sample = False
    assert model.sample(2, seed=0, return_latents=True).abs().max() > 1.5
    assert float(model.latent_scale) == pytest.approx(2 / (hi - lo))  # recorded, finite
    # Upstream trains on the continuous latents before the codebook: encode_kwargs.
    model.encode_kwargs = {"quantize": False}
    continuous = ae.encode(x, quantize=False)
    assert not torch.allclose(continuous, raw) and torch.equal(ae.quantize(continuous), raw)
    torch.testing.assert_close(model.encode(x), 2 * (continuous - lo) / (hi - lo) - 1)
    model.encode_kwargs = {}
    loaded = medgen.load(model.save_pretrained(tmp_path / "model"))
    assert loaded.hparams["latent_scale"] == "codebook"
    torch.testing.assert_close(loaded.encode(x), z)


def test_codebook_normalisation_needs_a_codebook_and_no_pre_encoded():
    with pytest.raises(ValueError, match="'codebook'"):
        Diffusion(net=TINY_NET, latent_channels=3, latent_scale="codebook", pre_encoded=True)
    with pytest.raises(ValueError, match="number, 'auto' or 'codebook'"):
        Diffusion(net=TINY_NET, latent_channels=3, latent_scale="minmax")


# --------------------------------------------------------------------------------------------------
# the *_full presets carry upstream's published numbers
# --------------------------------------------------------------------------------------------------
def test_full_presets_match_upstream_settings(tmp_path):
    cfg = medgen.compose(
        "train", ["experiment=medical_diffusion_full", f"paths.output_dir={tmp_path}"]
    )
    m = cfg.model
    assert (m.prediction, m.loss, m.latent_scale, m.clip_sample) == (
        "epsilon",
        "l1",
        "codebook",
        True,
    )
    assert dict(m.schedule) == {
        "kind": "cosine",
        "num_train_timesteps": 300,
        "cosine_s": 0.008,
        "max_beta": 0.9999,
    }
    assert (m.optimizer._target_, m.optimizer.lr, list(m.optimizer.betas)) == (
        "torch.optim.Adam",
        1e-4,
        [0.9, 0.999],
    )
    assert dict(m.encode_kwargs) == {"quantize": False}
    assert (m.sampler.name, m.sampler.steps, dict(m.decode_kwargs)) == (
        "ddpm",
        300,
        {"quantize": True},
    )
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches, cfg.trainer.max_steps) == (
        40,
        2,
        700000,
    )
    ema = cfg.callbacks.ema
    assert (ema.decay, ema.every_n_steps, ema.start_step) == (0.995, 10, 2000)

    cfg = medgen.compose("train", ["experiment=vqgan_3d_full", f"paths.output_dir={tmp_path}"])
    m = cfg.model
    assert (m.net.num_embeddings, m.net.embedding_dim, list(m.net.channels)) == (
        16384,
        8,
        [16, 32, 64],
    )
    assert (m.recon_weight, m.perceptual.weight, m.feature_matching_weight) == (4.0, 4.0, 4.0)
    assert (m.image_gan_weight, m.volume_gan_weight, m.adv_start_step, m.adv_loss) == (
        1.0,
        1.0,
        10000,
        "hinge",
    )
    assert (m.optimizer.lr, list(m.optimizer.betas), cfg.data.batch_size) == (3e-4, [0.5, 0.9], 2)
    assert (m.discriminator.ndf, m.discriminator.n_layers, m.slice_discriminator.n_layers) == (
        64,
        3,
        3,
    )


def test_medical_diffusion_full_trains_over_a_vqgan(vq_folder, tmp_path):
    """The full preset at a toy size: codebook latents, x0 clamp, EMA, accumulation, export."""
    overrides = [
        "experiment=medical_diffusion_full",
        f"paths.output_dir={tmp_path}",
        f"model.autoencoder={vq_folder}",
        "data.train.size=8",
        "data.train.length=4",
        "data.val.length=2",
        "data.batch_size=2",
        "model.net.channels=[8,16]",
        "model.net.num_res_blocks=1",
        "model.net.attention_levels=[false,true]",
        "model.net.num_head_channels=8",
        "model.net.norm_num_groups=4",
        "model.sampler.steps=2",
        "model.val_sampler.steps=2",
        "trainer.max_epochs=1",
        "~callbacks.progress_bar",
        "num_samples=1",
    ]
    result = medgen.train(medgen.compose("train", overrides))
    assert math.isfinite(result["metrics"]["val/mmd"])
    model = medgen.load(result["model_dir"])
    assert model.hparams["latent_scale"] == "codebook" and model.clip_sample
    assert model.encode_kwargs == {"quantize": False}
    assert model.hparams["schedule"]["max_beta"] == 0.9999 and model.num_train_timesteps == 300
    assert model.sample(1, seed=0).shape == (1, 1, 8, 8, 8)
