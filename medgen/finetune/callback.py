"""The callback that keeps frozen normalisation layers in eval mode and unfreezes on schedule."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L

from medgen.finetune.freezing import frozen_norms, unfreeze

log = logging.getLogger("medgen")

__all__ = ["FinetuneCallback"]


def unfreeze_schedule(
    freeze: Sequence[str], unfreeze_at_step: int | Mapping[str, int] | None
) -> dict[str, int]:
    """``{pattern: step}`` from ``unfreeze_at_step`` (one step for every freeze pattern, or a map)."""
    if unfreeze_at_step is None:
        return {}
    if isinstance(unfreeze_at_step, Mapping):
        return {str(p): int(s) for p, s in unfreeze_at_step.items()}
    if isinstance(unfreeze_at_step, bool) or not isinstance(unfreeze_at_step, int):
        raise ValueError(
            f"unfreeze_at_step must be a step (int) or {{pattern: step}}, got {unfreeze_at_step!r}"
        )
    if not freeze:
        raise ValueError("unfreeze_at_step is set but nothing is frozen (freeze is empty)")
    return {str(p): int(unfreeze_at_step) for p in freeze}


class FinetuneCallback(L.Callback):
    """Frozen batch norms stay in eval mode; ``unfreeze_at_step`` unfreezes (gradual unfreezing).

    Lightning puts the whole model in train mode at the start of every training epoch (and after
    each validation); before every training batch this callback puts the normalisation layers with
    running statistics that the still-frozen ``freeze`` patterns cover back into eval mode, and
    at ``global_step >= step`` unfreezes the parameters of each scheduled pattern (Howard & Ruder,
    ACL 2018). The schedule depends only on the step, so a resumed run unfreezes the same way.

    Args:
        freeze: The freeze patterns (``model.finetune.freeze``).
        unfreeze_at_step: One step for all freeze patterns, or ``{pattern: step}``.
    """

    def __init__(
        self,
        freeze: Sequence[str] = (),
        unfreeze_at_step: int | Mapping[str, int] | None = None,
    ) -> None:
        self.freeze = [str(p) for p in freeze]
        self.schedule = unfreeze_schedule(self.freeze, unfreeze_at_step)
        self.unfrozen: set[str] = set()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        for pattern, at in self.schedule.items():
            if pattern not in self.unfrozen and step >= at:
                names = unfreeze(pl_module, [pattern], "model.finetune.unfreeze_at_step")
                self.unfrozen.add(pattern)
                log.info("step %d: unfroze %d parameters matching %r", step, len(names), pattern)
        frozen = [p for p in self.freeze if p not in self.unfrozen]
        for norm in frozen_norms(pl_module, frozen) if frozen else ():
            norm.eval()
