"""The GAN LightningModule: step counting, penalties, sampling, EMA, training signal and DDP."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import medgen
import medgen.losses.adversarial as adversarial_losses
from medgen.callbacks import EMA
from medgen.data import PhantomDataset
from medgen.metrics import RandomConvFeatures, mmd_rbf
from medgen.models import GAN
from tests.helpers import cpu_trainer, cycled_loader, phantom_images


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nets(spatial_dims: int = 2, size: int = 16, critic: bool = False) -> dict:
    d_target = "medgen.nets.WGANCritic" if critic else "medgen.nets.DCGANDiscriminator"
    return {
        "generator": {
            "_target_": "medgen.nets.DCGANGenerator",
            "latent_dim": 8,
            "image_size": size,
            "channels": [16, 8],
        },
        "discriminator": {
            "_target_": d_target,
            "image_size": size,
            "channels": [8, 16],
            **({"norm": "layer"} if critic else {}),
        },
        "spatial_dims": spatial_dims,
    }


def _phantoms(spatial_dims: int, size: int) -> tuple[torch.Tensor, ...]:
    return phantom_images(spatial_dims, size, 32)


def _loader(spatial_dims: int = 2, size: int = 16, length: int = 8, batch: int = 4):
    return cycled_loader(_phantoms(spatial_dims, size), length, batch)


@pytest.mark.parametrize("n_critic", [1, 3])
def test_discriminator_and_generator_steps_follow_n_critic(n_critic):
    model = GAN(**_nets(), n_critic=n_critic)
    batches = 7
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=0)
    trainer.fit(model, _loader(length=4 * batches))
    assert int(model.discriminator_steps) == batches
    assert int(model.generator_steps) == batches // n_critic
    # Lightning's global_step counts the steps of both optimisers.
    assert trainer.global_step == batches + batches // n_critic


def test_lazy_r1_runs_every_interval(monkeypatch):
    calls = []
    original = adversarial_losses.r1_penalty

    def counting(logits, real, create_graph=True):
        calls.append(1)
        return original(logits, real, create_graph)

    monkeypatch.setattr(adversarial_losses, "r1_penalty", counting)
    model = GAN(**_nets(critic=True), r1_gamma=1.0, r1_interval=4)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=9, limit_val_batches=0)
    trainer.fit(model, _loader(length=36))
    assert len(calls) == 3  # discriminator steps 0, 4 and 8


def test_penalties_refuse_batch_norm_discriminators_and_bad_settings():
    with pytest.raises(ValueError, match="without batch norm"):
        GAN(**_nets(), gp_weight=10.0)
    with pytest.raises(ValueError, match="without batch norm"):
        GAN(**_nets(), r1_gamma=1.0)
    with pytest.raises(ValueError, match="n_critic"):
        GAN(**_nets(), n_critic=0)
    with pytest.raises(ValueError, match="unknown adv_loss 'bce'"):
        GAN(**_nets(), adv_loss="bce")
    with pytest.raises(ValueError, match="unknown adv_loss"), pytest.deprecated_call():
        GAN(**_nets(), loss="bce")  # the old key still reaches the same check
    bad = _nets()
    bad["generator"]["spatial_dims"] = 3
    with pytest.raises(ValueError, match="spatial_dims"):
        GAN(**bad)


def test_wrong_image_size_is_named():
    model = GAN(**_nets(size=16))
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"shape \(4, 1, 32, 32\).*image_size"):
        trainer.fit(model, _loader(size=32))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_sample_shapes_units_and_seeds(spatial_dims):
    model = GAN(**_nets(spatial_dims, size=8), value_range=(-1000.0, 1000.0))
    a, b = model.sample(3, seed=5), model.sample(3, seed=5)
    assert a.shape == (3, 1, *(8,) * spatial_dims)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, model.sample(3, seed=6))
    assert a.min() >= -1000.0 and a.max() <= 1000.0  # tanh output mapped to data units
    assert model.generator.training  # sampling restores the mode
    x = torch.linspace(-1000, 1000, 5)
    torch.testing.assert_close(model.to_net(x), torch.linspace(-1, 1, 5))
    torch.testing.assert_close(model.to_data(model.to_net(x)), x)


@pytest.mark.parametrize("loss", ["non_saturating", "lsgan", "hinge", "wgan"])
def test_every_loss_trains_a_step_in_3d(loss):
    critic = loss == "wgan"
    model = GAN(**_nets(3, size=8, critic=critic), loss=loss, gp_weight=10.0 if critic else 0.0)
    before = [p.detach().clone() for p in model.generator.parameters()]
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, _loader(3, size=8))
    after = list(model.generator.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(before, after, strict=True))


class RecordingEMA(EMA):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.updated_at: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        before = self._last_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._last_step != before:
            self.updated_at.append(self._last_step)


def test_ema_averages_once_per_generator_step():
    ema = RecordingEMA(attribute="generator", decay=0.5)
    model = GAN(**_nets(), n_critic=3)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=7, limit_val_batches=0, callbacks=[ema])
    trainer.fit(model, _loader(length=28))
    assert ema.updated_at == [0, 1, 2]


def test_training_brings_samples_towards_the_data():
    """On phantom slices, 150 DCGAN steps move samples' features towards the real ones."""
    torch.manual_seed(0)
    size = 16
    model = GAN(
        **_nets(size=size),
        optimizer_g={"_target_": "torch.optim.Adam", "lr": 1e-3, "betas": [0.5, 0.999]},
        optimizer_d={"_target_": "torch.optim.Adam", "lr": 1e-3, "betas": [0.5, 0.999]},
    )
    real = torch.stack(
        [d["image"] for d in PhantomDataset(spatial_dims=2, size=size, length=64, offset=500)]
    )
    features = RandomConvFeatures(2, width=8)

    def distance() -> float:
        f_real = features(model.to_net(real)).double()
        f_fake = features(model.to_net(model.sample(64, seed=0))).double()
        return mmd_rbf(f_real, f_fake, sigma=float(torch.pdist(f_real).median()))

    initial = distance()
    trainer = cpu_trainer(max_steps=300, limit_val_batches=0)  # 150 D + 150 G steps
    trainer.fit(model, _loader(length=1200, batch=8))
    assert int(model.generator_steps) == 150
    final = distance()
    assert final < 0.5 * initial, (initial, final)


# ------------------------------------------------------------------------------------------------
# DDP on two CPU processes
# ------------------------------------------------------------------------------------------------
class DumpWeights(L.Callback):
    """Write each rank's generator and discriminator weights at the end of training."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def test_ddp_spawn_keeps_weights_identical_across_ranks(tmp_path):
    # n_critic=2: in discriminator-only steps the generator gets no gradient, the classic
    # "unused parameters" failure of DDP unless the module handles it.
    model = GAN(**_nets(critic=True), loss="wgan", gp_weight=10.0, n_critic=2)
    trainer = cpu_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[DumpWeights(str(tmp_path))],
    )
    trainer.fit(model, _loader(length=16, batch=2))  # 4 batches per rank
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert int(states[0]["discriminator_steps"]) == 4
    assert int(states[0]["generator_steps"]) == 2
    # Parameters (and the step counters) are identical. Batch-norm running statistics are not
    # synchronised by DDP beyond broadcasting rank 0's at each forward, so they may differ by the
    # last step's update; checkpoints and exports come from rank 0.
    names = [k for k, _ in model.named_parameters()] + ["generator_steps", "discriminator_steps"]
    for key in names:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, msg=key)
    # Training did change the generator.
    assert any(
        not torch.equal(states[0][k], v)
        for k, v in GAN(**_nets(critic=True)).state_dict().items()
        if k.startswith("generator.")
    )


def test_experiments_export_a_generator_that_samples(tmp_path):
    from tests.conftest import tiny_overrides

    cfg = medgen.compose("train", tiny_overrides(tmp_path, "wgan_gp"))
    assert cfg.model.adv_loss == "wgan" and cfg.model.n_critic == 5
    result = medgen.train(cfg)
    assert "val/mmd" in result["metrics"]
    exported = medgen.load(tmp_path / "model")
    assert isinstance(exported, GAN)
    assert exported.sample(2, seed=0).shape == (2, 1, 64, 64)
    assert len(result["samples"]) == 2
