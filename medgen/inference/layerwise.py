"""Exact tiled inference, layer by layer (:func:`layerwise_apply`).

A net given as stages (:mod:`medgen.nn.layerwise`) runs one stage at a time over the whole volume:
each tile with an exact halo of real neighbours and the whole input's GroupNorm statistics
(gathered while the previous stage wrote its output), only its core written. Nothing is blended or
computed twice, so the result equals whole-volume inference up to float rounding, with one tile's
memory on the compute device and the intermediate volumes on the host or in memory-mapped files.
See :mod:`medgen.inference.global_stats` for the GroupNorm background.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import tempfile
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.inference.global_stats import GroupMoments, group_norm_with_stats
from medgen.nn.layerwise import Stage
from medgen.utils.sequences import per_axis

__all__ = ["layerwise_apply"]


def _stat_groups(norm: nn.Module | None, where: str) -> int | None:
    """Groups whose whole-input statistics ``norm`` needs; ``None`` for a pointwise norm."""
    if norm is None:
        return None
    if isinstance(norm, nn.GroupNorm):
        return norm.num_groups
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        if norm.training or not norm.track_running_stats:
            return norm.num_features
        return None  # running statistics: pointwise
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        if norm.training or norm.running_mean is None:
            raise ValueError(
                f"stage {where!r}: batch norm with batch statistics (training mode) cannot run "
                "layer by layer; put the net in evaluation mode"
            )
        return None
    raise ValueError(f"stage {where!r}: unsupported norm {type(norm).__name__}")


def _stage_forward(stage: Stage, h: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
    """``fn(act(norm(h)))`` with the whole input's normalisation statistics."""
    if stage.norm is not None:
        # With no statistics the norm is pointwise (running statistics) and makes a new tensor.
        h = stage.norm(h) if stats is None else group_norm_with_stats(h, stage.norm, *stats)
        if type(stage.act) is nn.SiLU:
            # h is the norm's fresh output, never a view of the stored input: activate in place.
            h = F.silu(h, inplace=True)
        elif stage.act is not None:
            h = stage.act(h)
    elif stage.act is not None:
        # h may be a view of the stored input: an in-place activation must not write into it.
        h = stage.act(h.clone() if getattr(stage.act, "inplace", False) else h)
    return stage.fn(h)


class _Store:
    """Allocates the intermediate volumes: host memory, or ``.npy`` memmaps in a directory."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.count = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if self.directory is None:
            return torch.empty(shape, dtype=dtype)
        if dtype == torch.bfloat16:
            raise ValueError("offload_dir cannot hold bfloat16 volumes (numpy has no bfloat16)")
        self.count += 1
        path = self.directory / f"stage_{self.count:03d}.npy"
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
        # The mapping outlives the name: the disk space is freed as soon as the volume is.
        with contextlib.suppress(OSError):
            path.unlink()
        return torch.from_numpy(array)


def _stage_sizes(stages: Sequence[Stage], spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Spatial size of every stage's input (and, last, of the output); checks divisibility."""
    sizes = [spatial]
    for stage in stages:
        scaled = [Fraction(n) * Fraction(stage.scale) for n in sizes[-1]]
        if any(v.denominator != 1 for v in scaled):
            raise ValueError(
                f"stage {stage.name!r} scales by {stage.scale}, but its input size {sizes[-1]} "
                f"does not divide by {Fraction(stage.scale).denominator}"
            )
        sizes.append(tuple(int(v) for v in scaled))
    return sizes


