"""StyleGAN2-ADA (2D and 3D) on the shared adversarial core.

Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2), CVPR 2020, and
"Training Generative Adversarial Networks with Limited Data" (StyleGAN2-ADA), NeurIPS 2020:

* non-saturating logistic loss (Goodfellow et al., 2014) through
  :class:`~medgen.losses.AdversarialObjective`;
* lazy R1 on real images every ``r1_interval`` (16) discriminator steps, weighted
  ``gamma / 2 * r1_interval`` (StyleGAN2, sec. 4); ``r1_gamma="auto"`` scales ``gamma`` with the
  squared resolution, ``2 * (res / 256) ** 2`` (0.5 at 128², 2 at 256², the ADA paper's values);
* lazy path-length regularisation every ``pl_interval`` (4) generator steps, weight 2, on half the
  batch, with the moving mean of the lengths in a buffer (StyleGAN2, sec. 3.2);
* with lazy regularisation, Adam's learning rate and betas are scaled by ``c = k / (k + 1)``
  (``lr * c``, ``beta ** c``; StyleGAN2, appendix B) so the regularised optimiser keeps its
  effective dynamics;
* style mixing with probability 0.9 (StyleGAN, sec. 3.1), truncation in ``sample``;
* a generator EMA with a half-life of ``ema_kimg`` thousand images, whose horizon ramps up as
  ``ema_rampup`` times the images seen (ADA's ramp-up), kept as the submodule ``generator_ema``
  (so it is in checkpoints and exports and ``sample`` uses it);
* ADA: :class:`~medgen.augment.AdaptiveAugment` in front of the discriminator for real and
  generated images alike, ``p`` adjusted every 4 discriminator steps toward ``r_t = 0.6``;
* FreezeD (Mo et al., "Freeze the Discriminator: a Simple Baseline for Fine-Tuning GANs", 2020):
  ``freeze_d = N`` leaves the discriminator's ``from_image`` layer and first ``N`` blocks (from the
  input side) without gradient, for transfer learning.

Every piece of state that training depends on (ADA's ``p`` and accumulators, the path-length mean,
the EMA generator with its ``w`` average, the step and image counters) is a buffer or a submodule,
so a checkpoint resumes exactly.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medgen.augment import AdaptiveAugment
from medgen.losses.adversarial import AdversarialObjective, path_length_penalty
from medgen.models.adversarial import build_net, zero_step_counter
from medgen.models.base import seeded_generator
from medgen.models.gan import LatentGANModule, latent

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ADA", "DEFAULT_STYLEGAN2_OPTIMIZER", "StyleGAN2", "auto_r1_gamma"]

#: StyleGAN2-ADA: Adam, lr 0.0025, betas (0, 0.99), eps 1e-8 for both nets.
DEFAULT_STYLEGAN2_OPTIMIZER: dict[str, Any] = {
    "_target_": "torch.optim.Adam",
    "lr": 0.0025,
    "betas": [0.0, 0.99],
    "eps": 1e-8,
}
#: ADA with the paper's controller (p from 0, target 0.6, every 4 steps, 500 kimg for 0 -> 1).
DEFAULT_ADA: dict[str, Any] = {"p": 0.0, "target": 0.6, "interval": 4, "kimg": 500.0}


def auto_r1_gamma(image_size: Sequence[int]) -> float:
    """R1 ``gamma`` for an image size: ``2 * (res / 256) ** 2`` with ``res`` the largest side.

    The StyleGAN2-ADA paper's values are 0.5 at 128² and 2 at 256² (``gamma`` grows with the
    squared resolution); for volumes the same rule is applied to the largest side (our choice).
    """
    return 2.0 * (max(image_size) / 256.0) ** 2


class _RecordingCritic:
    """Calls ``fn`` and keeps its outputs (detached), in call order."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn
        self.outputs: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        out = self.fn(x)
        self.outputs.append(out.detach())
        return out


