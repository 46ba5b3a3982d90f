"""``medgen-sample``: samples of a checkpoint, AGGrGAN datasets, or (``input=``) translation."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from medgen.data.outputs import write_images
from medgen.models.base import SAMPLE, SAMPLER_OPTIONS, WRITE_DATASET
from medgen.pretrained import CheckpointError, load
from medgen.utils.files import ensure_writable_dir

log = logging.getLogger("medgen")

__all__ = ["read_references", "sample", "write_audited_samples", "write_samples"]


def write_samples(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    num_samples: int,
    seed: int,
    batch_size: int = 16,
    prefix: str = "sample",
    units: str = "model",
    **sample_kwargs: Any,
) -> list[Path]:
    """Draw ``num_samples`` samples from ``model`` and write them as files, one per sample.

    2D samples become PNG files scaled from the model's ``value_range`` (16-bit grey, 8-bit RGB);
    3D samples become float32 NIfTI ``.nii.gz`` files with the training data's affine
    (orientation, spacing, origin). ``units="data"`` writes them in the training data's units
    (the inverse of its preset; see :func:`medgen.data.outputs.write_images`). The same seed
    gives byte-identical files. ``sample_kwargs`` go to ``model.sample`` (e.g. a diffusion
    model's ``steps``, ``sampler``, ``guidance``).
    """
    output_dir = ensure_writable_dir(output_dir, "sample folder")
    images = model.sample(num_samples, seed=seed, batch_size=batch_size, **sample_kwargs)
    return write_images(model, images, output_dir, prefix, units=units)


def read_references(folder: str | os.PathLike, model: torch.nn.Module) -> torch.Tensor:
    """Read the real images in ``folder`` as ``(R, C, *spatial)`` in ``model``'s data units.

    Integer files (8/16-bit PNG, TIFF) are scaled from their dtype's full range onto the model's
    ``value_range`` (as :func:`write_images` writes them); float files (NIfTI) are taken as data
    units. Every image must have the model's image size; an error names the first that does not.
    """
    from medgen.data.io import MedgenIOError, list_images, read

    low, high = model.value_range
    images = []
    for path in list_images(folder):
        image = read(path)
        source = str(image.meta.get("source_dtype", ""))
        tensor = image.as_tensor().float()
        if source in ("uint8", "uint16"):
            tensor = low + tensor / (255.0 if source == "uint8" else 65535.0) * (high - low)
        if images and tensor.shape != images[0].shape:
            raise MedgenIOError(
                f"{path}: shape {tuple(tensor.shape)} differs from the other reference images' "
                f"{tuple(images[0].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise MedgenIOError(f"{path}: reference image contains NaN/Inf values")
        images.append(tensor)
    return torch.stack(images)


def write_audited_samples(model: torch.nn.Module, cfg: DictConfig, extra: dict) -> list[Path]:
    """Draw samples, audit them against the training images in ``cfg.audit_against``, write.

    A sample closer to a training image than the audit threshold (see
    :mod:`medgen.metrics.audit`; leave-one-out baseline among the training images) is not
    written with ``audit_action=refuse`` (the default), or written with ``_flagged`` in its name
    with ``audit_action=mark``. ``audit.json`` in the output folder lists the flagged samples,
    their nearest training files and the threshold.
    """
    from medgen.metrics.audit import memorisation_audit
    from medgen.utils.files import write_json

    action = str(cfg.get("audit_action", "refuse"))
    if action not in ("refuse", "mark"):
        raise ValueError(f"audit_action must be 'refuse' or 'mark', got {action!r}")
    output_dir = ensure_writable_dir(cfg.output_dir, "sample folder")
    images = model.sample(
        int(cfg.num_samples),
        seed=int(cfg.seed),
        batch_size=int(cfg.get("batch_size", 16)),
        **extra,
    )
    from medgen.data.io import list_images

    train_files = list_images(cfg.audit_against)
    train = read_references(cfg.audit_against, model)
    low, high = (float(v) for v in model.value_range)
    unit = (images.detach().float().cpu().clamp(low, high) - low) / (high - low)
    result = memorisation_audit(
        list(unit), list((train - low) / (high - low)), None, **dict(cfg.get("audit_options") or {})
    )
    flagged = [int(i) for i in torch.nonzero(result.flagged).flatten()]
    units = str(cfg.get("output_units", "model"))
    if action == "refuse":
        keep = [i for i in range(len(images)) if i not in set(flagged)]
        paths = write_images(model, images[keep], output_dir, "sample", units=units) if keep else []
    else:
        paths = write_images(model, images, output_dir, "sample", units=units)
        for i in flagged:
            stem = f"sample_{i:04d}"
            target = paths[i].with_name(paths[i].name.replace(stem, f"{stem}_flagged", 1))
            paths[i] = paths[i].rename(target)
    summary = result.summary()
    summary["action"] = action
    summary["training_images"] = str(cfg.audit_against)
    summary["nearest_training_file"] = {
        str(i): train_files[int(result.pixel_nearest[i])].name for i in flagged
    }
    write_json(summary, output_dir / "audit.json")
    if flagged:
        log.warning(
            "medgen: %d of %d samples are closer to a training image than the audit threshold "
            "(correlation %.4f): %s (see %s)",
            len(flagged),
            len(images),
            summary["pixel"]["threshold_correlation"],
            "not written" if action == "refuse" else "written with _flagged in the name",
            output_dir / "audit.json",
        )
    return paths


def sample(cfg: DictConfig) -> list[Path]:
    """Write ``cfg.num_samples`` samples of ``cfg.checkpoint`` to ``cfg.output_dir``.

    With ``cfg.generators`` (a list of GAN checkpoints or exported folders) the samples are
    AGGrGAN aggregates of those generators; an AGGrGAN model (trained or aggregated) writes a
    dataset folder with ``selection.csv`` and scores its candidates against the real images in
    ``cfg.reference_dir`` when given.
    """
    device = torch.device(cfg.get("device", "cpu"))
    if cfg.get("generators"):
        from medgen.models import AGGrGAN

        model = AGGrGAN.from_generators(list(cfg.generators))
    else:
        model = load(cfg.checkpoint, use_ema=cfg.get("use_ema", True))
    model = model.to(device)
    if cfg.get("input") or not model.supports(SAMPLE):
        from medgen.runs.translation import translate

        return translate(cfg, model)
    if model.supports(WRITE_DATASET):
        reference = read_references(cfg.reference_dir, model) if cfg.get("reference_dir") else None
        paths = model.write_dataset(
            cfg.output_dir,
            int(cfg.num_samples),
            int(cfg.seed),
            reference=reference,
            batch_size=int(cfg.get("batch_size", 16)),
        )
    else:
        extra = {k: cfg.get(k) for k in ("steps", "sampler", "guidance") if cfg.get(k) is not None}
        if extra and not model.supports(SAMPLER_OPTIONS):
            raise CheckpointError(
                f"'{cfg.checkpoint}' holds a {type(model).__name__}: "
                f"{', '.join(f'{k}=' for k in extra)} are sampler settings of diffusion models"
            )
        if cfg.get("audit_against"):
            paths = write_audited_samples(model, cfg, extra)
        else:
            paths = write_samples(
                model,
                cfg.output_dir,
                int(cfg.num_samples),
                int(cfg.seed),
                int(cfg.get("batch_size", 16)),
                units=str(cfg.get("output_units", "model")),
                **extra,
            )
    log.info("medgen: wrote %d samples to %s", len(paths), cfg.output_dir)
    return paths
