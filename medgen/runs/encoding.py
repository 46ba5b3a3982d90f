"""``medgen-encode``: encode a dataset to latent files for latent diffusion."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from medgen.models.base import ENCODE
from medgen.pretrained import CheckpointError, load
from medgen.runs.common import tiling_from_config
from medgen.runs.composition import register_resolvers
from medgen.utils.files import ensure_writable_dir, write_json
from medgen.utils.instantiate import instantiate
from medgen.utils.targets import public_name
from medgen.version import __version__

log = logging.getLogger("medgen")

__all__ = ["encode"]


def encode(cfg: DictConfig) -> dict[str, Any]:
    """Encode a dataset to latent files with an autoencoder (``medgen-encode``).

    ``cfg.checkpoint`` is an :class:`~medgen.models.AutoencoderKL` or
    :class:`~medgen.models.VQGAN` checkpoint or exported folder; ``cfg.data`` a ``data=`` preset
    whose ``cfg.splits`` datasets are encoded one image at a time (tiled when ``cfg.tile`` is
    set, in image voxels). Writes ``cfg.output_dir/<split>/<index>_<name>.npy`` (unscaled
    latents) and ``latents.json`` with the scale factor ``1 / std`` of the training latents
    (Rombach et al. 2022), the autoencoder path and the source files (format in
    :mod:`medgen.data.latents`); read them back with :class:`medgen.data.LatentDataset`.

    Returns:
        The ``latents.json`` content, plus ``"output_dir"``.

    Raises:
        CheckpointError: the checkpoint is not an autoencoder.
        MedgenIOError: an input that cannot be read or encoded, naming the file.
    """
    import numpy as np

    from medgen.data.io import MedgenIOError
    from medgen.data.latents import (
        LATENTS_FORMAT,
        LATENTS_INDEX,
        LatentStatistics,
        latent_affine,
    )
    from medgen.utils.files import atomic_path

    register_resolvers()
    device = torch.device(cfg.get("device", "cpu"))
    checkpoint = Path(str(cfg.checkpoint)).expanduser()
    model = load(checkpoint, use_ema=cfg.get("use_ema", True))
    if not model.supports(ENCODE):
        raise CheckpointError(
            f"'{checkpoint}' holds a {type(model).__name__}, not an autoencoder for latent "
            "generation (medgen.models.AutoencoderKL or VQGAN)"
        )
    model = model.to(device).eval()
    output_dir = ensure_writable_dir(cfg.output_dir, "latent folder")
    try:
        datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
        datamodule.setup("fit")
    except Exception as err:  # Hydra wraps the dataset's error: surface the one naming the file
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, MedgenIOError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from err
    splits = [str(s) for s in cfg.get("splits", ["train", "val"])]
    tiling = tiling_from_config(cfg)
    max_items = cfg.get("scale_max_items")
    factor = model.downsample_factor

    stats = LatentStatistics()
    scale_split = "train" if "train" in splits else splits[0]
    index: dict[str, Any] = {"splits": {}}
    shapes: set[tuple[int, ...]] = set()
    for split in splits:
        dataset = datamodule.datasets.get(split)
        if dataset is None:
            log.warning("medgen-encode: the data has no '%s' split; skipped", split)
            continue
        folder = ensure_writable_dir(output_dir / split, "latent folder")
        entries = []
        for i in range(len(dataset)):
            item = dataset[i]
            source = str(item["path"]) if item.get("path") else f"phantom:{item.get('index', i)}"
            stem = Path(source).name if item.get("path") else f"phantom{item.get('index', i)}"
            for suffix in (".gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff", ".dcm"):
                stem = stem.removesuffix(suffix)
            image = item["image"]
            try:
                x = torch.as_tensor(image).float()[None]
                z = model.encode(x, tiling)[0].float().cpu()
            except (ValueError, RuntimeError) as err:
                raise MedgenIOError(f"{source}: cannot encode this image: {err}") from err
            if not torch.isfinite(z).all():
                raise MedgenIOError(f"{source}: its latent has NaN/Inf values (check the input)")
            name = f"{split}/{i:06d}_{stem}.npy"
            with atomic_path(output_dir / name) as tmp, open(tmp, "wb") as handle:
                np.save(handle, z.numpy(), allow_pickle=False)
            entry: dict[str, Any] = {"file": name, "source": source, "shape": list(z.shape)}
            affine = getattr(image, "affine", None)
            if affine is not None and model.spatial_dims == 3 and tuple(affine.shape) == (4, 4):
                entry["affine"] = latent_affine(affine, factor)
            entries.append(entry)
            shapes.add(tuple(z.shape))
            if split == scale_split and (max_items is None or stats.items < int(max_items)):
                stats.add(z)
        index["splits"][split] = entries
        log.info("medgen-encode: %d latents of split '%s' in %s", len(entries), split, folder)
    if stats.count < 2:
        raise MedgenIOError(f"no latents were written: the data has none of the splits {splits}")
    try:
        mean, std = stats.mean, stats.std
    except ValueError as err:
        raise MedgenIOError(str(err)) from err
    cls = type(model)
    index = {
        "format": LATENTS_FORMAT,
        "medgen_version": __version__,
        "autoencoder": str(checkpoint.resolve()),
        "autoencoder_class": public_name(cls, strict=False),
        "latent": model.latent_kind,
        "scale_factor": 1.0 / std,
        "latent_mean": mean,
        "latent_std": std,
        "scale_items": stats.items,
        "scale_split": scale_split,
        "shape": list(next(iter(shapes))) if len(shapes) == 1 else None,
        "spatial_dims": model.spatial_dims,
        "downsample_factor": factor,
        "value_range": list(model.value_range),
        "tile": tiling.to_dict()["tile"],
        "tiling": tiling.to_dict(),
        **index,
    }
    write_json(index, output_dir / LATENTS_INDEX)
    log.info("medgen-encode: scale factor %.6g, index %s", 1.0 / std, output_dir / LATENTS_INDEX)
    return {**index, "output_dir": str(output_dir)}
