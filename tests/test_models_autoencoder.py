"""AutoencoderKL and VQGAN: shapes, tiled encode/decode, losses, codebook, checkpoints, experiments."""

from __future__ import annotations

import hashlib

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import medgen
from medgen.losses import PerceptualLoss, VGGFeatures
from medgen.models import VQGAN, AutoencoderKL
from medgen.models.autoencoder import latent_scale_factor
from medgen.nets import NLayerDiscriminator
from medgen.tiling import global_group_norm, tiled_apply_global_norm
from tests.conftest import tiny_overrides
from tests.helpers import cycled_loader, phantom_images

KL_NET = {"channels": [8, 16], "latent_channels": 2, "norm_num_groups": 4}
VQ_NET = {"channels": [8, 16], "embedding_dim": 4, "num_embeddings": 32, "norm_num_groups": 4}
TINY_D = {"ndf": 8, "n_layers": 1}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _phantoms(spatial_dims: int, size: int) -> tuple[torch.Tensor, ...]:
    return phantom_images(spatial_dims, size, 4)


def _loader(spatial_dims: int, size: int = 16, length: int = 8, batch: int = 2) -> DataLoader:
    return cycled_loader(_phantoms(spatial_dims, size), length, batch)


def _fit(model: L.LightningModule, spatial_dims: int, steps: int, val: bool = False, **kw):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1 if val else 0,
        **kw,
    )
    loader = _loader(spatial_dims)
    trainer.fit(model, loader, _loader(spatial_dims, length=2) if val else None)
    return trainer


def _kl(spatial_dims: int = 2, **kwargs) -> AutoencoderKL:
    kwargs.setdefault("discriminator", TINY_D)
    kwargs.setdefault("perceptual", {"weight": 0.0})
    return AutoencoderKL(net=KL_NET, spatial_dims=spatial_dims, **kwargs)


def _vq(spatial_dims: int = 3, **kwargs) -> VQGAN:
    kwargs.setdefault("discriminator", TINY_D)
    kwargs.setdefault("slice_discriminator", TINY_D)
    kwargs.setdefault("perceptual", {"weight": 0.0})
    return VQGAN(net=VQ_NET, spatial_dims=spatial_dims, **kwargs)


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (fresh ResBlocks are identities by design)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (p.ndim == 1) * 0.0)
    return module


# ----------------------------------------------------------------- shapes
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("family", ["kl", "vq"])
def test_shapes(family, spatial_dims):
    model = (_kl if family == "kl" else _vq)(spatial_dims).eval()
    x = torch.rand(2, 1, *(16,) * spatial_dims)
    z = model.encode(x)
    channels = 2 if family == "kl" else 4
    assert z.shape == (2, channels, *(8,) * spatial_dims)
    assert model.latent_shape(16) == (channels, *(8,) * spatial_dims)
    assert model.decode(z).shape == x.shape
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(3, seed=0, image_size=16).shape == (3, 1, *(16,) * spatial_dims)
    if family == "vq":  # encode returns codebook vectors
        indices = model.encode_indices(x)
        assert indices.shape == (2, *(8,) * spatial_dims)
        torch.testing.assert_close(model.net.quantizer.lookup(indices), z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
        model.encode(torch.rand(1, 1, *(15,) * spatial_dims))


def test_latent_scale_factor_is_inverse_std():
    z = [torch.randn(3, 4, 5) * 2.5 + 1.0, torch.randn(2, 4, 5) * 2.5]
    expected = 1.0 / torch.cat([t.flatten() for t in z]).double().std()
    assert latent_scale_factor(z) == pytest.approx(float(expected), rel=1e-12)


# ----------------------------------------------------------------- tiling
@pytest.mark.parametrize("family", ["kl", "vq"])
def test_one_tile_equals_whole(family):
    model = (_kl if family == "kl" else _vq)(3).eval()
    _randomise(model.net)
    x = torch.rand(1, 1, 16, 16, 16)
    z = model.encode(x)
    torch.testing.assert_close(model.encode(x, tile=16), z, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.decode(z, tile=8), model.decode(z), rtol=0, atol=1e-6)
    # a tile larger than the input is padded, still one tile
    assert model.decode(z, tile=12).shape == x.shape


def test_frozen_whole_statistics_reproduce_group_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU())
    _randomise(net)
    x = torch.randn(2, 2, 12, 10)
    with torch.no_grad(), global_group_norm(net) as (norms, state):
        state.record = True
        state.axes = [(0, 12, 0, 12), (0, 10, 0, 10)]
        whole = net(x)
        norms[0].freeze()
        state.record = False
        frozen = net(x)
        mean, var = norms[0].stats
    reference = net[1](net[0](x))
    torch.testing.assert_close(whole, F.silu(reference))
    torch.testing.assert_close(frozen, whole, rtol=0, atol=1e-5)
    grouped = net[0](x).detach().double().reshape(2, 4, -1)
    torch.testing.assert_close(mean, grouped.mean(-1))
    torch.testing.assert_close(var, grouped.var(-1, unbiased=False))
    assert type(net[1]) is nn.GroupNorm  # restored


