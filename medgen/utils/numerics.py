"""Checks for NaN/Inf in what medgen writes (checkpoints, exports)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["NonFiniteError", "check_finite_state"]


class NonFiniteError(FloatingPointError):
    """Training produced non-finite losses or gradients, or a state to save is not finite."""


def check_finite_state(state: Mapping[str, Any], where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` if a floating tensor in ``state`` has NaN/Inf.

    Args:
        state: A state dict (nested mappings are searched too).
        where: What is being written (a file), for the message.
    """
    bad = []

    def visit(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(key)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else str(k))

    visit(state, "")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(
            f"refusing to write {where}: {len(bad)} tensor(s) hold NaN/Inf ({shown}); the "
            "previous file is kept"
        )
