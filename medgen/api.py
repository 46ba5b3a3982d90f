"""The runs behind the command line, importable: compose, train, sample, evaluate.

From a notebook::

    import medgen
    cfg = medgen.compose("train", overrides=["experiment=quickstart", "trainer.max_epochs=1"])
    result = medgen.train(cfg)
    model = medgen.load(result["model_dir"])
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from medgen.data.outputs import write_images
from medgen.inference.settings import Tiling
from medgen.pretrained import CheckpointError, load, load_checkpoint_file
from medgen.utils.files import ensure_writable_dir, write_json
from medgen.utils.instantiate import instantiate, to_plain
from medgen.utils.targets import public_name

log = logging.getLogger("medgen")

CONFIG_MODULE = "medgen.configs"


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("now"):  # Hydra registers it only inside its own app
        OmegaConf.register_new_resolver(
            "now", lambda pattern: datetime.now().strftime(pattern), use_cache=True
        )


def compose(
    config_name: str = "train",
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
) -> DictConfig:
    """Compose a medgen config the way the command line does, for use from Python.

    Args:
        config_name: ``"train"``, ``"sample"`` or ``"eval"`` (or a config of ``config_dir``).
        overrides: Hydra overrides, e.g. ``["experiment=quickstart", "trainer.max_epochs=2"]``.
        config_dir: Optional folder of your own configs, searched before medgen's packaged
            ones (like ``--config-dir`` on the command line).

    Returns:
        The composed config (without the ``hydra`` node).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    _register_resolvers()
    overrides = list(overrides)
    if config_dir is not None:
        uri = Path(config_dir).resolve().as_uri()
        overrides.append(f"hydra.searchpath=[{uri}]")
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def _build_list(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [
        instantiate(to_plain(conf), _convert_="all")
        for conf in node.values()
        if isinstance(conf, (dict, DictConfig)) and "_target_" in conf
    ]


def _resolve_resume(resume: str | None, checkpoint_dir: Path) -> str | None:
    if resume in (None, "", "null"):
        return None
    path = checkpoint_dir / "last.ckpt" if resume == "last" else Path(resume)
    load_checkpoint_file(path)  # a clear error for a missing or corrupt file, before training
    return str(path)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the model described by ``cfg`` (a composed ``train`` config).

    Writes under ``cfg.paths.output_dir``: ``checkpoints/last.ckpt`` (and the best checkpoint),
    ``metrics.json`` (final validation metrics), ``model/`` (exported model, EMA weights when an
    EMA callback ran) and ``samples/`` (validation images and ``cfg.num_samples`` samples).

    Returns:
        ``{"metrics": {...}, "output_dir", "checkpoint", "model_dir", "samples": [...]}``.
    """
    import lightning as L

    from medgen.callbacks.checkpoint_io import AtomicCheckpointIO

    _register_resolvers()
    output_dir = ensure_writable_dir(cfg.paths.output_dir)
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    ckpt_path = _resolve_resume(cfg.get("resume"), checkpoint_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    model = instantiate(to_plain(cfg.model), _recursive_=False, _convert_="all")
    callbacks = _build_list(cfg.get("callbacks"))
    loggers = _build_list(cfg.get("logger"))
    trainer_cfg = to_plain(cfg.trainer)
    trainer_cfg.setdefault("plugins", [])
    trainer_cfg["plugins"] = [*trainer_cfg["plugins"], AtomicCheckpointIO()]
    trainer = instantiate(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, _convert_="all"
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    result: dict[str, Any] = {
        "output_dir": str(output_dir),
        "checkpoint": str(checkpoint_dir / "last.ckpt"),
    }
    if not trainer.is_global_zero:
        return result
    metrics = {
        k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")
    }
    write_json(metrics, output_dir / "metrics.json")
    result["metrics"] = metrics
    if cfg.get("export", True):
        model_dir = Path(cfg.paths.model_dir)
        _export(model, trainer, callbacks, checkpoint_dir / "last.ckpt", model_dir)
        result["model_dir"] = str(model_dir)
        if cfg.get("num_samples", 0) > 0 and getattr(model, "unconditional", True):
            exported = load(model_dir)
            result["samples"] = [
                str(p)
                for p in write_samples(
                    exported,
                    Path(cfg.paths.sample_dir),
                    cfg.num_samples,
                    cfg.sample_seed,
                    units=str(cfg.get("output_units", "model")),
                )
            ]
    log.info("medgen: outputs in %s", output_dir)
    return result


def _export(model, trainer, callbacks: list[Any], last_ckpt: Path, model_dir: Path) -> None:
    """Export the trained model (EMA weights when an EMA callback ran) to ``model_dir``."""
    from medgen.callbacks import EMA

    spawned = getattr(trainer.strategy, "_start_method", None) in ("spawn", "forkserver")
    if spawned and last_ckpt.is_file():
        # Under ddp_spawn the callbacks of this process never saw training: the checkpoint
        # written by rank 0 holds the trained weights and the EMA shadow.
        load(last_ckpt).save_pretrained(model_dir)
        return
    ema = next((c for c in callbacks if isinstance(c, EMA)), None)
    model = model.cpu()
    if ema is not None:
        with ema.swapped(model):
            model.save_pretrained(model_dir)
    else:
        model.save_pretrained(model_dir)


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


def sample(cfg: DictConfig) -> list[Path]:
    """Write ``cfg.num_samples`` samples of ``cfg.checkpoint`` to ``cfg.output_dir``.

    With ``cfg.generators`` (a list of GAN checkpoints or exported folders) the samples are
    AGGrGAN aggregates of those generators; an AGGrGAN model (trained or aggregated) writes a
    dataset folder with ``selection.csv`` and scores its candidates against the real images in
    ``cfg.reference_dir`` when given.
    """
    device = torch.device(cfg.get("device", "cpu"))
    if cfg.get("generators"):
        from medgen.models.aggrgan import AGGrGAN

        model = AGGrGAN.from_generators(list(cfg.generators))
    else:
        model = load(cfg.checkpoint, use_ema=cfg.get("use_ema", True))
    model = model.to(device)
    if cfg.get("input") or not getattr(model, "unconditional", True):
        return _translate(cfg, model)
    if hasattr(model, "write_dataset"):
        reference = read_references(cfg.reference_dir, model) if cfg.get("reference_dir") else None
        paths = model.write_dataset(
            cfg.output_dir,
            int(cfg.num_samples),
            int(cfg.seed),
            reference=reference,
            batch_size=int(cfg.get("batch_size", 16)),
        )
    else:
        # diffusion models: sampler settings, passed only when set
        extra = {k: cfg.get(k) for k in ("steps", "sampler", "guidance") if cfg.get(k) is not None}
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


#: Top-level keys of sample/encode configs that were tiling settings before ``tiling.*``.
LEGACY_TILING_KEYS = ("tile", "overlap", "margin", "batch_tiles", "layerwise", "offload_dir")


def tiling_from_config(cfg: DictConfig) -> Tiling:
    """The :class:`~medgen.inference.Tiling` of a sample/encode config (``tiling.*``).

    The old top-level keys (``tile=256``, ``layerwise=true``, ...) still work: when set, they
    override ``tiling.*``, with a deprecation warning.
    """
    settings = to_plain(cfg.get("tiling")) or {}
    legacy = {k: to_plain(cfg.get(k)) for k in LEGACY_TILING_KEYS if cfg.get(k) is not None}
    if legacy:
        warnings.warn(
            f"{', '.join(f'{k}=' for k in legacy)} are deprecated: use "
            f"{', '.join(f'tiling.{k}=' for k in legacy)}",
            DeprecationWarning,
            stacklevel=2,
        )
    return Tiling.from_any(settings, **legacy)


def _translate(cfg: DictConfig, model: torch.nn.Module) -> list[Path]:
    """``medgen-sample input=PATH``: translate a file or folder with a translation model."""
    from medgen.inference import translate_files

    if not hasattr(model, "translate"):
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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Compare the ``cfg.real`` and ``cfg.fake`` folders and write the metrics as JSON."""
    from medgen.metrics import evaluate_folders

    metrics = evaluate_folders(
        cfg.real,
        cfg.fake,
        mode=cfg.get("mode", "auto"),
        data_range=cfg.get("data_range"),
        feature_extractor=cfg.get("feature_extractor", "pixels"),
        weights_path=cfg.get("weights_path"),
        batch_size=int(cfg.get("batch_size", 16)),
        protocol=cfg.get("protocol", "float"),
    )
    if cfg.get("output"):
        write_json(metrics, cfg.output)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


__all__ = [
    "CheckpointError",
    "compose",
    "evaluate",
    "load",
    "sample",
    "train",
    "write_images",
    "write_samples",
]


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
    from medgen.data.latents import LATENTS_FORMAT, LATENTS_INDEX, latent_affine
    from medgen.models.autoencoder import LatentAutoencoder
    from medgen.utils.files import atomic_path

    _register_resolvers()
    device = torch.device(cfg.get("device", "cpu"))
    checkpoint = Path(str(cfg.checkpoint)).expanduser()
    model = load(checkpoint, use_ema=cfg.get("use_ema", True))
    if not isinstance(model, LatentAutoencoder):
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

    total, total_sq, count, scale_items = 0.0, 0.0, 0, 0
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
            if split == scale_split and (max_items is None or scale_items < int(max_items)):
                zd = z.double()
                total += float(zd.sum())
                total_sq += float(zd.square().sum())
                count += zd.numel()
                scale_items += 1
        index["splits"][split] = entries
        log.info("medgen-encode: %d latents of split '%s' in %s", len(entries), split, folder)
    if count < 2:
        raise MedgenIOError(f"no latents were written: the data has none of the splits {splits}")
    mean = total / count
    std = ((total_sq - count * mean * mean) / (count - 1)) ** 0.5
    if not std > 0:
        raise MedgenIOError("the latents have zero variance; is the autoencoder trained?")
    cls = type(model)
    index = {
        "format": LATENTS_FORMAT,
        "medgen_version": __import__("medgen").__version__,
        "autoencoder": str(checkpoint.resolve()),
        "autoencoder_class": public_name(cls, strict=False),
        "latent": "codebook" if hasattr(model.net, "quantizer") else "posterior_mean",
        "scale_factor": 1.0 / std,
        "latent_mean": mean,
        "latent_std": std,
        "scale_items": scale_items,
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


__all__ += ["encode"]
