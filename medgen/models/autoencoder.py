"""Autoencoders for latent generation (2D/3D): KL autoencoder and VQ-GAN, with tiled inference.

- :class:`AutoencoderKL`: the first stage of latent diffusion (Rombach et al., "High-Resolution
  Image Synthesis with Latent Diffusion Models", CVPR 2022): a convolutional encoder/decoder with
  a diagonal-Gaussian latent and a small KL weight, trained with L1 + perceptual + patch
  adversarial losses (Esser et al., "Taming Transformers for High-Resolution Image Synthesis",
  CVPR 2021, Sec. 3.2, with their adaptive adversarial weight, eq. 7).
- :class:`VQGAN`: the first stage of Medical Diffusion (Khader et al., "Denoising diffusion
  probabilistic models for 3D medical image generation", Sci. Rep. 2023, arXiv 2211.03364): an EMA
  codebook with dead-code restarts and commitment 0.25 (van den Oord et al., "Neural Discrete
  Representation Learning", NeurIPS 2017), L1 and perceptual losses on random 2D slices, a 2D
  slice discriminator plus a 3D discriminator, and discriminator feature matching (Wang et al.,
  "pix2pixHD", CVPR 2018).

Both encode and decode volumes far larger than their training patches in tiles
(:meth:`LatentAutoencoder.encode` / :meth:`LatentAutoencoder.decode` with ``tile=``), with
GroupNorm statistics of the whole volume (:mod:`medgen.tiling`), so memory is set by the tile.

The nets see intensities in data units (the data presets normalise them, e.g. to ``[0, 1]`` or
``[-1, 1]``); latents are unscaled: multiply by :func:`latent_scale_factor` of a dataset's
latents (Rombach et al., Sec. 4.3.2 and Appendix G) before diffusion, as ``medgen-encode`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.data.latents import LatentStatistics
from medgen.inference import Tiling
from medgen.losses.adversarial import AdversarialObjective, resolve_adv_loss
from medgen.losses.perceptual import PerceptualLoss
from medgen.metrics import PairwiseMetrics
from medgen.models.adversarial import AdversarialModule, build_net, zero_step_counter
from medgen.models.base import ENCODE, SAMPLE, seeded_generator
from medgen.nets.vae import VAENet
from medgen.nets.vqgan import VQGANNet
from medgen.nn import DiagonalGaussian
from medgen.utils.targets import canonical_name, resolve_target

log = logging.getLogger(__name__)

__all__ = [
    "VQGAN",
    "AutoencoderKL",
    "LatentAutoencoder",
    "feature_matching_loss",
    "latent_scale_factor",
]

DEFAULT_AE_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.Adam", "lr": 1e-4}
DEFAULT_DISCRIMINATOR: dict[str, Any] = {
    "_target_": "medgen.nets.NLayerDiscriminator",
    "ndf": 64,
    "n_layers": 3,
    "norm": "batch",
}


def latent_scale_factor(latents: Iterable[Tensor]) -> float:
    """``1 / std`` of all elements of ``latents`` (Rombach et al. 2022, Sec. 4.3.2).

    Latent diffusion multiplies the first stage's latents by this factor so that they have unit
    variance, like the diffusion prior. Computed in float64 over every element given (a
    dataset's latents, or a subset of them) by :class:`medgen.data.latents.LatentStatistics`.

    Args:
        latents: Tensors of any shape, e.g. ``(B, C, *spatial)`` batches.

    Returns:
        The factor; raises ``ValueError`` for no elements or a zero standard deviation.
    """
    stats = LatentStatistics()
    for z in latents:
        stats.add(z)
    return stats.scale_factor


def feature_matching_loss(fake: Sequence[Tensor], real: Sequence[Tensor]) -> Tensor:
    """Discriminator feature matching of Medical Diffusion's VQ-GAN (Khader et al. 2023).

    ``sum_i 4 / L * mean|fake_i - real_i|`` over the ``L = n_layers + 1`` intermediate feature maps
    of a PatchGAN (all its conv stages but the logits), i.e. four times their mean L1 distance
    (pix2pixHD's feature matching, Wang et al., CVPR 2018, eq. 4, with Medical Diffusion's
    ``4 / (3 + 1)`` per layer for its 3-layer discriminators).

    Args:
        fake: Feature maps ``(B, C_i, *spatial_i)`` of the reconstruction.
        real: The same of the real images (no gradient needed).

    Returns:
        The scalar loss (float32).
    """
    if len(fake) != len(real) or not fake:
        raise ValueError(f"need matching, non-empty feature lists, got {len(fake)}, {len(real)}")
    weight = 4.0 / len(fake)
    return sum(
        weight * F.l1_loss(f.float(), r.detach().float()) for f, r in zip(fake, real, strict=True)
    )


class LatentAutoencoder(AdversarialModule):
    """What :class:`AutoencoderKL` and :class:`VQGAN` share: tiled encode/decode, the adversarial
    and perceptual terms, the manual optimisation loop, validation and sampling.

    Training step (manual optimisation, two optimisers): one autoencoder step on
    ``reconstruction_terms + adv_weight_t * generator_adversarial``, then, from ``adv_start_step``
    on, one discriminator step. ``adv_weight_t`` is 0 before ``adv_start_step`` (Esser et al.
    2021 start the discriminator late, after the reconstructions are good) and ``adv_weight``
    after, times the adaptive weight ``||grad_L(rec)|| / (||grad_L(g)|| + 1e-4)`` clamped to
    ``[0, 1e4]`` at the decoder's last layer ``L`` when ``adaptive_adv_weight`` (their eq. 7).
    The module counts its own autoencoder steps (:attr:`ae_steps`), which ``adv_start_step``
    refers to (Lightning's ``global_step`` counts both optimisers' steps).

    The perceptual loss is built on the first training step from the ``perceptual`` config, so a
    checkpoint reloads on a machine without the VGG weights file; without weights it is disabled
    with one warning (see :class:`~medgen.losses.PerceptualLoss`).
    """

    export_modules = ("net",)
    capabilities = frozenset({SAMPLE, ENCODE})
    #: What :meth:`encode` returns: ``"posterior_mean"`` (KL) or ``"codebook"`` (VQ) vectors.
    latent_kind: str = "posterior_mean"
    generator_step_buffer = "ae_steps"  # EMA and adv_start_step count autoencoder steps
    net: nn.Module

    def __init__(
        self,
        *,
        optimizer: Mapping[str, Any] | None,
        image_key: str,
        recon_weight: float,
        perceptual: Mapping[str, Any] | None,
        adv_weight: float,
        adv_start_step: int,
        adaptive_adv_weight: bool,
        adv_loss: str,
        num_log_images: int,
        sample_size: Sequence[int] | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer_g=optimizer or DEFAULT_AE_OPTIMIZER, **kwargs)
        self.image_key = image_key
        self.recon_weight = float(recon_weight)
        self.perceptual_config = dict(perceptual or {})
        self.perceptual_weight = float(self.perceptual_config.pop("weight", 1.0))
        self.adv_weight = float(adv_weight)
        self.adv_start_step = int(adv_start_step)
        self.adaptive_adv_weight = bool(adaptive_adv_weight)
        # Patch discriminators: 0.5 * (real + fake), as Esser et al.'s code.
        self.objective = AdversarialObjective(resolve_adv_loss(adv_loss), d_scale=0.5)
        self.adv_loss = self.objective.adv_loss
        self.num_log_images = int(num_log_images)
        self.image_size = tuple(int(s) for s in sample_size) if sample_size else None
        self.val_metrics = PairwiseMetrics(
            data_range=self.data_range, spatial_dims=self.spatial_dims, prefix="val/"
        )
        self.register_buffer("ae_steps", zero_step_counter())
        # Not a registered submodule: built on the first training step (see class docstring).
        self._perceptual: dict[str, PerceptualLoss] = {}

    # ----------------------------------------------------------------- nets and shapes
    @property
    def downsample_factor(self) -> int:
        """Spatial factor ``f`` between images and latents."""
        return int(self.net.downsample_factor)

    @property
    def latent_channels(self) -> int:
        """Channels of a latent."""
        return int(self.net.latent_channels)

    def latent_shape(self, image_size: int | Sequence[int] | None = None) -> tuple[int, ...]:
        """Shape ``(C_latent, *spatial / f)`` of one latent for images of ``image_size``.

        Args:
            image_size: Spatial size (int or per axis); default the training size.
        """
        size = self._size(image_size)
        self._check_divisible(size, "image size")
        return (self.latent_channels, *(s // self.downsample_factor for s in size))

    def _size(self, image_size: int | Sequence[int] | None) -> tuple[int, ...]:
        size = image_size if image_size is not None else self.image_size
        if size is None:
            raise ValueError(
                f"{type(self).__name__} has no image size yet: pass image_size (it is recorded "
                "from the first training batch)"
            )
        if isinstance(size, int):
            size = (size,) * self.spatial_dims
        size = tuple(int(s) for s in size)
        if len(size) != self.spatial_dims:
            raise ValueError(f"image_size {size} must have {self.spatial_dims} entries")
        return size

    def _check_divisible(self, size: Sequence[int], what: str) -> None:
        f = self.downsample_factor
        if any(int(s) % f for s in size):
            raise ValueError(
                f"{what} {tuple(size)} is not divisible by the downsampling factor {f} of "
                f"{type(self).__name__}; crop or pad the input to a multiple of {f}"
            )

    def set_perceptual_loss(self, loss: PerceptualLoss | None) -> None:
        """Use ``loss`` (e.g. built with ``extractor=VGGFeatures.random()`` in tests) as the
        perceptual loss instead of building one from the config; ``None`` rebuilds from config."""
        self._perceptual.clear()
        if loss is not None:
            self._perceptual["loss"] = loss.to(self.device)

    def perceptual_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Perceptual term (unweighted) between ``(B, C, *spatial)`` tensors; 0 when disabled."""
        if self.perceptual_weight == 0:
            return pred.sum() * 0.0
        if "loss" not in self._perceptual:
            config = {"value_range": list(self.value_range), **self.perceptual_config}
            self._perceptual["loss"] = PerceptualLoss(self.spatial_dims, **config).to(pred.device)
        return self._perceptual["loss"](pred, target)

    # ----------------------------------------------------------------- tiled inference
    def _run(
        self,
        fn: Callable[[Tensor], Tensor],
        module: nn.Module,
        x: Tensor,
        tiling: Tiling,
        scale: float,
        out: Tensor | None,
        head: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """``fn(x)``, whole or tiled as ``tiling`` says; layer by layer, ``module.stages()`` run
        exactly and ``head`` (the latent head of the encoder) follows on the whole result."""
        if tiling.layerwise and tiling.tile is not None:
            y = tiling.apply(
                module,
                x,
                stages=module.stages,
                device=self.device,
                out=out if head is None else None,
            )
            if head is None:
                return y
            y = head(y)
            return y if out is None else out.copy_(y)
        return tiling.apply(fn, x, scale=scale, module=module, out=out)

    def _check_input(self, x: Tensor, what: str) -> None:
        if not isinstance(x, Tensor) or x.ndim != self.spatial_dims + 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{what} must be a (B, C, *spatial) tensor with {self.spatial_dims} spatial dims, "
                f"got {shape}"
            )

    def _encode_net(self, x: Tensor) -> Tensor:
        """Continuous latents of ``x`` (no quantisation), ``(B, C_latent, *spatial / f)``."""
        return self._encoder_head(self.net.encoder(x))

    def _post_encode(self, z: Tensor) -> Tensor:
        return z

    def _encoder_head(self, h: Tensor) -> Tensor:
        """Continuous latents from the encoder net's output (identity; the KL posterior mean)."""
        return h

    @torch.no_grad()
    def encode(
        self,
        x: Tensor,
        tiling: Tiling | Mapping[str, Any] | int | Sequence[int] | None = None,
        *,
        out: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        """Latents of images ``x`` ``(B, C, *spatial)``: ``(B, C_latent, *spatial / f)``.

        Args:
            x: Images in data units; every spatial size divisible by :attr:`downsample_factor`.
            tiling: How to tile (:class:`~medgen.inference.Tiling`, a dict of its settings, or
                just the tile size). ``None`` encodes the whole input at once. With a tile
                **in image voxels** (a multiple of ``f``) the input is encoded in overlapping
                tiles blended with Gaussian weights (``overlap`` 0.5 by default: a trained net's
                outputs near a tile's edge differ from whole inference, and the wide overlap
                keeps them out of the blend), with GroupNorm statistics of the whole input
                (``norm_stats="global"``, :mod:`medgen.inference.global_stats`) or of each tile
                (``"tile"``, as MONAI / MAISI); ``layerwise=True`` encodes layer by layer
                (:func:`medgen.inference.layerwise_apply`), equal to whole-input encoding up to
                float rounding, with one tile's memory on the model's device and the
                intermediate volumes in host memory or ``offload_dir``.
            out: Optional preallocated ``(B, C_latent, *spatial / f)`` floating tensor that
                receives the latent (see :meth:`decode`).
            **options: Tiling settings as keywords (``tile=64, layerwise=True``), overriding
                ``tiling``'s.

        Returns:
            Posterior means (:class:`AutoencoderKL`) or codebook vectors (:class:`VQGAN`).
        """
        self._check_input(x, "x")
        self._check_divisible(x.shape[2:], "image size")
        x = x.to(self.device, self.dtype)
        tiling = Tiling.from_any(tiling, **options).with_defaults(overlap=0.5, margin=0)
        z = self._run(
            self._encode_net,
            self.net.encoder,
            x,
            tiling,
            1.0 / self.downsample_factor,
            out,
            self._encoder_head,
        )
        z = self._post_encode(z)
        return z if out is None or z is out else out.copy_(z)

    def _decode_net(self, z: Tensor) -> Tensor:
        return self.net.decode(z)

    def _pre_decode(self, z: Tensor) -> Tensor:
        return z

    @torch.no_grad()
    def decode(
        self,
        z: Tensor,
        tiling: Tiling | Mapping[str, Any] | int | Sequence[int] | None = None,
        *,
        out: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        """Images ``(B, C, *spatial * f)`` in data units from latents ``(B, C_latent, *spatial)``.

        Args:
            z: Unscaled latents (divide by the scale factor first if they came from a
                diffusion model trained on scaled latents).
            tiling: How to tile, as for :meth:`encode`, with the tile **in latent voxels**: a
                tile of 16 latent voxels is a 64-voxel image tile for ``f = 4``. Memory is then
                that of decoding one tile plus the output volume (``output_device="cpu"`` keeps
                the volume off the GPU). ``layerwise=True`` decodes layer by layer: every stage
                runs over the whole volume in tiles with exact halos and the whole volume's
                GroupNorm statistics, so the result equals whole decoding up to float rounding
                (no seams); the intermediate volumes (a few times the widest full-resolution
                activation) go to host memory or ``offload_dir``.
            out: Optional preallocated ``(B, C, *spatial * f)`` floating tensor that receives the
                image, e.g. ``torch.from_numpy(numpy.lib.format.open_memmap(path, "w+", ...))``
                to decode a volume larger than memory straight into a ``.npy`` file: tiles are
                blended into it, so memory is that of one tile (plus the statistics passes'
                per-group sums).
            **options: Tiling settings as keywords, overriding ``tiling``'s.
        """
        self._check_input(z, "z")
        z = self._pre_decode(z.to(self.device, self.dtype))
        tiling = Tiling.from_any(tiling, **options).with_defaults(overlap=0.5, margin=0)
        return self._run(
            self._decode_net, self.net.decoder, z, tiling, float(self.downsample_factor), out
        )

    @torch.no_grad()
    def reconstruct(
        self,
        x: Tensor,
        tiling: Tiling | Mapping[str, Any] | int | Sequence[int] | None = None,
        **options: Any,
    ) -> Tensor:
        """``decode(encode(x))`` with the same tiling, the decode tile in latent voxels
        (``tile // f``)."""
        tiling = Tiling.from_any(tiling, **options)
        z = self.encode(x, tiling)
        if isinstance(tiling.tile, int | tuple):
            f = self.downsample_factor
            tile = tiling.tile
            tiling = tiling.replace(
                tile=tile // f if isinstance(tile, int) else [t // f for t in tile]
            )
        return self.decode(z, tiling)

    # ----------------------------------------------------------------- losses
    def adv_active(self, step: int | None = None) -> bool:
        """Whether the adversarial terms are on at autoencoder step ``step`` (default: now)."""
        step = int(self.ae_steps) if step is None else step
        return self.has_discriminator and self.adv_weight > 0 and step >= self.adv_start_step

    @property
    def has_discriminator(self) -> bool:
        return False

    def discriminators(self) -> list[nn.Module]:
        return []

    def adaptive_weight(self, rec_loss: Tensor, g_loss: Tensor) -> Tensor:
        """Esser et al. 2021, eq. 7: ``||grad rec|| / (||grad g|| + 1e-4)`` at the decoder's
        last layer, clamped to ``[0, 1e4]`` and detached."""
        last = self.net.decoder.conv_out.weight
        (rec_grad,) = torch.autograd.grad(rec_loss, last, retain_graph=True)
        (g_grad,) = torch.autograd.grad(g_loss, last, retain_graph=True)
        weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach()

    def autoencoder_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Loss terms of the autoencoder step for a batch ``x``; ``loss`` is the total.

        Also holds ``recon_x`` (the reconstruction, with graph) for the discriminator step.
        """
        raise NotImplementedError

    def discriminator_terms(self, x: Tensor, recon_x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    # ----------------------------------------------------------------- optimisation
    def generator_parameters(self):
        return self.net.parameters()

    def discriminator_parameters(self):
        return [p for d in self.discriminators() for p in d.parameters()]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch[self.image_key]
        self._check_input(x, f"batch '{self.image_key}'")
        self._check_divisible(x.shape[2:], f"batch '{self.image_key}' size")
        if self.image_size is None:  # remember the training size for sampling and export
            self.image_size = tuple(int(s) for s in x.shape[2:])
            self.hparams["sample_size"] = list(self.image_size)
        optimizers = self.optimizer_list()
        active = self.adv_active()
        terms = self.autoencoder_terms(x)
        self.step_optimizer(optimizers[0], terms["loss"])  # the discriminators get no gradients
        self.count_generator_step()
        recon_x = terms.pop("recon_x").detach()
        if active:
            d_terms = self.discriminator_terms(x, recon_x)
            self.step_optimizer(optimizers[1], d_terms["d_loss"])
            terms.update(d_terms)
        self.step_schedulers("step")
        self.log("train/loss", terms.pop("loss").detach(), prog_bar=True)
        self.log_dict({f"train/{k}": v.detach().float() for k, v in terms.items()})

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch[self.image_key]
        recon_x = self.reconstruct(x)
        self.log("val/recon", F.l1_loss(recon_x.float(), x.float()), sync_dist=True)
        self.val_metrics.update(recon_x.float(), x.float())

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=False)
        self.val_metrics.reset()

    # ----------------------------------------------------------------- generation
    def _random_latents(self, num: int, shape: tuple[int, ...], generator) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        seed: int | None = None,
        batch_size: int = 16,
        image_size: int | Sequence[int] | None = None,
        **decode_kwargs: Any,
    ) -> Tensor:
        """Decode ``num_samples`` random latents (a sanity check of the decoder, not a model of
        the data: for realistic samples train a diffusion model on the latents).

        :class:`AutoencoderKL` decodes N(0, I) latents (its prior); :class:`VQGAN` uniformly
        random codes. Noise is drawn on the CPU from ``seed``.

        Returns:
            ``(num_samples, C, *spatial)`` in data units.
        """
        shape = self.latent_shape(image_size)
        z = self._random_latents(num_samples, shape, seeded_generator(seed))
        outputs = [
            self.decode(chunk.to(self.device), **decode_kwargs).float().cpu()
            for chunk in z.split(batch_size)
        ]
        return torch.cat(outputs)

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        x = batch[self.image_key][: self.num_log_images]
        return {"inputs": x, "reconstructions": self.reconstruct(x)}


def _build_discriminator(
    config: Mapping[str, Any], spatial_dims: int, in_channels: int, what: str
) -> nn.Module:
    config = {**DEFAULT_DISCRIMINATOR, **dict(config)}
    config.setdefault("in_channels", in_channels)
    return build_net(config, spatial_dims, what)


class AutoencoderKL(LatentAutoencoder):
    """KL-regularised autoencoder of latent diffusion (Rombach et al., CVPR 2022), 2D or 3D.

    Loss of the autoencoder step, with ``x̂`` decoded from a posterior sample::

        recon_weight * mean|x - x̂| + perceptual_weight * P(x̂, x)
            + kl_weight * mean_b KL(q(z|x_b) || N(0, I))   (summed over latent elements)
            + adv_weight_t * G(D(x̂))

    as in MONAI's brain latent-diffusion tutorial (mean L1, per-sample summed KL, ``kl_weight =
    1e-6``) and Esser et al. 2021 / Rombach et al. 2022 for the perceptual (LPIPS-style VGG) and
    patch adversarial terms (hinge loss, ``D = NLayerDiscriminator``, optional adaptive weight).
    The discriminator step minimises ``0.5 * (loss(D(x), real) + loss(D(x̂), fake))``.

    Args:
        net: Keyword arguments of :class:`medgen.nets.VAENet` (spatial latent; ``spatial_dims``
            is filled in): ``in_channels``, ``channels``, ``num_res_blocks``,
            ``attention_levels``, ``latent_channels``, ``norm_num_groups``, ...
        spatial_dims: 2 or 3.
        kl_weight: Weight of the KL term (1e-6).
        recon_weight: Weight of the L1 term.
        perceptual: :class:`~medgen.losses.PerceptualLoss` kwargs plus ``weight`` (default 1;
            0 turns it off); ``weights_path: null`` disables it with one warning.
        discriminator: Net config of the patch discriminator (``_target_`` + kwargs, default
            ``medgen.nets.NLayerDiscriminator``), or ``None`` for no adversarial term.
        adv_weight: Weight of the generator's adversarial term (0 = off).
        adv_start_step: Autoencoder step from which the adversarial terms are on.
        adaptive_adv_weight: Multiply ``adv_weight`` by Esser et al.'s adaptive weight.
        adv_loss: ``"hinge"`` (default), ``"non_saturating"`` or ``"lsgan"``.
        optimizer: Autoencoder optimiser config (default Adam, lr 1e-4).
        optimizer_d: Discriminator optimiser config (default: the autoencoder's).
        scheduler: Optional scheduler config (one per optimiser).
        image_key: Batch key of the images.
        value_range: ``(low, high)`` of the data; the data range of PSNR/SSIM.
        spacing: Voxel spacing of exported 3D samples.
        num_log_images: Images per validation grid.
        sample_size: Spatial size of samples (recorded from the first training batch).
        gradient_clip_val: Clip each optimiser step's gradients to this global norm (null: no
            clipping; ``trainer.gradient_clip_val`` does not apply to these manual steps).
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        kl_weight: float = 1e-6,
        recon_weight: float = 1.0,
        perceptual: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        adv_weight: float = 0.5,
        adv_start_step: int = 0,
        adaptive_adv_weight: bool = True,
        adv_loss: str = "hinge",
        optimizer: Mapping[str, Any] | None = None,
        optimizer_d: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        image_key: str = "image",
        value_range: Sequence[float] = (0.0, 1.0),
        spacing: Sequence[float] | None = None,
        num_log_images: int = 8,
        sample_size: Sequence[int] | None = None,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            value_range=value_range,
            optimizer=optimizer,
            optimizer_d=optimizer_d,
            scheduler=scheduler,
            spacing=spacing,
            image_key=image_key,
            recon_weight=recon_weight,
            perceptual=perceptual,
            adv_weight=adv_weight,
            adv_start_step=adv_start_step,
            adaptive_adv_weight=adaptive_adv_weight,
            adv_loss=adv_loss,
            num_log_images=num_log_images,
            sample_size=sample_size,
            gradient_clip_val=gradient_clip_val,
        )
        self.save_hyperparameters()
        net_kwargs = dict(net or {})
        net_kwargs.setdefault("spatial_dims", spatial_dims)
        if net_kwargs["spatial_dims"] != spatial_dims:
            raise ValueError("net.spatial_dims differs from the model's spatial_dims")
        if net_kwargs.get("latent_dim") is not None:
            raise ValueError("AutoencoderKL needs a spatial latent: leave net.latent_dim unset")
        # VAENet, or another allow-listed net with its interface (medgen.nets.AutoencoderKLNet:
        # MONAI's AutoencoderKL layout).
        target = net_kwargs.pop("_target_", None)
        net_cls = VAENet if target is None else resolve_target(canonical_name(target))
        self.net = net_cls(**net_kwargs)
        self.kl_weight = float(kl_weight)
        self.discriminator = (
            _build_discriminator(
                discriminator, spatial_dims, net_kwargs.get("in_channels", 1), "discriminator"
            )
            if discriminator is not None
            else None
        )

    @property
    def has_discriminator(self) -> bool:
        return self.discriminator is not None

    def discriminators(self) -> list[nn.Module]:
        return [self.discriminator] if self.discriminator is not None else []

    def _encoder_head(self, h: Tensor) -> Tensor:
        # The posterior mean of the encoder's moments.
        return DiagonalGaussian.from_moments(h).mode()

    def _random_latents(self, num: int, shape: tuple[int, ...], generator) -> Tensor:
        return torch.randn((num, *shape), generator=generator)

    def autoencoder_terms(self, x: Tensor) -> dict[str, Tensor]:
        recon_x, posterior = self.net(x)
        recon = F.l1_loss(recon_x.float(), x.float())
        perceptual = self.perceptual_loss(recon_x.float(), x.float())
        kl = posterior.kl().float().mean()
        rec_total = self.recon_weight * recon + self.perceptual_weight * perceptual
        loss = rec_total + self.kl_weight * kl
        terms = {"recon": recon, "perceptual": perceptual, "kl": kl}
        adv = recon.new_zeros(())
        weight = recon.new_zeros(())
        if self.adv_active():
            adv = self.objective.generator_loss(self.discriminator, recon_x)
            weight = recon.new_tensor(self.adv_weight)
            if self.adaptive_adv_weight:
                weight = weight * self.adaptive_weight(rec_total, adv)
            loss = loss + weight * adv
        terms.update(adv=adv, adv_weight=weight, loss=loss, recon_x=recon_x)
        return terms

    def discriminator_terms(self, x: Tensor, recon_x: Tensor) -> dict[str, Tensor]:
        return self.objective.discriminator_terms(self.discriminator, x, recon_x)


class VQGAN(LatentAutoencoder):
    """VQ-GAN first stage of Medical Diffusion (Khader et al. 2023), 2D or 3D.

    Autoencoder step, ``x̂ = decode(quantise(encode(x)))``::

        recon_weight * mean|x - x̂| + commitment (beta = 0.25, in the quantiser)
            + perceptual_weight * P_2.5D(x̂, x)                     (random 2D slices)
            + adv_weight_t * (image_gan_weight * G(D_2d(slices of x̂))
                              + volume_gan_weight * G(D_3d(x̂)))
            + [step >= adv_start_step] * feature_matching_weight * FM

    where ``FM`` is the sum over the discriminators whose GAN weight is not 0 (the weight itself
    does not scale it, as in Medical Diffusion's code) of :func:`feature_matching_loss`, ``sum_i
    4 / (n_layers + 1) * mean|D_i(x̂) - D_i(x)|`` over the ``n_layers + 1`` intermediate feature
    maps ``D_i`` (medgen 0.1.0 divided by ``n_layers + 2``: 0.8 of upstream's weight). The 2D slice
    discriminator sees one random slice per sample along ``slice_axis``; in 2D there is only the
    image discriminator, on whole images. Discriminator step: ``0.5 * (loss(D(x), real) +
    loss(D(x̂), fake))`` for each discriminator, weighted like the generator terms (hinge).
    The codebook (EMA, dead-code restarts) is in :class:`medgen.nets.VQGANNet`; its usage and
    perplexity are logged (``train/usage``, ``train/perplexity``, ``val/usage``,
    ``val/perplexity``).

    Medical Diffusion's settings: 16384 codes, embedding dim 8, channels [16, 32, 64] (16 hidden
    channels, downsampling 4 per axis), L1 weight 4, perceptual weight 4, image and volume GAN
    weights 1, feature-matching weight 4, discriminator start 10000 steps, hinge loss, Adam lr
    3e-4, batch 2 (see ``medgen/configs/model/vqgan.yaml``).

    Args:
        net: Keyword arguments of :class:`medgen.nets.VQGANNet` (``spatial_dims`` filled in).
        spatial_dims: 2 or 3.
        recon_weight: Weight of the L1 term.
        perceptual: :class:`~medgen.losses.PerceptualLoss` kwargs plus ``weight`` (2.5D on
            volumes: ``axes`` and ``num_slices`` choose the slices).
        discriminator: Net config of the volume (3D) or image (2D) discriminator, or ``None``.
        slice_discriminator: Net config of the 2D slice discriminator (3D only), or ``None``.
        slice_axis: Spatial axis (0 = D) along which slices are drawn for it.
        image_gan_weight: Weight of the 2D (slice or image) discriminator's terms.
        volume_gan_weight: Weight of the 3D discriminator's terms.
        feature_matching_weight: Weight of the feature-matching term (0 = off).
        adv_weight: Overall weight of the adversarial terms.
        adv_start_step: Autoencoder step from which discriminators and adversarial terms are on.
        adaptive_adv_weight: Multiply by Esser et al.'s adaptive weight (off in Medical Diffusion).
        adv_loss: GAN loss of the discriminators (``"hinge"``).
        optimizer, optimizer_d, scheduler, image_key, value_range, spacing, num_log_images,
        sample_size: As for :class:`AutoencoderKL`.
        gradient_clip_val: As for :class:`AutoencoderKL` (Medical Diffusion's VQ-GAN: 1.0).
    """

    latent_kind = "codebook"

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        spatial_dims: int = 3,
        recon_weight: float = 4.0,
        perceptual: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        slice_discriminator: Mapping[str, Any] | None = None,
        slice_axis: int = 0,
        image_gan_weight: float = 1.0,
        volume_gan_weight: float = 1.0,
        feature_matching_weight: float = 4.0,
        adv_weight: float = 1.0,
        adv_start_step: int = 10000,
        adaptive_adv_weight: bool = False,
        adv_loss: str = "hinge",
        optimizer: Mapping[str, Any] | None = None,
        optimizer_d: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        image_key: str = "image",
        value_range: Sequence[float] = (0.0, 1.0),
        spacing: Sequence[float] | None = None,
        num_log_images: int = 8,
        sample_size: Sequence[int] | None = None,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            value_range=value_range,
            optimizer=optimizer
            or {"_target_": "torch.optim.Adam", "lr": 3e-4, "betas": [0.5, 0.9]},
            optimizer_d=optimizer_d,
            scheduler=scheduler,
            spacing=spacing,
            image_key=image_key,
            recon_weight=recon_weight,
            perceptual=perceptual,
            adv_weight=adv_weight,
            adv_start_step=adv_start_step,
            adaptive_adv_weight=adaptive_adv_weight,
            adv_loss=adv_loss,
            num_log_images=num_log_images,
            sample_size=sample_size,
            gradient_clip_val=gradient_clip_val,
        )
        self.save_hyperparameters()
        net_kwargs = dict(net or {})
        net_kwargs.setdefault("spatial_dims", spatial_dims)
        if net_kwargs["spatial_dims"] != spatial_dims:
            raise ValueError("net.spatial_dims differs from the model's spatial_dims")
        self.net = VQGANNet(**net_kwargs)
        in_channels = net_kwargs.get("in_channels", 1)
        if slice_axis not in range(spatial_dims):
            raise ValueError(f"slice_axis must be in [0, {spatial_dims}), got {slice_axis}")
        self.slice_axis = int(slice_axis)
        self.image_gan_weight = float(image_gan_weight)
        self.volume_gan_weight = float(volume_gan_weight)
        self.feature_matching_weight = float(feature_matching_weight)
        if spatial_dims == 2:
            # In 2D, the image discriminator is the only one: the 2D config is `discriminator`.
            config = discriminator if discriminator is not None else slice_discriminator
            self.image_discriminator = (
                _build_discriminator(config, 2, in_channels, "discriminator")
                if config is not None
                else None
            )
            self.volume_discriminator = None
        else:
            self.image_discriminator = (
                _build_discriminator(slice_discriminator, 2, in_channels, "slice_discriminator")
                if slice_discriminator is not None
                else None
            )
            self.volume_discriminator = (
                _build_discriminator(discriminator, 3, in_channels, "discriminator")
                if discriminator is not None
                else None
            )

    @property
    def has_discriminator(self) -> bool:
        return bool(self.discriminators())

    def discriminators(self) -> list[nn.Module]:
        return [d for d in (self.image_discriminator, self.volume_discriminator) if d is not None]

    # ----------------------------------------------------------------- codes
    def _post_encode(self, z: Tensor) -> Tensor:
        # Quantise after blending: blended codes are not codes. Eval mode: the codebook is fixed.
        return self.quantize(z) if getattr(self, "_quantize_encoded", True) else z

    @torch.no_grad()
    def encode(self, x: Tensor, *args: Any, quantize: bool = True, **kwargs: Any) -> Tensor:
        """:meth:`LatentAutoencoder.encode`; ``quantize=False`` returns the continuous latents
        before the codebook (Medical Diffusion trains its DDPM on those, and snaps the sampled
        latents to the codebook when decoding: ``decode(quantize=True)``)."""
        self._quantize_encoded = bool(quantize)
        try:
            return super().encode(x, *args, **kwargs)
        finally:
            self._quantize_encoded = True

    @torch.no_grad()
    def quantize(self, z: Tensor) -> Tensor:
        """Nearest codebook vectors of latents ``(B, D, *spatial)`` (never updates the codebook)."""
        was_training = self.net.quantizer.training
        self.net.quantizer.eval()
        try:
            return self.net.quantizer(z.to(self.net.quantizer.embedding.dtype)).quantized
        finally:
            self.net.quantizer.train(was_training)

    @torch.no_grad()
    def decode(self, z: Tensor, *args: Any, quantize: bool = False, **kwargs: Any) -> Tensor:
        """:meth:`LatentAutoencoder.decode`; ``quantize=True`` first snaps ``z`` to the nearest
        codes (for latents from a diffusion model, as latent diffusion on VQ models does)."""
        if quantize:
            self._check_input(z, "z")
            z = self.quantize(z.to(self.device))
        return super().decode(z, *args, **kwargs)

    @torch.no_grad()
    def encode_indices(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Code indices ``(B, *spatial / f)`` of images ``x`` (``encode`` kwargs accepted)."""
        q = self.encode(x, **kwargs)
        quantizer = self.net.quantizer
        was_training = quantizer.training
        quantizer.eval()
        try:
            return quantizer(q.to(quantizer.embedding.dtype)).indices
        finally:
            quantizer.train(was_training)

    def _random_latents(self, num: int, shape: tuple[int, ...], generator) -> Tensor:
        k = self.net.quantizer.num_embeddings
        indices = torch.randint(k, (num, *shape[1:]), generator=generator)
        return self.net.quantizer.lookup(indices.to(self.net.quantizer.embedding.device)).cpu()

    # ----------------------------------------------------------------- losses
    def _slices(self, volumes: Sequence[Tensor]) -> list[Tensor]:
        """One random slice per sample along ``slice_axis``, the same for every tensor given."""
        x = volumes[0]
        dim = 2 + self.slice_axis
        index = torch.randint(x.shape[dim], (x.shape[0],), device=x.device)
        out = []
        for v in volumes:
            moved = v.movedim(dim, 2)  # (B, C, S, a, b)
            out.append(moved[torch.arange(v.shape[0], device=v.device), :, index])
        return out

    def _pairs(self, x: Tensor, recon_x: Tensor) -> list[tuple[nn.Module, float, Tensor, Tensor]]:
        """``(discriminator, weight, real, fake)`` for every discriminator."""
        pairs = []
        if self.image_discriminator is not None:
            if self.spatial_dims == 3:
                real, fake = self._slices([x, recon_x])
            else:
                real, fake = x, recon_x
            pairs.append((self.image_discriminator, self.image_gan_weight, real, fake))
        if self.volume_discriminator is not None:
            pairs.append((self.volume_discriminator, self.volume_gan_weight, x, recon_x))
        return pairs

    @staticmethod
    def _features(discriminator: nn.Module, x: Tensor) -> list[Tensor]:
        if hasattr(discriminator, "features"):
            return discriminator.features(x)
        return [discriminator(x)]

    def autoencoder_terms(self, x: Tensor) -> dict[str, Tensor]:
        recon_x, vq = self.net(x)
        recon = F.l1_loss(recon_x.float(), x.float())
        perceptual = self.perceptual_loss(recon_x.float(), x.float())
        rec_total = self.recon_weight * recon + self.perceptual_weight * perceptual
        loss = rec_total + vq.loss
        zero = recon.new_zeros(())
        terms = {
            "recon": recon,
            "perceptual": perceptual,
            "commitment": vq.loss.detach(),
            "perplexity": vq.perplexity.detach(),
            "usage": vq.usage.detach(),
        }
        adv, fm, weight = zero, zero, zero
        if self.adv_active():
            for discriminator, w, real, fake in self._pairs(x, recon_x):
                fake_feats = self._features(discriminator, fake)
                adv = adv + w * self.objective.generator_term(fake_feats[-1])
                if self.feature_matching_weight > 0 and w > 0:
                    with torch.no_grad():
                        real_feats = self._features(discriminator, real)
                    fm = fm + feature_matching_loss(fake_feats[:-1], real_feats[:-1])
            weight = recon.new_tensor(self.adv_weight)
            if self.adaptive_adv_weight:
                weight = weight * self.adaptive_weight(rec_total, adv)
            loss = loss + weight * adv + self.feature_matching_weight * fm
        terms.update(adv=adv, feature_matching=fm, adv_weight=weight, loss=loss, recon_x=recon_x)
        return terms

    def discriminator_terms(self, x: Tensor, recon_x: Tensor) -> dict[str, Tensor]:
        total = x.new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        for discriminator, w, real, fake in self._pairs(x, recon_x):
            name = "d_image" if discriminator is self.image_discriminator else "d_volume"
            d = self.objective.discriminator_terms(discriminator, real, fake)["d_loss"]
            terms[name] = d.detach()
            total = total + w * d
        terms["d_loss"] = total
        return terms

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        x = batch[self.image_key]
        out = self.net.quantizer(self.net.encode(x))
        self.log("val/perplexity", out.perplexity, sync_dist=True)
        self.log("val/usage", out.usage, sync_dist=True)
