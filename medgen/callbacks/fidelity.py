"""Log a fidelity metric (Fréchet distance in a chosen feature space) every few epochs.

:class:`FidelityMonitor` collects the real images of the first validation batches once (up to
``num_real``), then every ``every_n_epochs`` epochs draws ``num_samples`` samples from the model
(``pl_module.sample``), and logs the Fréchet distance between the two feature sets as
``log_name`` (``val/fd_random_conv`` by default). The statistics live in a torchmetrics metric
(:class:`medgen.metrics.streaming.FrechetDistance`) whose states are summed over DDP ranks, so
every rank contributes its share of real images and samples and all ranks log the same value.

Images are mapped from the model's ``value_range`` to ``[0, 1]`` before the extractor. Feature
extractors are those of :func:`medgen.features.build_extractor` (``random_conv`` needs no file;
``dinov2``, ``tf_inception``, ``radimagenet_resnet50``, ``medicalnet`` need ``weights_path``).
Values from different extractors or sample counts are not comparable; the number is a training
curve, not a result (use ``medgen-eval`` for that).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

log = logging.getLogger("medgen")

__all__ = ["FidelityMonitor"]


class FidelityMonitor(L.Callback):
    """Fréchet distance between validation images and model samples every few epochs.

    Args:
        every_n_epochs: period in epochs.
        feature_extractor: a name of :data:`medgen.features.EXTRACTORS`.
        weights_path: local weights for a pretrained extractor.
        sha256: expected SHA-256 of ``weights_path``.
        num_real: real images to collect (over all ranks: each rank collects ``num_real /
            world_size``).
        num_samples: samples per evaluation (over all ranks).
        batch_size: samples drawn per call of ``pl_module.sample``.
        seed: sample seed (each rank adds its rank, so ranks draw different samples).
        log_name: the logged key (default ``val/fd_<extractor>``).
        sample_kwargs: extra arguments of ``pl_module.sample`` (e.g. ``{"steps": 20}``).
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        feature_extractor: str = "random_conv",
        weights_path: str | None = None,
        sha256: str | None = None,
        num_real: int = 256,
        num_samples: int = 256,
        batch_size: int = 32,
        seed: int = 0,
        log_name: str | None = None,
        sample_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if every_n_epochs < 1 or num_real < 2 or num_samples < 2:
            raise ValueError(
                "every_n_epochs must be >= 1 and num_real, num_samples >= 2, got "
                f"{every_n_epochs}, {num_real}, {num_samples}"
            )
        self.every_n_epochs = int(every_n_epochs)
        self.feature_extractor = feature_extractor
        self.weights_path = weights_path
        self.sha256 = sha256
        self.num_real = int(num_real)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.log_name = log_name or f"val/fd_{feature_extractor}"
        self.sample_kwargs = dict(sample_kwargs or {})
        self.metric = None
        self._real_seen = 0
        self._warned = False
        self.history: list[tuple[int, float]] = []

    def _due(self, trainer: L.Trainer) -> bool:
        return (
            not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def _build(self, pl_module: L.LightningModule) -> None:
        from medgen.features.registry import build_extractor
        from medgen.metrics.streaming import FrechetDistance

        dims = int(getattr(pl_module, "spatial_dims", 2))
        extractor, _ = build_extractor(self.feature_extractor, dims, self.weights_path, self.sha256)
        probe = torch.zeros(2, 1, *([16] * dims)) if dims == 3 else torch.zeros(2, 1, 32, 32)
        with torch.no_grad():
            width = int(extractor(probe).shape[1])
        self.metric = FrechetDistance(extractor, width).to(pl_module.device)

    def _unit(self, pl_module: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        low, high = (float(v) for v in getattr(pl_module, "value_range", (0.0, 1.0)))
        return (images.float() - low) / (high - low)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        share = -(-self.num_real // max(trainer.world_size, 1))
        if trainer.sanity_checking or self._real_seen >= share or dataloader_idx != 0:
            return
        keys = getattr(pl_module, "data_keys", ("image",))
        images = batch.get(keys[0]) if isinstance(batch, Mapping) else batch
        if not torch.is_tensor(images):
            return
        if self.metric is None:
            self._build(pl_module)
        images = images[: share - self._real_seen].to(pl_module.device)
        self.metric.update(self._unit(pl_module, images), real=True)
        self._real_seen += len(images)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        if self.metric is None or self._real_seen == 0:
            if not self._warned:
                log.warning(
                    "FidelityMonitor: no validation images seen (no validation data, or "
                    "limit_val_batches=0); %s is not logged",
                    self.log_name,
                )
                self._warned = True
            return
        world = max(trainer.world_size, 1)
        share = -(-self.num_samples // world)
        was_training = pl_module.training
        pl_module.eval()
        seed = self.seed + trainer.global_rank
        with torch.no_grad():
            samples = pl_module.sample(
                share, seed=seed, batch_size=self.batch_size, **self.sample_kwargs
            )
        pl_module.train(was_training)
        self.metric.update(self._unit(pl_module, samples.to(pl_module.device)), real=False)
        value = self.metric.compute()  # synced over ranks by torchmetrics
        self.metric.reset()  # clears the fake statistics only
        pl_module.log(
            self.log_name, value.to(pl_module.device), sync_dist=False, rank_zero_only=False
        )
        self.history.append((trainer.current_epoch, float(value)))
        log.info("epoch %d: %s = %.4g", trainer.current_epoch, self.log_name, float(value))
