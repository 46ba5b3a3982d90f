"""``medgen-train``: train, checkpoint, export and sample one model from a composed config."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from medgen.models.base import SAMPLE
from medgen.pretrained import load, load_checkpoint_file
from medgen.runs.composition import register_resolvers
from medgen.runs.sampling import write_samples
from medgen.runs.validation import preflight_data
from medgen.utils.files import ensure_writable_dir, remove_stale_temporaries, write_json
from medgen.utils.instantiate import instantiate, to_plain

log = logging.getLogger("medgen")

__all__ = ["train"]


def _build_list(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [
        instantiate(to_plain(conf), _convert_="all")
        for conf in node.values()
        if isinstance(conf, (dict, DictConfig)) and "_target_" in conf
    ]


def _resolve_resume(resume: str | None, checkpoint_dir: Path, output_dir: Path) -> str | None:
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        return _latest_checkpoint(checkpoint_dir, output_dir)
    path = checkpoint_dir / "last.ckpt" if resume == "last" else Path(resume)
    from medgen.finetune import check_resume_path

    check_resume_path(path)  # an export folder: say to use model.init_from
    load_checkpoint_file(path)  # a clear error for a missing or corrupt file, before training
    return str(path)


def _latest_checkpoint(checkpoint_dir: Path, output_dir: Path) -> str | None:
    """``resume=auto``: the newest loadable of ``last.ckpt`` and Lightning's SLURM checkpoints.

    A requeued SLURM job runs the same command again: with ``resume=auto`` (what
    ``launcher=slurm`` sets) it continues from whichever was written last, ``checkpoints/last.ckpt``
    (medgen's pre-emption save) or ``<output_dir>/hpc_ckpt_<n>.ckpt`` (Lightning's SLURM save on
    SIGUSR1), and starts a new run when neither exists. A file that does not load (a node that
    died mid-write) is skipped with a warning for the next newest.
    """
    candidates = [checkpoint_dir / "last.ckpt", *output_dir.glob("hpc_ckpt_*.ckpt")]
    existing = sorted(
        (p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for path in existing:
        try:
            load_checkpoint_file(path)
        except Exception as err:  # any unreadable file: try the next one
            log.warning("resume=auto: skipping '%s', which does not load: %s", path, err)
            continue
        log.info("resume=auto: continuing from '%s'", path)
        return str(path)
    log.info("resume=auto: no checkpoint in '%s'; starting a new run", checkpoint_dir)
    return None


def _launched_rank() -> int:
    """The global rank this process was launched as (0 unless torchrun/SLURM/Lightning set one)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value and value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def _check_fresh_start(cfg: DictConfig, checkpoint_dir: Path, resuming: bool) -> None:
    """Refuse to start a new run over another run's checkpoints (it would mix the two)."""
    last = checkpoint_dir / "last.ckpt"
    if resuming or not last.is_file() or cfg.get("overwrite", False):
        return
    raise FileExistsError(
        f"'{last}' exists: this output folder holds an earlier run. Continue it with resume=last, "
        "choose another paths.output_dir, or pass overwrite=true to start afresh in it (its "
        "checkpoints are then replaced)"
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the model described by ``cfg`` (a composed ``train`` config).

    Writes under ``cfg.paths.output_dir``: ``checkpoints/last.ckpt`` (and the best checkpoint),
    ``metrics.json`` (final validation metrics), ``model/`` (exported model, EMA weights when an
    EMA callback ran) and ``samples/`` (validation images and ``cfg.num_samples`` samples).

    Before anything is built, the config's value types are checked against the targets'
    signatures (an error names every wrong key); the output folder is locked against a second
    live run (``.medgen.lock``); and a new run refuses a folder that holds another run's
    ``last.ckpt`` unless ``resume=last`` or ``overwrite=true``. With ``memory_estimate=true``
    one training step is measured instead (:func:`medgen.runs.memory.estimate_memory`) and
    nothing is trained.

    Returns:
        ``{"model", "metrics": {...}, "output_dir", "checkpoint", "model_dir", "samples": [...]}``
        (``model``: the trained module, on the CPU after export), or
        with ``memory_estimate=true`` ``{"memory": {...}, "output_dir", "memory_file"}``.
    """
    from medgen.runs.validation import check_config
    from medgen.utils.lock import RunLock

    register_resolvers()
    check_config(cfg)
    output_dir = ensure_writable_dir(cfg.paths.output_dir)
    if cfg.get("memory_estimate", False):
        return _estimate_only(cfg, output_dir)
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    if _launched_rank() > 0:  # the other ranks of a torchrun/SLURM/Lightning DDP launch
        return _fit(cfg, output_dir, checkpoint_dir)
    with RunLock(output_dir):
        _check_fresh_start(cfg, checkpoint_dir, cfg.get("resume") not in (None, "", "null"))
        if checkpoint_dir.is_dir():
            remove_stale_temporaries(checkpoint_dir)  # left by a process killed mid-write
        return _fit(cfg, output_dir, checkpoint_dir)


def _estimate_only(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """``memory_estimate=true``: measure one training step, report it, train nothing.

    Runs :func:`medgen.runs.memory.estimate_memory` at the configured sizes on the configured
    device, logs the peak and its breakdown, and writes them to ``<output_dir>/memory.json``.
    """
    from medgen.runs.memory import estimate_memory

    report = estimate_memory(cfg)
    path = output_dir / "memory.json"
    write_json(report, path)
    gib = 2.0**30
    parts = ", ".join(f"{k} {v / gib:.3f}" for k, v in report["breakdown"].items())
    log.info(
        "medgen: one training step of %s on %s (%s, batch %s) peaks at %.3f GiB "
        "(%s; activations %.3f GiB), %.2f steps/s; method: %s. Written to %s",
        report["settings"].get("task_name"),
        report["device"],
        report["settings"].get("precision"),
        report["settings"].get("batch_size"),
        report["peak_gib"],
        parts,
        report["saved_tensor_bytes"] / gib,
        report["steps_per_s"],
        report["method"],
        path,
    )
    return {"memory": report, "output_dir": str(output_dir), "memory_file": str(path)}


def _fit(cfg: DictConfig, output_dir: Path, checkpoint_dir: Path) -> dict[str, Any]:
    import lightning as L

    from medgen.callbacks.checkpoint_io import AtomicCheckpointIO
    from medgen.callbacks.csv_logger import CSVLogger, trim_metrics_csv

    ckpt_path = _resolve_resume(cfg.get("resume"), checkpoint_dir, output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    # the first training items against data.channels/spatial_dims/value_range, before the model
    # is built (the model's channels follow the data's when they are ${data.channels})
    preflight_data(cfg, datamodule)
    model_cfg = to_plain(cfg.model)
    model = instantiate(model_cfg, _recursive_=False, _convert_="all")
    callbacks = _build_list(cfg.get("callbacks"))
    # model.init_from / model.finetune.*: load weights (a new run: fresh optimiser, step 0, EMA
    # from the loaded weights), freeze, LoRA, learning-rate factors; skipped init when resuming
    from medgen.convert import convert
    from medgen.finetune import resume_messages, setup_finetune

    callbacks += setup_finetune(model, model_cfg, ckpt_path is not None, output_dir, convert)
    loggers = _build_list(cfg.get("logger"))
    if ckpt_path is not None:  # rows logged after the checkpoint are logged again
        ckpt = load_checkpoint_file(ckpt_path)
        step = int(ckpt.get("global_step", 0))
        restored, overridden = resume_messages(ckpt_path, ckpt, model_cfg)
        log.info("%s", restored)
        for message in overridden:
            log.warning("%s", message)
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                trim_metrics_csv(Path(logger.log_dir) / "metrics.csv", step)
    trainer_cfg = to_plain(cfg.trainer)
    trainer_cfg.setdefault("plugins", [])
    trainer_cfg["plugins"] = [*trainer_cfg["plugins"], AtomicCheckpointIO()]
    trainer = instantiate(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, _convert_="all"
    )
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except Exception as err:
        _raise_rank_failure(err, checkpoint_dir)
        raise

    result: dict[str, Any] = {
        "output_dir": str(output_dir),
        "checkpoint": str(checkpoint_dir / "last.ckpt"),
        "model": model,
    }
    if not trainer.is_global_zero:
        return result
    metrics = {
        k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")
    }
    write_json(metrics, output_dir / "metrics.json")  # NaN/Inf become null, with a warning
    result["metrics"] = metrics
    if cfg.get("export", True):
        model_dir = Path(cfg.paths.model_dir)
        _export(model, trainer, callbacks, checkpoint_dir / "last.ckpt", model_dir)
        result["model_dir"] = str(model_dir)
        from medgen.finetune import export_adapter

        spawned = getattr(trainer.strategy, "_start_method", None) in ("spawn", "forkserver")
        last = checkpoint_dir / "last.ckpt"
        adapter_dir = export_adapter(
            model, output_dir / "adapter", callbacks, checkpoint=last if spawned else None
        )
        if adapter_dir is not None:  # a LoRA run: the adapter alone, on its init_from base
            result["adapter_dir"] = str(adapter_dir)
        if cfg.get("num_samples", 0) > 0 and model.supports(SAMPLE):
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


class RankFailedError(RuntimeError):
    """A process of a multi-process run died; the others were stopped."""


def _raise_rank_failure(err: BaseException, checkpoint_dir: Path) -> None:
    """Turn torch.multiprocessing's report of a dead DDP process into a message naming it."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    if not isinstance(err, (ProcessExitedException, ProcessRaisedException)):
        return
    last = checkpoint_dir / "last.ckpt"
    kept = f"the last checkpoint is '{last}'" if last.is_file() else "no checkpoint was written"
    code = getattr(err, "exit_code", None)
    how = f"ended with exit code {code}" if code is not None else "raised an error"
    raise RankFailedError(
        f"DDP rank {err.error_index} {how}; the other ranks were stopped and {kept} "
        f"(continue with resume=last). Cause: {str(err).strip().splitlines()[-1]}"
    ) from err


def _export(model, trainer, callbacks: list[Any], last_ckpt: Path, model_dir: Path) -> None:
    """Export the trained model (EMA weights when an EMA callback ran) to ``model_dir``."""
    from medgen.callbacks import EMA

    spawned = getattr(trainer.strategy, "_start_method", None) in ("spawn", "forkserver")
    sharded = type(trainer.strategy).__name__.startswith(("FSDP", "ModelParallel", "DeepSpeed"))
    if (spawned or sharded) and last_ckpt.is_file():
        # Under ddp_spawn the callbacks of this process never saw training; under FSDP the
        # in-memory model holds only this rank's shard, and gathering it is a collective that
        # the other ranks (already past training) would never join. Either way the checkpoint
        # (consolidated by the strategy, state_dict_type=full) holds the trained weights and
        # the EMA shadow.
        from medgen.finetune import load as load_any  # a LoRA run's checkpoint too

        load_any(last_ckpt).save_pretrained(model_dir)
        return
    if sharded:
        raise RuntimeError(
            f"cannot export a sharded ({type(trainer.strategy).__name__}) model without its "
            f"consolidated checkpoint '{last_ckpt}': keep ModelCheckpoint's save_last and "
            "state_dict_type=full, or export later with medgen.load(<ckpt>).save_pretrained(...)"
        )
    ema = next((c for c in callbacks if isinstance(c, EMA)), None)
    model = model.cpu()
    if ema is not None:
        with ema.swapped(model):
            model.save_pretrained(model_dir)
    else:
        model.save_pretrained(model_dir)
