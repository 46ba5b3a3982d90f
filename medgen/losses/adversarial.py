"""Adversarial losses and discriminator regularisers, for 2D and 3D GANs.

Each loss is written as in its paper; logits are raw discriminator outputs of any shape (one per
sample, or one per patch for PatchGANs), and every loss is a mean over all logits.

- ``"non_saturating"`` (alias ``"vanilla"``): Goodfellow et al., "Generative Adversarial Nets",
  NeurIPS 2014 — the discriminator minimises binary cross-entropy, the generator maximises
  ``log D(G(z))`` instead of minimising ``log(1 - D(G(z)))`` (their section 3), which is BCE with
  the "real" label. pix2pix's ``vanilla`` mode is exactly this.
- ``"lsgan"``: Mao et al., "Least Squares Generative Adversarial Networks", ICCV 2017, with the
  0-1 coding (their eq. 9 with a=0, b=c=1): ``D: ½(D(x)-1)² + ½D(G(z))²``, ``G: ½(D(G(z))-1)²``.
  We drop the ½ to match pix2pix/CycleGAN (``MSELoss``), which scale it in the caller.
- ``"hinge"``: Lim & Ye, "Geometric GAN", 2017; Miyato et al., "Spectral Normalization for GANs",
  ICLR 2018: ``D: relu(1 - D(x)) + relu(1 + D(G(z)))``, ``G: -D(G(z))``.
- ``"wgan"``: Arjovsky et al., "Wasserstein GAN", ICML 2017: ``D: D(G(z)) - D(x)``,
  ``G: -D(G(z))``; use it with :func:`gradient_penalty` (Gulrajani et al., "Improved Training of
  Wasserstein GANs", NeurIPS 2017) — WGAN-GP.

Regularisers: :func:`gradient_penalty` (WGAN-GP, per-sample gradient norm), :func:`r1_penalty`
(Mescheder et al., "Which Training Methods for GANs do actually Converge?", ICML 2018) and
:func:`path_length_penalty` (StyleGAN2's path-length regularisation of the generator).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GAN_LOSSES = ("non_saturating", "vanilla", "lsgan", "hinge", "wgan")
#: The one vocabulary of ``adv_loss`` across medgen's adversarial families.
ADV_LOSSES = ("non_saturating", "lsgan", "hinge", "wgan")
#: Older names (pix2pix/CycleGAN's ``gan_mode`` values), accepted with a deprecation warning.
LEGACY_ADV_LOSSES = {"vanilla": "non_saturating", "wgangp": "wgan"}


def resolve_adv_loss(
    adv_loss: str | None, legacy: str | None = None, legacy_key: str = "loss"
) -> str:
    """The ``adv_loss`` of a model, from the new key or a deprecated one.

    Args:
        adv_loss: The value of ``adv_loss`` (one of :data:`ADV_LOSSES`, or an old name).
        legacy: The value of a deprecated key (``loss`` of GAN, ``gan_mode`` of pix2pix and
            CycleGAN); when given it wins, with a :class:`DeprecationWarning`, so that an old
            command line (``model.gan_mode=lsgan``) keeps its meaning.
        legacy_key: The deprecated key's name, for the warning.

    Returns:
        One of :data:`ADV_LOSSES`.
    """
    if legacy is not None:
        warnings.warn(
            f"'{legacy_key}' is deprecated; use adv_loss (one of {', '.join(ADV_LOSSES)})",
            DeprecationWarning,
            stacklevel=3,
        )
        adv_loss = legacy
    adv_loss = adv_loss or "non_saturating"
    if adv_loss in LEGACY_ADV_LOSSES:
        new = LEGACY_ADV_LOSSES[adv_loss]
        warnings.warn(
            f"adv_loss={adv_loss!r} is an old name; use {new!r}", DeprecationWarning, stacklevel=3
        )
        adv_loss = new
    if adv_loss not in ADV_LOSSES:
        raise ValueError(
            f"unknown adv_loss {adv_loss!r}; choose one of {', '.join(ADV_LOSSES)} (old names: "
            f"{', '.join(LEGACY_ADV_LOSSES)})"
        )
    return adv_loss


def check_gan_loss(mode: str) -> str:
    """Return ``mode`` if it names a GAN loss (see :data:`GAN_LOSSES`), else raise ValueError."""
    if mode not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {mode!r}; choose one of {', '.join(GAN_LOSSES)}")
    return mode


def adversarial_loss(
    logits: Tensor, target_is_real: bool, mode: str, for_discriminator: bool = True
) -> Tensor:
    """The loss of one set of logits against the label "real" or "fake".

    This is pix2pix's ``GANLoss(prediction, target_is_real)`` generalised to the hinge and
    Wasserstein losses, whose discriminator and generator terms differ in form: for those two,
    ``for_discriminator`` selects ``relu(1 ∓ D)`` / ``∓D`` (discriminator) or ``-D``
    (generator, ``target_is_real=True``).

    Args:
        logits: Raw discriminator outputs, any shape.
        target_is_real: Whether the logits should be judged real.
        mode: One of :data:`GAN_LOSSES`.
        for_discriminator: The discriminator's loss (True) or the generator's (False).

    Returns:
        Scalar, the mean over all logits (computed in float32).
    """
    check_gan_loss(mode)
    logits = logits.float()
    if mode in ("non_saturating", "vanilla"):
        # BCE-with-logits: -log sigmoid(l) = softplus(-l) for "real", softplus(l) for "fake".
        return F.softplus(-logits if target_is_real else logits).mean()
    if mode == "lsgan":
        return (logits - (1.0 if target_is_real else 0.0)).square().mean()
    if not for_discriminator:
        if not target_is_real:
            raise ValueError(f"the {mode} generator loss is defined for target_is_real=True only")
        return -logits.mean()
    if mode == "hinge":
        return F.relu(1.0 - logits if target_is_real else 1.0 + logits).mean()
    return -logits.mean() if target_is_real else logits.mean()  # wgan


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, mode: str) -> Tensor:
    """Discriminator (critic) loss: the "real" term on real logits plus the "fake" term on fakes."""
    return adversarial_loss(real_logits, True, mode) + adversarial_loss(fake_logits, False, mode)


def generator_loss(fake_logits: Tensor, mode: str) -> Tensor:
    """Generator loss on the discriminator's logits for generated images."""
    return adversarial_loss(fake_logits, True, mode, for_discriminator=False)


