"""Non-finite losses and gradients: skip the step, stop with a clear message, never save NaNs.

Mixed precision, a learning rate that is too high or one corrupt image can turn a loss into NaN;
one optimiser step on NaN gradients then spoils every weight, and the run goes on writing
checkpoints and an export that hold nothing but NaN. :class:`NumericalGuard` checks the
gradients before every optimiser step (automatic and manual optimisation alike: Lightning calls
``on_before_optimizer_step`` for both), drops a step whose gradients are not finite (the
optimiser sees no gradient, so the weights and its state stay as they were), and stops the run
after ``max_bad_steps`` consecutive bad steps with a :class:`NonFiniteError` naming the step,
the loss terms that were not finite and the batch's files. Checkpoints and exports with
non-finite weights are refused in any case (:func:`check_finite_state`, used by
:class:`~medgen.callbacks.checkpoint_io.AtomicCheckpointIO` and
:func:`medgen.pretrained.save_pretrained`), so the last good checkpoint is never overwritten.

PyTorch's ``GradScaler`` (Lightning's ``16-mixed``) does the same skip for fp16 overflow; bf16
(the GPU default) needs no scaler, and this guard covers what a scaler does not: NaN from the data
or from a diverging run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from medgen.utils.numerics import NonFiniteError, check_finite_state

log = logging.getLogger("medgen")

__all__ = ["NonFiniteError", "NumericalGuard", "check_finite_state", "batch_sources"]


def batch_sources(batch: Any, limit: int = 8) -> list[str]:
    """The file names a batch came from (its ``path``/``path_a``/``path_b`` entries), if any."""
    names: list[str] = []
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            if "path" in str(key) and isinstance(value, (list, tuple)):
                names += [str(v) for v in value]
            elif "path" in str(key) and isinstance(value, str):
                names.append(value)
    return names[:limit]


class NumericalGuard(L.Callback):
    """Skip optimiser steps with non-finite gradients; stop after ``max_bad_steps`` in a row.

    Args:
        max_bad_steps: Consecutive bad steps after which training stops with
            :class:`NonFiniteError` (the checkpoints written before stay as they are).
        check_weights: Also check the weights after every step (catches an optimiser that
            turned finite gradients into non-finite weights).
    """

    def __init__(self, max_bad_steps: int = 3, check_weights: bool = True) -> None:
        if int(max_bad_steps) < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = int(max_bad_steps)
        self.check_weights = bool(check_weights)
        self.bad_steps = 0
        self.skipped = 0
        self._batch: Any = None
        self._bad_in_batch = False
        self._bad_since_validation = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch
        self._bad_in_batch = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if bool(finite):
            return
        # Drop the step: no gradient, so the optimiser leaves weights and state alone.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        self._bad_in_batch = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            self._bad_in_batch = True
        if self.check_weights and not self._bad_in_batch:
            params = [p for p in pl_module.parameters() if p.is_floating_point()]
            finite = (
                torch.stack([torch.isfinite(p).all() for p in params]).all() if params else True
            )
            if not bool(finite):  # one device sync per step
                raise NonFiniteError(
                    f"step {trainer.global_step}: the weights became non-finite after an "
                    "optimiser step with finite gradients; lower the learning rate"
                    + self._describe(trainer, batch)
                )
        if not self._bad_in_batch:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self._bad_since_validation += 1
        log.warning(
            "step %d: non-finite loss or gradients; step skipped (%d in a row)%s",
            trainer.global_step,
            self.bad_steps,
            self._describe(trainer, batch),
        )
        if self.bad_steps >= self.max_bad_steps:
            raise NonFiniteError(
                f"step {trainer.global_step}: {self.bad_steps} consecutive steps with non-finite "
                "loss or gradients; training stopped (the last checkpoint is the last good one)"
                + self._describe(trainer, batch)
                + ". Lower the learning rate, use bf16 instead of fp16, or check the data"
            )

    def on_validation_end(self, trainer, pl_module) -> None:
        # Huge but finite weights (one step with a far too high learning rate) give non-finite
        # outputs; stop before this epoch's checkpoint overwrites the last good one (Lightning
        # runs the checkpoint callbacks after the others).
        if trainer.sanity_checking:
            return
        bad_steps, self._bad_since_validation = self._bad_since_validation, 0
        if not bad_steps:
            return
        metrics = sorted(
            k
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/")
            and isinstance(v, torch.Tensor)
            and v.numel() == 1
            and not math.isfinite(float(v))
        )
        if metrics:
            raise NonFiniteError(
                f"step {trainer.global_step}: validation gives non-finite {', '.join(metrics)} "
                f"after {bad_steps} skipped step(s) with non-finite loss or gradients; training "
                "stopped before this epoch's checkpoint (the last checkpoint is the last good "
                "one). Lower the learning rate, use bf16 instead of fp16, or check the data"
            )

    @staticmethod
    def _describe(trainer, batch: Any) -> str:
        terms = sorted(
            k
            for k, v in trainer.callback_metrics.items()
            if k.startswith("train/")
            and isinstance(v, torch.Tensor)
            and v.numel() == 1
            and not math.isfinite(float(v))
        )
        sources = batch_sources(batch)
        text = f"; non-finite terms: {', '.join(terms)}" if terms else ""
        if sources:
            text += f"; batch files: {', '.join(sources)}"
        return text

    def state_dict(self) -> dict[str, Any]:
        return {"bad_steps": self.bad_steps, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bad_steps = int(state_dict.get("bad_steps", 0))
        self.skipped = int(state_dict.get("skipped", 0))
