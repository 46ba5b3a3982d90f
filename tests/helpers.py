"""Small data and trainer helpers shared by the model tests (not fixtures: plain functions)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from medgen.data import PhantomDataset


@functools.cache
def phantom_images(
    spatial_dims: int, size: int, count: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """``count`` phantom images, made once per process (making phantoms is the slow part)."""
    data = PhantomDataset(spatial_dims=spatial_dims, size=size, length=count, seed=seed)
    return tuple(d["image"] for d in data)


def _image_item(i: int, image: Any) -> dict[str, Any]:
    return {"image": image}


class CycledDataset(Dataset):
    """``length`` items cycling over a few cached ones; ``to_item(i, item)`` builds each batch
    entry (default ``{"image": item}``)."""

    def __init__(
        self,
        items: Sequence[Any],
        length: int,
        to_item: Callable[[int, Any], dict[str, Any]] = _image_item,
    ) -> None:
        self.items, self.length, self.to_item = items, length, to_item

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.to_item(i, self.items[i % len(self.items)])


def cycled_loader(
    items: Sequence[Any],
    length: int,
    batch: int,
    to_item: Callable[[int, Any], dict[str, Any]] = _image_item,
) -> DataLoader:
    """An unshuffled single-process loader over :class:`CycledDataset`."""
    return DataLoader(CycledDataset(items, length, to_item), batch_size=batch, shuffle=False)


def cpu_trainer(**kwargs: Any) -> L.Trainer:
    """A quiet one-CPU Lightning trainer (no logger, checkpoints, progress bar or sanity check)."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


class RankParameterDump(L.Callback):
    """Save each rank's parameters after training, to compare ranks of a DDP run.

    Writes ``folder/rank{R}.pt`` (a plain state dict of the model's parameters) and
    ``folder/rank{R}_start.pt`` (the same before the first step).
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _dump(self, trainer: L.Trainer, pl_module: L.LightningModule, suffix: str) -> None:
        import os

        os.makedirs(self.folder, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}
        torch.save(state, os.path.join(self.folder, f"rank{trainer.global_rank}{suffix}.pt"))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "_start")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "")


class DieOnRank(L.Callback):
    """Kill rank ``rank`` abruptly (``os._exit``) after ``step`` steps: a GPU that falls over."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        import os

        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            os._exit(3)


#: A tiny DiffusionUNet config shared by the diffusion tests.
TINY_DIFFUSION_NET: dict[str, Any] = {
    "channels": [8, 16],
    "num_res_blocks": 1,
    "attention_levels": [False, True],
    "num_head_channels": 8,
    "norm_num_groups": 4,
}
