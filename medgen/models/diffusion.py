"""Diffusion models (2D/3D) in pixel or latent space as a LightningModule.

The method lives in :mod:`medgen.diffusion` and the network in :class:`medgen.nets.DiffusionUNet`:
a :class:`~medgen.diffusion.DiffusionProcess` (variance-preserving diffusion or rectified flow:
noising, objective, the function samplers call, defaults) and samplers found by name in the open
registry (:func:`~medgen.diffusion.get_sampler`), checked by their capability flags. This module
owns the training loop, the units, the conditioning and guidance, and the latent-space plumbing;
it never asks which process it holds.

- Pixel space: images are mapped from ``value_range`` to ``[-1, 1]``.
- Latent space (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
  CVPR 2022; Khader et al., "Denoising diffusion probabilistic models for 3D medical image
  generation" (Medical Diffusion), Sci. Rep. 2023): a frozen autoencoder with ``encode`` /
  ``decode`` (a medgen ``.ckpt`` or exported folder given as ``autoencoder``) maps images to
  latents, which are multiplied by ``latent_scale`` (``"auto"``: one over the standard deviation of
  the first training batch's latents, kept in a buffer).

The autoencoder travels with the diffusion model: its constructor arguments are recorded as
``autoencoder_config`` and its weights are part of the checkpoint and of the export, so
``medgen.load`` samples from a latent model on a machine that does not have the autoencoder's
original file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen import pretrained
from medgen.data.io import affine_from_axcodes, axcodes_from_affine
from medgen.diffusion import (
    PROCESS_PREDICTIONS,
    DiffusionObjective,
    DiffusionProcess,
    NoiseSchedule,
    RectifiedFlowObjective,
    Sampler,
    condition_dropout_mask,
    get_sampler,
    guided,
    list_samplers,
    make_process,
    repaint_hook,
)
from medgen.diffusion.schedules import resolve_schedule, upgrade_stored_schedule
from medgen.metrics.fidelity import RandomConvFeatures, mmd_rbf
from medgen.models.base import SAMPLE, SAMPLER_OPTIONS, GenerativeModule, seeded_generator
from medgen.utils.instantiate import instantiate
from medgen.utils.targets import public_name

log = logging.getLogger(__name__)

__all__ = ["Diffusion"]

DEFAULT_DIFFUSION_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.AdamW", "lr": 1e-4}
DEFAULT_NET: dict[str, Any] = {"_target_": "medgen.nets.DiffusionUNet"}
#: Prediction types; ``flow`` is rectified flow (velocity, continuous time).
MODEL_PREDICTIONS = PROCESS_PREDICTIONS

_MISSING_AUTOENCODER = (
    "latent diffusion needs a trained autoencoder: pass model.autoencoder=PATH (a .ckpt or an "
    "exported model folder), e.g. first `medgen-train experiment=vqgan_3d`, then "
    "`medgen-train experiment=medical_diffusion model.autoencoder=<that run>/model`"
)


def _is_missing(value: Any) -> bool:
    return value is None or value == "" or value == "???"


def _as_tuple(size: int | Sequence[int], dims: int) -> tuple[int, ...]:
    if isinstance(size, int):
        return (size,) * dims
    size = tuple(int(s) for s in size)
    if len(size) != dims:
        raise ValueError(f"expected {dims} spatial sizes, got {size}")
    return size


def _resize(x: Tensor, size: Sequence[int], reduce: str = "mean") -> Tensor:
    """Resize ``(B, C, *spatial)`` to ``size``: area average / max when shrinking, else nearest."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    dims = x.ndim - 2
    shrinking = all(s <= c for s, c in zip(size, x.shape[2:], strict=True))
    if not shrinking:
        return F.interpolate(x, size=size, mode="nearest")
    if reduce == "max":
        pool = F.adaptive_max_pool2d if dims == 2 else F.adaptive_max_pool3d
    else:
        pool = F.adaptive_avg_pool2d if dims == 2 else F.adaptive_avg_pool3d
    return pool(x, size)


