"""Tiled inference: one settings object, and the methods it chooses between.

- :mod:`medgen.inference.settings`: :class:`Tiling`, the settings every tiling call accepts, and
  :meth:`Tiling.apply`, which runs a net with the method they choose;
- :mod:`medgen.inference.blend`: sliding-window tiles blended with Gaussian weights
  (:func:`tiled_apply`), the tile grid;
- :mod:`medgen.inference.global_stats`: blended tiles with whole-volume GroupNorm statistics
  (:func:`tiled_apply_global_norm`);
- :mod:`medgen.inference.layerwise`: exact tiles, layer by layer (:func:`layerwise_apply`);
- :mod:`medgen.inference.files`: translating files and folders (:func:`translate_files`).
"""

from medgen.inference.blend import tile_grid, tile_starts, tiled_apply
from medgen.inference.files import translate_files
from medgen.inference.global_stats import (
    GlobalStatsGroupNorm,
    global_group_norm,
    group_norm_with_stats,
    tiled_apply_global_norm,
)
from medgen.inference.layerwise import layerwise_apply
from medgen.inference.settings import AUTO_TILE, NORM_STATS, Tiling

__all__ = [
    "AUTO_TILE",
    "NORM_STATS",
    "GlobalStatsGroupNorm",
    "Tiling",
    "global_group_norm",
    "group_norm_with_stats",
    "layerwise_apply",
    "tile_grid",
    "tile_starts",
    "tiled_apply",
    "tiled_apply_global_norm",
    "translate_files",
]
