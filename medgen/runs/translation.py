"""``medgen-sample input=PATH``: translate files and folders with a translation model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from medgen.inference import translate_files
from medgen.models.base import TRANSLATE
from medgen.pretrained import CheckpointError
from medgen.runs.common import tiling_from_config
from medgen.utils.instantiate import to_plain

log = logging.getLogger("medgen")

__all__ = ["translate"]


def translate(cfg: DictConfig, model: torch.nn.Module) -> list[Path]:
    """``medgen-sample input=PATH``: translate a file or folder with a translation model."""
    if not model.supports(TRANSLATE):
        raise CheckpointError(
            f"'{cfg.checkpoint}' holds a {type(model).__name__}, which does not translate images; "
            "input= is for translation models (Pix2Pix, CycleGAN)"
        )
    if not cfg.get("input"):
        raise CheckpointError(
            f"'{cfg.checkpoint}' holds a {type(model).__name__}, which translates images: give "
            "input=FILE_OR_FOLDER"
        )
    paths = translate_files(
        model,
        cfg.input,
        cfg.output_dir,
        direction=cfg.get("direction", "a2b"),
        tiling=tiling_from_config(cfg),
        deterministic=bool(cfg.get("deterministic", True)),
        input_preset=to_plain(cfg.input_preset) if cfg.get("input_preset") else None,
    )
    log.info("medgen: translated %d files into %s", len(paths), cfg.output_dir)
    return paths
