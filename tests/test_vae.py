"""The VAE family: shapes in 2D/3D, the loss formula, KL warm-up, learning on phantoms, sampling."""

from __future__ import annotations

import pytest
import torch

from medgen.data import PhantomDataset
from medgen.models import VAE

STEPS = 400
TINY = {"channels": [8, 16], "norm_num_groups": 4, "latent_channels": 2}


@pytest.mark.parametrize(
    ("spatial_dims", "size", "latent_dim", "latent_shape"),
    [
        (2, 16, None, (2, 8, 8)),
        (2, 16, 6, (6,)),
        (3, 8, None, (2, 4, 4, 4)),
        (3, 8, 5, (5,)),
    ],
)
def test_shapes(spatial_dims, size, latent_dim, latent_shape):
    model = VAE(
        net={**TINY, "latent_dim": latent_dim, "image_size": size}, spatial_dims=spatial_dims
    )
    x = torch.rand(2, 1, *(size,) * spatial_dims)
    assert model.encode(x).shape == (2, *latent_shape)
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(3, seed=0).shape == (3, 1, *(size,) * spatial_dims)
    terms = model.loss(x)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])


def test_loss_is_recon_plus_weighted_normalised_kl():
    torch.manual_seed(0)
    model = VAE(net={**TINY, "image_size": 16}, beta=0.5, kl_warmup_steps=0)
    x = torch.rand(2, 1, 16, 16)
    torch.manual_seed(1)
    terms = model.loss(x)
    torch.manual_seed(1)
    recon_x, posterior = model.net(x)
    expected_kl = posterior.kl().mean() / (16 * 16)
    expected = (recon_x - x).abs().mean() + 0.5 * expected_kl
    torch.testing.assert_close(terms["kl"], expected_kl)
    torch.testing.assert_close(terms["loss"], expected)


def test_kl_warmup_is_linear():
    model = VAE(net={**TINY, "image_size": 16}, beta=2.0, kl_warmup_steps=100)
    assert model.current_beta(0) == 0.0
    assert model.current_beta(25) == pytest.approx(0.5)
    assert model.current_beta(100) == 2.0
    assert model.current_beta(1000) == 2.0


def test_sampling_is_deterministic_per_seed():
    model = VAE(net={**TINY, "latent_dim": 4, "image_size": 16}).eval()
    state = torch.get_rng_state()
    a, b, c = model.sample(4, seed=11), model.sample(4, seed=11), model.sample(4, seed=12)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), state), "sampling must not touch the global RNG"
    # the noise does not depend on batching (only float rounding of the decoder may)
    torch.testing.assert_close(model.sample(4, seed=11, batch_size=3), a, rtol=1e-5, atol=1e-5)


def test_loss_falls_on_phantoms():
    """A small VAE learns phantom anatomy: its reconstructions beat the best constant image."""
    torch.manual_seed(0)
    data = PhantomDataset(spatial_dims=2, size=32, length=64)
    images = torch.stack([data[i]["image"] for i in range(64)])
    val = PhantomDataset(spatial_dims=2, size=32, length=16, offset=1000)
    val_images = torch.stack([val[i]["image"] for i in range(16)])
    model = VAE(
        net={
            "channels": [8, 16, 32],
            "norm_num_groups": 4,
            "latent_channels": 4,
            "image_size": 32,
            "init_logvar": -4.0,
        },
        beta=0.01,
        kl_warmup_steps=50,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(STEPS):
        x = images[torch.randint(0, 64, (8,))]
        loss = model.loss(x, step=step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    # on unseen subjects, reconstructions beat the best constant image (the training mean)
    model.eval()
    recon_err = (model.reconstruct(val_images) - val_images).abs().mean()
    mean_err = (images.mean(0, keepdim=True) - val_images).abs().mean()
    assert recon_err < 0.95 * mean_err, (recon_err, mean_err)


def test_bad_arguments():
    with pytest.raises(ValueError, match="recon_loss"):
        VAE(net=TINY, recon_loss="l3")
    with pytest.raises(ValueError, match="spatial_dims"):
        VAE(net=TINY, spatial_dims=4)
    with pytest.raises(ValueError, match="image_size"):
        VAE(net={**TINY, "latent_dim": 4})
    with pytest.raises(ValueError, match="divisible"):
        VAE(net={**TINY, "latent_dim": 4, "image_size": 15})
