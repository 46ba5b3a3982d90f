"""What the samplers share: time grids, step noise and the variance-preserving step loop.

Timesteps of variance-preserving samplers: ``steps`` timesteps ``t_0 > ... > t_{N-1}`` with
"trailing" spacing ``round(T - k T / N) - 1`` (Lin et al., "Common Diffusion Noise Schedules and
Sample Steps are Flawed", WACV 2024, Sec. 3.3 and Table 2), so sampling always starts at ``T - 1``,
where ``x_T ~ N(0, I)`` is the right start, and ``steps = T`` is the training chain. The last step
goes to clean data (``alpha_bar = 1``, timestep ``-1``).

Flow samplers integrate from ``t = 1`` (noise) to ``t = 0`` (data) on an evenly spaced grid,
optionally shifted as in SD3 (Esser et al. 2024, Eq. 23; :func:`~medgen.diffusion.shift_time`).

Step noise is drawn on the CPU from ``generator`` and then moved (:func:`step_noise`), so a seed
gives the same samples on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from medgen.diffusion.objectives import shift_time
from medgen.diffusion.schedules import NoiseSchedule

__all__ = [
    "Denoiser",
    "Hook",
    "Velocity",
    "alpha_bar_float",
    "flow_time_grid",
    "renoise",
    "step_noise",
    "timestep_grid",
    "vp_loop",
]

#: ``denoise(x_t, t) -> (x0_hat, eps_hat)`` at an integer timestep.
Denoiser = Callable[[Tensor, int], tuple[Tensor, Tensor]]
#: ``velocity(x_t, t) -> v`` at a flow time in ``[0, 1]``.
Velocity = Callable[[Tensor, float], Tensor]
#: ``hook(x, t_next) -> x``, called after every step (inpainting).
Hook = Callable[[Tensor, float], Tensor]


def step_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``like``, drawn on the CPU from ``generator``."""
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def timestep_grid(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` decreasing timesteps with trailing spacing, from ``T - 1`` down.

    Args:
        num_train_timesteps: ``T``.
        steps: Number of sampling steps ``N``, ``1 <= N <= T``.

    Returns:
        ``[t_0, ..., t_{N-1}]`` with ``t_0 = T - 1``; ``N = T`` gives ``T - 1, ..., 0``.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(
            f"steps must be between 1 and num_train_timesteps={num_train_timesteps}, got {steps}"
        )
    ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - k * ratio)) - 1 for k in range(steps)]


def flow_time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` times from 1 to 0, evenly spaced then shifted (:func:`shift_time`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return [float(v) for v in shift_time(t, shift)]


def alpha_bar_float(schedule: NoiseSchedule, t: int) -> float:
    """``alpha_bar_t`` as a Python float (``t = -1``: 1, clean data)."""
    return float(schedule.alpha_bar(t).double())


def renoise(
    schedule: NoiseSchedule, x: Tensor, t_from: int, t_to: int, generator: torch.Generator | None
) -> Tensor:
    """Sample ``q(x_{t_to} | x_{t_from})`` for ``t_to > t_from`` (RePaint's jump back).

    Lugmayr et al., "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", CVPR
    2022 (Algorithm 1, jump length 1).
    """
    alpha = alpha_bar_float(schedule, t_to) / alpha_bar_float(schedule, t_from)
    return math.sqrt(alpha) * x + math.sqrt(1.0 - alpha) * step_noise(x, generator)


def vp_loop(
    step: Callable[[Tensor, Tensor, Tensor, int, int], Tensor],
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    grid: list[int],
    generator: torch.Generator | None,
    hook: Hook | None,
    resample: int,
) -> Tensor:
    """Run a one-step update over ``grid`` with inpainting and RePaint resampling.

    Args:
        step: ``step(x_t, x0_hat, eps_hat, t, t_prev) -> x_{t_prev}``.
        denoise: ``(x_t, t) -> (x0_hat, eps_hat)``.
        schedule: The noise schedule (for re-noising).
        x: Start noise ``(B, C, *spatial)``.
        grid: Decreasing timesteps (:func:`timestep_grid`); the last step goes to ``-1``.
        generator: CPU generator of the re-noising noise.
        hook: Called as ``hook(x, t_prev)`` after every step.
        resample: Repeat every step this many times, re-noising back to its start in between.

    Returns:
        Samples, same shape as ``x``.
    """
    if resample < 1:
        raise ValueError(f"resample must be >= 1, got {resample}")
    for i, t in enumerate(grid):
        t_prev = grid[i + 1] if i + 1 < len(grid) else -1
        for r in range(resample):
            x0, eps = denoise(x, t)
            x_prev = step(x, x0, eps, t, t_prev)
            if hook is not None:
                x_prev = hook(x_prev, t_prev)
            if r < resample - 1 and t_prev >= 0:
                x = renoise(schedule, x_prev, t_prev, t, generator)
            else:
                x = x_prev
                break
    return x