class Diffusion(GenerativeModule):
    """Denoising diffusion or rectified flow, 2D/3D, pixel or latent, with conditioning and CFG.

    Training: for a batch ``x`` (in the net's space: ``[-1, 1]`` pixels or scaled latents), draw
    ``eps ~ N(0, I)`` and a time, noise ``x`` and regress the net's output onto the objective's
    target (:class:`~medgen.diffusion.DiffusionObjective` for ``epsilon`` / ``v`` / ``x0``,
    :class:`~medgen.diffusion.RectifiedFlowObjective` for ``flow``). Conditions (class, scalars)
    are replaced by their null token with probability ``cond_drop_prob`` so the same net also
    learns the unconditional model for classifier-free guidance.

    Validation logs ``val/loss`` at fixed noise and timesteps (comparable across epochs) and
    ``val/mmd``, the RBF-MMD between fixed random-conv features of samples drawn with the cheap
    ``val_sampler`` and of the validation images (the GANs' quality proxy).

    Args:
        net: Net config: :class:`~medgen.nets.DiffusionUNet` kwargs (an optional ``_target_``
            picks another net with the same call signature). ``spatial_dims``, ``in_channels``,
            ``out_channels``, ``num_class_embeds`` and ``num_scalar_conds`` are filled in.
        spatial_dims: 2 or 3.
        channels: Image channels (pixel mode).
        prediction: ``"epsilon"``, ``"v"``, ``"x0"`` or ``"flow"`` (rectified flow).
        schedule: Noise schedule kwargs of :class:`~medgen.diffusion.NoiseSchedule` (``kind``,
            ``num_train_timesteps``, ...); for ``flow`` only ``num_train_timesteps`` is used (the
            scale of the time given to the net).
        loss: ``"l2"`` or ``"l1"``.
        min_snr_gamma: Min-SNR-gamma loss weighting (``None``: off; not for ``flow``).
        flow: Rectified-flow settings: ``time_sampling`` (``uniform`` / ``logit_normal``),
            ``logit_mean``, ``logit_std``, ``shift``.
        sampler: Default sampler of :meth:`sample`: ``{"name": ..., "steps": ..., "eta": ...}``
            (default: the process's, ``ddim`` or ``euler``, 50 steps); any registered sampler
            of the process's family (:func:`~medgen.diffusion.list_samplers`).
        val_sampler: Sampler of validation samples (keep it cheap).
        guidance_scale: Default classifier-free guidance scale of :meth:`sample`.
        clip_sample: Clamp predicted clean images to ``[-1, 1]`` while sampling (default: on in
            pixel space, off in latent space and for ``flow``). In latent space it clamps the
            predicted clean latents, as Medical Diffusion does with its min-max normalised
            latents (``latent_scale: codebook``).
        autoencoder: Latent mode: path of a frozen autoencoder (``.ckpt`` or exported folder) with
            ``encode`` / ``decode``.
        autoencoder_config: Filled in from ``autoencoder`` (its ``_target_`` and constructor
            arguments); rebuilds the autoencoder without the original file.
        latent_channels: Makes a latent model without an autoencoder yet (so that a config
            composes and builds before the autoencoder exists; training and sampling then ask for
            ``autoencoder``). An autoencoder's own latent channels take precedence.
        latent_scale: Factor applied to latents, ``"auto"`` (1 / std of the first batch) or
            ``"codebook"``: map the value range of a VQ autoencoder's codebook onto ``[-1, 1]``
            (a scale and a shift, read from the codebook when used), Medical Diffusion's latent
            normalisation (Khader et al. 2023).
        decode_kwargs: Extra keyword arguments of the autoencoder's ``decode`` (e.g. ``tile``).
        encode_kwargs: Extra keyword arguments of the autoencoder's ``encode`` (e.g.
            ``{quantize: false}``: a VQGAN's continuous latents before the codebook, on which
            Medical Diffusion trains).
        pre_encoded: Batches already hold scaled latents (``medgen-encode`` +
            :class:`medgen.data.LatentDataset`); ``latent_scale`` must then be the folder's
            ``scale_factor`` (from ``latents.json``), which :meth:`decode` divides by.
        image_key: Batch key of the images.
        class_key: Batch key of integer class labels (class conditioning), or ``None``.
        num_classes: Number of classes (required with ``class_key``).
        scalar_keys: Batch keys of scalar conditions (each ``(B,)``; NaN = unknown).
        condition_key: Batch key of an image condition concatenated to the net's input.
        condition_channels: Channels of the image condition.
        cond_drop_prob: Probability of dropping class and scalar conditions in training.
        value_range: Data range ``(low, high)`` of the images.
        optimizer: Optimiser config of the net.
        scheduler: Learning-rate scheduler config, or ``None``.
        spacing: Voxel spacing of exported 3D samples (default: from the first batch's affine when
            it is a MetaTensor, else 1 mm).
        orientation: Axis codes of exported 3D samples, e.g. ``"RAS"`` or ``"LPS"`` (default:
            those of the first batch's affine, i.e. of the data after its preset's ``Orient``,
            when it is a MetaTensor; else ``"RAS"``).
        sample_size: Spatial size of what the net denoises (latent size in latent mode); recorded
            from the first training batch when ``None``.
        num_log_images: Samples per validation image set.
        val_num_samples: Samples drawn for ``val/mmd`` (at most the validation set's size).
        val_features_width: Width of the random-conv feature net of ``val/mmd``.
    """

    export_modules = ("net",)
    capabilities = frozenset({SAMPLE, SAMPLER_OPTIONS})

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        channels: int = 1,
        prediction: str = "epsilon",
        schedule: Mapping[str, Any] | None = None,
        loss: str = "l2",
        min_snr_gamma: float | None = None,
        flow: Mapping[str, Any] | None = None,
        sampler: Mapping[str, Any] | None = None,
        val_sampler: Mapping[str, Any] | None = None,
        guidance_scale: float = 1.0,
        clip_sample: bool | None = None,
        autoencoder: str | None = None,
        autoencoder_config: Mapping[str, Any] | None = None,
        latent_channels: int | None = None,
        latent_scale: float | str = 1.0,
        decode_kwargs: Mapping[str, Any] | None = None,
        encode_kwargs: Mapping[str, Any] | None = None,
        pre_encoded: bool = False,
        image_key: str = "image",
        class_key: str | None = None,
        num_classes: int | None = None,
        scalar_keys: Sequence[str] = (),
        condition_key: str | None = None,
        condition_channels: int | None = None,
        cond_drop_prob: float = 0.0,
        value_range: Sequence[float] = (0.0, 1.0),
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        spacing: Sequence[float] | None = None,
        orientation: str | None = None,
        sample_size: Sequence[int] | None = None,
        num_log_images: int = 8,
        val_num_samples: int = 16,
        val_features_width: int = 16,
    ) -> None:
        optimizer = dict(optimizer or DEFAULT_DIFFUSION_OPTIMIZER)
        if prediction != "flow":  # record the betas used, not the defaults of the day
            schedule = resolve_schedule(schedule)
        super().__init__(spatial_dims, value_range, optimizer, scheduler, spacing)
        self.save_hyperparameters()
        if orientation is not None:
            affine_from_axcodes((1.0, 1.0, 1.0), orientation)  # validates the codes
            orientation = orientation.upper()
        self.orientation = orientation
        self.prediction = prediction
        self.process: DiffusionProcess = make_process(
            prediction, schedule, loss, min_snr_gamma, flow
        )
        self.num_train_timesteps = self.process.num_train_timesteps
        process = self.process
        self.sampler_config = {
            "name": process.default_sampler,
            "steps": process.default_steps,
            **dict(sampler or {}),
        }
        self.val_sampler_config = {
            "name": process.default_sampler,
            "steps": process.default_val_steps,
            **dict(val_sampler or {}),
        }
        for config in (self.sampler_config, self.val_sampler_config):
            spec = self._check_sampler(get_sampler(config["name"]))
            if not spec.supports_eta and config.get("eta"):
                log.warning(
                    "sampler %r takes no eta; eta=%s in its config is ignored",
                    spec.name,
                    config["eta"],
                )
        self.guidance_scale = float(guidance_scale)

        # Conditioning.
        if class_key is not None and (num_classes is None or num_classes < 1):
            raise ValueError("class conditioning (class_key) needs num_classes >= 1")
        if condition_key is not None and (condition_channels is None or condition_channels < 1):
            raise ValueError("image conditioning (condition_key) needs condition_channels >= 1")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.image_key = image_key
        self.class_key = class_key
        self.num_classes = int(num_classes) if class_key is not None else None
        self.scalar_keys = tuple(scalar_keys or ())
        self.condition_key = condition_key
        self.condition_channels = int(condition_channels) if condition_key else 0
        self.cond_drop_prob = float(cond_drop_prob)

        # Latent mode: the frozen autoencoder.
        self.autoencoder: nn.Module | None = None
        self.latent_scale_mode = latent_scale
        if not (latent_scale in ("auto", "codebook") or isinstance(latent_scale, (int, float))):
            raise ValueError(
                f"latent_scale must be a number, 'auto' or 'codebook', got {latent_scale!r}"
            )
        # "auto": measured on the first batch; "codebook": the codebook's, written when used.
        if latent_scale == "auto":
            scale0 = math.nan
        elif latent_scale == "codebook":
            scale0 = 1.0
        else:
            scale0 = float(latent_scale)
        self.register_buffer("latent_scale", torch.tensor(scale0, dtype=torch.float32))
        self.decode_kwargs = dict(decode_kwargs or {})
        self.encode_kwargs = dict(encode_kwargs or {})
        self.pre_encoded = bool(pre_encoded)
        if self.pre_encoded and isinstance(latent_scale, str):
            raise ValueError(
                "pre_encoded latents are already scaled: set latent_scale to the scale_factor of "
                f"their latents.json instead of {latent_scale!r}"
            )
        self.latent_factor: tuple[int, ...] | None = None
        net_channels = channels
        if autoencoder_config is not None or not _is_missing(autoencoder):
            self._attach_autoencoder(autoencoder, autoencoder_config, channels)
            if latent_channels is not None and int(latent_channels) != self.latent_channels:
                log.info(
                    "latent_channels=%s replaced by the autoencoder's %d",
                    latent_channels,
                    self.latent_channels,
                )
            net_channels = self.latent_channels
        elif latent_channels is not None:
            net_channels = int(latent_channels)  # latent model waiting for its autoencoder
            self.latent_channels = net_channels
        self.is_latent = self.autoencoder is not None or latent_channels is not None
        if self.pre_encoded and not self.is_latent:
            raise ValueError("pre_encoded needs a latent model (autoencoder or latent_channels)")
        self.net_channels = net_channels
        if clip_sample is None:
            clip_sample = process.clips_by_default and not self.is_latent
        self.clip_sample = bool(clip_sample)

        # The net.
        net_config = {**DEFAULT_NET, **dict(net or {})}
        fills = {
            "spatial_dims": spatial_dims,
            "in_channels": net_channels + self.condition_channels,
            "out_channels": net_channels,
        }
        if self.num_classes is not None:
            fills["num_class_embeds"] = self.num_classes + 1  # the last is the null class
        if self.scalar_keys:
            fills["num_scalar_conds"] = len(self.scalar_keys)
        for key, value in fills.items():
            if net_config.get(key) not in (None, value):
                raise ValueError(
                    f"net.{key}={net_config[key]} conflicts with the model's {value} (it is "
                    "filled in from the data and conditioning settings; drop it)"
                )
            net_config[key] = value
        self.net = instantiate(net_config)
        self.sample_size = _as_tuple(sample_size, spatial_dims) if sample_size else None
        self.num_log_images = int(num_log_images)
        self.val_num_samples = int(val_num_samples)
        self.val_features = RandomConvFeatures(spatial_dims, width=val_features_width)
        self._val_real: list[Tensor] = []
        self._val_conditions: list[dict[str, Tensor]] = []

    # ----------------------------------------------------------------- autoencoder
    def _attach_autoencoder(
        self, path: str | None, config: Mapping[str, Any] | None, channels: int
    ) -> None:
        if config is not None:
            # Rebuilt from its recorded config; weights come from our checkpoint / export.
            cls = pretrained.resolve_model_class(config["_target_"], "model.autoencoder_config")
            autoencoder = cls(**dict(config.get("init_args", {})))
            modules = tuple(config.get("modules") or ())
        else:
            try:
                autoencoder = pretrained.load(path)
            except pretrained.CheckpointError as err:
                raise pretrained.CheckpointError(f"model.autoencoder: {err}") from err
            modules = tuple(getattr(autoencoder, "export_modules", ()) or ())
            if not hasattr(autoencoder, "export_init_args"):
                raise ValueError(f"model.autoencoder '{path}' is not a medgen model")
            cls = type(autoencoder)
            self.hparams["autoencoder_config"] = {
                "_target_": public_name(cls, strict=False),
                "init_args": autoencoder.export_init_args(),
                "modules": list(modules),
            }
        for method in ("encode", "decode"):
            if not callable(getattr(autoencoder, method, None)):
                raise ValueError(
                    f"the autoencoder {type(autoencoder).__name__} has no {method}() method; "
                    "latent diffusion needs a model with encode() and decode()"
                )
        ae_dims = getattr(autoencoder, "spatial_dims", self.spatial_dims)
        if ae_dims != self.spatial_dims:
            raise ValueError(
                f"the autoencoder is {ae_dims}D but the diffusion model is {self.spatial_dims}D"
            )
        autoencoder.eval().requires_grad_(False)
        self.autoencoder = autoencoder
        modules = modules or ("",)
        self.export_modules = (
            "net",
            *(f"autoencoder.{m}" if m else "autoencoder" for m in modules),
        )
        # Probe the latent shape of a small image.
        probe = (32,) * self.spatial_dims
        with torch.no_grad():
            z = self._encode_raw(torch.zeros(1, channels, *probe))
        if z.ndim != 2 + self.spatial_dims:
            raise ValueError(
                f"the autoencoder makes latents of shape {tuple(z.shape[1:])} for a "
                f"{probe} image; latent diffusion needs a spatial latent (C, *spatial)"
            )
        self.latent_channels = int(z.shape[1])
        self.latent_factor = tuple(p // s for p, s in zip(probe, z.shape[2:], strict=True))

    def setup(self, stage: str) -> None:
        if self.is_latent:
            self._require_autoencoder()  # fail before the first batch, with the how-to

    def _require_autoencoder(self) -> nn.Module:
        if self.autoencoder is None:
            raise ValueError(_MISSING_AUTOENCODER)
        return self.autoencoder

    def _encode_raw(self, x: Tensor) -> Tensor:
        z = self.autoencoder.encode(x, **self.encode_kwargs)
        if isinstance(z, (tuple, list)):
            z = z[0]
        if not isinstance(z, Tensor) and callable(getattr(z, "mode", None)):
            z = z.mode()  # a posterior distribution: its mode
        return z

    def train(self, mode: bool = True) -> Diffusion:
        """Set train/eval mode; the frozen autoencoder always stays in eval mode."""
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()
        return self

    def codebook_normalisation(self) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` mapping the codebook's value range ``[lo, hi]`` onto ``[-1, 1]``.

        Medical Diffusion normalises latents by the global minimum and maximum of the VQ-GAN's
        codebook, ``2 (z - lo) / (hi - lo) - 1`` (``latent_scale: codebook``); read from the
        current codebook, so it follows the autoencoder's weights.
        """
        autoencoder = self._require_autoencoder()
        quantizer = getattr(getattr(autoencoder, "net", None), "quantizer", None)
        codes = getattr(quantizer, "embedding", None)
        if not isinstance(codes, Tensor):
            raise ValueError(
                "latent_scale='codebook' normalises by a VQ codebook's range; the autoencoder "
                f"{type(autoencoder).__name__} has none (use a VQGAN, or latent_scale: auto)"
            )
        lo, hi = codes.detach().float().min(), codes.detach().float().max()
        scale = 2.0 / (hi - lo).clamp(min=1e-12)
        with torch.no_grad():
            self.latent_scale.fill_(float(scale))  # for the record; the shift is -1 - lo * scale
        return scale, -1.0 - lo * scale

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images in data units ``(B, C, *spatial)`` -> what the net denoises.

        Pixel mode: ``[-1, 1]`` images; latent mode: latents times :attr:`latent_scale`.
        """
        if not self.is_latent:
            return self.to_net(x.float())
        self._require_autoencoder()
        z = self._encode_raw(x.to(self.device)).float()
        if self.latent_scale_mode == "codebook":
            scale, shift = self.codebook_normalisation()
            return z * scale + shift
        if not torch.isfinite(self.latent_scale):
            std = z.std()
            if self._trainer is not None and self.trainer.world_size > 1:
                std = self.all_gather(std).mean()
            self.latent_scale.fill_(1.0 / float(std.clamp(min=1e-8)))
            log.info("latent_scale set to %.5g (1 / std of the first batch)", self.latent_scale)
        return z * self.latent_scale

    @torch.no_grad()
    def decode(self, z: Tensor, tiling: Any = None) -> Tensor:
        """What the net denoises -> images in data units (inverse of :meth:`encode`).

        Latent mode decodes with the autoencoder, tiled as ``tiling`` says (see
        :class:`~medgen.inference.Tiling`) or, by default, as ``decode_kwargs`` say.
        """
        if not self.is_latent:
            return self.to_data(z.float())
        autoencoder = self._require_autoencoder()
        if self.latent_scale_mode == "codebook":
            scale, shift = self.codebook_normalisation()
            z = ((z - shift) / scale).to(self.dtype)
        else:
            z = (z / self.latent_scale).to(self.dtype)
        kwargs = dict(self.decode_kwargs)
        if tiling is None:
            return autoencoder.decode(z, **kwargs).float()
        from medgen.inference import Tiling

        kwargs = {k: v for k, v in kwargs.items() if k not in Tiling.fields()}
        return autoencoder.decode(z, Tiling.from_any(tiling), **kwargs).float()

    # ----------------------------------------------------------------- the process
    @property
    def is_flow(self) -> bool:
        """Whether the model is a rectified flow (read-only; the process decides everything)."""
        return self.process.family == "flow"

    @property
    def objective(self) -> DiffusionObjective | RectifiedFlowObjective:
        """The process's training objective."""
        return self.process.objective

    @property
    def schedule(self) -> NoiseSchedule | None:
        """The noise schedule of a variance-preserving model (``None`` for a flow)."""
        return getattr(self.process, "schedule", None)

    def _check_sampler(self, sampler: Sampler) -> Sampler:
        """``sampler`` if its family fits the process, else a ValueError naming those that do."""
        if not self.process.accepts(sampler):
            allowed = ", ".join(list_samplers(family=self.process.family))
            raise ValueError(
                f"sampler {sampler.name!r} (family {sampler.family!r}) does not fit "
                f"{self.process.description}; use one of {allowed}"
            )
        return sampler

    # ----------------------------------------------------------------- conditioning

    @property
    def unconditional(self) -> bool:
        """Whether :meth:`sample` works without conditions (``medgen-train`` then writes samples)."""
        if self.condition_key is not None:
            return False
        return not self.has_droppable_conditions or self.cond_drop_prob > 0

    @property
    def has_droppable_conditions(self) -> bool:
        """Whether the model has conditions that classifier-free guidance can drop."""
        return self.num_classes is not None or bool(self.scalar_keys)

    def batch_conditions(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The conditions of a training batch: ``class_labels``, ``scalars``, ``image``."""
        cond: dict[str, Tensor] = {}
        n = batch[self.image_key].shape[0]
        if self.class_key is not None:
            if self.class_key not in batch:
                raise KeyError(f"batch has no class labels under '{self.class_key}' (class_key)")
            cond["class_labels"] = torch.as_tensor(batch[self.class_key]).reshape(n).long()
        if self.scalar_keys:
            missing = [k for k in self.scalar_keys if k not in batch]
            if missing:
                raise KeyError(f"batch has no scalar conditions under {missing} (scalar_keys)")
            cond["scalars"] = torch.stack(
                [torch.as_tensor(batch[k]).reshape(n).float() for k in self.scalar_keys], dim=1
            )
        if self.condition_key is not None:
            if self.condition_key not in batch:
                raise KeyError(f"batch has no image condition under '{self.condition_key}'")
            cond["image"] = torch.as_tensor(batch[self.condition_key]).float()
        return cond

    def _null(self, cond: Mapping[str, Tensor], drop: Tensor | None = None) -> dict[str, Tensor]:
        """Replace class and scalar conditions by their null token where ``drop`` (all if None)."""
        out = dict(cond)
        if "class_labels" in cond:
            null = torch.full_like(cond["class_labels"], self.num_classes)
            out["class_labels"] = (
                null if drop is None else torch.where(drop, null, out["class_labels"])
            )
        if "scalars" in cond:
            nan = torch.full_like(cond["scalars"], math.nan)
            out["scalars"] = (
                nan if drop is None else torch.where(drop[:, None], nan, out["scalars"])
            )
        return out

    def _prepare_conditions(
        self, condition: Mapping[str, Any] | None, n: int, size: Sequence[int]
    ) -> dict[str, Tensor]:
        """User conditions for ``n`` samples, broadcast; missing droppable ones become null."""
        condition = dict(condition or {})
        aliases = {"class": "class_labels", "label": "class_labels", "labels": "class_labels"}
        condition = {aliases.get(k, k): v for k, v in condition.items()}
        unknown = set(condition) - {"class_labels", "scalars", "image"}
        if unknown:
            raise ValueError(
                f"unknown condition keys {sorted(unknown)}; use class_labels, scalars, image"
            )
        cond: dict[str, Tensor] = {}
        missing = []
        if self.num_classes is not None:
            if "class_labels" in condition:
                labels = torch.as_tensor(condition["class_labels"]).long().reshape(-1)
                if labels.min() < 0 or labels.max() >= self.num_classes:
                    raise ValueError(f"class labels must be in 0 .. {self.num_classes - 1}")
                cond["class_labels"] = labels.expand(n) if labels.numel() == 1 else labels
            else:
                missing.append("class_labels")
                cond["class_labels"] = torch.full((n,), self.num_classes, dtype=torch.long)
        elif "class_labels" in condition:
            raise ValueError("this model is not class-conditional (no class_key)")
        if self.scalar_keys:
            k = len(self.scalar_keys)
            if "scalars" in condition:
                scalars = torch.as_tensor(condition["scalars"], dtype=torch.float32)
                scalars = scalars.reshape(-1, k)
                cond["scalars"] = scalars.expand(n, k) if scalars.shape[0] == 1 else scalars
            else:
                missing.append("scalars")
                cond["scalars"] = torch.full((n, k), math.nan)
        elif "scalars" in condition:
            raise ValueError("this model has no scalar conditions (no scalar_keys)")
        if self.condition_key is not None:
            if "image" not in condition:
                raise ValueError(
                    f"this model is conditioned on an image ('{self.condition_key}'); pass "
                    "condition={'image': tensor (N, C, *spatial)}"
                )
            image = torch.as_tensor(condition["image"]).float()
            if image.ndim == self.spatial_dims + 1:
                image = image[None]
            image = image.expand(n, *image.shape[1:]) if image.shape[0] == 1 else image
            cond["image"] = _resize(image, size) if self.is_latent else image
        elif "image" in condition:
            raise ValueError("this model is not conditioned on an image (no condition_key)")
        for key, value in cond.items():
            if value.shape[0] != n:
                raise ValueError(f"condition {key} has {value.shape[0]} entries for {n} samples")
        if missing and self.cond_drop_prob == 0.0:
            raise ValueError(
                f"missing conditions {missing}: the model was trained without condition dropout, "
                "so it has no unconditional mode; pass them in `condition`"
            )
        return cond

    def net_forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The net's raw output for ``x`` ``(B, C, *spatial)`` at net timesteps ``t`` ``(B,)``."""
        h = x
        if "image" in cond:
            image = cond["image"].to(x.device, x.dtype)
            if self.is_latent:
                image = _resize(image, x.shape[2:])
            h = torch.cat([x, image], dim=1)
        kwargs = {}
        if "class_labels" in cond:
            kwargs["class_labels"] = cond["class_labels"].to(x.device)
        if "scalars" in cond:
            kwargs["scalars"] = cond["scalars"].to(x.device, x.dtype)
        return self.net(h, t, **kwargs)

    def guided_forward(
        self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor], scale: float
    ) -> Tensor:
        """Net output with classifier-free guidance ``scale`` (one pass when ``scale`` is 1)."""
        if not self.has_droppable_conditions:
            return self.net_forward(x, t, cond)
        null = self._null(cond)

        def joint() -> tuple[Tensor, Tensor]:
            both = {k: torch.cat([cond[k].to(x.device), null[k].to(x.device)]) for k in cond}
            out = self.net_forward(torch.cat([x, x]), torch.cat([t, t]), both)
            return out.chunk(2)

        return guided(
            lambda: self.net_forward(x, t, cond), lambda: self.net_forward(x, t, null), scale, joint
        )

    # ----------------------------------------------------------------- training
    def loss(self, z: Tensor, cond: Mapping[str, Tensor], generator: torch.Generator | None = None):
        """The training loss of clean ``z`` (net space) under conditions ``cond``.

        With a CPU ``generator`` the noise and times are drawn from it (validation), else from the
        global RNG on the data's device.
        """
        return self.process.loss(lambda x_t, t: self.net_forward(x_t, t, cond), z, generator)

    def batch_to_net(self, x: Tensor) -> Tensor:
        """A batch's images (or, with ``pre_encoded``, its scaled latents) in the net's space."""
        if not self.pre_encoded:
            return self.encode(x)
        z = torch.as_tensor(x).float()
        if z.ndim != self.spatial_dims + 2 or z.shape[1] != self.net_channels:
            raise ValueError(
                f"pre_encoded batch '{self.image_key}' has shape {tuple(z.shape)}; expected "
                f"(B, {self.net_channels}, *spatial) latents"
            )
        return z

    def _record_batch(self, x: Tensor, z: Tensor) -> None:
        if self.sample_size is None:
            self.sample_size = tuple(int(s) for s in z.shape[2:])
            self.hparams["sample_size"] = list(self.sample_size)
        affine = getattr(x, "affine", None)
        if (
            self.spatial_dims == 3
            and isinstance(affine, Tensor)
            and affine.shape[-2:] == (4, 4)
            and affine.numel() > 0
        ):
            affine = affine.reshape(-1, 4, 4)[0].double().cpu()
            if self.hparams.get("spacing") is None:
                spacing = [float(v) for v in affine[:3, :3].norm(dim=0)]
                self.spacing = tuple(spacing)
                self.hparams["spacing"] = spacing
            if self.hparams.get("orientation") is None:
                self.orientation = axcodes_from_affine(affine)
                self.hparams["orientation"] = self.orientation

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        x = batch[self.image_key]
        z = self.batch_to_net(x)
        self._record_batch(x, z)
        cond = self.batch_conditions(batch)
        if self.has_droppable_conditions and self.cond_drop_prob > 0:
            drop = condition_dropout_mask(z.shape[0], self.cond_drop_prob, device=z.device)
            cond = self._null({k: v.to(z.device) for k, v in cond.items()}, drop)
        loss = self.loss(z, {k: v.to(z.device) for k, v in cond.items()})
        if self._trainer is not None:  # also usable in a plain loop (see the examples)
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = self.build_optimizer(self.net.parameters())
        scheduler = self.build_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch[self.image_key]
        z = self.batch_to_net(x)
        self._record_batch(x, z)
        cond = self.batch_conditions(batch)
        generator = seeded_generator(1_000 + batch_idx)  # same noise and times every epoch
        loss = self.loss(z, {k: v.to(z.device) for k, v in cond.items()}, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        kept = sum(len(r) for r in self._val_real)
        if kept < self.val_num_samples:
            take = self.val_num_samples - kept
            real = self.decode(z[:take]) if self.pre_encoded else x[:take].float()
            self._val_real.append(self.val_features(self.to_net(real)))
            self._val_conditions.append({k: v[:take].cpu() for k, v in cond.items()})

    def on_validation_epoch_end(self) -> None:
        if not self._val_real:
            return
        real = torch.cat(self._val_real)
        conds = self._val_conditions
        self._val_real, self._val_conditions = [], []
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]} if conds[0] else None
        if len(real) < 2:
            return
        fake = self.sample(len(real), seed=0, condition=cond, **self._val_sampler_kwargs())
        fake = self.val_features(self.to_net(fake.to(real.device)))
        real, fake = real.cpu().double(), fake.cpu().double()
        sigma = float(torch.pdist(real).median()) or 1.0  # from the real features alone
        self.log("val/mmd", mmd_rbf(real, fake, sigma=sigma), prog_bar=True, sync_dist=True)

    def _val_sampler_kwargs(self) -> dict[str, Any]:
        config = dict(self.val_sampler_config)
        return {"sampler": config.pop("name"), "steps": config.pop("steps"), **config}

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        x = batch[self.image_key][: self.num_log_images]
        if self.pre_encoded:
            x = self.decode(self.batch_to_net(x))
        cond = {k: v[: len(x)] for k, v in self.batch_conditions(batch).items()}
        samples = self.sample(len(x), seed=0, condition=cond or None, **self._val_sampler_kwargs())
        return {"real": x, "samples": samples}

    # ----------------------------------------------------------------- generation
    def _net_size(self, sample_size: int | Sequence[int] | None) -> tuple[int, ...]:
        if sample_size is not None:
            return _as_tuple(sample_size, self.spatial_dims)
        if self.sample_size is None:
            raise ValueError(
                "the model does not know its sample size yet (train it, or pass sample_size=)"
            )
        return self.sample_size

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        batch_size: int = 16,
        condition: Mapping[str, Any] | None = None,
        known: Tensor | None = None,
        mask: Tensor | None = None,
        resample: int = 1,
        eta: float | None = None,
        sample_size: int | Sequence[int] | None = None,
        return_latents: bool = False,
        tiling: Any = None,
    ) -> Tensor:
        """Draw ``num_samples`` images ``(N, C, *spatial)`` in data units.

        The start noise is drawn on the CPU from a generator seeded with ``seed``, then the step
        noise of stochastic samplers batch after batch, so a seed gives the same samples on every
        device (for a given ``batch_size``).

        Args:
            num_samples: Number of samples ``N``.
            steps: Sampling steps (default: the model's ``sampler.steps`` for its own sampler,
                else the sampler's ``default_steps``; ``ddpm``: all ``T``).
            sampler: A registered sampler of the model's family (built in: ``ddpm``, ``ddim``,
                ``dpmpp_2m`` for noise-prediction models, ``euler``, ``heun`` for flow models;
                :func:`~medgen.diffusion.list_samplers`); default: the model's ``sampler.name``.
            guidance: Classifier-free guidance scale (default: the model's ``guidance_scale``).
            seed: Random seed (``None``: random).
            batch_size: Samples per net call.
            condition: ``{"class_labels": (N,) or int, "scalars": (N, K) or (K,),
                "image": (N, C', *spatial)}``; a missing class/scalar condition means the
                unconditional model (needs training with ``cond_drop_prob > 0``).
            known: Inpainting: a known image ``(N or 1, C, *spatial)`` in data units.
            mask: Inpainting: ``(N or 1, 1, *spatial)``, 1 where to generate, 0 where ``known``
                is kept. Known voxels are replaced by ``known`` noised to the current time after
                every step (RePaint); the output equals ``known`` exactly there.
            resample: RePaint resampling count per step (samplers that support it: ``ddpm``,
                ``ddim``).
            eta: Stochasticity of samplers that take it (``ddim``; default: the model's
                ``sampler.eta`` or 0); other samplers refuse a nonzero ``eta``.
            sample_size: Spatial size of the net's input (default: the training size; latent size
                in latent mode; taken from ``known`` when given).
            return_latents: Latent mode: return the latents instead of decoded images.
            tiling: Latent mode: how the autoencoder decodes (a :class:`~medgen.inference.Tiling`,
                its settings as a dict, or a tile size in latent voxels); default
                ``decode_kwargs``.

        Returns:
            ``(N, C, *spatial)`` on the CPU.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        config = dict(self.sampler_config)
        name = sampler or config.get("name")
        spec = self._check_sampler(get_sampler(name))
        if steps is None and spec.name == get_sampler(config["name"]).name:
            steps = config.get("steps")
        if steps is None:
            steps = self.process.default_sampler_steps(spec)
        options: dict[str, Any] = {}
        if spec.supports_eta:
            options["eta"] = float(eta if eta is not None else config.get("eta", 0.0) or 0.0)
        elif eta:
            raise ValueError(
                f"sampler {spec.name!r} takes no eta; samplers with eta: "
                f"{', '.join(list_samplers(self.process.family, supports_eta=True)) or 'none'}"
            )
        if resample != 1:
            if not spec.supports_resample:
                names = list_samplers(self.process.family, supports_resample=True)
                raise ValueError(
                    f"resample (RePaint) works with the {', '.join(names) or 'no'} samplers, "
                    f"not {spec.name!r}"
                )
            options["resample"] = int(resample)
        scale = self.guidance_scale if guidance is None else float(guidance)
        if scale != 1.0 and not self.has_droppable_conditions:
            raise ValueError("guidance needs a class- or scalar-conditional model")
        if scale != 1.0 and self.cond_drop_prob == 0.0:
            log.warning("guidance on a model trained without condition dropout (cond_drop_prob=0)")
        if self.is_latent:
            self._require_autoencoder()
        generator = seeded_generator(seed)

        # Inpainting inputs in the net's space.
        known_net = mask_net = None
        if (known is None) != (mask is None):
            raise ValueError("inpainting needs both `known` and `mask`")
        if known is not None:
            known = torch.as_tensor(known).float()
            mask = torch.as_tensor(mask).float()
            if known.ndim == self.spatial_dims + 1:
                known = known[None]
            if mask.ndim == self.spatial_dims + 1:
                mask = mask[None]
            if mask.shape[2:] != known.shape[2:]:
                raise ValueError(
                    f"mask {tuple(mask.shape)} and known {tuple(known.shape)} differ in size"
                )
            known = known.expand(num_samples, *known.shape[1:]) if len(known) == 1 else known
            mask = (mask > 0.5).float()
            mask = mask.expand(num_samples, *mask.shape[1:]) if len(mask) == 1 else mask
            if len(known) != num_samples or len(mask) != num_samples:
                raise ValueError("known and mask need 1 or num_samples entries")
            known_net = torch.cat(
                [self.encode(k.to(self.device)).cpu() for k in known.split(batch_size)]
            )
            mask_net = _resize(mask, known_net.shape[2:], reduce="max")
            if sample_size is None:
                sample_size = tuple(known_net.shape[2:])
        size = self._net_size(sample_size)
        cond = self._prepare_conditions(condition, num_samples, size)
        if known is not None and tuple(known_net.shape[2:]) != size:
            raise ValueError(f"known image gives size {tuple(known_net.shape[2:])}, not {size}")

        noise = torch.randn((num_samples, self.net_channels, *size), generator=generator)

        was_training = self.training
        self.eval()
        outputs = []
        try:
            for start in range(0, num_samples, batch_size):
                sl = slice(start, start + batch_size)
                x = noise[sl].to(self.device)
                c = {k: v[sl].to(self.device) for k, v in cond.items()}
                hook = None
                if known_net is not None:
                    hook = repaint_hook(
                        self.process,
                        known_net[sl].to(self.device),
                        mask_net[sl].to(self.device),
                        generator,
                    )
                model_fn = self.process.model_function(self._guided_net(c, scale), self.clip_sample)
                z = self.process.run_sampler(
                    spec, model_fn, x, steps=steps, generator=generator, hook=hook, **options
                )
                if return_latents and self.is_latent:
                    outputs.append(z.float().cpu())
                    continue
                if self.clip_sample and not self.is_latent:
                    z = z.clamp(-1.0, 1.0)
                image = self.decode(z, tiling).cpu()
                if known is not None:  # exact known voxels in data units
                    m = mask[sl]
                    image = m * image + (1.0 - m) * known[sl]
                outputs.append(image)
        finally:
            self.train(was_training)
        return torch.cat(outputs)

    def _guided_net(
        self, cond: Mapping[str, Tensor], scale: float
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``net_fn(x_t, net_t)`` for the process: the guided net output, in float32."""

        def net_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.guided_forward(x.to(self.dtype), t, cond, scale).float()

        return net_fn

    # ----------------------------------------------------------------- stored configs
    @staticmethod
    def upgrade_init_args(init_args: Mapping[str, Any]) -> dict[str, Any]:
        """Stored constructor arguments as they were meant by the medgen that wrote them.

        medgen 0.1.0 stored the schedule as given and defaulted ``scaled_linear`` to Stable
        Diffusion's betas (0.00085, 0.012); today's default is MONAI's (1e-4, 0.02) and the
        betas are always stored. A stored ``scaled_linear`` schedule without betas gets the old
        ones (see :func:`medgen.diffusion.schedules.upgrade_stored_schedule`).
        """
        args = dict(init_args)
        if args.get("prediction", "epsilon") != "flow":
            upgraded = upgrade_stored_schedule(args.get("schedule"))
            if upgraded is not None:
                args["schedule"] = upgraded
        return args

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the schedule a checkpoint was trained with (see :meth:`upgrade_init_args`)."""
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("hyper_parameters")
        if not isinstance(stored, Mapping) or "schedule" not in stored:
            return
        schedule = self.upgrade_init_args(stored).get("schedule")
        if schedule == stored.get("schedule") or self.prediction == "flow":
            return
        log.warning(
            "checkpoint written with the old scaled_linear default: keeping its betas %s..%s "
            "(today's default is 1e-4..0.02)",
            schedule["beta_start"],
            schedule["beta_end"],
        )
        hp = self.hparams
        self.process = make_process(
            self.prediction, schedule, hp["loss"], hp["min_snr_gamma"], hp["flow"]
        ).to(self.device)
        self.hparams["schedule"] = schedule

    # ----------------------------------------------------------------- export
    def export_init_args(self) -> dict[str, Any]:
        """Constructor arguments with the learned latent scale and the recorded sizes."""
        args = dict(self.hparams)
        if (
            self.is_latent
            and self.latent_scale_mode != "codebook"
            and torch.isfinite(self.latent_scale)
        ):
            args["latent_scale"] = float(self.latent_scale)
        return args
