"""Adversarial losses and gradient penalties against their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medgen.losses.adversarial import (
    GAN_LOSSES,
    adversarial_loss,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    r1_penalty,
)


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, generator=g) * 2, torch.randn(6, 1, generator=g) * 2


def test_non_saturating_is_binary_cross_entropy():
    real, fake = _logits()
    expected = F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    torch.testing.assert_close(discriminator_loss(real, fake, "non_saturating"), expected)
    # The generator maximises log D(G(z)): -mean(log sigmoid(fake)).
    torch.testing.assert_close(
        generator_loss(fake, "vanilla"), -torch.log(torch.sigmoid(fake)).mean()
    )


def test_lsgan_hinge_wgan_formulas():
    real, fake = _logits()
    torch.testing.assert_close(
        discriminator_loss(real, fake, "lsgan"), ((real - 1) ** 2).mean() + (fake**2).mean()
    )
    torch.testing.assert_close(generator_loss(fake, "lsgan"), ((fake - 1) ** 2).mean())
    torch.testing.assert_close(
        discriminator_loss(real, fake, "hinge"),
        torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean(),
    )
    torch.testing.assert_close(generator_loss(fake, "hinge"), -fake.mean())
    torch.testing.assert_close(discriminator_loss(real, fake, "wgan"), fake.mean() - real.mean())
    torch.testing.assert_close(generator_loss(fake, "wgan"), -fake.mean())


def test_patch_logits_are_averaged_and_unknown_mode_is_named():
    logits = torch.zeros(2, 1, 4, 4)
    assert math.isclose(float(adversarial_loss(logits, True, "vanilla")), math.log(2), rel_tol=1e-6)
    with pytest.raises(ValueError, match="unknown GAN loss 'bce'.*non_saturating"):
        adversarial_loss(logits, True, "bce")
    with pytest.raises(ValueError, match="target_is_real=True only"):
        adversarial_loss(logits, False, "hinge", for_discriminator=False)
    assert set(GAN_LOSSES) >= {"non_saturating", "lsgan", "hinge", "wgan"}


class Quadratic(torch.nn.Module):
    """``D(x) = sum(w * x²)`` per sample: ``∇D(x) = 2 w x``, known in closed form."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.rand(shape, generator=torch.Generator().manual_seed(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x.square()).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("spatial", [(5, 5), (3, 4, 4)], ids=["2d", "3d"])
def test_gradient_penalty_is_per_sample(spatial):
    g = torch.Generator().manual_seed(1)
    real = torch.randn(4, 2, *spatial, generator=g)
    fake = torch.randn(4, 2, *spatial, generator=g)
    critic = Quadratic((2, *spatial))

    gp = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(7))

    eps = torch.rand((4,) + (1,) * (real.ndim - 1), generator=torch.Generator().manual_seed(7))
    mixed = eps * real + (1 - eps) * fake
    grads = 2 * critic.w.detach() * mixed  # per-sample gradient of D at x̂
    per_sample = grads.flatten(1).norm(dim=1)
    torch.testing.assert_close(gp, ((per_sample - 1) ** 2).mean())
    # torchgan-style: one norm over the whole batch's gradient is a different (wrong) quantity.
    whole_batch = (grads.flatten().norm() - 1) ** 2
    assert not torch.allclose(gp, whole_batch, rtol=0.05)


def test_gradient_penalty_backpropagates_to_the_critic():
    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    critic = Quadratic((1, 4, 4))
    gradient_penalty(critic, real, fake).backward()
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        gradient_penalty(critic, real, fake[:2])


def test_r1_matches_its_formula():
    real = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    critic = Quadratic((1, 6, 6))
    x = real.clone().requires_grad_(True)
    r1 = r1_penalty(critic(x), x)
    expected = (2 * critic.w.detach() * real).flatten(1).square().sum(1).mean()
    torch.testing.assert_close(r1, expected)
    r1.backward()
    assert critic.w.grad is not None
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(critic(real), real)
