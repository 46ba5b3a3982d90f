"""What several runs share: the tiling settings of a config."""

from __future__ import annotations

import warnings

from omegaconf import DictConfig

from medgen.inference.settings import Tiling
from medgen.utils.instantiate import to_plain

__all__ = ["LEGACY_TILING_KEYS", "tiling_from_config"]


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