def test_multi_tile_decode_seam_error_is_bounded():
    """Global GroupNorm statistics make tiles agree with whole decoding; per-tile ones do not."""
    model = _kl(2).eval()
    _randomise(model.net.decoder, seed=1)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, 2, 32, 32, generator=generator)
    z[..., :12, :] *= 0.2  # non-stationary content: a quiet region
    whole = model.decode(z)
    scale = float(whole.max() - whole.min())
    interior = (slice(None), slice(None), slice(8, -8), slice(8, -8))

    def error(**kwargs) -> float:
        tiled = model.decode(z, tile=16, overlap=0.5, **kwargs)
        assert tiled.shape == whole.shape
        return float((tiled - whole)[interior].abs().max()) / scale

    per_tile = error(norm_stats="tile")
    global_stats = error(norm_stats="global", margin=2)
    assert global_stats < 0.05
    assert global_stats < per_tile / 3


def test_decode_into_a_preallocated_output_equals_the_returned_volume():
    model = _kl(3).eval()
    _randomise(model.net.decoder, seed=1)
    z = torch.randn(1, 2, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    for norm_stats in ("global", "tile"):
        expected = model.decode(z, tile=8, overlap=0.5, norm_stats=norm_stats)
        out = torch.full_like(expected, float("nan"))
        assert model.decode(z, tile=8, overlap=0.5, norm_stats=norm_stats, out=out) is out
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    whole = torch.empty_like(expected)
    torch.testing.assert_close(model.decode(z, out=whole), model.decode(z), rtol=0, atol=0)
    x = model.decode(z)
    latent = torch.empty(1, 2, 12, 12, 12)
    assert model.encode(x, tile=16, out=latent) is latent
    torch.testing.assert_close(latent, model.encode(x, tile=16), rtol=0, atol=0)


def test_tiled_encode_with_margin_over_the_receptive_field_is_exact():
    """A fresh net's ResBlocks are identities, so its receptive field is small: a margin of 4
    voxels covers it, and with whole-image GroupNorm statistics tiles reproduce whole encoding;
    per-tile statistics do not."""
    model = _kl(2).eval()
    x = _phantoms(2, 32)[0][None]
    whole = model.encode(x)
    scale = float(whole.max() - whole.min())
    tiled = model.encode(x, tile=16, overlap=0.5, margin=4)
    assert tiled.shape == whole.shape
    assert float((tiled - whole).abs().max()) / scale < 1e-5
    per_tile = model.encode(x, tile=16, overlap=0.5, margin=4, norm_stats="tile")
    assert float((per_tile - whole).abs().max()) / scale > 1e-2
    with pytest.raises(ValueError, match="norm_stats"):
        model.encode(x, tile=16, norm_stats="batch")


def test_global_norm_tiling_refuses_batched_tiles():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="one tile at a time"):
        tiled_apply_global_norm(net, torch.rand(1, 1, 16, 16), 8, batch_tiles=2)


# ----------------------------------------------------------------- losses
def test_autoencoder_kl_loss_formula():
    torch.manual_seed(0)
    model = _kl(2, discriminator=None, kl_weight=1e-3, recon_weight=2.0)
    x = torch.rand(2, 1, 16, 16)
    torch.manual_seed(1)
    terms = model.autoencoder_terms(x)
    torch.manual_seed(1)
    recon_x, posterior = model.net(x)
    kl = posterior.kl().mean()
    expected = 2.0 * (recon_x - x).abs().mean() + 1e-3 * kl
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["loss"], expected)
    assert float(terms["adv"]) == 0.0


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    model = _kl(2)
    x = torch.rand(2, 1, 16, 16)
    recon_x, _ = model.net(x)
    rec = (recon_x - x).abs().mean()
    g = -model.discriminator(recon_x).mean()
    weight = model.adaptive_weight(rec, g)
    last = model.net.decoder.conv_out.weight
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g, last, retain_graph=True)[0]
    assert float(weight) == pytest.approx(float(g_rec.norm() / (g_adv.norm() + 1e-4)), rel=1e-5)


