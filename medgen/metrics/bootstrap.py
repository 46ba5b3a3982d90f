"""Bootstrap confidence intervals for set-level metrics (FID, KID, PRDC, AUC, Dice).

:func:`bootstrap_ci` resamples every input set with replacement, independently, recomputes the
statistic, and returns the percentile interval (Efron & Tibshirani, "An introduction to the
bootstrap", 1993, ch. 13). Resampling duplicates samples, which biases distances such as FID
upwards on small sets: the interval shows the spread of the estimate, while the point value is
always the statistic of the full sets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["bootstrap_ci"]


def _take(x: Any, index: np.ndarray) -> Any:
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(index, device=x.device)]
    return np.asarray(x)[index]


def bootstrap_ci(
    statistic: Callable[..., float],
    sets: Sequence[Any],
    *,
    n_boot: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    paired: bool = False,
) -> dict[str, float]:
    """Percentile bootstrap interval of ``statistic(*sets)``.

    Args:
        statistic: maps the sets (tensors or arrays indexed along their first axis) to a float.
        sets: the inputs, e.g. ``(real_features, fake_features)``.
        n_boot: bootstrap rounds (0: the value only, with a NaN interval).
        confidence: interval coverage, e.g. 0.95.
        seed: seed of the resampling (NumPy generator; no global state is touched).
        paired: resample all sets with the same indices (they must have the same length, e.g.
            predictions and labels of one test set).

    Returns:
        ``{"value", "ci_low", "ci_high", "n_boot", "confidence"}``; rounds whose statistic is not
        finite (e.g. an AUC on a resample with one class) are dropped, and the interval is NaN
        when fewer than half of the rounds remain.
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0 (0: no interval), got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lengths = [len(s) for s in sets]
    if paired and len(set(lengths)) != 1:
        raise ValueError(f"paired bootstrap needs sets of one length, got {lengths}")
    value = float(statistic(*sets))
    rng = np.random.default_rng(seed)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_boot):
            if paired:
                index = rng.integers(0, lengths[0], lengths[0])
                resampled = [_take(s, index) for s in sets]
            else:
                resampled = [
                    _take(s, rng.integers(0, n, n)) for s, n in zip(sets, lengths, strict=True)
                ]
            try:
                v = float(statistic(*resampled))
            except ValueError:
                continue
            if math.isfinite(v):
                values.append(v)
    alpha = (1 - confidence) / 2
    if n_boot == 0 or len(values) < n_boot / 2:
        low = high = float("nan")
    else:
        low, high = (float(q) for q in np.quantile(values, [alpha, 1 - alpha]))
    return {
        "value": value,
        "ci_low": low,
        "ci_high": high,
        "n_boot": len(values),
        "confidence": confidence,
    }
