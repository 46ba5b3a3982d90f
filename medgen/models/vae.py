"""Variational autoencoder (2D/3D) as a LightningModule.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014 (ELBO, reparameterisation);
Higgins et al., "beta-VAE", ICLR 2017 (KL weight); Bowman et al., "Generating Sentences from a
Continuous Space", CoNLL 2016 (KL warm-up).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from medgen.metrics import PairwiseMetrics
from medgen.models.base import GenerativeModule, seeded_generator
from medgen.nets.vae import VAENet

RECON_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss, "mse": F.mse_loss}


class VAE(GenerativeModule):
    """Variational autoencoder with beta weighting and KL warm-up.

    The loss per batch is ``recon + beta_t * kl`` where ``recon`` is the mean L1 (or L2) error per
    image element and ``kl`` is KL(q(z|x) || N(0, I)) summed over latent dimensions, averaged over
    the batch and divided by the number of elements of one image — so ``beta`` does not depend on
    the image size, and ``beta = 1`` is the negative ELBO of a Laplace (L1) or Gaussian (L2)
    likelihood of fixed scale, up to constants. ``beta_t = beta * min(1, step / kl_warmup_steps)``.

    Args:
        net: Keyword arguments of :class:`medgen.nets.VAENet` (``spatial_dims`` is filled in).
        spatial_dims: 2 or 3.
        beta: KL weight.
        kl_warmup_steps: Steps over which ``beta`` ramps linearly from 0 (0 = no warm-up).
        recon_loss: ``"l1"`` or ``"l2"``.
        image_key: Key of the image in a batch dict.
        value_range: Data range ``(low, high)`` of the images.
        optimizer: Optimiser config (see :class:`~medgen.models.base.GenerativeModule`).
        scheduler: Scheduler config or ``None``.
        spacing: Voxel spacing of exported 3D samples.
        num_log_images: Images per validation grid.
        sample_size: Spatial size of prior samples for a spatial latent (default:
            ``net.image_size``, else the size of the first training batch, recorded so that
            checkpoints and exported models sample at the training size).
    """

    export_modules = ("net",)

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        recon_loss: str = "l1",
        image_key: str = "image",
        value_range: Sequence[float] = (0.0, 1.0),
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        spacing: Sequence[float] | None = None,
        num_log_images: int = 8,
        sample_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(spatial_dims, value_range, optimizer, scheduler, spacing)
        self.save_hyperparameters()
        if recon_loss not in RECON_LOSSES:
            raise ValueError(
                f"recon_loss must be one of {sorted(RECON_LOSSES)}, got {recon_loss!r}"
            )
        net_kwargs = dict(net or {})
        net_kwargs.setdefault("spatial_dims", spatial_dims)
        if net_kwargs["spatial_dims"] != spatial_dims:
            raise ValueError("net.spatial_dims differs from the model's spatial_dims")
        self.net = VAENet(**net_kwargs)
        self.image_size = sample_size or net_kwargs.get("image_size")
        self.beta = float(beta)
        self.kl_warmup_steps = int(kl_warmup_steps)
        self.recon_fn = RECON_LOSSES[recon_loss]
        self.image_key = image_key
        self.num_log_images = num_log_images
        self.val_metrics = PairwiseMetrics(
            data_range=self.data_range, spatial_dims=spatial_dims, prefix="val/"
        )

    # ----------------------------------------------------------------- losses
    def current_beta(self, step: int | None = None) -> float:
        """KL weight at ``step`` (default: the current global step)."""
        step = self.global_step if step is None else step
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.kl_warmup_steps)

    def loss(self, x: torch.Tensor, step: int | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for a batch ``x`` ``(B, C, *spatial)``: ``loss``, ``recon``, ``kl``, ``beta``."""
        recon_x, posterior = self.net(x)
        recon = self.recon_fn(recon_x.float(), x.float())
        kl = posterior.kl().float().mean() / x[0].numel()
        beta = self.current_beta(step)
        return {
            "loss": recon + beta * kl,
            "recon": recon,
            "kl": kl,
            "beta": torch.tensor(beta),
        }

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch[self.image_key]
        if self.image_size is None:  # remember the training size for sampling and export
            self.image_size = tuple(int(s) for s in x.shape[2:])
            self.hparams["sample_size"] = list(self.image_size)
        terms = self.loss(x)
        self.log("train/loss", terms["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"})
        return terms["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch[self.image_key]
        recon_x = self.reconstruct(x)
        self.log("val/recon", self.recon_fn(recon_x.float(), x.float()), sync_dist=True)
        self.val_metrics.update(recon_x.float(), x.float())

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=False)
        self.val_metrics.reset()

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of ``x``: ``(B, C, *spatial)`` -> same shape."""
        return self.net.decode(self.net.encode(x).mode())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean latent of ``x``."""
        return self.net.encode(x).mode()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from latents."""
        return self.net.decode(z)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        seed: int | None = None,
        batch_size: int = 16,
        image_size: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Decode ``num_samples`` draws from the prior N(0, I).

        Noise is drawn on the CPU from a generator seeded with ``seed``, so samples are identical
        across runs and devices for a given seed.

        Args:
            num_samples: Number of images.
            seed: Random seed (``None``: random).
            batch_size: Decoding batch size.
            image_size: Spatial size for a spatial latent (default: the training ``image_size``).

        Returns:
            ``(num_samples, C, *spatial)`` in data units.
        """
        generator = seeded_generator(seed)
        size = image_size if image_size is not None else self.image_size
        if size is not None and isinstance(size, int):
            size = (size,) * self.spatial_dims
        shape = self.net.latent_shape(size)
        z = torch.randn((num_samples, *shape), generator=generator)
        outputs = []
        for chunk in z.split(batch_size):
            outputs.append(self.net.decode(chunk.to(self.device, self.dtype)).float().cpu())
        return torch.cat(outputs)

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        x = batch[self.image_key][: self.num_log_images]
        return {
            "inputs": x,
            "reconstructions": self.reconstruct(x),
            "samples": self.sample(x.shape[0], seed=0, image_size=tuple(x.shape[2:])),
        }
