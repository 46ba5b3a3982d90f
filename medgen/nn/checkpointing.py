"""Activation checkpointing by stages of an ``nn.Sequential``, exact for batch-norm statistics.

A net built as one flat ``nn.Sequential`` (so that its ``state_dict`` keys stay those of the
reference implementation) is run as contiguous index ranges, "stages". With
``gradient_checkpointing`` on, in training mode with grad enabled, each stage is recomputed in the
backward pass instead of keeping its activations (non-reentrant
:func:`torch.utils.checkpoint.checkpoint`).

Recomputing a stage that holds batch norm (or instance norm with ``track_running_stats``) in
training mode would apply the running-statistics update a second time. :func:`checkpoint_stage`
wraps the recomputation in :class:`RestoreRunningStats`, so outputs, gradients and running
statistics are the same as without checkpointing. The translation nets
(:mod:`medgen.nets.translation`) and the GAN nets (:mod:`medgen.nets.gan`, which add spectral
norm's power-iteration vectors on top, from :class:`BufferSnapshot`) share these helpers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "BufferSnapshot",
    "RestoreRunningStats",
    "StagedCheckpointMixin",
    "apply_layers",
    "checkpoint_stage",
    "stages_from_starts",
    "tracked_stat_buffers",
]


def tracked_stat_buffers(modules: Sequence[nn.Module]) -> list[Tensor]:
    """Running-statistics buffers that norm layers in ``modules`` update in training mode.

    Args:
        modules: Modules searched recursively.

    Returns:
        ``running_mean``, ``running_var`` and ``num_batches_tracked`` of every batch / instance
        norm with ``track_running_stats``, in module order (buffers that are ``None`` skipped).
    """
    buffers: list[Tensor] = []
    for top in modules:
        for m in top.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                stats = (m.running_mean, m.running_var, m.num_batches_tracked)
                buffers += [b for b in stats if b is not None]
    return buffers


class BufferSnapshot:
    """Context manager that copies ``buffers`` on entry (into :attr:`saved`) and keeps them.

    Args:
        buffers: The tensors to copy.
    """

    def __init__(self, buffers: list[Tensor]) -> None:
        self.buffers = buffers
        self.saved: list[Tensor] = []

    def __enter__(self) -> None:
        self.saved = [b.clone() for b in self.buffers]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class RestoreRunningStats(BufferSnapshot):
    """Context manager that undoes running-statistics updates made inside it.

    Entered around the recomputation of a checkpointed stage: the recomputed forward runs batch /
    instance norm in training mode again, which would apply the momentum update (and
    ``num_batches_tracked += 1``) a second time. The buffers are copied on entry and written back
    on exit, so they end exactly as after the original forward pass.

    Args:
        buffers: The buffers to restore, e.g. :func:`tracked_stat_buffers` of the stage.
    """

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self.saved, strict=True):
                buffer.copy_(saved)
        self.saved = []


def _recompute_contexts(buffers: list[Tensor]) -> tuple[Any, Any]:
    return contextlib.nullcontext(), RestoreRunningStats(buffers)


def apply_layers(layers: nn.Sequential, start: int, stop: int, h: Tensor) -> Tensor:
    """Run ``layers[start:stop]`` on ``h`` in order, without building a sub-``Sequential``.

    Args:
        layers: The flat sequence of layers.
        start: Index of the first layer run.
        stop: Index after the last layer run.
        h: The input of ``layers[start]``.

    Returns:
        The output of ``layers[stop - 1]`` (``h`` itself when ``start == stop``).
    """
    for i in range(start, stop):
        h = layers[i](h)
    return h


def checkpoint_stage(layers: nn.Sequential, start: int, stop: int, h: Tensor) -> Tensor:
    """Run ``layers[start:stop]`` on ``h`` under non-reentrant activation checkpointing.

    Batch norm (and instance norm with ``track_running_stats``) recomputed in the backward pass
    would update its running statistics twice. Eagerly, the recomputation is wrapped in
    :class:`RestoreRunningStats`. Under ``torch.compile`` the checkpointed region is recomputed
    functionally by AOTAutograd (backends ``aot_eager``, ``inductor``), where buffer updates are
    applied once by construction, so no context is needed (dynamo accepts only selective-
    checkpointing contexts). The debugging ``eager`` backend replays the region through eager
    checkpointing with the buffers as saved inputs, so its backward fails for batch-norm stages.

    Args:
        layers: The flat sequence of layers.
        start: Index of the first layer of the stage.
        stop: Index after the last layer of the stage.
        h: The stage's input; it must not be modified in place by the stage.

    Returns:
        The stage's output, as :func:`apply_layers` gives it.
    """
    fn = functools.partial(apply_layers, layers, start, stop)
    if torch.compiler.is_compiling():
        return checkpoint(fn, h, use_reentrant=False)
    buffers = tracked_stat_buffers([layers[i] for i in range(start, stop)])
    if not buffers:
        return checkpoint(fn, h, use_reentrant=False)
    context_fn = functools.partial(_recompute_contexts, buffers)
    return checkpoint(fn, h, use_reentrant=False, context_fn=context_fn)


class StagedCheckpointMixin(nn.Module):
    """Runs contiguous slices ("stages") of an ``nn.Sequential``, checkpointed when asked.

    A subclass sets ``gradient_checkpointing`` (a bool) and calls :meth:`_run_stages` (or
    :meth:`_run_stage`) from its ``forward``; it may override :meth:`_run_stage` to checkpoint
    differently (as the GAN nets do for spectral norm). Stages are index ranges, so the
    ``state_dict`` keys are those of the flat ``nn.Sequential``.
    """

    gradient_checkpointing: bool

    def _run_stage(self, layers: nn.Sequential, start: int, stop: int, h: Tensor) -> Tensor:
        """Run one stage, checkpointed in training with grad enabled if asked."""
        # Only worthwhile (and only done) in training with grad enabled, where a backward follows.
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint_stage(layers, start, stop, h)
        return apply_layers(layers, start, stop, h)

    def _run_stages(
        self, layers: nn.Sequential, stages: Sequence[tuple[int, int]], h: Tensor
    ) -> Tensor:
        """Run ``stages`` (``(start, stop)`` pairs) one after the other on ``h``."""
        for start, stop in stages:
            h = self._run_stage(layers, start, stop, h)
        return h


def stages_from_starts(starts: Sequence[int], length: int) -> tuple[tuple[int, int], ...]:
    """``((s0, s1), (s1, s2), ..., (s_last, length))`` from the start index of every stage.

    Args:
        starts: Increasing start index of each stage.
        length: Number of layers; the last stage ends there.

    Returns:
        One ``(start, stop)`` pair per stage.
    """
    bounds = [*starts, length]
    return tuple((bounds[i], bounds[i + 1]) for i in range(len(starts)))
