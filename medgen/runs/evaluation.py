"""``medgen-eval``: compare folders of real and generated images."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig

from medgen.utils.files import write_json

__all__ = ["evaluate"]


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
