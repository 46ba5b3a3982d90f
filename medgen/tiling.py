"""Former home of the GroupNorm-aware tiling methods, now in :mod:`medgen.inference`.

Kept so that ``from medgen.tiling import layerwise_apply`` (and the other public names) still works.
"""

from medgen.inference.global_stats import (
    GlobalStatsGroupNorm,
    global_group_norm,
    group_norm_with_stats,
    tiled_apply_global_norm,
)
from medgen.inference.layerwise import layerwise_apply

__all__ = [
    "GlobalStatsGroupNorm",
    "global_group_norm",
    "group_norm_with_stats",
    "layerwise_apply",
    "tiled_apply_global_norm",
]
