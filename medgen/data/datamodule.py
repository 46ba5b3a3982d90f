"""One LightningDataModule behind every ``data=`` preset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medgen.utils.instantiate import InstantiationError, instantiate, to_plain


class EpochShuffleSampler(Sampler[int]):
    """Random permutation per epoch drawn from ``(seed, epoch)``, not from the global RNG.

    Lightning calls :meth:`set_epoch` before every training epoch, so the order of epoch ``e`` is
    the same in a run that never stopped and in one resumed from a checkpoint (torch's
    ``RandomSampler`` draws its seed from the global RNG when the iterator is created, which a
    resumed run cannot reproduce).

    Args:
        length: Dataset length.
        seed: Base seed of the permutations.
    """

    def __init__(self, length: int, seed: int = 0, dataset: Dataset | None = None) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.dataset = dataset
        self.epoch = 0
        #: Give this to the DataLoader as ``generator``: it draws the workers' base seed, which
        #: then also depends on (seed, epoch) only, and the global RNG is left untouched.
        self.loader_generator = torch.Generator()
        self._skip = 0
        self.set_epoch(0)

    def skip_once(self, count: int) -> None:
        """Leave out the first ``count`` indices of the next iteration (a resumed epoch's batches
        that ran before the checkpoint), so the rest of the epoch sees the data it would have."""
        self._skip = max(0, int(count))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.loader_generator.manual_seed(self.seed * 1_000_003 + self.epoch + 7_777_777)
        # datasets with epoch-dependent randomness (patches, paired crops) follow the same epoch
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        skip, self._skip = self._skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.length


class MedicalDataModule(L.LightningDataModule):
    """Train/validation/test loaders built from dataset configs.

    Each split is a dataset config (``{"_target_": "medgen.data.PhantomDataset", ...}``) or an
    already built ``Dataset``. Datasets are created in :meth:`setup`, so a config can be composed
    and inspected without touching the data. Splits hold different subjects: the phantom presets
    use disjoint indices, and when ``val`` is ``None`` and ``val_fraction > 0`` the training
    config's ``source`` (folder, glob, CSV or JSON datalist) is split by subject with
    :func:`medgen.data.datasets.split_by_subject`, so one patient's volumes and slices are never on
    both sides.

    The module also describes its data for the model configs to follow (``model.spatial_dims:
    ${data.spatial_dims}``): ``spatial_dims``, ``channels`` and ``value_range`` (the intensity
    range of the tensors its datasets produce, after their presets).

    Args:
        train: Training dataset (config or object).
        val: Validation dataset, or ``None``.
        test: Test dataset, or ``None``.
        batch_size: Training batch size.
        val_batch_size: Validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory (useful on GPU).
        persistent_workers: Keep workers alive between epochs (when ``num_workers > 0``).
        drop_last: Drop the last incomplete training batch.
        seed: Seed of the training shuffle and of the subject split.
        val_fraction: Fraction of subjects held out for validation when ``val`` is ``None``.
        spatial_dims: 2 or 3, the dimensionality of the images the datasets return.
        channels: Channels of the images (1 grey, 3 RGB).
        value_range: ``(low, high)`` intensity range of the images after their presets.
    """

    def __init__(
        self,
        train: Mapping[str, Any] | Dataset,
        val: Mapping[str, Any] | Dataset | None = None,
        test: Mapping[str, Any] | Dataset | None = None,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        drop_last: bool = True,
        seed: int = 0,
        val_fraction: float = 0.0,
        spatial_dims: int = 2,
        channels: int = 1,
        value_range: tuple[float, float] | list[float] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        self.configs = {"train": train, "val": val, "test": test}
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.drop_last = drop_last
        self.seed = seed
        self.val_fraction = float(val_fraction)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.value_range = tuple(value_range)
        self.datasets: dict[str, Dataset | None] = {}

    @staticmethod
    def _build(config: Mapping[str, Any] | Dataset | None) -> Dataset | None:
        if config is None or isinstance(config, Dataset):
            return config
        from medgen.data.io import MedgenIOError

        try:
            return instantiate(to_plain(config), _convert_="all")
        except InstantiationError as exc:
            # A dataset's own error names the file and the problem; the wrapper adds nothing.
            if isinstance(exc.__cause__, MedgenIOError):
                raise exc.__cause__ from None
            raise

    def _split_configs(self) -> dict[str, Any]:
        """Replace a missing ``val`` by a subject-level split of the training ``source``."""
        configs = dict(self.configs)
        train = configs["train"]
        if configs["val"] is not None or self.val_fraction <= 0 or isinstance(train, Dataset):
            return configs
        train = dict(to_plain(train))
        if "source" not in train:
            raise ValueError(
                "val_fraction needs a training dataset config with a 'source' to split"
            )
        from medgen.data.datasets import resolve_sources, split_by_subject

        items = resolve_sources(train["source"], **_source_kwargs(train))
        train_items, val_items = split_by_subject(items, self.val_fraction, seed=self.seed)
        configs["train"] = {**train, "source": train_items}
        configs["val"] = {**train, "source": val_items, **_deterministic(train)}
        return configs

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (once) and check them together.

        Raises:
            MedgenIOError: bad files (named by the datasets), or a split whose images differ in
                shape from the training images (checked from the file headers, see
                :func:`medgen.data.datasets.check_shapes_across_splits`).
            ValueError: an empty training dataset.
        """
        from medgen.data.datasets import check_shapes_across_splits

        configs = self._split_configs() if "train" not in self.datasets else self.configs
        for split, config in configs.items():
            if split not in self.datasets:
                self.datasets[split] = self._build(config)
        train = self.datasets["train"]
        if train is not None and len(train) == 0:
            raise ValueError("the training dataset is empty")
        check_shapes_across_splits(self.datasets)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        dataset = self.datasets[split]
        if dataset is None:
            return []  # Lightning skips the loop for an empty loader list
        batch_size = self.batch_size if split == "train" else self.val_batch_size
        sampler = EpochShuffleSampler(len(dataset), self.seed, dataset) if shuffle else None
        loader = DataLoader(
            dataset,
            batch_size=min(batch_size, len(dataset)) if not shuffle else batch_size,
            sampler=sampler,
            generator=sampler.loader_generator if sampler is not None else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            drop_last=self.drop_last and shuffle and len(dataset) > batch_size,
        )
        if sampler is not None:
            done = self._batches_done_in_epoch()
            if 0 < done < len(loader):  # resuming a checkpoint saved mid-epoch
                sampler.skip_once(batch_size * done)
        return loader

    def _batches_done_in_epoch(self) -> int:
        """Training batches of the current epoch that ran before the checkpoint being resumed.

        Lightning restores its loop state before it asks for the loaders; resuming a checkpoint
        saved mid-epoch (on pre-emption) continues that epoch where it stopped.
        """
        trainer = getattr(self, "trainer", None)
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        progress = getattr(getattr(loop, "batch_progress", None), "current", None)
        if progress is None or not getattr(trainer.fit_loop, "restarting", False):
            return 0
        return int(progress.completed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _source_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ("key", "base_dir") if k in config}


def _deterministic(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validation copies of a training config switch off random augmentation."""
    return {k: v for k, v in (("flip", False), ("crop_size", None)) if k in config}
