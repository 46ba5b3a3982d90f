"""One LightningDataModule behind every ``data=`` preset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medgen.utils.instantiate import instantiate, to_plain


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

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0
        #: Give this to the DataLoader as ``generator``: it draws the workers' base seed, which
        #: then also depends on (seed, epoch) only, and the global RNG is left untouched.
        self.loader_generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.loader_generator.manual_seed(self.seed * 1_000_003 + self.epoch + 7_777_777)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class MedicalDataModule(L.LightningDataModule):
    """Train/validation/test loaders built from dataset configs.

    Each split is a dataset config (``{"_target_": "medgen.data.PhantomDataset", ...}``) or an
    already built ``Dataset``. Datasets are created in :meth:`setup`, so a config can be composed
    and inspected without touching the data. Splits must hold different subjects (the presets use
    disjoint phantom indices or file lists); the module never splits one volume's slices.

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
        seed: Seed of the training shuffle (see :class:`EpochShuffleSampler`).
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
        self.datasets: dict[str, Dataset | None] = {}

    @staticmethod
    def _build(config: Mapping[str, Any] | Dataset | None) -> Dataset | None:
        if config is None or isinstance(config, Dataset):
            return config
        return instantiate(to_plain(config), _convert_="all")

    def setup(self, stage: str | None = None) -> None:
        for split, config in self.configs.items():
            if split not in self.datasets:
                self.datasets[split] = self._build(config)
        train = self.datasets["train"]
        if train is not None and len(train) == 0:
            raise ValueError("the training dataset is empty")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        dataset = self.datasets[split]
        if dataset is None:
            return []  # Lightning skips the loop for an empty loader list
        batch_size = self.batch_size if split == "train" else self.val_batch_size
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=min(batch_size, len(dataset)) if not shuffle else batch_size,
            sampler=sampler,
            generator=sampler.loader_generator if sampler is not None else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            drop_last=self.drop_last and shuffle and len(dataset) > batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
