"""Euler integration of a rectified flow from noise (``t = 1``) to data (``t = 0``).

Liu, Gong, Liu. "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
Flow." ICLR 2023; Lipman, Chen, Ben-Hamu, Nickel, Le. "Flow Matching for Generative Modeling."
ICLR 2023.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medgen.diffusion.samplers.common import Hook, Velocity, flow_time_grid
from medgen.diffusion.samplers.registry import register_sampler

__all__ = ["euler_sample"]


@register_sampler(
    "euler", family="flow", order=1, default_steps=50, aliases=("rflow", "rflow_euler")
)
def euler_sample(
    velocity: Velocity,
    x: Tensor,
    steps: int = 50,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    hook: Hook | None = None,
) -> Tensor:
    """Euler integration of ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` (data).

    Args:
        velocity: ``(x_t, t) -> v`` with ``t`` a float in ``[0, 1]``.
        x: Start noise ``(B, C, *spatial)``.
        steps: Number of steps (net evaluations).
        shift: Time shift of the grid (SD3; use the training shift).
        generator: Unused; accepted for a uniform interface.
        hook: Called as ``hook(x, t_next)`` after every step (inpainting).

    Returns:
        Samples, same shape as ``x``.
    """
    del generator
    grid = flow_time_grid(steps, shift)
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        x = x + (t_next - t) * velocity(x, t)
        if hook is not None:
            x = hook(x, t_next)
    return x
