"""Image-to-image translation (2D/3D): pix2pix, Pyramid pix2pix and CycleGAN (with COMI's terms).

Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks" (pix2pix), CVPR
2017; Liu et al., "BCI: Breast Cancer Immunohistochemical Image Generation through Pyramid Pix2pix",
CVPR-W 2022 (arXiv 2204.11425; the pyramid loss); Zhu et al., "Unpaired Image-to-Image Translation
using Cycle-Consistent Adversarial Networks" (CycleGAN), ICCV 2017; Zhang et al., "Correction of
out-of-focus microscopic images by deep learning" (COMI), Comput. Struct. Biotechnol. J. 20, 2022.

The nets live in :mod:`medgen.nets.translation`, the losses in :mod:`medgen.losses`; this module
owns the optimisation steps, validation against targets and deterministic (optionally tiled)
inference. Unlike the reference code, the models keep any number of channels and any intensity
range, run in 3D, and translate in evaluation mode by default (no dropout, running batch-norm
statistics), so the same input always gives the same output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.inference import AUTO_TILE, Tiling
from medgen.losses.adversarial import AdversarialObjective, has_batch_norm, resolve_adv_loss
from medgen.losses.perceptual import PerceptualLoss
from medgen.losses.pyramid import PyramidL1Loss
from medgen.metrics import PairwiseMetrics
from medgen.models.adversarial import (
    DEFAULT_GAN_OPTIMIZER,
    AdversarialModule,
    build_net,
    zero_step_counter,
)
from medgen.models.base import TRANSLATE
from medgen.nets.translation import init_weights
from medgen.nn.checkpointing import BufferSnapshot, tracked_stat_buffers
from medgen.utils.image_pool import ImagePool

#: GAN modes of the reference code (the deprecated ``gan_mode``), and the ``adv_loss`` of each.
GAN_MODES: dict[str, str] = {
    "vanilla": "non_saturating",
    "lsgan": "lsgan",
    "wgangp": "wgan",
    "hinge": "hinge",
}
DEFAULT_RESNET: dict[str, Any] = {"_target_": "medgen.nets.ResnetGenerator", "n_blocks": 9}
DEFAULT_PATCHGAN: dict[str, Any] = {"_target_": "medgen.nets.NLayerDiscriminator", "n_layers": 3}


def gan_mode_loss(gan_mode: str) -> str:
    """The ``adv_loss`` of a pix2pix/CycleGAN ``gan_mode`` (the reference code's names)."""
    if gan_mode not in GAN_MODES:
        raise ValueError(f"unknown gan_mode {gan_mode!r}; valid: {', '.join(GAN_MODES)}")
    return GAN_MODES[gan_mode]


def translation_adv_loss(adv_loss: str, gan_mode: str | None) -> str:
    """``adv_loss``, or the deprecated ``gan_mode`` (validated by its own names) when given."""
    if gan_mode is not None:
        gan_mode = gan_mode_loss(gan_mode)
    return resolve_adv_loss(adv_loss, gan_mode, "gan_mode")


def size_multiple(net: nn.Module) -> int:
    """The factor every spatial size must be divisible by for ``net`` (1 when unconstrained)."""
    from medgen.nets.translation import ResnetGenerator, UnetGenerator

    if isinstance(net, UnetGenerator):
        return 2**net.num_downs
    if isinstance(net, ResnetGenerator):
        return 4
    return int(getattr(net, "size_multiple", 1))


def _net_config(
    config: Mapping[str, Any] | None, default: Mapping[str, Any], **fill: Any
) -> dict[str, Any]:
    config = dict(config or default)
    for key, value in fill.items():
        config.setdefault(key, value)
    return config


@contextlib.contextmanager
def inference_mode(net: nn.Module, deterministic: bool = True) -> Iterator[nn.Module]:
    """Run ``net`` for inference, restoring its mode (and statistics) afterwards.

    ``deterministic=True`` puts it in eval mode: no dropout, running batch-norm statistics.
    ``deterministic=False`` reproduces the reference code's default test behaviour (dropout on,
    batch statistics of the input); the running statistics that training mode updates are
    restored on exit, so inference never changes the model.
    """
    was_training = net.training
    snapshot = BufferSnapshot(tracked_stat_buffers([net]))
    snapshot.__enter__()
    net.train(not deterministic)
    try:
        yield net
    finally:
        net.train(was_training)
        with torch.no_grad():
            for buffer, saved in zip(snapshot.buffers, snapshot.saved, strict=True):
                buffer.copy_(saved)


class TranslationModule(AdversarialModule):
    """What pix2pix and CycleGAN share: units, padding to the nets' size multiple, validation
    against targets, deterministic and tiled translation.

    Batches are dicts with a source image under ``source_key`` (``"a"``) and its target (or, for
    unpaired training, an image of the target domain) under ``target_key`` (``"b"``), both in
    data units (``value_range``); the nets see them mapped to [-1, 1]. Validation translates
    the source and compares the output with the target (PSNR, SSIM, MS-SSIM, MAE, Pearson r as
    ``val/...``), so validation data must be aligned pairs.
    """

    #: Translation models map an input to an output; they draw no unconditional samples.
    unconditional = False
    capabilities = frozenset({TRANSLATE})
    #: A plateau learning-rate policy follows the validation MAE unless told otherwise.
    plateau_monitor = "val/mae"

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        adv_loss: str,
        gp_weight: float,
        optimizer_g: Mapping[str, Any] | None,
        source_key: str,
        target_key: str,
        num_log_images: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer_g=optimizer_g or DEFAULT_GAN_OPTIMIZER, **kwargs)
        if gp_weight < 0:
            raise ValueError(f"gp_weight must be >= 0, got {gp_weight}")
        # The gradient penalty belongs to the Wasserstein loss here (pix2pix's wgangp mode).
        self.objective = AdversarialObjective(
            adv_loss, float(gp_weight) if adv_loss == "wgan" else 0.0, d_scale=0.5
        )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.source_key, self.target_key = source_key, target_key
        self.image_key = source_key  # the batch key of the model's input images
        self.num_log_images = num_log_images
        metrics = ("psnr", "ssim", "ms_ssim", "mae", "pearson_r")
        self.val_metrics = PairwiseMetrics(
            data_range=self.data_range,
            spatial_dims=self.spatial_dims,
            metrics=metrics,
            prefix="val/",
        )
        self.register_buffer("generator_steps", zero_step_counter())

    # ----------------------------------------------------------------- nets
    def generator_for(self, direction: str = "a2b") -> nn.Module:
        """The generator translating in ``direction`` (``"a2b"``; CycleGAN also ``"b2a"``)."""
        raise NotImplementedError

    def check_discriminator(self, discriminator: nn.Module) -> None:
        """Refuse batch norm in ``discriminator`` under the (per-sample) gradient penalty."""
        if self.objective.gp_weight > 0 and has_batch_norm(discriminator):
            raise ValueError(
                "adv_loss=wgan (gan_mode=wgangp) adds a per-sample gradient penalty, which batch "
                "norm in the discriminator breaks (batch statistics couple the samples); set the "
                "discriminator's norm to instance or none"
            )

    # ----------------------------------------------------------------- batches
    def _pair(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The batch's source and target images, checked against the nets' channels."""
        for key in (self.source_key, self.target_key):
            if key not in batch:
                raise KeyError(
                    f"batch has no '{key}' image (keys: {sorted(batch)}); set the model's "
                    "source_key/target_key or use a paired/unpaired dataset"
                )
        # Plain tensors: MONAI MetaTensors would carry their metadata (numpy affines) into the
        # outputs, the image pools and so into checkpoints, which then no longer load safely.
        a, b = (
            x.as_tensor() if hasattr(x, "as_tensor") else x
            for x in (batch[self.source_key], batch[self.target_key])
        )
        for name, x, channels in (
            ("source", a, self.in_channels),
            ("target", b, self.out_channels),
        ):
            if x.ndim != self.spatial_dims + 2 or x.shape[1] != channels:
                raise ValueError(
                    f"{name} batch has shape {tuple(x.shape)}, expected (B, {channels}, "
                    f"*{self.spatial_dims} spatial axes); set the model's in_channels/out_channels "
                    "to the data's"
                )
        return a, b

    def _run(
        self, generator: nn.Module, x: Tensor, net: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """``generator(x)`` in net units, reflect-padding to its size multiple and cropping back
        (``net``, if given, runs instead of ``generator``)."""
        net = generator if net is None else net
        multiple = size_multiple(generator)
        spatial = x.shape[2:]
        pad = [(-s) % multiple for s in spatial]
        if not any(pad):
            return net(x)
        flat: list[int] = []
        for p in reversed(pad):  # F.pad lists the last axis first
            flat += [p // 2, p - p // 2]
        mode = "reflect" if all(p < s for p, s in zip(pad, spatial, strict=True)) else "replicate"
        out = net(F.pad(x, flat, mode=mode))
        index = [slice(None), slice(None)] + [
            slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial, strict=True)
        ]
        return out[tuple(index)]

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        a, b = self._pair(batch)
        out = self.to_data(self._run(self.generator_for("a2b"), self.to_net(a)))
        self.val_metrics.update(out.float(), b.float())

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=False)
        self.val_metrics.reset()

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        a, b = self._pair(batch)
        a, b = a[: self.num_log_images], b[: self.num_log_images]
        return {"inputs": a, "outputs": self.translate(a, tile=None), "targets": b}

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def translate(
        self,
        x: Tensor,
        direction: str = "a2b",
        tiling: Tiling | Mapping[str, Any] | int | Sequence[int] | str | None = None,
        *,
        deterministic: bool = True,
        **options: Any,
    ) -> Tensor:
        """Translate images ``(B, C_in, *spatial)`` (or one ``(C_in, *spatial)``) in data units.

        Any spatial size works: the input is reflect-padded to the generator's size multiple and
        the output cropped back. Images larger than the tile along some axis are translated tile by
        tile with blended overlaps (:func:`medgen.inference.tiled_apply`), so memory follows the
        tile size, not the image size; smaller ones are translated whole.

        Args:
            x: Source images in data units, on any device (the output comes back there).
            direction: ``"a2b"``, or ``"b2a"`` for a CycleGAN.
            tiling: How to tile (:class:`~medgen.inference.Tiling`, a dict of its settings, or
                the tile size). Defaults here: ``tile="auto"`` (512 in 2D, 128 in 3D;
                ``tile=None`` translates the whole image at once), ``overlap=0.25``, and
                ``margin="auto"`` (half the overlap is discarded at inner tile edges, where the
                net saw no context). ``layerwise=True`` (ResNet generators) translates layer by
                layer (:func:`medgen.inference.layerwise_apply`): every stage runs over the
                whole image in tiles with exact halos and whole-image instance-norm statistics,
                so the result equals a whole-image pass up to float rounding, with one tile's
                memory on the model's device and the intermediate images in host memory (or
                ``offload_dir``).
            deterministic: Eval mode (no dropout, running statistics; the default). ``False``
                reproduces the reference code's test mode (dropout and batch statistics on),
                without changing the stored statistics.
            **options: Tiling settings as keywords (``tile=256, overlap=0.5``), overriding
                ``tiling``'s.

        Returns:
            ``(B, C_out, *spatial)`` float32 in data units (``(C_out, *spatial)`` for one image).
        """
        single = x.ndim == self.spatial_dims + 1
        if single:
            x = x.unsqueeze(0)
        expected = self.in_channels if direction == "a2b" else self.out_channels
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != expected:
            raise ValueError(
                f"expected {self.spatial_dims}D images with {expected} channel(s), shaped "
                f"(B, {expected}, *spatial), got {tuple(x.shape)}"
            )
        tiling = Tiling.from_any({"tile": "auto"} if tiling is None else tiling, **options)
        tiling = tiling.with_defaults(overlap=0.25, margin="auto")
        generator = self.generator_for(direction)
        multiple = size_multiple(generator)
        if tiling.layerwise and tiling.tile_size(x.shape[2:], multiple) is not None:
            if not hasattr(generator, "stages"):
                raise ValueError(
                    f"layerwise translation needs a ResNet generator; {type(generator).__name__} "
                    "has no layer-by-layer form (translate it with blended tiles)"
                )
            if not deterministic:
                raise ValueError("layerwise translation runs in evaluation mode (deterministic)")
            exact = tiling.replace(output_device=tiling.output_device or str(x.device))

            def staged(t: Tensor) -> Tensor:
                return exact.apply(
                    generator, t, multiple=multiple, stages=generator.stages, device=self.device
                )

            with inference_mode(generator, deterministic):
                # The whole image in net units (pointwise), padded once; tiles move to the device.
                out = self._run(generator, self.to_net(x.to(self.dtype)), staged).float()
            out = self.to_data(out)
            return out[0] if single else out

        def fn(t: Tensor) -> Tensor:
            t = self.to_net(t.to(self.device, self.dtype))
            return self._run(generator, t).float()

        blended = tiling.replace(
            layerwise=False, output_device=tiling.output_device or str(x.device)
        )
        with inference_mode(generator, deterministic):
            out = blended.apply(fn, x, multiple=multiple)
        out = self.to_data(out.to(x.device))
        return out[0] if single else out

    @torch.no_grad()
    def sample(self, num_samples: int, seed: int | None = None, **kwargs: Any) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} translates images (translate, or medgen-sample input=PATH); "
            "it draws no unconditional samples"
        )


class Pix2Pix(TranslationModule):
    """Conditional GAN ``G: a -> b`` with a conditional PatchGAN ``D(a, b)`` and an L1 or pyramid term.

    Per batch (pix2pix, Isola et al. 2017, eq. 4): ``fake = G(a)``; one discriminator step on
    ``0.5 * (loss(D(a, b), real) + loss(D(a, fake), fake))`` (plus ``gp_weight`` times the
    per-sample gradient penalty in ``wgangp`` mode); then one generator step on
    ``loss(D(a, fake), real) + reconstruction`` where reconstruction is ``lambda_l1 * |fake - b|``
    (``reconstruction="l1"``, 100 in the paper) or the BCI paper's multi-scale
    :class:`~medgen.losses.PyramidL1Loss` (``reconstruction="pyramid"``: L1 at full resolution and
    on three successively blurred and halved copies, each weighted 25, Liu et al. 2022). L1 is
    computed in the nets' [-1, 1] units, as upstream.

    Args:
        generator: Net config of ``G`` (default ResNet-9; ``spatial_dims``, ``in_channels``,
            ``out_channels`` filled in).
        discriminator: Net config of ``D`` (default the 70x70 PatchGAN); its ``in_channels`` is
            ``in_channels + out_channels`` (input and output concatenated).
        spatial_dims: 2 or 3.
        in_channels: Channels of the source images.
        out_channels: Channels of the target images.
        adv_loss: ``"non_saturating"`` (BCE with logits, pix2pix's ``vanilla``), ``"lsgan"``
            (least squares), ``"wgan"`` (Wasserstein, with the gradient penalty) or ``"hinge"``.
        gp_weight: Gradient-penalty weight with ``adv_loss="wgan"`` (10, Gulrajani et al. 2017).
        reconstruction: ``"l1"`` or ``"pyramid"``.
        lambda_l1: Weight of the L1 term (``reconstruction="l1"``).
        pyramid: Keyword arguments of :class:`~medgen.losses.PyramidL1Loss` (``num_levels`` 4,
            ``level_weights`` 25, ...).
        init_type: Initialisation of both nets (``normal``, ``xavier``, ``kaiming``,
            ``orthogonal``; ``None`` keeps PyTorch's).
        init_gain: Scale of ``normal``/``xavier``/``orthogonal`` initialisation.
        optimizer_g: Optimiser config of ``G`` (Adam 2e-4, betas (0.5, 0.999)).
        optimizer_d: Optimiser config of ``D`` (default: ``optimizer_g``).
        scheduler: Optional scheduler config, one instance per optimiser, stepped every epoch,
            e.g. :func:`medgen.utils.schedulers.lr_policy` (``policy: linear``).
        source_key: Batch key of the source images.
        target_key: Batch key of the target images.
        value_range: Data range of the images.
        spacing: Voxel spacing of written 3D outputs.
        num_log_images: Images per validation grid.
        gan_mode: Deprecated: the reference code's name of the loss (``vanilla``, ``lsgan``,
            ``wgangp``, ``hinge``); wins over ``adv_loss`` when given, with a warning.
    """

    export_modules = ("generator",)

    def __init__(
        self,
        generator: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        adv_loss: str = "non_saturating",
        gp_weight: float = 10.0,
        reconstruction: str = "l1",
        lambda_l1: float = 100.0,
        pyramid: Mapping[str, Any] | None = None,
        init_type: str | None = "normal",
        init_gain: float = 0.02,
        optimizer_g: Mapping[str, Any] | None = None,
        optimizer_d: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        source_key: str = "a",
        target_key: str = "b",
        value_range: Sequence[float] = (0.0, 1.0),
        spacing: Sequence[float] | None = None,
        num_log_images: int = 8,
        gan_mode: str | None = None,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            adv_loss=translation_adv_loss(adv_loss, gan_mode),
            gp_weight=gp_weight,
            optimizer_g=optimizer_g,
            optimizer_d=optimizer_d,
            scheduler=scheduler,
            value_range=value_range,
            spacing=spacing,
            source_key=source_key,
            target_key=target_key,
            num_log_images=num_log_images,
        )
        self.save_hyperparameters()
        if reconstruction not in ("l1", "pyramid"):
            raise ValueError(f"reconstruction must be 'l1' or 'pyramid', got {reconstruction!r}")
        self.generator = build_net(
            _net_config(
                generator, DEFAULT_RESNET, in_channels=in_channels, out_channels=out_channels
            ),
            spatial_dims,
            "generator",
        )
        self.discriminator = build_net(
            {**dict(discriminator or DEFAULT_PATCHGAN), "in_channels": in_channels + out_channels},
            spatial_dims,
            "discriminator",
        )
        self.check_discriminator(self.discriminator)
        if init_type:
            init_weights(self.generator, init_type, init_gain)
            init_weights(self.discriminator, init_type, init_gain)
        self.reconstruction = reconstruction
        self.lambda_l1 = float(lambda_l1)
        self.pyramid = (
            PyramidL1Loss(spatial_dims, **dict(pyramid or {}))
            if reconstruction == "pyramid"
            else None
        )

    def generator_for(self, direction: str = "a2b") -> nn.Module:
        if direction != "a2b":
            raise ValueError(f"Pix2Pix translates a2b only, got direction={direction!r}")
        return self.generator

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        return self.generator.parameters()

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return self.discriminator.parameters()

    def reconstruction_loss(self, fake: Tensor, target: Tensor) -> Tensor:
        """The L1 (weighted by ``lambda_l1``) or pyramid term, in net units."""
        if self.pyramid is not None:
            return self.pyramid(fake.float(), target.float())
        return self.lambda_l1 * F.l1_loss(fake.float(), target.float())

    def discriminator_loss(self, a: Tensor, b: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """``0.5 * (D real + D fake)`` (+ gradient penalty) on concatenated pairs."""
        real_pair, fake_pair = torch.cat([a, b], 1), torch.cat([a, fake.detach()], 1)
        return self.objective.discriminator_terms(self.discriminator, real_pair, fake_pair)

    def generator_loss(self, a: Tensor, b: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """Adversarial + reconstruction terms of the generator step."""
        terms = {
            "g_gan": self.objective.generator_loss(self.discriminator, torch.cat([a, fake], 1)),
            "g_rec": self.reconstruction_loss(fake, b),
        }
        terms["g_loss"] = terms["g_gan"] + terms["g_rec"]
        return terms

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        a, b = self._pair(batch)
        a, b = self.to_net(a), self.to_net(b)
        opt_g, opt_d = self.optimizer_list()
        fake = self._run(self.generator, a)
        d_terms = self.discriminator_loss(a, b, fake)
        self.step_optimizer(opt_d, d_terms["d_loss"])
        g_terms = self.generator_loss(a, b, fake)  # D gets no parameter gradients in this step
        self.step_optimizer(opt_g, g_terms["g_loss"])
        self.count_generator_step()
        self.step_schedulers("step")
        self.log("train/g_loss", g_terms.pop("g_loss").detach(), prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in {**d_terms, **g_terms}.items()})


class CycleGAN(TranslationModule):
    """Two generators ``G_ab``, ``G_ba`` and two discriminators ``D_a``, ``D_b`` on unpaired data.

    Generator step (Zhu et al. 2017, eq. 3, with the identity term of their Sec. 5.2), with
    ``fake_b = G_ab(a)``, ``rec_a = G_ba(fake_b)``, ``fake_a = G_ba(b)``, ``rec_b = G_ab(fake_a)``::

        adv_weight * [loss(D_b(fake_b), real) + loss(D_a(fake_a), real)]
        + lambda_a |rec_a - a| + lambda_b |rec_b - b|
        + lambda_identity * (lambda_b |G_ab(b) - b| + lambda_a |G_ba(a) - a|)
        + adv_cycle_weight * [loss(D_a(rec_a), real) + loss(D_b(rec_b), real)]          (COMI)
        + perceptual_weight * [P(fake_b, a) + P(rec_a, a) + P(fake_a, b) + P(rec_b, b)]  (COMI)

    where ``P`` is the VGG perceptual distance (:class:`~medgen.losses.PerceptualLoss`, local
    weights; COMI uses VGG-19 block3_conv3 on the translated and the cycle-reconstructed images,
    compared here with the image they came from, the content they must keep). Then one step of
    both discriminators on ``0.5 * (loss(D(real), real) + loss(D(pool(fake)), fake))`` each, the
    fakes drawn from an :class:`~medgen.utils.image_pool.ImagePool` of the last ``pool_size``
    generated images. The pools travel with the checkpoint.

    Args:
        generator: Net config of ``G_ab`` (default ResNet-9; channels filled in).
        generator_ba: Net config of ``G_ba`` (default: the same as ``generator`` with the
            channels swapped).
        discriminator: Net config of ``D_a`` and ``D_b`` (default the 70x70 PatchGAN).
        spatial_dims: 2 or 3.
        in_channels: Channels of domain ``a``.
        out_channels: Channels of domain ``b``.
        adv_loss: ``"lsgan"`` (default, as CycleGAN), ``"non_saturating"``, ``"wgan"`` (with the
            gradient penalty) or ``"hinge"``.
        gp_weight: Gradient-penalty weight with ``adv_loss="wgan"``.
        lambda_a: Cycle weight ``a -> b -> a`` (10).
        lambda_b: Cycle weight ``b -> a -> b`` (10).
        lambda_identity: Identity weight relative to the cycle weights (0.5; 0 = off; needs
            ``in_channels == out_channels``).
        adv_weight: Weight of the adversarial terms on translated images (1; COMI 1e-3).
        adv_cycle_weight: Weight of adversarial terms on cycle-reconstructed images (0; COMI 1e-3).
        perceptual: Keyword arguments of :class:`~medgen.losses.PerceptualLoss` (e.g.
            ``arch: vgg19``, ``layers: [block3_conv3]``, ``weights_path``), or ``None``.
        perceptual_weight: Weight of the perceptual terms (COMI 1).
        pool_size: Size of each image pool (50; 0 = no pool).
        init_type: Initialisation of all nets (``None`` keeps PyTorch's).
        init_gain: Scale of the initialisation.
        optimizer_g: Optimiser config of both generators (Adam 2e-4, betas (0.5, 0.999)).
        optimizer_d: Optimiser config of both discriminators (default: ``optimizer_g``).
        scheduler: Optional scheduler config (see :class:`Pix2Pix`).
        source_key: Batch key of domain ``a`` images.
        target_key: Batch key of domain ``b`` images.
        value_range: Data range of the images (both domains).
        spacing: Voxel spacing of written 3D outputs.
        num_log_images: Images per validation grid.
    """

    export_modules = ("generator_ab", "generator_ba")

    def __init__(
        self,
        generator: Mapping[str, Any] | None = None,
        generator_ba: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        adv_loss: str = "lsgan",
        gp_weight: float = 10.0,
        lambda_a: float = 10.0,
        lambda_b: float = 10.0,
        lambda_identity: float = 0.5,
        adv_weight: float = 1.0,
        adv_cycle_weight: float = 0.0,
        perceptual: Mapping[str, Any] | None = None,
        perceptual_weight: float = 1.0,
        pool_size: int = 50,
        init_type: str | None = "normal",
        init_gain: float = 0.02,
        optimizer_g: Mapping[str, Any] | None = None,
        optimizer_d: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        source_key: str = "a",
        target_key: str = "b",
        value_range: Sequence[float] = (0.0, 1.0),
        spacing: Sequence[float] | None = None,
        num_log_images: int = 8,
        gan_mode: str | None = None,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            adv_loss=translation_adv_loss(adv_loss, gan_mode),
            gp_weight=gp_weight,
            optimizer_g=optimizer_g,
            optimizer_d=optimizer_d,
            scheduler=scheduler,
            value_range=value_range,
            spacing=spacing,
            source_key=source_key,
            target_key=target_key,
            num_log_images=num_log_images,
        )
        self.save_hyperparameters()
        if lambda_identity > 0 and in_channels != out_channels:
            raise ValueError(
                f"the identity term feeds domain b images ({out_channels} channels) to G_ab, "
                f"which takes {in_channels}; set lambda_identity: 0 for domains whose channels "
                "differ"
            )
        g_ab = _net_config(
            generator, DEFAULT_RESNET, in_channels=in_channels, out_channels=out_channels
        )
        g_ba = dict(generator_ba) if generator_ba else dict(g_ab)
        if not generator_ba:
            g_ba["in_channels"], g_ba["out_channels"] = out_channels, in_channels
        self.generator_ab = build_net(g_ab, spatial_dims, "generator")
        self.generator_ba = build_net(g_ba, spatial_dims, "generator_ba")
        d_config = dict(discriminator or DEFAULT_PATCHGAN)
        self.discriminator_a = build_net(
            {**d_config, "in_channels": in_channels}, spatial_dims, "discriminator"
        )
        self.discriminator_b = build_net(
            {**d_config, "in_channels": out_channels}, spatial_dims, "discriminator"
        )
        self.check_discriminator(self.discriminator_a)
        if init_type:
            for net in self._nets():
                init_weights(net, init_type, init_gain)
        self.lambda_a, self.lambda_b = float(lambda_a), float(lambda_b)
        self.lambda_identity = float(lambda_identity)
        self.adv_weight, self.adv_cycle_weight = float(adv_weight), float(adv_cycle_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual = (
            PerceptualLoss(spatial_dims, value_range=(-1.0, 1.0), **dict(perceptual))
            if perceptual is not None and perceptual_weight > 0
            else None
        )
        if self.perceptual is not None and in_channels != out_channels:
            raise ValueError(
                "the perceptual terms compare translated images with their sources and need "
                f"in_channels == out_channels, got {in_channels} and {out_channels}"
            )
        self.pool_size = int(pool_size)
        self.pool_a = ImagePool(self.pool_size, torch.Generator().manual_seed(0))
        self.pool_b = ImagePool(self.pool_size, torch.Generator().manual_seed(1))

    def _nets(self) -> tuple[nn.Module, ...]:
        return (self.generator_ab, self.generator_ba, self.discriminator_a, self.discriminator_b)

    def generator_for(self, direction: str = "a2b") -> nn.Module:
        if direction == "a2b":
            return self.generator_ab
        if direction == "b2a":
            return self.generator_ba
        raise ValueError(f"direction must be 'a2b' or 'b2a', got {direction!r}")

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.generator_ab.parameters()
        yield from self.generator_ba.parameters()

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.discriminator_a.parameters()
        yield from self.discriminator_b.parameters()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # Pool draws follow the run's seed (and differ between ranks).
        seed = torch.initial_seed() + 7_919 * self.global_rank
        for i, pool in enumerate((self.pool_a, self.pool_b)):
            if pool.generator is not None and not len(pool):
                pool.generator.manual_seed((seed + i) % 2**63)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["image_pools"] = [self.pool_a.state_dict(), self.pool_b.state_dict()]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        pools = checkpoint.get("image_pools")
        if pools:
            self.pool_a.load_state_dict(pools[0])
            self.pool_b.load_state_dict(pools[1])

    # ----------------------------------------------------------------- losses
    def _gen_adv(self, discriminator: nn.Module, fake: Tensor) -> Tensor:
        return self.objective.generator_loss(discriminator, fake)

    def generator_loss(self, a: Tensor, b: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Generator terms (net units) and the translated ``fake_a``, ``fake_b`` (with graph)."""
        fake_b = self._run(self.generator_ab, a)
        rec_a = self._run(self.generator_ba, fake_b)
        fake_a = self._run(self.generator_ba, b)
        rec_b = self._run(self.generator_ab, fake_a)
        terms = {
            "g_ab": self._gen_adv(self.discriminator_b, fake_b),
            "g_ba": self._gen_adv(self.discriminator_a, fake_a),
            "cycle_a": F.l1_loss(rec_a.float(), a.float()),
            "cycle_b": F.l1_loss(rec_b.float(), b.float()),
        }
        total = self.adv_weight * (terms["g_ab"] + terms["g_ba"])
        total = total + self.lambda_a * terms["cycle_a"] + self.lambda_b * terms["cycle_b"]
        if self.lambda_identity > 0:
            terms["idt_b"] = F.l1_loss(self._run(self.generator_ab, b).float(), b.float())
            terms["idt_a"] = F.l1_loss(self._run(self.generator_ba, a).float(), a.float())
            total = total + self.lambda_identity * (
                self.lambda_b * terms["idt_b"] + self.lambda_a * terms["idt_a"]
            )
        if self.adv_cycle_weight > 0:
            terms["g_cycle_adv"] = self._gen_adv(self.discriminator_a, rec_a) + self._gen_adv(
                self.discriminator_b, rec_b
            )
            total = total + self.adv_cycle_weight * terms["g_cycle_adv"]
        if self.perceptual is not None and self.perceptual.enabled:
            p = self.perceptual
            terms["perceptual"] = p(fake_b, a) + p(rec_a, a) + p(fake_a, b) + p(rec_b, b)
            total = total + self.perceptual_weight * terms["perceptual"]
        terms["g_loss"] = total
        return terms, fake_a, fake_b

    def discriminator_loss(
        self, discriminator: nn.Module, real: Tensor, fake: Tensor
    ) -> dict[str, Tensor]:
        """``0.5 * (D real + D fake)`` (+ gradient penalty) of one discriminator."""
        return self.objective.discriminator_terms(discriminator, real, fake)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        a, b = self._pair(batch)
        a, b = self.to_net(a), self.to_net(b)
        opt_g, opt_d = self.optimizer_list()
        g_terms, fake_a, fake_b = self.generator_loss(a, b)
        self.step_optimizer(opt_g, g_terms["g_loss"])  # the discriminators get no gradients
        d_b = self.discriminator_loss(self.discriminator_b, b, self.pool_b.query(fake_b))
        d_a = self.discriminator_loss(self.discriminator_a, a, self.pool_a.query(fake_a))
        self.step_optimizer(opt_d, d_a["d_loss"] + d_b["d_loss"])
        self.count_generator_step()
        self.step_schedulers("step")
        self.log("train/g_loss", g_terms.pop("g_loss").detach(), prog_bar=True)
        logged = {f"train/{k}": v.detach() for k, v in g_terms.items()}
        for side, terms in (("a", d_a), ("b", d_b)):  # train/d_a_real, ..., train/d_b_loss
            logged.update(
                {f"train/d_{side}_{k.removeprefix('d_')}": v.detach() for k, v in terms.items()}
            )
        self.log_dict(logged)


__all__ = [
    "AUTO_TILE",
    "GAN_MODES",
    "CycleGAN",
    "Pix2Pix",
    "TranslationModule",
    "gan_mode_loss",
    "inference_mode",
    "size_multiple",
]
