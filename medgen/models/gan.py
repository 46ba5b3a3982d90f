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
from typing import Any

import torch
from torch import Tensor, nn

from medgen.losses.adversarial import AdversarialObjective, resolve_adv_loss
from medgen.metrics.fidelity import RandomConvFeatures, mmd_rbf
from medgen.models.adversarial import (
    DEFAULT_GAN_OPTIMIZER,
    AdversarialModule,
    build_net,
    zero_step_counter,
)
from medgen.models.base import seeded_generator

log = logging.getLogger(__name__)

DEFAULT_GENERATOR: dict[str, Any] = {"_target_": "medgen.nets.DCGANGenerator"}
DEFAULT_DISCRIMINATOR: dict[str, Any] = {"_target_": "medgen.nets.DCGANDiscriminator"}


def latent(num: int, latent_dim: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard-normal latents ``(num, latent_dim)`` on ``like``'s device and dtype."""
    return torch.randn((num, latent_dim), generator=generator, device=like.device, dtype=like.dtype)


class LatentGANModule(AdversarialModule):
    """What the unconditional GAN families (GAN, AGGrGAN) share on top of
    :class:`~medgen.models.adversarial.AdversarialModule`: per-rank latents, the pair update,
    validation MMD and seeded sampling. Subclasses define the nets, :meth:`training_step` and
    :meth:`sample`.

    Images are mapped from ``value_range`` to [-1, 1] for the nets (the generators' ``tanh``
    range) and back to data units in :meth:`sample`. Latents are drawn from a per-rank stream, so
    DDP ranks do not generate the same images.
    """

    def __init__(
        self,
        *,
        image_key: str,
        val_features_width: int | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_key = image_key
        # The fixed random-conv features of ``val/mmd``.
        self.val_features = (
            RandomConvFeatures(self.spatial_dims, width=val_features_width)
            if val_features_width
            else None
        )
        self._val_real: list[Tensor] = []
        self._latent_rng: torch.Generator | None = None

    # ----------------------------------------------------------------- checks
    def check_images(self, x: Tensor, generator: nn.Module) -> None:
        """Raise a clear error when a batch does not have the generator's image size."""
        expected = tuple(getattr(generator, "image_size", x.shape[2:]))
        if x.ndim != self.spatial_dims + 2 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"batch '{self.image_key}' has shape {tuple(x.shape)}, but the generator makes "
                f"(B, C, *{expected}); set the generator's image_size to the data's size"
            )

    # ----------------------------------------------------------------- set-up
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
        self.step_optimizer(opt_d, terms["d_loss"])
        if (discriminator_step + 1) % objective.n_critic == 0:
            z = latent(batch_size, generator.latent_dim, self._latent_rng, real)
            g_loss = objective.generator_loss(discriminator, generator(z))
            self.step_optimizer(opt_g, g_loss)  # D gets no parameter gradients here
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


class GAN(LatentGANModule):
    """A generator ``G(z)`` and a discriminator/critic ``D(x)`` trained alternately.

    Every training batch is one discriminator step; after every ``n_critic`` discriminator steps
    the generator takes one step (WGAN-GP's Algorithm 1; ``n_critic=1`` alternates). The module
    keeps its own counters, :attr:`generator_steps` and :attr:`discriminator_steps` (Lightning's
    ``global_step`` counts the steps of both optimisers), and the EMA callback averages once per
    generator step. ``max_generator_steps`` stops training after that many generator steps.

    The losses are :class:`AdversarialObjective`'s. A penalty on gradients per sample is only
    meaningful when the discriminator treats samples independently, so a discriminator with
    batch norm is refused when either penalty is on. See
    :class:`~medgen.models.adversarial.AdversarialModule` for units and DDP.

    Args:
        generator: Net config of ``G`` (``_target_`` + kwargs; ``spatial_dims`` filled in). It
            must have a ``latent_dim`` attribute and map ``(B, latent_dim)`` to images.
        discriminator: Net config of ``D``: images to logits ``(B, ...)``. Spectral
            normalisation is a net option (``spectral_norm: true``).
        spatial_dims: 2 or 3.
        adv_loss: ``"non_saturating"``, ``"lsgan"``, ``"hinge"`` or ``"wgan"``.
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
        loss: Deprecated name of ``adv_loss`` (wins when given, with a warning).
    """

    export_modules = ("generator",)

    def __init__(
        self,
        generator: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        adv_loss: str = "non_saturating",
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
        loss: str | None = None,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            value_range=value_range,
            optimizer_g=optimizer_g or DEFAULT_GAN_OPTIMIZER,
            optimizer_d=optimizer_d,
            scheduler=scheduler,
            spacing=spacing,
            image_key=image_key,
            val_features_width=val_features_width,
        )
        self.save_hyperparameters()
        self.objective = AdversarialObjective(
            resolve_adv_loss(adv_loss, loss, "loss"), gp_weight, r1_gamma, r1_interval, n_critic
        )
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
        self.max_generator_steps = max_generator_steps
        self.num_log_images = num_log_images
        self.register_buffer("generator_steps", zero_step_counter())
        self.register_buffer("discriminator_steps", zero_step_counter())

    def generator_parameters(self):
        return self.generator.parameters()

    def discriminator_parameters(self):
        return self.discriminator.parameters()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        real = batch[self.image_key]
        self.check_images(real, self.generator)
        opt_g, opt_d = self.optimizer_list()
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
            self.count_generator_step()
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
