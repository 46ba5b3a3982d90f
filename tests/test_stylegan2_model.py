"""The StyleGAN2 LightningModule: regularisers, EMA ramp, style mixing, ADA in training, exact
resume, sampling, export/reload, medgen-sample, FreezeD, class conditioning, the no-leak check."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import medgen
import medgen.losses.adversarial as adversarial_losses
from medgen.callbacks import RNGState
from medgen.losses.adversarial import path_length_penalty
from medgen.models import StyleGAN2
from medgen.models.stylegan2 import auto_r1_gamma
from tests.helpers import cpu_trainer, cycled_loader, phantom_images

pytestmark = pytest.mark.usefixtures("single_thread")


def _nets(size: int = 16, **generator) -> dict:
    widths = {"channel_base": 64, "channel_max": 8}
    return {
        "generator": {
            "image_size": size,
            "latent_dim": 8,
            "mapping_layers": 2,
            **widths,
            **generator,
        },
        "discriminator": {"image_size": size, "mbstd_group_size": 2, **widths},
    }


def _model(spatial_dims: int = 2, size: int = 16, **kwargs) -> StyleGAN2:
    kwargs.setdefault("ema_kimg", 0.01)
    return StyleGAN2(**_nets(size), spatial_dims=spatial_dims, **kwargs)


def _loader(spatial_dims: int = 2, size: int = 16, length: int = 8, batch: int = 4):
    return cycled_loader(phantom_images(spatial_dims, size, 8), length, batch)


def test_path_length_penalty_matches_a_hand_computation():
    """Linear generator ``img = A w``: ``J^T y = A^T y``, so lengths are known in closed form."""
    torch.manual_seed(0)
    a = torch.randn(2 * 3 * 3, 4)  # (pixels of a (2, 3, 3) image) x w_dim
    ws = torch.randn(5, 2, 4, requires_grad=True)  # (B, num_ws = 2, w_dim = 4)
    images = (ws.sum(1) @ a.t()).reshape(5, 2, 3, 3)
    noise = torch.randn(5, 2, 3, 3)
    pl_mean = torch.tensor(0.5)
    penalty, lengths, new_mean = path_length_penalty(images, ws, pl_mean, 0.1, noise)
    y = noise.reshape(5, -1) / 3.0  # / sqrt(number of pixels) = / sqrt(9)
    grad = y @ a  # (B, w_dim), the same for both layers of ws
    expected = grad.square().sum(1).sqrt()  # sqrt(mean over the 2 layers of |grad|^2)
    torch.testing.assert_close(lengths, expected)
    mean = 0.5 + 0.1 * (expected.mean() - 0.5)
    torch.testing.assert_close(new_mean, mean)
    torch.testing.assert_close(penalty, (expected - mean).square().mean())
    assert float(pl_mean) == 0.5  # not modified in place


def test_r1_is_lazy_and_gamma_scales_with_resolution(monkeypatch):
    assert auto_r1_gamma((128, 128)) == pytest.approx(0.5)
    assert auto_r1_gamma((256, 256)) == pytest.approx(2.0)
    assert auto_r1_gamma((32, 32, 32)) == pytest.approx(2.0 / 64)
    assert _model().r1_gamma == pytest.approx(2.0 * (16 / 256) ** 2)
    calls = []
    original = adversarial_losses.r1_penalty

    def counting(logits, real, create_graph=True):
        calls.append(1)
        return original(logits, real, create_graph)

    monkeypatch.setattr(adversarial_losses, "r1_penalty", counting)
    model = _model(r1_gamma=1.0, r1_interval=3, pl_weight=0.0)
    cpu_trainer(max_steps=10, limit_val_batches=0).fit(model, _loader(length=40))
    assert int(model.discriminator_steps) == int(model.generator_steps) == 5
    assert len(calls) == 2  # discriminator steps 0 and 3
    assert model.objective.r1_gamma == 1.0 and model.objective.r1_interval == 3


def test_lazy_regularisation_rescales_adam():
    model = _model(r1_interval=16, pl_interval=4)
    opt_g, opt_d = model.configure_optimizers()
    assert opt_g.param_groups[0]["lr"] == pytest.approx(0.0025 * 4 / 5)
    assert opt_d.param_groups[0]["lr"] == pytest.approx(0.0025 * 16 / 17)
    assert opt_d.param_groups[0]["betas"][1] == pytest.approx(0.99 ** (16 / 17))
    plain = _model(lazy_optimizer=False)
    assert plain.configure_optimizers()[0].param_groups[0]["lr"] == pytest.approx(0.0025)


def test_ema_ramp_up_and_half_life():
    model = _model(ema_kimg=10.0, ema_rampup=0.05)
    for p in model.generator.parameters():
        p.data.add_(1.0)
    before = [p.clone() for p in model.generator_ema.parameters()]
    # No image seen yet: the ramped horizon is 0, beta = 0, the EMA copies the generator.
    assert model.update_ema(4) == 0.0
    for p, q in zip(model.generator_ema.parameters(), model.generator.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    # 2000 images seen: horizon min(10000, 0.05 * 2000) = 100 images.
    model.images_seen.fill_(2000)
    for p in model.generator.parameters():
        p.data.add_(1.0)
    before = [p.clone() for p in model.generator_ema.parameters()]
    beta = model.update_ema(4)
    assert beta == pytest.approx(0.5 ** (4 / 100))
    for p, old, new in zip(
        model.generator_ema.parameters(), before, model.generator.parameters(), strict=True
    ):
        torch.testing.assert_close(p, new + beta * (old - new))
    # Late in training the half-life is ema_kimg thousand images.
    model.images_seen.fill_(10**7)
    assert model.update_ema(32) == pytest.approx(0.5 ** (32 / 10_000))
    assert _model(ema_kimg=10.0, ema_rampup=None).update_ema(32) == pytest.approx(
        0.5 ** (32 / 10_000)
    )


def test_style_mixing_switches_latents_at_the_crossover():
    torch.manual_seed(0)
    model = _model()
    z, z2 = torch.randn(3, 8), torch.randn(3, 8)
    ws, cutoff = model.mixed_ws(z, z2, None, mix=True)
    assert 1 <= cutoff < model.generator.num_ws
    torch.testing.assert_close(ws[:, :cutoff], model.generator.map(z)[:, :cutoff])
    torch.testing.assert_close(ws[:, cutoff:], model.generator.map(z2)[:, cutoff:])
    same, cutoff = model.mixed_ws(z, z2, None, mix=False)
    assert cutoff == model.generator.num_ws
    torch.testing.assert_close(same, model.generator.map(z))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_training_steps_with_ada_2d_3d(spatial_dims):
    size = 16 if spatial_dims == 2 else 8
    augment = {"p": 0.5, "target": 0.6, "interval": 1, "kimg": 0.1}
    model = _model(spatial_dims, size, augment=augment, pl_interval=2)
    start = [p.clone() for p in model.generator.parameters()]
    cpu_trainer(max_steps=6, limit_val_batches=0).fit(
        model, _loader(spatial_dims, size, length=12, batch=4)
    )
    assert int(model.generator_steps) == 3 and int(model.images_seen) == 12
    assert model.ada_p != 0.5  # the controller moved p (4 images per step over kimg = 0.1)
    assert float(model.pl_mean) > 0  # path-length mean tracked
    assert any(
        not torch.equal(a, b) for a, b in zip(start, model.generator.parameters(), strict=True)
    )
    assert float(model.generator.mapping.w_avg.abs().sum()) > 0
    torch.testing.assert_close(model.generator_ema.mapping.w_avg, model.generator.mapping.w_avg)


def test_checkpoint_resumes_exactly(tmp_path):
    """3 + 3 steps from a checkpoint equal 6 uninterrupted steps, bit for bit (ADA p, path-length
    mean, EMA and w average are state; the latents' stream and global RNGs are restored)."""
    augment = {"p": 0.3, "target": 0.6, "interval": 2, "kimg": 0.1}
    kwargs = {"augment": augment, "pl_interval": 2, "r1_interval": 2}

    def trainer(epochs: int):
        return cpu_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[RNGState()])

    def loader():
        # Its own generator: a loader without one draws its base seed from the global RNG when
        # an epoch starts, before RNGState restores it, so the two runs would differ by a draw.
        data = _loader(length=12)
        return DataLoader(data.dataset, batch_size=4, generator=torch.Generator())

    torch.manual_seed(0)
    whole = _model(**kwargs)
    trainer(2).fit(whole, loader())
    torch.manual_seed(0)
    first = _model(**kwargs)
    t = trainer(1)
    t.fit(first, loader())
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _model(**kwargs)
    trainer(2).fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    assert int(resumed.generator_steps) == 6
    state, expected = resumed.state_dict(), whole.state_dict()
    assert float(expected["augment.p"]) != 0.3
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0, msg=key)


