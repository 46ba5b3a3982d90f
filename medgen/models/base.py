"""Common base of medgen's LightningModules: optimiser from config, export, checkpoint identity."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medgen import pretrained
from medgen.utils.instantiate import instantiate
from medgen.utils.targets import public_name

log = logging.getLogger(__name__)

DEFAULT_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.AdamW", "lr": 1e-3}

#: What a model family can do; the run layer (:mod:`medgen.runs`) asks :meth:`GenerativeModule.
#: supports` instead of probing attributes.
SAMPLE = "sample"  #: ``sample(n, seed=, batch_size=)``: unconditional samples in data units
SAMPLER_OPTIONS = "sampler_options"  #: ``sample`` takes ``steps``, ``sampler``, ``guidance``
TRANSLATE = "translate"  #: ``translate(x, direction, tiling)``; ``in/out_channels``
ENCODE = "encode"  #: ``encode``/``decode`` to and from latents; ``downsample_factor``
WRITE_DATASET = "write_dataset"  #: ``write_dataset(folder, n, seed, reference=, batch_size=)``
CAPABILITIES = (SAMPLE, SAMPLER_OPTIONS, TRANSLATE, ENCODE, WRITE_DATASET)


class GenerativeModule(L.LightningModule):
    """Base class of every medgen model family.

    Subclasses build their nets from plain JSON-friendly kwargs, call
    ``self.save_hyperparameters()`` in ``__init__`` (so a checkpoint rebuilds itself), and list
    in :attr:`export_modules` the submodules needed for inference.

    The optimiser and the learning-rate scheduler are configs (``{"_target_": "torch.optim.AdamW",
    "lr": 1e-3}``), not objects, so that the hyper-parameters stay plain data that
    ``torch.load(weights_only=True)`` can read back; they are instantiated in
    :meth:`configure_optimizers` through the allowlisted :func:`medgen.utils.instantiate`.

    Args:
        spatial_dims: 2 or 3.
        value_range: ``(low, high)`` of the data the model is trained on, in data units; samples
            are clipped to it when written to integer image files, and it is the data range of
            PSNR/SSIM.
        optimizer: Optimiser config (``_target_`` plus kwargs, without ``params``).
        scheduler: Optional scheduler config; may hold ``interval``/``frequency``/``monitor`` keys
            that go to Lightning's scheduler dict instead of the constructor.
        spacing: Voxel spacing written to exported NIfTI samples (3D); defaults to 1.0 per axis.
    """

    #: Submodules saved by :meth:`save_pretrained`.
    export_modules: tuple[str, ...] = ()
    #: What the family can do (names from :data:`CAPABILITIES`); see :meth:`supports`.
    capabilities: frozenset[str] = frozenset({SAMPLE})
    #: Keys of a model config read by the run, never passed to the constructor
    #: (:func:`medgen.utils.instantiate.instantiate` skips them; :mod:`medgen.finetune`).
    config_only_keys: tuple[str, ...] = ("init_from", "finetune")

    def supports(self, capability: str) -> bool:
        """Whether this model can do ``capability`` (one of :data:`CAPABILITIES`).

        Unconditional sampling also needs the model to be unconditional (a class-conditional
        diffusion model declares ``sample`` but needs its conditions).
        """
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; known: {CAPABILITIES}")
        if capability == SAMPLE and not getattr(self, "unconditional", True):
            return False
        return capability in self.capabilities

    def __init__(
        self,
        spatial_dims: int = 2,
        value_range: Sequence[float] = (0.0, 1.0),
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(value_range) != 2 or not value_range[1] > value_range[0]:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.spatial_dims = spatial_dims
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.optimizer_config = dict(optimizer or DEFAULT_OPTIMIZER)
        self.scheduler_config = dict(scheduler) if scheduler else None
        self.spacing = tuple(float(s) for s in (spacing or (1.0,) * spatial_dims))
        #: What the model knows of its training data (:mod:`medgen.data.outputs`): the affine of
        #: 3D data (orientation, spacing, origin) and the intensity preset, recorded from the
        #: first training batch and kept in checkpoints and exports.
        self.data_info: dict[str, Any] = {}

    #: Batch keys whose images describe the data the model generates, in order of preference.
    @property
    def data_keys(self) -> tuple[str, ...]:
        keys = [getattr(self, name, None) for name in ("image_key", "target_key")]
        return tuple(k for k in keys if isinstance(k, str))

    def record_data(self, batch: Any) -> None:
        """Record the training data's affine and preset from ``batch`` (once per run)."""
        from medgen.data.outputs import data_info_from_batch

        transform = None
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        datasets = getattr(datamodule, "datasets", None)
        if isinstance(datasets, Mapping):
            transform = getattr(datasets.get("train"), "transform", None)
        info = data_info_from_batch(batch, self.data_keys, self.spatial_dims, transform)
        self.data_info = {**info, **{k: v for k, v in self.data_info.items() if v is not None}}
        self._data_recorded = True

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log`` with MONAI MetaTensors made plain tensors.

        A metric computed from a MetaTensor batch is a MetaTensor; ``ModelCheckpoint`` then stores
        it as its best score, and the checkpoint no longer loads with ``weights_only=True``.
        """
        if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor:
            value = value.as_subclass(torch.Tensor)
        super().log(name, value, *args, **kwargs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not getattr(self, "_data_recorded", False):
            self.record_data(batch)

    def to_net(self, x: torch.Tensor) -> torch.Tensor:
        """Data units (:attr:`value_range`) -> the nets' ``[-1, 1]``."""
        low, high = self.value_range
        return (x - low) * (2.0 / (high - low)) - 1.0

    def to_data(self, y: torch.Tensor) -> torch.Tensor:
        """The nets' ``[-1, 1]`` -> data units (:attr:`value_range`)."""
        low, high = self.value_range
        return (y + 1.0) * ((high - low) / 2.0) + low

    @property
    def data_range(self) -> float:
        """Width of :attr:`value_range`, the data range used by PSNR and SSIM."""
        return self.value_range[1] - self.value_range[0]

    # ----------------------------------------------------------------- optimisation
    def build_optimizer(self, params, config: Mapping[str, Any] | None = None):
        """Instantiate an optimiser config for ``params`` (through :meth:`param_groups`)."""
        config = dict(config or self.optimizer_config)
        return instantiate(config, self.param_groups(params, config))

    def param_groups(self, params, config: Mapping[str, Any]) -> list:
        """The hook every family's optimisers go through: ``params`` as optimiser groups.

        One group by default; with fine-tuning (``model.finetune.lr_multipliers``, set up by
        :func:`medgen.finetune.setup_finetune` as ``finetune_plan``) one group per factor.
        Frozen parameters stay in their group: they get no gradient, so the optimiser skips
        them until ``unfreeze_at_step`` unfreezes them.
        """
        plan = getattr(self, "finetune_plan", None)
        if plan is None:
            return list(params)
        return plan.param_groups(self, params, config)

    def build_scheduler(self, optimizer, config: Mapping[str, Any] | None = None):
        """Instantiate a scheduler config as a Lightning scheduler dict (or ``None``)."""
        config = dict(config or self.scheduler_config or {})
        if not config:
            return None
        lightning_keys = {
            k: config.pop(k) for k in ("interval", "frequency", "monitor") if k in config
        }
        return {"scheduler": instantiate(config, optimizer), **lightning_keys}

    #: Metric a ``ReduceLROnPlateau`` scheduler follows when its config names no ``monitor``.
    plateau_monitor: str = "val/loss"

    def step_schedulers(self, interval: str) -> None:
        """Step the schedulers configured with this ``interval`` (``"epoch"`` or ``"step"``).

        For manually optimised models (GANs, autoencoders, translation), which Lightning does not
        step; a ``ReduceLROnPlateau`` gets the monitored value (``monitor`` in the scheduler
        config, else :attr:`plateau_monitor`) and is left alone, with one warning, until that
        value has been logged.
        """
        config = self.scheduler_config or {}
        if not config or config.get("interval", "epoch") != interval:
            return
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitor = config.get("monitor", self.plateau_monitor)
                value = self.trainer.callback_metrics.get(monitor)
                if value is None:
                    if not getattr(self, "_plateau_warned", False):
                        log.warning("plateau lr policy: %r was not logged; lr unchanged", monitor)
                        self._plateau_warned = True
                    continue
                scheduler.step(float(value))
            else:
                scheduler.step()

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            self.step_schedulers("epoch")

    def configure_optimizers(self):
        optimizer = self.build_optimizer(self.parameters())
        scheduler = self.build_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ----------------------------------------------------------------- checkpoint identity
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medgen_target"] = public_name(type(self), strict=False)
        checkpoint["medgen_data"] = dict(self.data_info)
        plan = getattr(self, "finetune_plan", None)
        if plan is not None and plan.lora:  # medgen.load re-adds them before loading the state
            from medgen.finetune.lora import lora_config

            checkpoint[pretrained.ADAPTERS_KEY] = lora_config(self)
        if "hyper_parameters" in checkpoint:  # AttributeDict -> dict, so weights_only loads it
            checkpoint["hyper_parameters"] = dict(checkpoint["hyper_parameters"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from medgen.data.outputs import check_data_info

        self.data_info = check_data_info(checkpoint.get("medgen_data"), "checkpoint")

    # ----------------------------------------------------------------- export
    def export_init_args(self) -> dict[str, Any]:
        """Plain constructor arguments written to ``config.json`` (defaults to the hparams)."""
        return dict(self.hparams)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Export the inference nets as ``config.json`` + ``model.safetensors`` in ``directory``.

        The current weights are written; to export EMA weights, call this inside the EMA
        callback's :meth:`~medgen.callbacks.EMA.swapped` context (``medgen-train`` does). LoRA
        adapters are merged into the written weights (the model keeps them unmerged).
        """
        from medgen.finetune.lora import merged_adapters

        with merged_adapters(self):
            return pretrained.save_pretrained(
                self, directory, self.export_init_args(), self.export_modules, self.data_info
            )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GenerativeModule:
        """Load a model exported by :meth:`save_pretrained` (or a ``.ckpt``); see :func:`medgen.load`."""
        model = pretrained.load(path)
        if not isinstance(model, cls):
            raise pretrained.CheckpointError(
                f"'{path}' holds a {type(model).__name__}, not a {cls.__name__}"
            )
        return model

    # ----------------------------------------------------------------- generation API
    @torch.no_grad()
    def sample(self, num_samples: int, seed: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Draw ``num_samples`` images ``(N, C, *spatial)`` in data units."""
        raise NotImplementedError(f"{type(self).__name__} does not generate unconditional samples")

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Images to log for a validation batch: name -> ``(N, C, *spatial)`` in data units."""
        return {}


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (random when ``None``), independent of global RNG.

    Noise is always drawn on the CPU and then moved, so the same seed gives the same samples on
    every device.
    """
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator
