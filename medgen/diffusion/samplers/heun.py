"""Heun's second-order method on a rectified flow (Karras et al. 2022, Algorithm 1).

Karras, Aittala, Aila, Laine. "Elucidating the Design Space of Diffusion-Based Generative
Models." NeurIPS 2022 (Algorithm 1, Heun's method), applied to the rectified-flow ODE of Liu,
Gong & Liu, ICLR 2023.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medgen.diffusion.samplers.common import Hook, Velocity, flow_time_grid
from medgen.diffusion.samplers.registry import register_sampler

__all__ = ["heun_sample"]


# default_steps=50: the model's fallback has always been 50 steps for every non-DDPM sampler.
@register_sampler(
    "heun", family="flow", order=2, evals_per_step=2, default_steps=50, aliases=("rflow_heun",)
)
def heun_sample(
    velocity: Velocity,
    x: Tensor,
    steps: int = 25,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    hook: Hook | None = None,
) -> Tensor:
    """Heun's second-order method (explicit trapezoid; Karras et al. 2022, Algorithm 1).

    ``x' = x + dt v(x, t)``, then ``x_next = x + dt (v(x, t) + v(x', t_next)) / 2``: two net
    evaluations per step.

    Args:
        velocity: ``(x_t, t) -> v`` with ``t`` a float in ``[0, 1]``.
        x: Start noise ``(B, C, *spatial)``.
        steps: Number of steps (``2 * steps`` net evaluations).
        shift: Time shift of the grid.
        generator: Unused; accepted for a uniform interface.
        hook: Called as ``hook(x, t_next)`` after every step (inpainting).

    Returns:
        Samples, same shape as ``x``.
    """
    del generator
    grid = flow_time_grid(steps, shift)
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        dt = t_next - t
        v = velocity(x, t)
        x_euler = x + dt * v
        x = x + 0.5 * dt * (v + velocity(x_euler, t_next))
        if hook is not None:
            x = hook(x, t_next)
    return x
