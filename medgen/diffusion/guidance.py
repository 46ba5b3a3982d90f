"""Classifier-free guidance and the conditioning dropout that trains for it.

Ho & Salimans, "Classifier-Free Diffusion Guidance", NeurIPS 2021 Workshop (arXiv 2207.12598):
one net learns the conditional and the unconditional model by replacing the condition with a null
token for a fraction ``p_uncond`` of the training samples (Algorithm 1); sampling combines both
predictions (Eq. 6, written with ``w + 1 = scale``)::

    pred = pred_uncond + scale * (pred_cond - pred_uncond)

``scale = 1`` is the conditional model, ``scale = 0`` the unconditional one, ``scale > 1``
sharpens samples towards the condition. All prediction types (epsilon, v, x0, flow velocity) are
affine in the net output for a fixed ``x_t``, so guiding the raw net output is the same as guiding
the noise prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["classifier_free_guidance", "condition_dropout_mask", "guided"]


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """``uncond + scale * (cond - uncond)`` (Ho & Salimans 2022, Eq. 6)."""
    if scale == 1.0:
        return cond
    if scale == 0.0:
        return uncond
    return uncond + scale * (cond - uncond)


def guided(
    cond_fn: Callable[[], Tensor],
    uncond_fn: Callable[[], Tensor],
    scale: float,
    joint_fn: Callable[[], tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """Evaluate a guided prediction, skipping the pass a scale of 1 (or 0) does not need.

    Args:
        cond_fn: Computes the conditional prediction.
        uncond_fn: Computes the unconditional prediction.
        scale: Guidance scale.
        joint_fn: Optional single call returning ``(cond, uncond)`` (e.g. one net pass on the
            doubled batch), used when both are needed.

    Returns:
        The guided prediction.
    """
    if scale == 1.0:
        return cond_fn()
    if scale == 0.0:
        return uncond_fn()
    cond, uncond = joint_fn() if joint_fn is not None else (cond_fn(), uncond_fn())
    return classifier_free_guidance(cond, uncond, scale)


def condition_dropout_mask(
    batch_size: int,
    p: float,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Boolean ``(B,)`` mask, ``True`` where a sample's condition is replaced by the null token.

    Args:
        batch_size: ``B``.
        p: Probability of dropping each sample's condition (``p_uncond``; 0.1-0.2 is usual).
        device: Device of the mask.
        generator: Random generator (default: the global one).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition dropout probability must be in [0, 1], got {p}")
    if p == 0.0:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    return torch.rand(batch_size, generator=generator, device=device) < p
