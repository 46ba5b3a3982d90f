"""``medgen-eval``: compare folders of real and generated images, audit and report.

Paired folders (the same file names on both sides, or ``protocol=bci``) get the paired metrics of
:func:`medgen.metrics.evaluate_folders`; unpaired folders get the full evaluation of
:func:`medgen.metrics.evaluate_generation`: fidelity and diversity in one or more feature spaces,
``audit=true`` for the memorisation audit against ``train=DIR``, ``utility=...`` for
train-synthetic-test-real, ``report_dir=DIR`` for ``report.md`` + ``report.json`` + figures.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medgen.utils.files import write_json

log = logging.getLogger("medgen")

__all__ = ["evaluate", "preset_of_checkpoint"]


def preset_of_checkpoint(path: str) -> tuple[Any, tuple[float, float]]:
    """The intensity preset (config) and ``value_range`` a checkpoint or export was trained with.

    Raises:
        ValueError: the model records no preset (trained before medgen kept it).
    """
    from medgen.pretrained import load

    model = load(path)
    info = getattr(model, "data_info", None) or {}
    if not info.get("preset"):
        raise ValueError(
            f"{path}: the model records no intensity preset; pass real_preset=NAME instead "
            "(e.g. real_preset=mr)"
        )
    return info["preset"], tuple(float(v) for v in model.value_range)


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _paired(cfg: DictConfig) -> bool:
    from medgen.data.io import files_by_stem, list_images

    mode = cfg.get("mode", "auto")
    if mode == "paired" or cfg.get("protocol", "float") == "bci":
        return True
    if mode == "unpaired":
        return False
    real = files_by_stem(list_images(cfg.real), cfg.real)
    fake = files_by_stem(list_images(cfg.fake), cfg.fake)
    return set(real) == set(fake)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.fake`` against ``cfg.real``; write the metrics as JSON (and a report)."""
    from medgen.metrics import evaluate_folders, evaluate_generation

    if _paired(cfg):
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
    else:
        extractors = _plain(cfg.get("feature_extractors")) or [
            cfg.get("feature_extractor", "pixels")
        ]
        weights = dict(_plain(cfg.get("weights")) or {})
        if cfg.get("weights_path"):
            weights.setdefault(extractors[0], cfg.weights_path)
        sha256 = dict(_plain(cfg.get("sha256")) or {})
        real_preset = _plain(cfg.get("real_preset"))
        value_range = _plain(cfg.get("value_range"))
        if cfg.get("preset_from"):
            preset, model_range = preset_of_checkpoint(cfg.preset_from)
            real_preset = real_preset or preset
            if value_range is None and cfg.get("data_range") is None:
                value_range = list(model_range)
        metrics = evaluate_generation(
            cfg.real,
            cfg.fake,
            train=cfg.get("train"),
            feature_extractors=extractors,
            weights=weights,
            sha256=sha256,
            protocol=cfg.get("feature_protocol", "auto"),
            center_ratio=float(cfg.get("center_ratio", 1.0)),
            every_k=int(cfg.get("every_k", 1)),
            data_range=cfg.get("data_range"),
            value_range=value_range,
            real_preset=real_preset,
            fake_preset=_plain(cfg.get("fake_preset")),
            normalize=cfg.get("normalize", "none"),
            allow_range_mismatch=bool(cfg.get("allow_range_mismatch", False)),
            k=int(cfg.get("k", 5)),
            n_boot=int(cfg.get("n_boot", 50)),
            audit=bool(cfg.get("audit", False)),
            audit_options=_plain(cfg.get("audit_options")),
            utility=_plain(cfg.get("utility")),
            report_dir=cfg.get("report_dir"),
            cache_dir=cfg.get("cache_dir"),
            batch_size=int(cfg.get("batch_size", 16)),
            device=cfg.get("device", "cpu"),
            seed=int(cfg.get("seed", 0)),
        )
        for warning in metrics.get("warnings", []):
            log.warning("medgen-eval: %s", warning)
    if cfg.get("output"):
        write_json(metrics, cfg.output)
    print(json.dumps(_summary(metrics), indent=2, sort_keys=True))
    return metrics


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What is printed: the paired metrics, or the headline numbers of the full evaluation."""
    if metrics.get("mode") == "paired":
        return metrics
    keys = ("mode", "n_real", "n_fake", "fid", "kid_mean", "kid_std", "feature_extractor")
    out = {k: metrics.get(k) for k in keys}
    if "audit" in metrics:
        out["copy_rate"] = metrics["audit"]["copy_rate"]
        out["flagged"] = metrics["audit"]["flagged_files"]
    if "utility" in metrics:
        u = metrics["utility"]
        out["utility"] = {
            r: u[r]["value"] for r in ("real", "synthetic", "real+synthetic") if r in u
        }
    if "report" in metrics:
        out["report"] = metrics["report"].get("markdown")
    return out
