"""Pre-emption: on SIGTERM or SIGUSR1, save ``last.ckpt`` at the end of the batch and exit.

Clusters end jobs with a signal: SLURM sends SIGTERM at the time limit or on pre-emption (and
SIGUSR1 some time before, with ``#SBATCH --signal=USR1@120``). Lightning stops on SIGTERM at the
end of the running batch, but writes nothing: the work since the last checkpoint is lost.
:class:`Preemption` saves ``last.ckpt`` there (atomically, through medgen's checkpoint plugin),
so ``resume=last`` continues from that very batch, and treats SIGUSR1 the same way when nothing
else (Lightning's SLURM auto-requeue) handles it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("medgen")

__all__ = ["Preemption"]


class Preemption(L.Callback):
    """Save ``last.ckpt`` and stop when the process is asked to end.

    Args:
        checkpoint_dir: Where ``last.ckpt`` goes (default: the ``ModelCheckpoint``'s folder).
        usr1: Also stop on SIGUSR1 (when no other handler, e.g. Lightning's SLURM requeue, is
            installed for it).
    """

    def __init__(self, checkpoint_dir: str | None = None, usr1: bool = True) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.usr1 = bool(usr1)
        self.saved: Path | None = None
        self._requested = False
        self._previous: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.usr1 or not hasattr(signal, "SIGUSR1"):
            return
        try:
            current = signal.getsignal(signal.SIGUSR1)
            ours = isinstance(getattr(current, "__self__", None), Preemption)  # a stale one
            if current in (signal.SIG_DFL, None) or ours:
                self._previous = signal.signal(signal.SIGUSR1, self._on_usr1)
                if ours:
                    self._previous = signal.SIG_DFL
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _on_usr1(self, signum: int, frame: Any) -> None:
        log.warning("received SIGUSR1: saving last.ckpt at the end of this batch and stopping")
        self._requested = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._requested:  # arrived after the last batch ended: stop before this one
            raise SIGTERMException()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._requested:
            raise SIGTERMException()

    def _path(self, trainer: L.Trainer) -> Path | None:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir) / "last.ckpt"
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}.ckpt"
        return None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        path = self._path(trainer)
        if path is None:
            log.warning("pre-empted, but no checkpoint folder is known: nothing saved")
            return
        trainer.save_checkpoint(path)
        self.saved = path
        log.warning(
            "pre-empted: saved %s at step %d; continue with resume=last", path, trainer.global_step
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
