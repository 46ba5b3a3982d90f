"""One settings object for tiled inference, accepted by every call that can tile.

``encode``, ``decode``, ``reconstruct`` (autoencoders), ``translate``, ``translate_files``
(translation models), the latent decoding of ``Diffusion.sample`` and ``medgen-sample`` /
``medgen-encode`` all take a :class:`Tiling` (or a dict, or just a tile size) instead of repeating
eight keyword arguments each. :meth:`Tiling.apply` then runs a net with the method the settings
choose: blended tiles (:func:`~medgen.inference.tiled_apply`), blended tiles with whole-volume
GroupNorm statistics (:func:`~medgen.inference.tiled_apply_global_norm`) or exact layer-by-layer
tiles (:func:`~medgen.inference.layerwise_apply`).

Example::

    from medgen.inference import Tiling

    volume = vae.decode(z, Tiling(tile=16, layerwise=True, offload_dir="/scratch"))
    volume = vae.decode(z, tile=16, layerwise=True)      # the same, as keywords
    out = model.translate(slide, tiling={"tile": 512, "overlap": 0.5})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medgen.utils.sequences import per_axis

__all__ = ["AUTO_TILE", "NORM_STATS", "Tiling"]

#: Tile of ``tile="auto"`` per spatial dimensionality.
AUTO_TILE = {2: 512, 3: 128}
#: Where the normalisation statistics of blended tiles come from.
NORM_STATS = ("global", "tile")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a net runs on inputs too large for one pass.

    Args:
        tile: ``None`` runs the whole input at once; an int or one per axis is the tile size (in
            the input's voxels: image voxels for encoders and translators, latent voxels for
            decoders); ``"auto"`` is 512 in 2D and 128 in 3D.
        overlap: Fraction of a tile shared with each neighbour, in ``[0, 1)`` (``None``: the
            caller's default, 0.5 for autoencoders and 0.25 for translation).
        margin: Voxels discarded at tile edges that face another tile (one number or one per
            axis), or ``"auto"`` for half the overlap (``None``: the caller's default, 0 for
            autoencoders and ``"auto"`` for translation).
        norm_stats: ``"global"``: GroupNorm statistics of the whole input, measured in partial
            passes; ``"tile"``: each tile normalised by itself (one pass, as MONAI/MAISI).
        layerwise: Run layer by layer with exact halos and whole-input statistics: equal to a
            whole pass up to float rounding (nets with a ``stages()`` description only);
            ``overlap``, ``margin``, ``norm_stats`` and ``batch_tiles`` are then unused.
        offload_dir: With ``layerwise``, a folder for the intermediate volumes (memory-mapped
            files, removed afterwards) instead of host memory.
        output_device: Where the result is assembled (default: the input's device), e.g.
            ``"cpu"`` for a volume that does not fit on the GPU.
        batch_tiles: Tiles per call of the net (blended tiles with ``norm_stats="tile"`` or a
            translator).
        progress: Show a progress bar over tiles.
    """

    tile: int | tuple[int, ...] | str | None = None
    overlap: float | None = None
    margin: int | tuple[int, ...] | str | None = None
    norm_stats: str = "global"
    layerwise: bool = False
    offload_dir: str | None = None
    output_device: str | None = None
    batch_tiles: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        tile = self.tile
        if isinstance(tile, str):
            if tile.lower() in ("none", "null", "whole", ""):
                tile = None
            elif tile.lower() != "auto":
                raise ValueError(
                    f"tile must be an int, a list of ints, 'auto' or null, got {tile!r}"
                )
            else:
                tile = "auto"
        elif isinstance(tile, bool):
            raise ValueError(f"tile must be an int, a list of ints, 'auto' or null, got {tile!r}")
        elif tile == 0:
            tile = None
        elif tile is not None:
            sizes = (tile,) if isinstance(tile, int) else tuple(tile)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in sizes):
                raise ValueError(f"tile must be positive integers, got {self.tile!r}")
            tile = sizes[0] if isinstance(tile, int) else sizes
        object.__setattr__(self, "tile", tile)
        if self.overlap is not None and not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if self.margin is None:
            pass
        elif isinstance(self.margin, str):
            if self.margin != "auto":
                raise ValueError(f"margin must be voxels or 'auto', got {self.margin!r}")
        else:
            margin = self.margin if isinstance(self.margin, int) else tuple(self.margin)
            if any(int(m) < 0 for m in ((margin,) if isinstance(margin, int) else margin)):
                raise ValueError(f"margin must be >= 0, got {self.margin!r}")
            object.__setattr__(self, "margin", margin)
        if self.norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {self.norm_stats!r}")
        if isinstance(self.batch_tiles, bool) or int(self.batch_tiles) < 1:
            raise ValueError(f"batch_tiles must be a positive integer, got {self.batch_tiles!r}")
        if self.offload_dir is not None:
            object.__setattr__(self, "offload_dir", str(self.offload_dir))
        if self.output_device is not None:
            object.__setattr__(self, "output_device", str(self.output_device))

    # ----------------------------------------------------------------- construction
    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The setting names (the keys a dict or keyword arguments may use)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_any(cls, value: Any = None, /, **options: Any) -> Tiling:
        """Build settings from a :class:`Tiling`, a mapping, a tile size or ``None``, plus keywords.

        Args:
            value: Existing settings, a dict/``DictConfig`` of settings, an int or a sequence of
                ints (the tile size), ``"auto"``, or ``None``.
            **options: Settings that override ``value``'s (``tile=None``: the whole input).
                In a mapping, ``None`` values mean "not set" (every such setting's default is
                ``None`` anyway).

        Raises:
            TypeError: an unknown setting, naming the valid ones.
        """
        if isinstance(value, Tiling):
            base: dict[str, Any] = dataclasses.asdict(value)
        elif value is None:
            base = {}
        elif isinstance(value, Mapping) or hasattr(value, "items"):
            base = {k: v for k, v in dict(value).items() if v is not None}
        else:
            base = {"tile": value}
        unknown = sorted((set(base) | set(options)) - set(cls.fields()))
        if unknown:
            raise TypeError(
                f"unknown tiling setting(s) {unknown}; valid: {', '.join(cls.fields())}"
            )
        base.update(options)
        if isinstance(base.get("tile"), Sequence) and not isinstance(base["tile"], str):
            base["tile"] = tuple(base["tile"])
        if isinstance(base.get("margin"), Sequence) and not isinstance(base["margin"], str):
            base["margin"] = tuple(base["margin"])
        return cls(**base)

    def replace(self, **changes: Any) -> Tiling:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def with_defaults(self, **defaults: Any) -> Tiling:
        """A copy in which the settings still ``None`` take ``defaults`` (e.g. ``overlap=0.5``)."""
        return self.replace(**{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly settings."""
        out = dataclasses.asdict(self)
        for key in ("tile", "margin"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    # ----------------------------------------------------------------- geometry
    def tile_size(self, spatial: Sequence[int], multiple: int = 1) -> tuple[int, ...] | None:
        """The tile per axis for an input of size ``spatial``, or ``None`` to run it whole.

        ``"auto"`` becomes :data:`AUTO_TILE`; a tile covering the whole input means no tiling
        (the result is exactly the net's). Tiles are whole multiples of ``multiple`` (a net's size
        factor), no larger than needed along short axes.
        """
        if self.tile is None:
            return None
        dims = len(spatial)
        tile = AUTO_TILE[dims] if self.tile == "auto" else self.tile
        sizes = [int(t) for t in per_axis(tile, dims, "tile")]
        if all(s <= t for s, t in zip(spatial, sizes, strict=True)):
            return None
        return tuple(
            max(multiple, (min(t, s) // multiple) * multiple)
            for s, t in zip(spatial, sizes, strict=True)
        )

    def margins(self, tiles: Sequence[int]) -> tuple[int, ...]:
        """Per-axis margins for ``tiles`` (``"auto"``: half the overlap of each tile)."""
        if self.margin == "auto":
            return tuple(int((self.overlap or 0.0) * t) // 2 for t in tiles)
        if self.margin is None:
            return (0,) * len(tiles)
        return tuple(int(m) for m in per_axis(self.margin, len(tiles), "margin"))

    # ----------------------------------------------------------------- running
    def apply(
        self,
        fn: Callable[[Tensor], Tensor],
        x: Tensor,
        *,
        scale: float | Sequence[float] = 1.0,
        multiple: int = 1,
        module: nn.Module | None = None,
        stages: Callable[[], Sequence[Any]] | None = None,
        device: torch.device | str | None = None,
        out: Tensor | None = None,
        accumulate_dtype: torch.dtype | None = torch.float32,
    ) -> Tensor:
        """Run ``fn`` on ``x`` as these settings say.

        Args:
            fn: The net (or a function running it) on ``(B, C, *spatial)`` inputs.
            x: The input.
            scale: Output/input size ratio of ``fn`` (4 for a 4x decoder, 1/4 for an encoder).
            multiple: Every tile size is a multiple of this (the net's size factor).
            module: The module whose GroupNorms get whole-input statistics
                (``norm_stats="global"``); ``None`` runs plain blended tiles.
            stages: Returns the net's :class:`~medgen.nn.layerwise.Stage` list (``layerwise``).
            device: Where ``fn`` runs (layer by layer: where each tile goes).
            out: Optional preallocated output (see :func:`~medgen.inference.tiled_apply`).
            accumulate_dtype: Accumulator dtype of blended tiles.

        Returns:
            ``fn(x)`` computed whole or in tiles, on ``output_device`` (default: ``x``'s).
        """
        from medgen.inference.blend import tiled_apply
        from medgen.inference.global_stats import tiled_apply_global_norm
        from medgen.inference.layerwise import layerwise_apply

        tiles = self.tile_size(x.shape[2:], multiple)
        if tiles is None:
            y = fn(x)
            if out is not None:
                if out.shape != y.shape:
                    raise ValueError(f"out has shape {tuple(out.shape)}; expected {tuple(y.shape)}")
                return out.copy_(y)
            return y if self.output_device is None else y.to(self.output_device)
        if self.layerwise:
            if stages is None:
                raise ValueError(
                    "layerwise tiling needs a net with a layer-by-layer form (stages()); use "
                    "blended tiles (layerwise=false)"
                )
            return layerwise_apply(
                stages(),
                x,
                tiles,
                device=device,
                offload_dir=self.offload_dir,
                out=out,
                output_device=self.output_device,
                progress=self.progress,
            )
        overlap = 0.25 if self.overlap is None else float(self.overlap)
        kwargs: dict[str, Any] = dict(
            margin=self.replace(overlap=overlap).margins(tiles),
            output_device=self.output_device,
            progress=self.progress,
            accumulate_dtype=accumulate_dtype,
            out=out,
        )
        if self.norm_stats == "global" and module is not None:
            return tiled_apply_global_norm(fn, x, tiles, overlap, scale, module=module, **kwargs)
        return tiled_apply(fn, x, tiles, overlap, scale, batch_tiles=self.batch_tiles, **kwargs)

    @property
    def offload_path(self) -> Path | None:
        """``offload_dir`` as a path."""
        return None if self.offload_dir is None else Path(self.offload_dir)