def _per_sample_grad_norm_sq(outputs: Tensor, inputs: Tensor, create_graph: bool) -> Tensor:
    """``|d sum(outputs) / d inputs|²`` per sample: ``(B,)``.

    Summing the outputs before differentiating gives each sample's own gradient, because the
    discriminator treats the samples of a batch independently (no batch norm, see the nets).
    """
    (grad,) = torch.autograd.grad(
        outputs.float().sum(), inputs, create_graph=create_graph, only_inputs=True
    )
    return grad.float().flatten(1).square().sum(dim=1)


def gradient_penalty(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    center: float = 1.0,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
) -> Tensor:
    """WGAN-GP penalty ``E[(‖∇D(x̂)‖₂ - center)²]`` (Gulrajani et al. 2017, eq. 3).

    ``x̂ = ε x + (1 - ε) G(z)`` with one ``ε ~ U[0, 1]`` **per sample**, and the norm taken over
    each sample's own gradient (all of its channels and voxels), then averaged over the batch.
    (Taking one norm over the whole batch's gradient, as some libraries do, penalises the
    batch's joint gradient, which is ``sqrt(B)`` times a per-sample norm near 1: wrong by design.)

    Args:
        critic: Maps ``(B, C, *spatial)`` to logits of any shape with batch first (wrap a
            conditional critic with its condition, e.g. ``lambda x: D(torch.cat([cond, x], 1))``).
        real: Real images ``(B, C, *spatial)``.
        fake: Generated images of the same shape (detached or not; only their values are used).
        center: Target norm (1 in the paper; 0 gives the zero-centred variant).
        generator: Optional ``torch.Generator`` for ``ε`` (on the images' device).
        create_graph: Keep the graph so the penalty can be back-propagated (training).

    Returns:
        Scalar penalty (float32); multiply by λ (10 in the paper) in the caller.
    """
    if real.shape != fake.shape:
        raise ValueError(
            f"real and fake must have the same shape, got {tuple(real.shape)} and "
            f"{tuple(fake.shape)}"
        )
    shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    eps = torch.rand(shape, generator=generator, device=real.device, dtype=real.dtype)
    mixed = torch.lerp(fake.detach(), real.detach(), eps).requires_grad_(True)
    norms = _per_sample_grad_norm_sq(critic(mixed), mixed, create_graph).add(1e-12).sqrt()
    return (norms - center).square().mean()


