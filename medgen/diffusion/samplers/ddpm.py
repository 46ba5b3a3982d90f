"""Ancestral DDPM sampling (Ho et al. 2020), optionally strided, with RePaint resampling.

Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models." NeurIPS 2020 (Eqs. 6-7,
Algorithm 2).
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

__all__ = ["ddpm_coefficients", "ddpm_sample", "ddpm_step"]


def ddpm_coefficients(schedule: NoiseSchedule, t: int, t_prev: int) -> tuple[float, float, float]:
    """Coefficients of the DDPM posterior ``q(x_{t_prev} | x_t, x_0)`` (Ho et al. 2020, Eq. 7).

    ``mean = c0 x_0 + ct x_t`` and ``variance`` ("fixed small", ``beta_tilde``), with
    ``alpha = alpha_bar_t / alpha_bar_{t_prev}`` and ``beta = 1 - alpha``; for consecutive steps
    (``t_prev = t - 1``) ``alpha`` and ``beta`` are the schedule's own ``alphas[t]`` and
    ``betas[t]``, so the full-length chain uses exactly the training schedule::

        c0 = sqrt(alpha_bar_prev) beta / (1 - alpha_bar_t)
        ct = sqrt(alpha) (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta

    Args:
        schedule: The noise schedule.
        t: Current timestep.
        t_prev: Target timestep ``< t`` (``-1``: clean data, where the variance is 0).

    Returns:
        ``(c0, ct, variance)`` as Python floats.
    """
    a_t, a_prev = alpha_bar_float(schedule, t), alpha_bar_float(schedule, t_prev)
    if t_prev == t - 1:
        alpha, beta = float(schedule.alphas[t].double()), float(schedule.betas[t].double())
    else:
        alpha = a_t / a_prev
        beta = 1.0 - alpha
    c0 = math.sqrt(a_prev) * beta / (1.0 - a_t)
    ct = math.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)
    variance = (1.0 - a_prev) / (1.0 - a_t) * beta
    return c0, ct, variance


def ddpm_step(
    schedule: NoiseSchedule, x: Tensor, x0: Tensor, t: int, t_prev: int, noise: Tensor | None
) -> Tensor:
    """One ancestral step ``x_t -> x_{t_prev}`` given the predicted ``x0`` and standard noise."""
    c0, ct, variance = ddpm_coefficients(schedule, t, t_prev)
    out = c0 * x0 + ct * x
    if t_prev >= 0 and variance > 0 and noise is not None:
        out = out + math.sqrt(variance) * noise
    return out


@register_sampler(
    "ddpm", family="vp", stochastic=True, order=1, default_steps=None, supports_resample=True
)
def ddpm_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    hook: Hook | None = None,
    resample: int = 1,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), optionally strided.

    Args:
        denoise: ``(x_t, t) -> (x0_hat, eps_hat)``.
        schedule: The training noise schedule.
        x: Start noise ``x_{T-1} ~ N(0, I)``, ``(B, C, *spatial)``.
        steps: Number of steps (default: ``T``, the training chain). Fewer steps use the
            posterior between the strided timesteps.
        generator: CPU generator for the step noise.
        hook: Called as ``hook(x, t_next)`` after every step (inpainting).
        resample: RePaint resampling: repeat every step this many times.

    Returns:
        Samples, same shape as ``x``.
    """
    grid = timestep_grid(schedule.num_train_timesteps, steps or schedule.num_train_timesteps)

    def step(x: Tensor, x0: Tensor, eps: Tensor, t: int, t_prev: int) -> Tensor:
        noise = step_noise(x, generator) if t_prev >= 0 else None
        return ddpm_step(schedule, x, x0, t, t_prev, noise)

    return vp_loop(step, denoise, schedule, x, grid, generator, hook, resample)