def test_sample_seeds_units_truncation():
    model = _model(value_range=(-100.0, 100.0))
    a, b, c = model.sample(3, seed=5), model.sample(3, seed=5), model.sample(3, seed=6)
    assert a.shape == (3, 1, 16, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert float(a.min()) >= -100.0 and float(a.max()) <= 100.0
    # psi = 0: every latent is w_avg; noise strengths start at 0, so all samples are equal.
    flat = model.sample(3, seed=5, truncation_psi=0.0)
    torch.testing.assert_close(flat[0], flat[2])
    # batching and the number of samples do not change a sample (up to the float rounding of
    # batched products; range 200)
    torch.testing.assert_close(model.sample(3, seed=5, batch_size=2), a, atol=1e-3, rtol=0)
    torch.testing.assert_close(model.sample(2, seed=5), a[:2], atol=1e-3, rtol=0)


def test_export_reload_and_medgen_sample(tmp_path):
    model = _model()
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, _loader(length=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    from_ckpt = medgen.load(tmp_path / "last.ckpt")
    torch.testing.assert_close(from_ckpt.sample(2, seed=3), model.sample(2, seed=3))
    exported = model.save_pretrained(tmp_path / "model")
    loaded = medgen.load(exported)
    assert isinstance(loaded, StyleGAN2)
    torch.testing.assert_close(loaded.sample(2, seed=3), model.sample(2, seed=3))
    for name in ("generator", "generator_ema", "discriminator"):
        for (key, p), q in zip(
            getattr(model, name).state_dict().items(),
            getattr(loaded, name).state_dict().values(),
            strict=True,
        ):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{name}.{key}")
    cfg = medgen.compose(
        "sample",
        [f"checkpoint={exported}", f"output_dir={tmp_path / 'samples'}", "num_samples=3"],
    )
    paths = medgen.sample(cfg)
    assert [Path(p).name for p in paths] == [f"sample_{i:04d}.png" for i in range(3)]
    cfg = medgen.compose(
        "sample",
        [f"checkpoint={tmp_path / 'last.ckpt'}", f"output_dir={tmp_path / 'ck'}", "num_samples=2"],
    )
    assert len(medgen.sample(cfg)) == 2
    # The same seed gives the same images from the checkpoint and from the export.
    from medgen.data.io import read

    for i in range(2):
        torch.testing.assert_close(
            read(tmp_path / "ck" / f"sample_{i:04d}.png").as_tensor(), read(paths[i]).as_tensor()
        )


def test_freeze_d_leaves_the_first_blocks_untouched():
    model = _model(freeze_d=1)
    frozen = {
        k: v.clone()
        for k, v in model.discriminator.state_dict().items()
        if k.startswith(("from_image", "blocks.0."))
    }
    rest = {k: v.clone() for k, v in model.discriminator.state_dict().items() if k not in frozen}
    cpu_trainer(max_steps=4, limit_val_batches=0).fit(model, _loader(length=8))
    state = model.discriminator.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert any(not torch.equal(state[k], v) for k, v in rest.items())
    with pytest.raises(ValueError, match="freeze_d=7"):
        _model(freeze_d=7)


def test_class_conditional_training_and_sampling():
    nets = _nets(8, num_classes=2)
    nets["discriminator"]["num_classes"] = 2
    model = StyleGAN2(**nets, label_key="label")
    images = phantom_images(2, 8, 4)
    loader = cycled_loader(images, 4, 4, lambda i, x: {"image": x, "label": i % 2})
    cpu_trainer(max_steps=2, limit_val_batches=0).fit(model, loader)
    samples = model.sample(2, seed=0, labels=[0, 1])
    assert samples.shape == (2, 1, 8, 8)
    assert not model.supports("sample")  # needs labels: not for unconditional medgen-sample
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(2, seed=0)
    with pytest.raises(ValueError, match="label_key"):
        StyleGAN2(**nets)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="pl_interval"):
        _model(pl_interval=0)
    with pytest.raises(ValueError, match="style_mixing_prob"):
        _model(style_mixing_prob=1.5)
    bad = _nets()
    bad["discriminator"]["image_size"] = 32
    with pytest.raises(ValueError, match="image_size"):
        StyleGAN2(**bad)


def test_experiment_trains_exports_and_samples(tmp_path):
    from tests.conftest import tiny_overrides

    overrides = [
        *tiny_overrides(tmp_path, "stylegan2_2d"),
        "data.train.size=16",
        "data.batch_size=4",
        "model.generator.channel_base=64",
        "model.discriminator.channel_base=64",
        "trainer.max_steps=4",
    ]
    cfg = medgen.compose("train", overrides)
    assert cfg.model.augment.target == 0.6 and cfg.model.r1_interval == 16
    result = medgen.train(cfg)
    assert "val/mmd" in result["metrics"]
    exported = medgen.load(tmp_path / "model")
    assert isinstance(exported, StyleGAN2) and exported.augment is not None
    assert len(result["samples"]) == 2

    # Transfer learning: a new run starts G, G_ema and D from the export (model.init_from, the
    # fine-tuning layer) and FreezeD keeps the discriminator's first block as exported.
    overrides[1] = f"paths.output_dir={tmp_path / 'transfer'}"
    cfg = medgen.compose(
        "train", [*overrides, f"+model.init_from={tmp_path / 'model'}", "model.freeze_d=1"]
    )
    model = medgen.train(cfg)["model"]
    report = json.loads((tmp_path / "transfer" / "init_from.json").read_text())
    nets = ("generator.", "generator_ema.", "discriminator.")
    # Only the run's own state starts fresh (counters, ADA p, path-length mean, val features).
    assert not [k for k in report["missing"] if k.startswith(nets)], report["missing"]
    assert report["unexpected"] == [] and report["reinitialised"] in ({}, [])
    exported_keys = sum(
        len(getattr(exported, n).state_dict())
        for n in ("generator", "generator_ema", "discriminator")
    )
    assert report["loaded"] == exported_keys  # every weight of G, G_ema and D
    before, after = exported.discriminator.state_dict(), model.discriminator.state_dict()
    frozen = [k for k in before if k.startswith(("from_image", "blocks.0."))]
    assert frozen and all(torch.equal(before[k], after[k].cpu()) for k in frozen)
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if k not in frozen)


@pytest.mark.slow
def test_no_leak_samples_keep_the_orientation_of_never_flipped_data():
    """Trained on images bright on the left only, with x-flips at a fixed p = 0.8 (the
    discriminator sees 40% of all images flipped), the generator learns the clean orientation:
    its samples are bright on the left (ADA, sec. 2). A leaking augmentation would teach it the
    augmented distribution, in which 40% of the images are bright on the right."""
    torch.manual_seed(0)
    size = 16
    base = torch.zeros(64, 1, size, size)
    base[..., : size // 2] = 0.8
    base += 0.1 * torch.rand(64, 1, size, size)
    augment = {"p": 0.8, "target": None, "xflip": 1.0}
    augment.update({k: 0.0 for k in ("rotate90", "xint", "scale", "rotate", "aniso")})
    augment.update({k: 0.0 for k in ("brightness", "contrast")})
    nets = _nets(size)
    for net in nets.values():
        net.update(channel_base=256, channel_max=16)
    model = StyleGAN2(**nets, augment=augment, ema_kimg=0.5)
    loader = cycled_loader(tuple(base), 8 * 800, 8)
    cpu_trainer(max_steps=1600, limit_val_batches=0).fit(model, loader)  # 800 generator steps
    samples = model.sample(64, seed=0)
    left = samples[..., : size // 2].mean(dim=(1, 2, 3))
    right = samples[..., size // 2 :].mean(dim=(1, 2, 3))
    assert float((left > right).float().mean()) > 0.8, left - right
    assert float((left - right).mean()) > 0.1


class _DumpState(L.Callback):
    """Each rank's full state dict (weights, ADA p, path-length mean) at the end of training."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_stay_identical_with_ada(tmp_path):
    """Under DDP (two CPU processes) the ADA statistics are summed over ranks, so every rank
    moves p the same way, and the weights and the EMA weights stay identical. (The running means
    of w and of the path lengths are per-rank buffers, as in the paper's code; DDP broadcasts
    rank 0's at every step and checkpoints come from rank 0.)"""
    augment = {"p": 0.3, "target": 0.6, "interval": 1, "kimg": 0.05}
    model = _model(augment=augment, pl_interval=2, r1_interval=2)
    trainer = cpu_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[_DumpState(str(tmp_path))],
    )
    trainer.fit(model, _loader(length=16, batch=2))  # 4 batches per rank
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert int(states[0]["generator_steps"]) == 4
    assert float(states[0]["augment.p"]) != 0.3
    rank_local = ("val_features", "pl_mean", "w_avg")
    for key, value in states[0].items():
        if any(part in key for part in rank_local):
            continue
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0, msg=key)