def r1_penalty(real_logits: Tensor, real: Tensor, create_graph: bool = True) -> Tensor:
    """R1 penalty ``E[‖∇ₓD(x)‖²]`` on real data (Mescheder et al. 2018, eq. 9, without γ/2).

    Args:
        real_logits: ``D(real)``, computed from ``real`` with ``real.requires_grad_(True)``.
        real: The real images ``(B, C, *spatial)``.
        create_graph: Keep the graph so the penalty can be back-propagated.

    Returns:
        Scalar: the mean over samples of each sample's squared gradient norm. The full
        regulariser is ``gamma / 2 * r1_penalty(...)``; with lazy regularisation every ``k``
        discriminator steps (Karras et al., StyleGAN2, CVPR 2020, section 4) it is also multiplied
        by ``k``.
    """
    if not real.requires_grad:
        raise ValueError("r1_penalty needs real.requires_grad_(True) before computing D(real)")
    return _per_sample_grad_norm_sq(real_logits, real, create_graph).mean()


def path_length_penalty(
    images: Tensor,
    ws: Tensor,
    pl_mean: Tensor,
    decay: float = 0.01,
    noise: Tensor | None = None,
    create_graph: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """StyleGAN2's path-length regulariser (Karras et al., CVPR 2020, section 3.2, eq. 4).

    ``E_{w, y}[(‖J_wᵀ y‖₂ - a)²]`` with ``y ~ N(0, I) / sqrt(number of pixels)`` (so the lengths do
    not depend on the image size) and ``a`` the moving average of the lengths. The Jacobian-vector
    product is one backward pass of ``sum(images * y)`` to ``ws``; a sample's length is
    ``sqrt(mean over layers of |grad_l|²)``, as in the paper's implementation for per-layer ``w``.

    Args:
        images: Generated images ``(B, C, *spatial)``, computed from ``ws`` with graph.
        ws: The per-layer latents ``(B, num_ws, w_dim)`` (or ``(B, w_dim)``) they came from.
        pl_mean: The current moving average ``a`` (a scalar tensor; not modified).
        decay: Weight of this batch's mean length in the new average.
        noise: ``y`` before scaling (default: drawn from ``N(0, I)``), ``images``' shape.
        create_graph: Keep the graph so the penalty can be back-propagated.

    Returns:
        ``(penalty, lengths, new_mean)``: the mean over samples of ``(length - new_mean)²``,
        the per-sample lengths ``(B,)`` and the updated average (detached). Multiply the penalty
        by the weight (2 in StyleGAN2) and, when lazy, by the interval.
    """
    if noise is None:
        noise = torch.randn_like(images)
    noise = noise / math.sqrt(math.prod(images.shape[2:]))
    (grad,) = torch.autograd.grad(
        (images.float() * noise.float()).sum(), ws, create_graph=create_graph, only_inputs=True
    )
    grad = grad.float().reshape(grad.shape[0], -1, grad.shape[-1])
    lengths = grad.square().sum(dim=2).mean(dim=1).sqrt()
    new_mean = pl_mean.float().lerp(lengths.mean().detach(), decay)
    penalty = (lengths - new_mean).square().mean()
    return penalty, lengths, new_mean


def has_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` contains a batch-norm layer (which couples the samples of a batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@dataclass(frozen=True)
class AdversarialObjective:
    """The losses of one generator/discriminator pair: the only place they are written.

    Discriminator loss: ``d_scale * (loss(D(real), real) + loss(D(fake), fake))``, plus
    ``gp_weight * gradient_penalty`` (per-sample norms, WGAN-GP) and
    ``r1_gamma / 2 * r1_interval * R1`` every ``r1_interval`` discriminator steps (lazy R1,
    Karras et al. 2020, section 4). ``d_scale`` is 1 for the GANs (Goodfellow et al.) and 0.5 for
    pix2pix, CycleGAN and the autoencoders' patch discriminators (as their papers' code, which
    halves the discriminator's objective to slow it relative to the generator).
    Generator loss: ``loss(D(fake), real)`` in the generator form (non-saturating; ``-D`` for
    hinge and WGAN).

    Args:
        adv_loss: One of :data:`ADV_LOSSES`.
        gp_weight: WGAN-GP weight (0 = off).
        r1_gamma: R1 weight (0 = off).
        r1_interval: Lazy R1 interval in discriminator steps.
        n_critic: Discriminator steps per generator step.
        d_scale: Factor of the discriminator's real + fake terms.
    """

    adv_loss: str = "non_saturating"
    gp_weight: float = 0.0
    r1_gamma: float = 0.0
    r1_interval: int = 1
    n_critic: int = 1
    d_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.adv_loss not in ADV_LOSSES:
            raise ValueError(f"unknown adv_loss {self.adv_loss!r}; choose one of {ADV_LOSSES}")
        if self.n_critic < 1 or self.r1_interval < 1:
            raise ValueError(
                f"n_critic and r1_interval must be >= 1, got {self.n_critic} and {self.r1_interval}"
            )
        if self.gp_weight < 0 or self.r1_gamma < 0:
            raise ValueError(
                f"gp_weight and r1_gamma must be >= 0, got {self.gp_weight}, {self.r1_gamma}"
            )

    def check_discriminator(self, discriminator: nn.Module) -> None:
        """Refuse batch norm in ``discriminator`` when a per-sample penalty is on."""
        if (self.gp_weight > 0 or self.r1_gamma > 0) and has_batch_norm(discriminator):
            raise ValueError(
                "gradient penalties (gp_weight, r1_gamma) are per-sample and need a "
                "discriminator without batch norm (batch statistics couple the samples); use "
                "medgen.nets.WGANCritic or norm: none/layer/instance"
            )

    def discriminator_terms(
        self,
        discriminator: Callable[[Tensor], Tensor],
        real: Tensor,
        fake: Tensor,
        step: int = 0,
    ) -> dict[str, Tensor]:
        """Loss terms ``d_real``, ``d_fake`` (and ``gp``, ``r1``) and the total ``d_loss``.

        Args:
            discriminator: Images to logits (wrap a conditional one, e.g. pix2pix's pairs are
                passed concatenated as ``real`` and ``fake``).
            real: Real images.
            fake: Generated images (detached here).
            step: This pair's discriminator step count, for lazy R1.
        """
        do_r1 = self.r1_gamma > 0 and step % self.r1_interval == 0
        if do_r1:
            real = real.detach().requires_grad_(True)
        real_logits = discriminator(real)
        fake_logits = discriminator(fake.detach())
        terms = {
            "d_real": adversarial_loss(real_logits, True, self.adv_loss),
            "d_fake": adversarial_loss(fake_logits, False, self.adv_loss),
        }
        total = self.d_scale * (terms["d_real"] + terms["d_fake"])
        if self.gp_weight > 0:
            terms["gp"] = gradient_penalty(discriminator, real, fake)
            total = total + self.gp_weight * terms["gp"]
        if do_r1:
            terms["r1"] = r1_penalty(real_logits, real)
            total = total + (0.5 * self.r1_gamma * self.r1_interval) * terms["r1"]
        terms["d_loss"] = total
        return terms

    def generator_loss(self, discriminator: Callable[[Tensor], Tensor], fake: Tensor) -> Tensor:
        """Generator loss for generated images ``fake`` (with graph)."""
        return self.generator_term(discriminator(fake))

    def generator_term(self, fake_logits: Tensor) -> Tensor:
        """Generator loss on the discriminator's logits for generated images."""
        return adversarial_loss(fake_logits, True, self.adv_loss, for_discriminator=False)


__all__ = [
    "ADV_LOSSES",
    "LEGACY_ADV_LOSSES",
    "AdversarialObjective",
    "GAN_LOSSES",
    "has_batch_norm",
    "resolve_adv_loss",
    "adversarial_loss",
    "check_gan_loss",
    "discriminator_loss",
    "generator_loss",
    "gradient_penalty",
    "path_length_penalty",
    "r1_penalty",
]