def test_adversarial_term_is_zero_before_adv_start_step():
    torch.manual_seed(0)
    model = _kl(2, adv_start_step=3)
    d_before = [p.detach().clone() for p in model.discriminator.parameters()]
    trainer = _fit(model, 2, steps=3)  # 3 autoencoder steps, no discriminator step
    assert int(model.ae_steps) == 3
    assert float(trainer.callback_metrics["train/adv"]) == 0.0
    assert float(trainer.callback_metrics["train/adv_weight"]) == 0.0
    assert "train/d_loss" not in trainer.callback_metrics
    for p, q in zip(model.discriminator.parameters(), d_before, strict=True):
        assert torch.equal(p, q)
    trainer = _fit(model, 2, steps=5)  # resumes the module's counter: adversarial steps now
    assert float(trainer.callback_metrics["train/adv"]) != 0.0
    assert float(trainer.callback_metrics["train/adv_weight"]) > 0.0
    assert "train/d_loss" in trainer.callback_metrics
    assert any(
        not torch.equal(p, q)
        for p, q in zip(model.discriminator.parameters(), d_before, strict=True)
    )


def test_discriminator_features_end_with_the_logits():
    d = NLayerDiscriminator(3, 1, ndf=4, n_layers=2).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    feats = d.features(x)
    assert len(feats) == 4
    torch.testing.assert_close(feats[-1], d(x))


def test_vqgan_terms_use_both_discriminators_and_feature_matching():
    torch.manual_seed(0)
    model = _vq(3, adv_start_step=0)
    x = torch.stack(_phantoms(3, 16)[:2])
    terms = model.autoencoder_terms(x)
    assert float(terms["feature_matching"].detach()) > 0
    expected = (
        4.0 * terms["recon"] + terms["commitment"] + terms["adv"] + 4.0 * terms["feature_matching"]
    )
    torch.testing.assert_close(terms["loss"], expected)
    d_terms = model.discriminator_terms(x, terms["recon_x"].detach())
    assert {"d_image", "d_volume", "d_loss"} <= set(d_terms)
    assert model.image_discriminator.model[0].weight.ndim == 4  # 2D slice discriminator
    assert model.volume_discriminator.model[0].weight.ndim == 5


