"""One LightningDataModule behind every ``data=`` preset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from medgen.utils.instantiate import instantiate, to_plain


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
    ) -> None:
        super().__init__()
        self.configs = {"train": train, "val": val, "test": test}
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.drop_last = drop_last
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
        return DataLoader(
            dataset,
            batch_size=min(batch_size, len(dataset)) if not shuffle else batch_size,
            shuffle=shuffle,
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
