"""DPM-Solver++(2M): multistep second-order solver of the probability-flow ODE (Lu et al. 2022).

Lu, Zhou, Bao, Chen, Li, Zhu. "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models." 2022 (Algorithm 2, multistep second order, data prediction).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medgen.diffusion.samplers.common import Denoiser, Hook, alpha_bar_float, timestep_grid
from medgen.diffusion.samplers.registry import register_sampler
from medgen.diffusion.schedules import NoiseSchedule

__all__ = ["dpmpp_2m_sample"]


@register_sampler(
    "dpmpp_2m",
    family="vp",
    order=2,
    default_steps=50,
    aliases=("dpm++2m", "dpm++", "dpm_solver++", "dpmsolver++"),
)
def dpmpp_2m_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    steps: int = 25,
    generator: torch.Generator | None = None,
    hook: Hook | None = None,
) -> Tensor:
    """DPM-Solver++(2M): multistep second-order solver of the probability-flow ODE.

    In the half-log-SNR time ``lambda = log(alpha / sigma)`` with ``alpha = sqrt(alpha_bar)`` and
    ``sigma = sqrt(1 - alpha_bar)``, with ``h_i = lambda_{t_i} - lambda_{t_{i-1}}`` and
    ``r_i = h_{i-1} / h_i`` (Lu et al. 2022, Algorithm 2)::

        D_i = (1 + 1 / (2 r_i)) x0_hat_{i-1} - 1 / (2 r_i) x0_hat_{i-2}     (first step: x0_hat_0)
        x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) D_i

    The last step, to clean data (``sigma = 0``, ``h = inf``), reduces to ``x_0 = x0_hat``
    (first order, as DPM-Solver's "lower order final"). One net evaluation per step.

    Args:
        denoise: ``(x_t, t) -> (x0_hat, eps_hat)``.
        schedule: The training noise schedule.
        x: Start noise ``(B, C, *spatial)``.
        steps: Number of steps (net evaluations).
        generator: Unused (the solver is deterministic); accepted for a uniform interface.
        hook: Called as ``hook(x, t_next)`` after every step (inpainting).

    Returns:
        Samples, same shape as ``x``.
    """
    del generator
    grid = timestep_grid(schedule.num_train_timesteps, steps)
    prev_x0: Tensor | None = None
    h_prev = 0.0
    for i, t in enumerate(grid):
        t_next = grid[i + 1] if i + 1 < len(grid) else -1
        x0, _ = denoise(x, t)
        if t_next < 0:
            x = x0
        else:
            a_t, a_next = alpha_bar_float(schedule, t), alpha_bar_float(schedule, t_next)
            lam_t, lam_next = float(schedule.log_snr(t)), float(schedule.log_snr(t_next))
            h = lam_next - lam_t
            if prev_x0 is None:
                d = x0
            else:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * prev_x0
            sigma_ratio = math.sqrt((1.0 - a_next) / (1.0 - a_t))
            x = sigma_ratio * x - math.sqrt(a_next) * math.expm1(-h) * d
            h_prev = h
        prev_x0 = x0
        if hook is not None:
            x = hook(x, t_next)
    return x
