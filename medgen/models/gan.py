"""Unconditional GANs (2D/3D) with manual optimisation: DCGAN, WGAN-GP, hinge, LSGAN, R1.

Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014; Radford et al., "Unsupervised
Representation Learning with Deep Convolutional GANs" (DCGAN), ICLR 2016; Gulrajani et al.,
"Improved Training of Wasserstein GANs" (WGAN-GP, Algorithm 1: ``n_critic`` critic steps per
generator step), NeurIPS 2017; Mescheder et al., "Which Training Methods for GANs do actually
Converge?" (R1), ICML 2018; Karras et al., "Analyzing and Improving the Image Quality of StyleGAN"
(lazy regularisation), CVPR 2020; Karras et al., "Progressive Growing of GANs" (generator EMA),
ICLR 2018.

The losses live in :mod:`medgen.losses.adversarial`; this module owns only the optimisation loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from medgen.losses.adversarial import (
    adversarial_loss,
    check_gan_loss,
    gradient_penalty,
    r1_penalty,
)
from medgen.metrics.fidelity import RandomConvFeatures, mmd_rbf
from medgen.models.base import GenerativeModule, seeded_generator
from medgen.utils.instantiate import instantiate

log = logging.getLogger(__name__)

DEFAULT_GENERATOR: dict[str, Any] = {"_target_": "medgen.nets.DCGANGenerator"}
DEFAULT_DISCRIMINATOR: dict[str, Any] = {"_target_": "medgen.nets.DCGANDiscriminator"}
# DCGAN (Radford et al. 2016, section 4): Adam, lr 2e-4, beta1 0.5.
DEFAULT_GAN_OPTIMIZER: dict[str, Any] = {
    "_target_": "torch.optim.Adam",
    "lr": 2e-4,
    "betas": [0.5, 0.999],
}


def build_net(config: Mapping[str, Any], spatial_dims: int, what: str) -> nn.Module:
    """Instantiate a net config (``_target_`` + kwargs) with ``spatial_dims`` filled in."""
    config = dict(config)
    if "_target_" not in config:
        raise ValueError(f"the {what} config needs a _target_ (e.g. medgen.nets.DCGANGenerator)")
    config.setdefault("spatial_dims", spatial_dims)
    if config["spatial_dims"] != spatial_dims:
        raise ValueError(
            f"{what}.spatial_dims={config['spatial_dims']} differs from the model's "
            f"spatial_dims={spatial_dims}"
        )
    return instantiate(config)


def has_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` contains a batch-norm layer (which couples the samples of a batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@dataclass(frozen=True)
class AdversarialObjective:
    """The losses of one generator/discriminator pair (see :mod:`medgen.losses.adversarial`).

    Discriminator loss: ``loss(D(x), real) + loss(D(G(z)), fake)``, plus
    ``gp_weight * gradient_penalty`` (per-sample norms, WGAN-GP) and
    ``r1_gamma / 2 * r1_interval * R1`` every ``r1_interval`` discriminator steps (lazy R1).
    Generator loss: ``loss(D(G(z)), real)`` in the generator form (non-saturating, ``-D`` for
    hinge and WGAN).
    """

    loss: str = "non_saturating"
    gp_weight: float = 0.0
    r1_gamma: float = 0.0
    r1_interval: int = 1
    n_critic: int = 1

    def __post_init__(self) -> None:
        check_gan_loss(self.loss)
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
        self, discriminator: nn.Module, real: Tensor, fake: Tensor, step: int
    ) -> dict[str, Tensor]:
        """Loss terms (``d_real``, ``d_fake``, ``gp``, ``r1``, total ``d_loss``) at D step ``step``."""
        do_r1 = self.r1_gamma > 0 and step % self.r1_interval == 0
        if do_r1:
            real = real.detach().requires_grad_(True)
        real_logits = discriminator(real)
        fake_logits = discriminator(fake.detach())
        terms = {
            "d_real": adversarial_loss(real_logits, True, self.loss),
            "d_fake": adversarial_loss(fake_logits, False, self.loss),
        }
        total = terms["d_real"] + terms["d_fake"]
        if self.gp_weight > 0:
            terms["gp"] = gradient_penalty(discriminator, real, fake)
            total = total + self.gp_weight * terms["gp"]
        if do_r1:
            terms["r1"] = r1_penalty(real_logits, real)
            total = total + (0.5 * self.r1_gamma * self.r1_interval) * terms["r1"]
        terms["d_loss"] = total
        return terms

    def generator_loss(self, discriminator: nn.Module, fake: Tensor) -> Tensor:
        """Generator loss for generated images ``fake`` (with graph)."""
        return adversarial_loss(discriminator(fake), True, self.loss, for_discriminator=False)


def latent(num: int, latent_dim: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard-normal latents ``(num, latent_dim)`` on ``like``'s device and dtype."""
    return torch.randn((num, latent_dim), generator=generator, device=like.device, dtype=like.dtype)