def test_perceptual_loss_in_the_model_uses_local_weights(tmp_path):
    model = _kl(2, perceptual={"weight": 1.0})
    x = torch.rand(2, 1, 16, 16)
    with pytest.warns(UserWarning, match="PerceptualLoss is disabled"):
        assert float(model.perceptual_loss(x, x.flip(-1))) == 0.0  # no weights: off
    random = VGGFeatures.random("vgg16", layers=("relu1_2",))
    model.set_perceptual_loss(PerceptualLoss(2, extractor=random))
    assert float(model.perceptual_loss(x, x.flip(-1))) > 0
    # a weights file with the wrong hash or shape is refused, naming the file
    path = tmp_path / "vgg16.pth"
    state = {f"features.{k}": v for k, v in random.features.state_dict().items()}
    torch.save(state, path)
    wrong = _kl(2, perceptual={"weight": 1.0, "weights_path": str(path), "sha256": "0" * 64})
    with pytest.raises(ValueError, match="SHA-256 mismatch") as err:
        wrong.perceptual_loss(x, x)
    assert str(path) in str(err.value)
    bad = {**state, "features.0.weight": torch.zeros(64, 1, 3, 3)}
    torch.save(bad, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    wrong = _kl(2, perceptual={"weight": 1.0, "weights_path": str(path), "sha256": digest})
    with pytest.raises(ValueError, match="shape") as err:
        wrong.perceptual_loss(x, x)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------- training
def test_training_loss_falls_on_phantoms():
    torch.manual_seed(0)
    model = _kl(2, discriminator=None, optimizer={"_target_": "torch.optim.Adam", "lr": 3e-3})
    x = torch.stack(_phantoms(2, 16))
    with torch.no_grad():
        before = float(F.l1_loss(model.eval().reconstruct(x), x))
    _fit(model, 2, steps=40)
    with torch.no_grad():
        after = float(F.l1_loss(model.eval().reconstruct(x), x))
    assert after < 0.5 * before


def test_dead_codes_are_revived_during_vqgan_training():
    torch.manual_seed(0)
    model = _vq(3, discriminator=None, slice_discriminator=None)
    quantizer = model.net.quantizer
    _fit(model, 3, steps=1)  # initialises the codebook from the first batch
    with torch.no_grad():  # make half of the codes unreachable: they can only come back by restart
        quantizer.embedding[:16] = 1e3
        quantizer.embed_sum[:16] = 1e3
        quantizer.cluster_size[:16] = 1.0
    trainer = _fit(model, 3, steps=4)
    revived = quantizer.embedding[:16]
    assert float(revived.abs().max()) < 100  # restarted from encoder outputs
    z = model.net.encode(torch.stack(_phantoms(3, 16)[:2]))
    assert float(revived.abs().max()) <= float(z.abs().max()) + 1e-3
    assert 0 < float(trainer.callback_metrics["train/usage"]) <= 1
    assert float(trainer.callback_metrics["train/perplexity"]) >= 1


@pytest.mark.parametrize("family", ["kl", "vq"])
def test_checkpoint_and_export_reload_and_encode_identically(family, tmp_path):
    torch.manual_seed(0)
    spatial_dims = 2 if family == "kl" else 3
    model = (_kl if family == "kl" else _vq)(spatial_dims, adv_start_step=1)
    trainer = _fit(model, spatial_dims, steps=3)
    validator = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = validator.validate(model, _loader(spatial_dims, length=2), verbose=False)[0]
    assert metrics["val/psnr"] > 0
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    model.save_pretrained(tmp_path / "exported")
    x = torch.stack(_phantoms(spatial_dims, 16)[:2])
    expected = model.eval().encode(x)
    for path in (ckpt, tmp_path / "exported"):
        loaded = medgen.load(path)
        assert type(loaded) is type(model)
        torch.testing.assert_close(loaded.encode(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(expected), model.decode(expected), rtol=0, atol=0)
        assert loaded.image_size == (16,) * spatial_dims


@pytest.fixture(scope="module")
def vqgan_run(tmp_path_factory):
    """The vqgan_3d experiment, shrunk to a few steps on 16^3 phantoms, through medgen.train."""
    out = tmp_path_factory.mktemp("vqgan_3d")
    overrides = tiny_overrides(out, "vqgan_3d") + [
        "data.train.size=16",
        "data.batch_size=2",
        "model.adv_start_step=2",
        "model.net.num_embeddings=64",
        "model.discriminator.ndf=4",
        "model.slice_discriminator.ndf=4",
        "trainer.max_steps=6",
    ]
    cfg = medgen.compose("train", overrides)
    assert cfg.model.net.embedding_dim == 8 and cfg.model.net.channels == [16, 32, 64]
    return out, medgen.train(cfg)


def test_vqgan_3d_experiment_trains_and_exports(vqgan_run):
    out, result = vqgan_run
    assert {"val/psnr", "val/perplexity", "val/usage"} <= set(result["metrics"])
    model = medgen.load(result["model_dir"])
    assert isinstance(model, VQGAN) and int(model.ae_steps) == 0  # buffers are not exported
    assert model.net.quantizer.num_embeddings == 64
    ckpt = medgen.load(out / "checkpoints" / "last.ckpt")
    assert int(ckpt.ae_steps) == 4  # 2 before the discriminators + 2 with (6 optimiser steps)
    assert len(result["samples"]) == 2


def _moved(now, before) -> float:
    return float(
        torch.cat([(a.detach() - b).flatten() for a, b in zip(now, before, strict=True)]).norm()
    )


def test_gradient_clip_val_bounds_every_optimiser_step():
    """With SGD at lr 1 a step moves the weights by minus the gradient: its norm is the clip."""
    sgd = {"_target_": "torch.optim.SGD", "lr": 1.0}

    def moved(**kwargs) -> tuple[float, float]:
        torch.manual_seed(0)
        model = _kl(optimizer=sgd, optimizer_d=sgd, adv_start_step=0, **kwargs)
        net0 = [p.detach().clone() for p in model.net.parameters()]
        d0 = [p.detach().clone() for p in model.discriminator.parameters()]
        _fit(model, 2, steps=1)
        return _moved(model.net.parameters(), net0), _moved(model.discriminator.parameters(), d0)

    net, disc = moved(gradient_clip_val=1e-3)
    assert net == pytest.approx(1e-3, rel=1e-3) and disc == pytest.approx(1e-3, rel=1e-3)
    free_net, free_disc = moved()
    assert free_net > 1e-2 and free_disc > 1e-2
    with pytest.raises(ValueError, match="gradient_clip_val"):
        _kl(gradient_clip_val=0)