class StyleGAN2(LatentGANModule):
    """StyleGAN2-ADA: a style-based generator against a residual discriminator, 2D or 3D.

    Every training batch is one generator step (with path-length regularisation every
    ``pl_interval`` steps) followed by one discriminator step (with R1 every ``r1_interval``
    steps), as in the paper's training loop. See the module docstring for the method.

    Args:
        generator: Config of :class:`~medgen.nets.StyleGAN2Generator` (``spatial_dims`` filled in).
        discriminator: Config of :class:`~medgen.nets.StyleGAN2Discriminator`.
        spatial_dims: 2 or 3.
        r1_gamma: R1 weight, or ``"auto"`` (:func:`auto_r1_gamma` of the image size).
        r1_interval: Lazy R1 interval in discriminator steps (16).
        pl_weight: Path-length weight (2; 0 = off).
        pl_interval: Lazy path-length interval in generator steps (4).
        pl_decay: Decay of the moving mean of path lengths (0.01).
        pl_batch_shrink: The path-length batch is the batch divided by this (2).
        style_mixing_prob: Probability of mixing two latents in a training batch (0.9).
        ema_kimg: Half-life of the generator EMA in thousands of images (10; 0 = no averaging).
        ema_rampup: The EMA horizon is at most ``ema_rampup * images seen`` (0.05; ``None``: no
            ramp-up).
        augment: Keyword arguments of :class:`~medgen.augment.AdaptiveAugment` (``spatial_dims``
            filled in); ``None`` turns augmentation off. ``{}`` gives ADA with the defaults.
        freeze_d: FreezeD: the number of discriminator blocks (from the input side) to freeze.
        lazy_optimizer: Scale the optimisers' lr and betas for lazy regularisation.
        truncation_psi: Default truncation of :meth:`sample` (1 = none).
        optimizer_g: Generator optimiser config (default: Adam 0.0025, betas (0, 0.99)).
        optimizer_d: Discriminator optimiser config (default: the generator's).
        scheduler: Optional scheduler config, one instance per optimiser.
        max_generator_steps: Stop after this many generator steps.
        image_key: Key of the images in a batch.
        label_key: Key of integer class labels in a batch (class-conditional nets only).
        value_range: Data range ``(low, high)`` of the images.
        spacing: Voxel spacing of exported 3D samples.
        num_log_images: Samples per validation grid.
        val_features_width: Width of the random-conv features of ``val/mmd``.
    """

    export_modules = ("generator_ema", "generator", "discriminator")

    def __init__(
        self,
        generator: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        r1_gamma: float | str = "auto",
        r1_interval: int = 16,
        pl_weight: float = 2.0,
        pl_interval: int = 4,
        pl_decay: float = 0.01,
        pl_batch_shrink: int = 2,
        style_mixing_prob: float = 0.9,
        ema_kimg: float = 10.0,
        ema_rampup: float | None = 0.05,
        augment: Mapping[str, Any] | None = None,
        freeze_d: int = 0,
        lazy_optimizer: bool = True,
        truncation_psi: float = 1.0,
        optimizer_g: Mapping[str, Any] | None = None,
        optimizer_d: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        max_generator_steps: int | None = None,
        image_key: str = "image",
        label_key: str | None = None,
        value_range: Sequence[float] = (0.0, 1.0),
        spacing: Sequence[float] | None = None,
        num_log_images: int = 16,
        val_features_width: int = 16,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            value_range=value_range,
            optimizer_g=optimizer_g or DEFAULT_STYLEGAN2_OPTIMIZER,
            optimizer_d=optimizer_d,
            scheduler=scheduler,
            spacing=spacing,
            image_key=image_key,
            val_features_width=val_features_width,
        )
        self.save_hyperparameters()
        for name, value in (("pl_interval", pl_interval), ("pl_batch_shrink", pl_batch_shrink)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= style_mixing_prob <= 1.0:
            raise ValueError(f"style_mixing_prob must be in [0, 1], got {style_mixing_prob}")
        if pl_weight < 0 or ema_kimg < 0:
            raise ValueError(f"pl_weight and ema_kimg must be >= 0, got {pl_weight}, {ema_kimg}")
        gen_cfg = {"_target_": "medgen.nets.StyleGAN2Generator", **dict(generator or {})}
        disc_cfg = {"_target_": "medgen.nets.StyleGAN2Discriminator", **dict(discriminator or {})}
        self.generator = build_net(gen_cfg, spatial_dims, "generator")
        self.discriminator = build_net(disc_cfg, spatial_dims, "discriminator")
        for name, net in (("generator", self.generator), ("discriminator", self.discriminator)):
            if tuple(net.image_size) != tuple(self.generator.image_size):
                raise ValueError(
                    f"the {name}'s image_size {tuple(net.image_size)} differs from the "
                    f"generator's {tuple(self.generator.image_size)}"
                )
        self.num_classes = int(getattr(self.generator, "num_classes", 0))
        if self.num_classes != int(getattr(self.discriminator, "num_classes", 0)):
            raise ValueError("generator and discriminator must have the same num_classes")
        if self.num_classes and not label_key:
            raise ValueError("class-conditional nets (num_classes > 0) need model.label_key")
        self.unconditional = self.num_classes == 0
        self.label_key = label_key
        self.latent_dim = int(self.generator.latent_dim)
        self.r1_gamma = (
            auto_r1_gamma(self.generator.image_size) if r1_gamma == "auto" else float(r1_gamma)
        )
        self.objective = AdversarialObjective(
            "non_saturating", r1_gamma=self.r1_gamma, r1_interval=r1_interval
        )
        self.objective.check_discriminator(self.discriminator)
        self.pl_weight = float(pl_weight)
        self.pl_interval = int(pl_interval)
        self.pl_decay = float(pl_decay)
        self.pl_batch_shrink = int(pl_batch_shrink)
        self.style_mixing_prob = float(style_mixing_prob)
        self.ema_kimg = float(ema_kimg)
        self.ema_rampup = ema_rampup
        self.lazy_optimizer = lazy_optimizer
        self.truncation_psi = float(truncation_psi)
        self.max_generator_steps = max_generator_steps
        self.num_log_images = num_log_images
        self.augment = (
            AdaptiveAugment(spatial_dims, **dict(augment)) if augment is not None else None
        )
        self.freeze_d = int(freeze_d)
        self.discriminator.freeze(self.freeze_d)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.register_buffer("generator_steps", zero_step_counter())
        self.register_buffer("discriminator_steps", zero_step_counter())
        self.register_buffer("images_seen", zero_step_counter())
        self.register_buffer("pl_mean", torch.zeros(()))

    # ----------------------------------------------------------------- exact resume
    def on_fit_start(self) -> None:
        super().on_fit_start()
        pending = getattr(self, "_pending_latent_rng", None)
        if pending is not None and self._latent_rng is not None:
            self._latent_rng.set_state(pending.to(self._latent_rng.get_state().device))
            self._pending_latent_rng = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._latent_rng is not None:  # the latents' stream, so a resumed run continues it
            checkpoint["medgen_latent_rng"] = self._latent_rng.get_state().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._pending_latent_rng = checkpoint.get("medgen_latent_rng")

    # ----------------------------------------------------------------- optimisers
    def generator_parameters(self):
        return self.generator.parameters()

    def discriminator_parameters(self):
        # Every parameter, frozen ones too (FreezeD, model.finetune.freeze): they get no gradient,
        # which Adam skips, and a block unfrozen later (unfreeze_at_step) is already optimised.
        return self.discriminator.parameters()

    @staticmethod
    def lazy_config(config: Mapping[str, Any], interval: int) -> dict[str, Any]:
        """An optimiser config with ``lr * c`` and ``betas ** c``, ``c = k / (k + 1)``.

        Lazy regularisation every ``k`` steps adds one step's worth of gradient per ``k + 1``
        updates; StyleGAN2 (appendix B) rescales Adam so the optimiser's dynamics stay those of
        ``k`` minibatches.
        """
        config = dict(config)
        ratio = interval / (interval + 1)
        if "lr" in config:
            config["lr"] = float(config["lr"]) * ratio
        if "betas" in config:
            config["betas"] = [float(b) ** ratio for b in config["betas"]]
        return config

    def optimizer_groups(self):
        groups = [
            (list(self.generator_parameters()), self.optimizer_config),
            (list(self.discriminator_parameters()), self.optimizer_d_config),
        ]
        if not self.lazy_optimizer:
            return groups
        g_interval = self.pl_interval if self.pl_weight > 0 else 0
        d_interval = self.objective.r1_interval if self.r1_gamma > 0 else 0
        return [
            (params, self.lazy_config(config, k) if k > 1 else dict(config))
            for (params, config), k in zip(groups, (g_interval, d_interval), strict=True)
        ]

    # ----------------------------------------------------------------- pieces of a step
    def labels(self, batch: Mapping[str, Any], like: Tensor) -> Tensor | None:
        """One-hot class labels ``(B, num_classes)`` from ``batch[label_key]`` (or ``None``)."""
        if not self.num_classes:
            return None
        if self.label_key not in batch:
            raise KeyError(f"the batch has no '{self.label_key}' (model.label_key) for the labels")
        return self.one_hot(torch.as_tensor(batch[self.label_key]), like)

    def one_hot(self, labels: Tensor, like: Tensor) -> Tensor:
        """Integer labels ``(B,)`` -> one-hot ``(B, num_classes)`` on ``like``'s device/dtype."""
        labels = labels.reshape(-1).long().to(like.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"class labels must be in [0, {self.num_classes}), got {labels.tolist()}"
            )
        return nn.functional.one_hot(labels, self.num_classes).to(like.dtype)

    def mixed_ws(
        self,
        z: Tensor,
        z2: Tensor,
        c: Tensor | None,
        mix: bool,
        update_w_avg: bool = False,
    ) -> tuple[Tensor, int]:
        """Per-layer latents with style mixing (StyleGAN, sec. 3.1).

        With ``mix``, a crossover layer ``k`` uniform in ``[1, num_ws)`` is drawn and layers
        ``k..`` take ``z2``'s ``w``; otherwise ``k = num_ws`` (no mixing).

        Returns:
            ``(ws, k)`` with ``ws`` of shape ``(B, num_ws, w_dim)``.
        """
        g = self.generator
        ws = g.map(z, c, update_w_avg=update_w_avg)
        cutoff = g.num_ws
        if mix and g.num_ws > 1:
            cutoff = int(torch.randint(1, g.num_ws, ()))
            ws = torch.cat([ws[:, :cutoff], g.map(z2, c)[:, cutoff:]], dim=1)
        return ws, cutoff

    def _latents(self, batch_size: int, like: Tensor) -> tuple[Tensor, Tensor, bool]:
        z = latent(batch_size, self.latent_dim, self._latent_rng, like)
        z2 = latent(batch_size, self.latent_dim, self._latent_rng, like)
        mix = bool(torch.rand(()) < self.style_mixing_prob)
        return z, z2, mix

    def critic(self, c: Tensor | None) -> Callable[[Tensor], Tensor]:
        """``x -> D(augment(x), c)``: the discriminator as the losses see it."""

        def run(x: Tensor) -> Tensor:
            if self.augment is not None:
                x = self.augment(x)
            return self.discriminator(x, c)

        return run

    @torch.no_grad()
    def update_ema(self, batch_size: int) -> float:
        """Move ``generator_ema`` toward ``generator``; returns the decay ``beta`` used.

        ``beta = 0.5 ** (batch_size / n)`` with the horizon ``n = ema_kimg * 1000`` images,
        capped at ``ema_rampup * images_seen`` (so early weights are forgotten quickly). Buffers
        (the ``w`` average) are copied.
        """
        horizon = self.ema_kimg * 1000.0
        if self.ema_rampup is not None:
            horizon = min(horizon, float(self.images_seen) * self.ema_rampup)
        beta = 0.5 ** (batch_size / max(horizon, 1e-8)) if self.ema_kimg > 0 else 0.0
        for p_ema, p in zip(
            self.generator_ema.parameters(), self.generator.parameters(), strict=True
        ):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(self.generator_ema.buffers(), self.generator.buffers(), strict=True):
            b_ema.copy_(b)
        return beta

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return tensor
        return trainer.strategy.reduce(tensor.to(self.device), reduce_op="sum").cpu()

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        real = batch[self.image_key]
        self.check_images(real, self.generator)
        real = self.to_net(real)
        c = self.labels(batch, real)
        opt_g, opt_d = self.optimizer_list()
        batch_size = real.shape[0]
        critic = self.critic(c)
        logs: dict[str, Tensor | float] = {}

        # Generator: non-saturating loss, + lazy path-length regularisation.
        z, z2, mix = self._latents(batch_size, real)
        ws, _ = self.mixed_ws(z, z2, c, mix, update_w_avg=True)
        g_loss = self.objective.generator_loss(critic, self.generator.synthesis(ws))
        total = g_loss
        if self.pl_weight > 0 and int(self.generator_steps) % self.pl_interval == 0:
            n = max(batch_size // self.pl_batch_shrink, 1)
            zp, zp2, mixp = self._latents(n, real)
            ws_pl, _ = self.mixed_ws(zp, zp2, None if c is None else c[:n], mixp)
            penalty, _, new_mean = path_length_penalty(
                self.generator.synthesis(ws_pl), ws_pl, self.pl_mean, self.pl_decay
            )
            self.pl_mean.copy_(new_mean)
            total = total + penalty * (self.pl_weight * self.pl_interval)
            logs["train/pl"] = penalty.detach()
            logs["train/pl_mean"] = new_mean
        self.step_optimizer(opt_g, total)
        logs["train/ema_beta"] = self.update_ema(batch_size)
        self.count_generator_step()
        self.images_seen += batch_size

        # Discriminator: logistic loss on augmented reals and fakes, + lazy R1.
        with torch.no_grad():
            z, z2, mix = self._latents(batch_size, real)
            fake = self.generator.synthesis(self.mixed_ws(z, z2, c, mix)[0])
        recorder = _RecordingCritic(critic)
        terms = self.objective.discriminator_terms(
            recorder, real, fake, int(self.discriminator_steps)
        )
        self.step_optimizer(opt_d, terms["d_loss"])
        self.discriminator_steps += 1
        if self.augment is not None:
            # discriminator_terms evaluates D on the reals first.
            self.augment.observe(recorder.outputs[0])
            r_t = self.augment.step(self._reduce_sum)
            if r_t is not None:
                logs["train/ada_rt"] = r_t
            logs["train/ada_p"] = self.augment.p
        self.step_schedulers("step")
        self.log("train/g_loss", g_loss.detach(), prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()})
        self.log_dict(logs)
        self.log("train/generator_steps", self.generator_steps.float())
        if self.max_generator_steps and int(self.generator_steps) >= self.max_generator_steps:
            self.trainer.should_stop = True

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.check_images(batch[self.image_key], self.generator)
        if self.unconditional:
            super().validation_step(batch, batch_idx)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        seed: int | None = None,
        batch_size: int = 64,
        truncation_psi: float | None = None,
        truncation_cutoff: int | None = None,
        labels: Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """``num_samples`` images ``(N, C, *spatial)`` in data units from the EMA generator.

        Latents and noise inputs are drawn on the CPU, from one generator per sample seeded from
        ``seed`` and the sample's index, so a seed gives the same images on every device, for every
        ``batch_size``, and ``sample(n)`` starts with ``sample(m)`` for ``m < n``. Outputs are
        clipped to the data range.

        Args:
            num_samples: Number of images.
            seed: Random seed (``None``: random).
            batch_size: Images per forward pass.
            truncation_psi: Truncation in ``W`` (default: the model's ``truncation_psi``).
            truncation_cutoff: Truncate only the first layers (default: all).
            labels: Class labels ``(N,)`` of a class-conditional model.
        """
        psi = self.truncation_psi if truncation_psi is None else float(truncation_psi)
        rng = seeded_generator(seed)
        generator = self.generator_ema
        c_all = None
        if self.num_classes:
            if labels is None:
                raise ValueError(
                    f"this StyleGAN2 is class-conditional ({self.num_classes} classes): "
                    "pass labels=[...] (one per sample)"
                )
            c_all = self.one_hot(torch.as_tensor(labels), torch.empty(0))
            if len(c_all) != num_samples:
                raise ValueError(f"got {len(c_all)} labels for {num_samples} samples")
        # One generator per sample (its latent, then its noise), seeded from the run's seed and
        # the sample's index: neither batching nor the number of samples changes a sample.
        base = int(torch.randint(0, 2**62, (), generator=rng))
        streams = [torch.Generator().manual_seed(base + i) for i in range(num_samples)]
        z_all = torch.stack([torch.randn(self.latent_dim, generator=g) for g in streams])
        was_training = generator.training
        generator.eval()
        out = []
        try:
            for start in range(0, num_samples, batch_size):
                n = min(batch_size, num_samples - start)
                z = z_all[start : start + n]
                noise = streams[start : start + n]
                c = None if c_all is None else c_all[start : start + n]
                device, dtype = self.device, self.dtype
                ws = generator.map(
                    z.to(device, dtype),
                    None if c is None else c.to(device, dtype),
                    psi,
                    truncation_cutoff,
                )
                images = generator.synthesis(ws, noise).float().clamp(-1.0, 1.0)
                out.append(self.to_data(images).cpu())
        finally:
            generator.train(was_training)
        return torch.cat(out) if out else torch.empty(0)

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        real = batch[self.image_key][: self.num_log_images]
        if not self.unconditional:
            return {"real": real}
        return {"real": real, "samples": self.sample(self.num_log_images, seed=0)}

    @property
    def ada_p(self) -> float:
        """The current augmentation probability (0 without augmentation)."""
        return float(self.augment.p) if self.augment is not None else 0.0

    def extra_repr(self) -> str:
        return (
            f"r1_gamma={self.r1_gamma:g}, r1_interval={self.objective.r1_interval}, "
            f"pl_weight={self.pl_weight:g}, pl_interval={self.pl_interval}, "
            f"freeze_d={self.freeze_d}, ada={self.augment is not None}"
        )