class AdversarialModule(GenerativeModule):
    """What every GAN family shares: units, DDP set-up, per-rank latents, the pair update,
    validation MMD and per-epoch schedulers. Subclasses define the nets and
    :meth:`training_step` and :meth:`sample`.

    Images are mapped from ``value_range`` to [-1, 1] for the nets (the generators' ``tanh``
    range) and back to data units in :meth:`sample`.

    Under DDP (``trainer=ddp`` / ``ddp_cpu``), a generator receives no gradient in
    discriminator-only steps (``n_critic > 1``) and a discriminator none in generator steps;
    DistributedDataParallel then needs ``find_unused_parameters=True``, which :meth:`setup` sets
    on Lightning's DDP strategy before it wraps the model. Latents are drawn from a per-rank
    stream, so ranks do not generate the same images.
    """

    def __init__(
        self,
        spatial_dims: int,
        value_range: Sequence[float],
        optimizer: Mapping[str, Any] | None,
        scheduler: Mapping[str, Any] | None,
        spacing: Sequence[float] | None,
        image_key: str,
        val_features_width: int | None,
    ) -> None:
        super().__init__(spatial_dims, value_range, optimizer, scheduler, spacing)
        self.automatic_optimization = False
        self.image_key = image_key
        # The fixed random-conv features of ``val/mmd``; ``None`` for families that validate
        # otherwise (translation compares outputs with their targets).
        self.val_features = (
            RandomConvFeatures(spatial_dims, width=val_features_width)
            if val_features_width
            else None
        )
        self._val_real: list[Tensor] = []
        self._latent_rng: torch.Generator | None = None

    # ----------------------------------------------------------------- units
    def to_net(self, x: Tensor) -> Tensor:
        """Data units -> the nets' [-1, 1]."""
        low, high = self.value_range
        return (x - low) * (2.0 / (high - low)) - 1.0

    def to_data(self, y: Tensor) -> Tensor:
        """The nets' [-1, 1] -> data units."""
        low, high = self.value_range
        return (y + 1.0) * ((high - low) / 2.0) + low

    def check_images(self, x: Tensor, generator: nn.Module) -> None:
        """Raise a clear error when a batch does not have the generator's image size."""
        expected = tuple(getattr(generator, "image_size", x.shape[2:]))
        if x.ndim != self.spatial_dims + 2 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"batch '{self.image_key}' has shape {tuple(x.shape)}, but the generator makes "
                f"(B, C, *{expected}); set the generator's image_size to the data's size"
            )

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        strategy = getattr(self._trainer, "strategy", None) if self._trainer else None
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(ddp_kwargs, dict) and not ddp_kwargs.get("find_unused_parameters"):
            # Discriminator-only steps leave the generator without gradients (and vice versa).
            ddp_kwargs["find_unused_parameters"] = True
            log.info("%s: DDP set to find_unused_parameters=True", type(self).__name__)

    def on_fit_start(self) -> None:
        # One latent stream per rank, seeded from the run's seed, so ranks generate different
        # images.
        seed = torch.initial_seed() + 1_000_003 * self.global_rank
        self._latent_rng = torch.Generator(device=self.device).manual_seed(seed % 2**63)

    # ----------------------------------------------------------------- training
    def update_pair(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        objective: AdversarialObjective,
        opt_g,
        opt_d,
        real: Tensor,
        discriminator_step: int,
    ) -> dict[str, Tensor]:
        """One discriminator step, and a generator step when ``n_critic`` divides the new count.

        Args:
            real: Real images in net units.
            discriminator_step: Discriminator steps this pair has taken before this one.

        Returns:
            The detached loss terms; ``g_loss`` is present when the generator stepped.
        """
        batch_size = real.shape[0]
        with torch.no_grad():
            fake = generator(latent(batch_size, generator.latent_dim, self._latent_rng, real))
        terms = objective.discriminator_terms(discriminator, real, fake, discriminator_step)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(terms["d_loss"])
        opt_d.step()
        if (discriminator_step + 1) % objective.n_critic == 0:
            self.toggle_optimizer(opt_g)  # D needs no parameter gradients here
            z = latent(batch_size, generator.latent_dim, self._latent_rng, real)
            g_loss = objective.generator_loss(discriminator, generator(z))
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            opt_g.step()
            self.untoggle_optimizer(opt_g)
            terms["g_loss"] = g_loss
        return {k: v.detach() for k, v in terms.items()}

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        real = batch[self.image_key]
        self._val_real.append(self.val_features(self.to_net(real).float()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_real:
            return
        real = torch.cat(self._val_real)
        self._val_real.clear()
        if self.trainer.world_size > 1:
            real = self.all_gather(real).flatten(0, 1)
        fake = self.val_features(self.to_net(self.sample(len(real), seed=0)).to(real.device))
        if len(real) >= 2:
            real, fake = real.cpu().double(), fake.cpu().double()
            # Bandwidth from the real features alone, so values are comparable across epochs.
            sigma = float(torch.pdist(real).median()) or 1.0
            self.log("val/mmd", mmd_rbf(real, fake, sigma=sigma), prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def run_generator(
        self, generator: nn.Module, num_samples: int, seed: int | None, batch_size: int
    ) -> Tensor:
        """``num_samples`` images of ``generator`` in data units, on the CPU.

        Latents are drawn on the CPU from a generator seeded with ``seed``, so the same seed gives
        the same images on every device. The generator runs in eval mode (batch norm uses its
        running statistics); its mode is restored afterwards.
        """
        z = torch.randn((num_samples, generator.latent_dim), generator=seeded_generator(seed))
        was_training = generator.training
        generator.eval()
        try:
            return torch.cat(
                [
                    self.to_data(generator(chunk.to(self.device, self.dtype)).float()).cpu()
                    for chunk in z.split(batch_size)
                ]
            )
        finally:
            generator.train(was_training)


class GAN(AdversarialModule):
    """A generator ``G(z)`` and a discriminator/critic ``D(x)`` trained alternately.

    Every training batch is one discriminator step; after every ``n_critic`` discriminator steps
    the generator takes one step (WGAN-GP's Algorithm 1; ``n_critic=1`` alternates). The module
    keeps its own counters, :attr:`generator_steps` and :attr:`discriminator_steps` (Lightning's
    ``global_step`` counts the steps of both optimisers), and the EMA callback averages once per
    generator step. ``max_generator_steps`` stops training after that many generator steps.

    The losses are :class:`AdversarialObjective`'s. A penalty on gradients per sample is only
    meaningful when the discriminator treats samples independently, so a discriminator with
    batch norm is refused when either penalty is on. See :class:`AdversarialModule` for units and
    DDP.

    Args:
        generator: Net config of ``G`` (``_target_`` + kwargs; ``spatial_dims`` filled in). It
            must have a ``latent_dim`` attribute and map ``(B, latent_dim)`` to images.
        discriminator: Net config of ``D``: images to logits ``(B, ...)``. Spectral
            normalisation is a net option (``spectral_norm: true``).
        spatial_dims: 2 or 3.
        loss: ``"non_saturating"`` (``"vanilla"``), ``"lsgan"``, ``"hinge"`` or ``"wgan"``.
        gp_weight: WGAN-GP weight λ (10 in the paper; 0 = off).
        r1_gamma: R1 weight γ (0 = off).
        r1_interval: Lazy R1: compute it every this many discriminator steps.
        n_critic: Discriminator steps per generator step.
        optimizer_g: Optimiser config of the generator.
        optimizer_d: Optimiser config of the discriminator (default: the generator's).
        scheduler: Optional scheduler config, one instance per optimiser, stepped every epoch
            (``interval: step`` — after every generator step).
        max_generator_steps: Stop after this many generator steps (``None``: no limit).
        image_key: Key of the images in a batch dict.
        value_range: Data range ``(low, high)`` of the images.
        spacing: Voxel spacing of exported 3D samples.
        num_log_images: Samples per validation grid.
        val_features_width: Width of the fixed random-conv feature net used for ``val/mmd``.
    """

    export_modules = ("generator",)

    def __init__(
        self,
        generator: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        loss: str = "non_saturating",
        gp_weight: float = 0.0,
        r1_gamma: float = 0.0,
        r1_interval: int = 1,
        n_critic: int = 1,
        optimizer_g: Mapping[str, Any] | None = None,
        optimizer_d: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        max_generator_steps: int | None = None,
        image_key: str = "image",
        value_range: Sequence[float] = (0.0, 1.0),
        spacing: Sequence[float] | None = None,
        num_log_images: int = 16,
        val_features_width: int = 16,
    ) -> None:
        optimizer_g = dict(optimizer_g or DEFAULT_GAN_OPTIMIZER)
        super().__init__(
            spatial_dims,
            value_range,
            optimizer_g,
            scheduler,
            spacing,
            image_key,
            val_features_width,
        )
        self.save_hyperparameters()
        self.objective = AdversarialObjective(loss, gp_weight, r1_gamma, r1_interval, n_critic)
        self.generator = build_net(generator or DEFAULT_GENERATOR, spatial_dims, "generator")
        self.discriminator = build_net(
            discriminator or DEFAULT_DISCRIMINATOR, spatial_dims, "discriminator"
        )
        if not hasattr(self.generator, "latent_dim"):
            raise ValueError(
                f"the generator {type(self.generator).__name__} has no latent_dim attribute"
            )
        self.objective.check_discriminator(self.discriminator)
        self.latent_dim = int(self.generator.latent_dim)
        self.optimizer_d_config = dict(optimizer_d or optimizer_g)
        self.max_generator_steps = max_generator_steps
        self.num_log_images = num_log_images
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("discriminator_steps", torch.zeros((), dtype=torch.long))

    @property
    def ema_step(self) -> int:
        """Generator steps taken: the EMA callback averages once per generator step."""
        return int(self.generator_steps)

    def configure_optimizers(self):
        opt_g = self.build_optimizer(self.generator.parameters())
        opt_d = self.build_optimizer(self.discriminator.parameters(), self.optimizer_d_config)
        sched_g, sched_d = self.build_scheduler(opt_g), self.build_scheduler(opt_d)
        if sched_g is None:
            return [opt_g, opt_d]
        return [opt_g, opt_d], [sched_g, sched_d]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        real = batch[self.image_key]
        self.check_images(real, self.generator)
        opt_g, opt_d = self.optimizers()
        terms = self.update_pair(
            self.generator,
            self.discriminator,
            self.objective,
            opt_g,
            opt_d,
            self.to_net(real),
            int(self.discriminator_steps),
        )
        self.discriminator_steps += 1
        if "g_loss" in terms:
            self.generator_steps += 1
            self.log("train/g_loss", terms.pop("g_loss"), prog_bar=True)
            self.step_schedulers("step")
        self.log_dict({f"train/{k}": v for k, v in terms.items()})
        self.log("train/generator_steps", self.generator_steps.float())
        if self.max_generator_steps and int(self.generator_steps) >= self.max_generator_steps:
            self.trainer.should_stop = True

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.check_images(batch[self.image_key], self.generator)
        super().validation_step(batch, batch_idx)

    @torch.no_grad()
    def sample(self, num_samples: int, seed: int | None = None, batch_size: int = 64) -> Tensor:
        """Generate ``num_samples`` images ``(N, C, *spatial)`` in data units (seeded, eval mode)."""
        return self.run_generator(self.generator, num_samples, seed, batch_size)

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        real = batch[self.image_key][: self.num_log_images]
        return {"real": real, "samples": self.sample(self.num_log_images, seed=0)}
