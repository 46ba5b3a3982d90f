"""DDIM sampling (Song et al. 2021): deterministic for ``eta = 0``, DDPM-like for ``eta = 1``.

Song, Meng, Ermon. "Denoising Diffusion Implicit Models." ICLR 2021 (Eqs. 12 and 16).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medgen.diffusion.samplers.common import (
    Denoiser,
    Hook,
    alpha_bar_float,
    step_noise,
    timestep_grid,
    vp_loop,
)
from medgen.diffusion.samplers.registry import register_sampler
from medgen.diffusion.schedules import NoiseSchedule

__all__ = ["ddim_sample", "ddim_step"]


def ddim_step(
    schedule: NoiseSchedule,
    x0: Tensor,
    eps: Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One DDIM step (Song et al. 2021, Eq. 12 with ``sigma`` of Eq. 16 scaled by ``eta``).

    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)``; ``eta = 0`` is the
    deterministic DDIM, ``eta = 1`` has DDPM's variance.
    """
    a_t, a_prev = alpha_bar_float(schedule, t), alpha_bar_float(schedule, t_prev)
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    direction = math.sqrt(max(1.0 - a_prev - sigma**2, 0.0))
    out = math.sqrt(a_prev) * x0 + direction * eps
    if sigma > 0 and noise is not None:
        out = out + sigma * noise
    return out


@register_sampler(
    "ddim", family="vp", order=1, default_steps=50, supports_eta=True, supports_resample=True
)
def ddim_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    hook: Hook | None = None,
    resample: int = 1,
) -> Tensor:
    """DDIM sampling (Song et al. 2021); deterministic for ``eta = 0``.

    Args:
        denoise: ``(x_t, t) -> (x0_hat, eps_hat)``.
        schedule: The training noise schedule.
        x: Start noise ``(B, C, *spatial)``.
        steps: Number of steps (net evaluations).
        eta: Stochasticity, 0 (ODE) to 1 (DDPM-like).
        generator: CPU generator for the step noise (``eta > 0`` or ``resample > 1``).
        hook: Called as ``hook(x, t_next)`` after every step (inpainting).
        resample: RePaint resampling: repeat every step this many times.

    Returns:
        Samples, same shape as ``x``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    grid = timestep_grid(schedule.num_train_timesteps, steps)

    def step(x: Tensor, x0: Tensor, eps: Tensor, t: int, t_prev: int) -> Tensor:
        noise = step_noise(x, generator) if eta > 0 and t_prev >= 0 else None
        return ddim_step(schedule, x0, eps, t, t_prev, eta, noise)

    return vp_loop(step, denoise, schedule, x, grid, generator, hook, resample)
