"""Write validation images to disk (and to TensorBoard when it is the logger).

2D: one grid PNG per logged set (16-bit, so no intensity resolution is lost). 3D: a PNG of the three
central orthogonal slices of every volume, plus the volumes themselves as NIfTI. The grids are
:func:`medgen.viz.image_grid`'s, the ones the notebook views draw.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medgen.data.io import MedgenIOError, write
from medgen.viz.grids import image_grid, orthogonal_slices

__all__ = ["ImageLogger", "image_grid", "orthogonal_slices", "write_image_set"]

log = logging.getLogger("medgen")


def write_image_set(
    images: torch.Tensor,
    folder: str | os.PathLike,
    name: str,
    value_range: Sequence[float],
    spacing: Sequence[float] | None = None,
    affines: torch.Tensor | None = None,
    volumes: torch.Tensor | None = None,
) -> list[Path]:
    """Write a set of images as a grid PNG (and NIfTI volumes for 3D); return the paths.

    Args:
        images: ``(N, C, *spatial)`` in ``value_range`` (the grid preview).
        folder: Destination folder.
        name: File name stem.
        value_range: Range of ``images``.
        spacing: Voxel spacing of the NIfTI volumes when ``affines`` is not given.
        affines: ``(N, 4, 4)`` or ``(4, 4)`` voxel-to-world affines of the volumes (e.g. the
            batch's own, or the training data's), so that they overlay their inputs.
        volumes: What to write as NIfTI instead of ``images`` (e.g. the same in data units).
    """
    folder = Path(folder)
    grid = image_grid(images, value_range)
    # grey grids keep 16 bits; RGB previews are 8-bit (Pillow writes no 16-bit RGB PNG)
    bit_depth = 16 if grid.shape[0] == 1 else 8
    paths = [write(grid, folder / f"{name}.png", value_range=(0.0, 1.0), bit_depth=bit_depth)]
    if images.ndim == 5:
        if affines is None:
            affines = torch.diag(torch.tensor([*(spacing or (1.0, 1.0, 1.0)), 1.0]))
        affines = affines.double().reshape(-1, 4, 4).expand(len(images), 4, 4)
        for i, volume in enumerate(images if volumes is None else volumes):
            path = folder / f"{name}_{i:02d}.nii.gz"
            paths.append(write(volume.float().cpu(), path, affine=affines[i]))
    return paths


class ImageLogger(L.Callback):
    """Log the model's :meth:`log_images` for the first validation batch every few epochs.

    Args:
        output_dir: Folder for the image files (``None``: ``<default_root_dir>/samples``).
        every_n_epochs: Logging period in epochs.
        max_images: Images per set.
        output_units: Units of the 3D NIfTI files: ``"model"`` (the normalised range) or
            ``"data"`` (the inverse of the training preset: HU, scanner units). Volumes carry
            the validation batch's own affines (reconstructions overlay their inputs), else the
            training data's.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        every_n_epochs: int = 1,
        max_images: int = 8,
        output_units: str = "model",
    ) -> None:
        from medgen.data.outputs import OUTPUT_UNITS

        if output_units not in OUTPUT_UNITS:
            raise ValueError(f"output_units must be one of {OUTPUT_UNITS}, got {output_units!r}")
        self.output_dir = output_dir
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.max_images = max_images
        self.output_units = output_units
        self.written: list[Path] = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            batch_idx != 0
            or dataloader_idx != 0
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or trainer.current_epoch % self.every_n_epochs
            or not hasattr(pl_module, "log_images")
            or not isinstance(batch, Mapping)
        ):
            return
        sub_batch = {k: v[: self.max_images] if torch.is_tensor(v) else v for k, v in batch.items()}
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            sets = pl_module.log_images(sub_batch)
        pl_module.train(was_training)
        from medgen.data.outputs import batch_affine, output_affine, to_data_units

        folder = Path(self.output_dir or Path(trainer.default_root_dir) / "samples")
        value_range = getattr(pl_module, "value_range", (0.0, 1.0))
        keys = getattr(pl_module, "data_keys", ("image",))
        found = [batch_affine(sub_batch.get(k)) for k in keys]
        batch_affines = next((a for a in found if a is not None), None)
        tb = _tensorboard(trainer)
        for name, images in sets.items():
            images = images.detach().float().cpu()
            tag = f"epoch{trainer.current_epoch:04d}_{name}"
            affines, volumes = None, None
            if images.ndim == 5:
                same = batch_affines is not None and len(batch_affines) == len(images)
                affines = batch_affines if same else output_affine(pl_module)
                if self.output_units == "data":
                    volumes = to_data_units(pl_module, images.clamp(*value_range))
            try:
                self.written += write_image_set(
                    images, folder, tag, value_range, affines=affines, volumes=volumes
                )
            except MedgenIOError as err:  # e.g. NaN outputs of a diverging model: log, go on
                log.warning("validation images %s not written: %s", tag, err)
                continue
            if tb is not None:
                tb.add_image(f"val/{name}", image_grid(images, value_range), trainer.global_step)


def _tensorboard(trainer: L.Trainer):
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            return experiment
    return None