def _allocate_on(device: torch.device, size: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.empty((*like.shape[:2], *size), dtype=like.dtype, device=device)


def _allocate_in(store: _Store, size: tuple[int, ...], like: Tensor) -> Tensor:
    return store.empty((*like.shape[:2], *size), like.dtype)


def _place(
    y: Tensor,
    region: tuple[slice, ...],
    target: Tensor | None,
    sums: GroupMoments | None,
    allocate: Callable[[Tensor], Tensor],
) -> Tensor:
    """Write a stage's output piece into its volume (allocated on the first piece)."""
    if target is None:
        target = allocate(y)
    elif target.shape[:2] != y.shape[:2]:
        raise ValueError(
            f"out has batch and channels {tuple(target.shape[:2])}; the net gives "
            f"{tuple(y.shape[:2])}"
        )
    if sums is not None:
        sums.add(y)
    target[(slice(None), slice(None), *region)].copy_(y)
    return target


@torch.no_grad()
def layerwise_apply(
    stages: Sequence[Stage],
    x: Tensor,
    tile: int | Sequence[int],
    *,
    device: str | torch.device | None = None,
    offload_dir: str | Path | None = None,
    out: Tensor | None = None,
    output_device: str | torch.device | None = None,
    progress: bool = False,
) -> Tensor:
    """Run a net given as :class:`~medgen.nn.layerwise.Stage` s on ``x``, tile by tile, exactly.

    Every stage runs over the whole volume before the next one starts: its input is cut into
    tiles whose *cores* partition the volume, each tile is taken with the stage's ``halo`` of real
    neighbouring voxels (the volume's own zero padding at its borders), normalised with the
    GroupNorm statistics of the stage's whole input, passed through ``fn``, and its core written
    into the stage's output volume; the per-group sums of that output are accumulated on the way
    for the next stage's norm, so the statistics cost no extra pass. Global stages
    (self-attention) run on the whole tensor. No voxel is blended and none is computed twice, so
    the result equals running the net on the whole volume up to floating-point rounding (unlike
    :func:`tiled_apply_global_norm`, whose tiles see at most their own context).

    Memory on ``device`` is that of one stage on one tile (plus its halo), which is at most what
    running the whole net on one tile takes. The intermediate volumes (every stage's output, at
    most three at a time: the input, the output and a residual block's shortcut) are kept in host
    memory, or in ``.npy`` memmaps in ``offload_dir`` when given (deleted afterwards): for a
    decoder that is a few times the size of its widest full-resolution activation, e.g. 4 GiB
    per intermediate for 64 float32 channels at 256^3.

    This is our own method. MONAI's sliding-window inference and MAISI's VAE decode tiles
    independently with per-tile GroupNorm statistics; the Stable-Diffusion community's "tiled
    VAE" keeps every tile's activations to estimate the statistics.

    Args:
        stages: The net, e.g. :meth:`medgen.nets.Decoder.stages`.
        x: ``(B, C, *spatial)`` input.
        tile: Tile size in ``x``'s voxels (int or one per axis); at a stage of another
            resolution it scales with it (a 16-voxel latent tile is a 64-voxel tile after a 4x
            upsampling).
        device: Where the stages run (default: ``x``'s device); tiles move there one at a time.
        offload_dir: Directory for the intermediate volumes as memory-mapped files (default:
            host memory).
        out: Optional preallocated output (any device, or a memmap) written tile by tile.
        output_device: Where the output is allocated when ``out`` is not given (default:
            ``x``'s device).
        progress: Show a progress bar per stage.

    Returns:
        The net's output for ``x``.

    Raises:
        ValueError: For no stages, a size that a resampling stage cannot divide, a stage whose
            output does not have its declared size, or a wrong ``out`` shape.
    """
    if len(stages) == 0:
        raise ValueError("layerwise_apply needs at least one stage")
    if x.ndim < 3:
        raise ValueError(f"x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    spatial_dims = x.ndim - 2
    tiles = tuple(int(t) for t in per_axis(tile, spatial_dims, "tile"))
    if any(t < 1 for t in tiles):
        raise ValueError(f"tile must be positive, got {tile!r}")
    device = x.device if device is None else torch.device(device)
    output_device = x.device if output_device is None else torch.device(output_device)
    sizes = _stage_sizes(stages, tuple(int(n) for n in x.shape[2:]))
    groups = [_stat_groups(stage.norm, stage.name) for stage in stages]
    # Stage inputs that a later stage adds as a shortcut, and the last stage that needs each.
    last_use: dict[int, int] = {}
    for i, stage in enumerate(stages):
        if stage.skip is None:
            continue
        source = i - int(stage.skip_back)
        if not 0 <= source < i:
            raise ValueError(f"stage {stage.name!r}: skip_back {stage.skip_back} has no source")
        if sizes[source] != sizes[i + 1]:
            raise ValueError(
                f"stage {stage.name!r} adds a shortcut of size {sizes[source]} to an output of "
                f"size {sizes[i + 1]}"
            )
        last_use[source] = i
    if out is not None and tuple(out.shape[2:]) != sizes[-1]:
        raise ValueError(f"out has spatial size {tuple(out.shape[2:])}; expected {sizes[-1]}")

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm ships with lightning
            pass
        else:
            bar = tqdm(total=len(stages), desc="stages", unit="stage")

    with contextlib.ExitStack() as stack:
        directory = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            directory = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(dir=offload_dir, ignore_cleanup_errors=True)
                )
            )
        store = _Store(directory)
        cur = x
        kept: dict[int, Tensor] = {}
        pending: GroupMoments | None = None
        resolution = Fraction(1)
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            size, out_size = sizes[i], sizes[i + 1]
            scale = Fraction(stage.scale)
            step = scale.denominator  # a downsampling stage needs even tile starts
            stage_tile = [max(1, math.ceil(t * resolution)) for t in tiles]
            stage_tile = [math.ceil(t / step) * step for t in stage_tile]
            axes = [list(range(0, n, t)) for n, t in zip(size, stage_tile, strict=True)]
            cores = [
                [(a, min(a + t, n)) for a in starts]
                for starts, t, n in zip(axes, stage_tile, size, strict=True)
            ]

            if i in last_use:
                kept[i] = cur
            shortcut = kept[i - stage.skip_back] if stage.skip is not None else None
            stats = None
            if groups[i] is not None:
                if pending is None:  # the input's statistics were not gathered when it was made
                    pending = GroupMoments(groups[i])
                    for box in itertools.product(*cores):
                        region = tuple(slice(a, b) for a, b in box)
                        pending.add(cur[(slice(None), slice(None), *region)].to(device))
                stats = pending.moments()
            following = None if last else groups[i + 1]
            sums = None if following is None else GroupMoments(following)

            target = out if last else None
            if last:
                allocate = functools.partial(_allocate_on, output_device, out_size)
            else:
                allocate = functools.partial(_allocate_in, store, out_size)
            if stage.halo is None:
                y = _stage_forward(stage, cur.to(device), stats)
                if tuple(y.shape[2:]) != out_size:
                    raise ValueError(
                        f"stage {stage.name!r} gave size {tuple(y.shape[2:])}; expected {out_size}"
                    )
                if stage.skip is not None:
                    assert shortcut is not None
                    y += stage.skip(shortcut.to(device))
                target = _place(y, tuple(slice(None) for _ in size), target, sums, allocate)
                del y
            else:
                halo = math.ceil(stage.halo / step) * step
                for box in itertools.product(*cores):
                    lo = [max(a - halo, 0) for a, _ in box]
                    hi = [min(b + halo, n) for (_, b), n in zip(box, size, strict=True)]
                    region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
                    y = _stage_forward(
                        stage, cur[(slice(None), slice(None), *region)].to(device), stats
                    )
                    expected = tuple(int((b - a) * scale) for a, b in zip(lo, hi, strict=True))
                    if tuple(y.shape[2:]) != expected:
                        raise ValueError(
                            f"stage {stage.name!r} gave size {tuple(y.shape[2:])} for an input "
                            f"of {tuple(b - a for a, b in zip(lo, hi, strict=True))}; expected "
                            f"{expected} (scale {scale})"
                        )
                    crop = tuple(
                        slice(int((a - r) * scale), int((b - r) * scale))
                        for (a, b), r in zip(box, lo, strict=True)
                    )
                    y = y[(slice(None), slice(None), *crop)]
                    core = tuple(slice(int(a * scale), int(b * scale)) for a, b in box)
                    if stage.skip is not None:
                        assert shortcut is not None
                        piece = shortcut[(slice(None), slice(None), *core)].to(device)
                        y = y + stage.skip(piece)
                    target = _place(y, core, target, sums, allocate)
                    del y
            assert target is not None
            # Inputs are kept only until the last stage that adds them as a shortcut.
            for source in [j for j in kept if last_use[j] <= i]:
                del kept[source]
            shortcut = None
            cur, pending = target, sums
            resolution *= scale
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(stage.name)
        if bar is not None:
            bar.close()
        return cur
