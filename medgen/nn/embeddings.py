"""Embeddings of scalar conditioning signals such as diffusion timesteps or noise levels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al., 2017, Sec. 3.5).

    With ``half = dim // 2`` and frequencies ``f_k = max_period ** (-k / half)`` for
    ``k = 0, ..., half - 1``, the embedding is ``[cos(t f_0), ..., cos(t f_{half-1}),
    sin(t f_0), ..., sin(t f_{half-1})]``, followed by one zero column when ``dim`` is odd.

    Args:
        t: Timesteps of shape ``(B,)`` (a scalar is treated as ``B = 1``); any real dtype.
        dim: Embedding size ``D``.
        max_period: Controls the lowest frequency, ``1 / max_period``.

    Returns:
        Float32 embedding of shape ``(B, D)`` on the device of ``t``.

    Raises:
        ValueError: If ``dim`` is not positive or ``t`` has more than one dimension.
    """
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}.")
    if t.dim() > 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}.")
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.reshape(-1).to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb
