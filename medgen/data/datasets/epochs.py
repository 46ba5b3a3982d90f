"""Per-item randomness, a pure function of ``(seed, epoch, index)``, and the shared epoch.

:func:`epoch_rng` seeds the random choices of an item; :class:`EpochMixin` holds the epoch in
shared memory so that DataLoader workers see :meth:`~EpochMixin.set_epoch`.
"""

from __future__ import annotations

import contextlib
import operator

import numpy as np
import torch


def epoch_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of item ``index`` at ``epoch``: a pure function of the three."""
    return np.random.default_rng([seed, epoch, index])


class EpochMixin:
    """``set_epoch`` whose value reaches DataLoader worker processes, persistent ones included.

    The epoch lives in a one-element tensor in shared memory: workers hold a copy of the dataset
    but share that storage (fork or spawn), so ``set_epoch`` in the main process is seen by them.
    """

    def _init_epoch(self) -> None:
        epoch = torch.zeros(1, dtype=torch.int64)
        with contextlib.suppress(RuntimeError, OSError):  # no shared memory: main process only
            epoch.share_memory_()
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        """The epoch used to seed random choices (0 until :meth:`set_epoch` is called)."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch`` (call it at the start of every epoch)."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self._epoch[0] = epoch
