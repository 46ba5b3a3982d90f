"""Samplers: DDPM, DDIM, DPM-Solver++(2M) and rectified-flow Euler / Heun, behind one interface.

Every sampler turns noise into data by calling a model function and is a plain function of
tensors, so it works on any device and under ``torch.compile``. Two model interfaces exist:

- variance-preserving samplers (``ddpm``, ``ddim``, ``dpmpp_2m``) take a *denoiser*
  ``denoise(x_t, t) -> (x0_hat, eps_hat)`` with an integer timestep ``t`` of a
  :class:`~medgen.diffusion.NoiseSchedule` (the model converts its raw prediction with
  :func:`~medgen.diffusion.predict_x0_eps`, applies guidance and clipping);
- flow samplers (``euler``, ``heun``) take a *velocity* ``velocity(x_t, t) -> v`` with ``t`` in
  ``[0, 1]`` (``x_t = (1 - t) x_0 + t eps``, ``v = eps - x_0``).

All of them accept a ``hook(x, t_next) -> x`` called after every step with the time just reached
(``-1`` / ``0.0`` for clean data): :mod:`medgen.models.diffusion` uses it for RePaint-style
inpainting (Lugmayr et al., "RePaint", CVPR 2022), which replaces the known region with the known
image noised to ``t_next``. ``ddpm`` and ``ddim`` also take RePaint's ``resample`` (jump length 1):
after each step the sample is re-noised to the step's start and the step repeated, harmonising the
known and generated regions.

Step noise (``ddpm``, ``ddim`` with ``eta > 0``, resampling) is drawn on the CPU from
``generator`` and then moved, so a seed gives the same samples on every device.

Timesteps: ``steps`` timesteps ``t_0 > ... > t_{N-1}`` with "trailing" spacing
``round(T - k T / N) - 1`` (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are
Flawed", WACV 2024, Sec. 3.3 and Table 2), so sampling always starts at ``T - 1``, where
``x_T ~ N(0, I)`` is the right start, and ``steps = T`` is the training chain. The last step goes to
clean data (``alpha_bar = 1``).

Why our own and not MONAI's ``DDPMScheduler`` / ``DDIMScheduler`` / ``RFlowScheduler``: those are
stateful step objects with the prediction type and clipping fixed at construction, their DDIM
uses "leading" spacing (starts at ``T - T/N``, off the noise it is given), and MONAI has no
DPM-Solver++. The DDPM and DDIM update rules here are tested to give MONAI's results for the same
model output and noise (``tests/test_diffusion_method.py``).

References:
    Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models." NeurIPS 2020 (Eqs. 6-7).
    Song, Meng, Ermon. "Denoising Diffusion Implicit Models." ICLR 2021 (Eqs. 12 and 16).
    Lu, Zhou, Bao, Chen, Li, Zhu. "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models." 2022 (Algorithm 2, multistep second order, data prediction).
    Liu, Gong, Liu. "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
    Flow." ICLR 2023. Karras, Aittala, Aila, Laine. "Elucidating the Design Space of
    Diffusion-Based Generative Models." NeurIPS 2022 (Algorithm 1, Heun's method).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from medgen.diffusion.objectives import shift_time
from medgen.diffusion.schedules import NoiseSchedule

__all__ = [
    "SAMPLERS",
    "Sampler",
    "ddim_sample",
    "ddim_step",
    "ddpm_coefficients",
    "ddpm_sample",
    "ddpm_step",
    "dpmpp_2m_sample",
    "euler_sample",
    "flow_time_grid",
    "get_sampler",
    "heun_sample",
    "timestep_grid",
]

Denoiser = Callable[[Tensor, int], tuple[Tensor, Tensor]]
Velocity = Callable[[Tensor, float], Tensor]
Hook = Callable[[Tensor, float], Tensor]


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
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


def _a(schedule: NoiseSchedule, t: int) -> float:
    return float(schedule.alpha_bar(t).double())


# ------------------------------------------------------------------------------------------------
# DDPM (ancestral)
# ------------------------------------------------------------------------------------------------
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
    a_t, a_prev = _a(schedule, t), _a(schedule, t_prev)
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


def _renoise(
    schedule: NoiseSchedule, x: Tensor, t_from: int, t_to: int, generator: torch.Generator | None
) -> Tensor:
    """Sample ``q(x_{t_to} | x_{t_from})`` for ``t_to > t_from`` (RePaint's jump back)."""
    alpha = _a(schedule, t_to) / _a(schedule, t_from)
    return math.sqrt(alpha) * x + math.sqrt(1.0 - alpha) * _randn(x, generator)


def _vp_loop(
    step: Callable[[Tensor, Tensor, Tensor, int, int], Tensor],
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    grid: list[int],
    generator: torch.Generator | None,
    hook: Hook | None,
    resample: int,
) -> Tensor:
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
                x = _renoise(schedule, x_prev, t_prev, t, generator)
            else:
                x = x_prev
                break
    return x


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
        noise = _randn(x, generator) if t_prev >= 0 else None
        return ddpm_step(schedule, x, x0, t, t_prev, noise)

    return _vp_loop(step, denoise, schedule, x, grid, generator, hook, resample)


# ------------------------------------------------------------------------------------------------
# DDIM
# ------------------------------------------------------------------------------------------------
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
    a_t, a_prev = _a(schedule, t), _a(schedule, t_prev)
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    direction = math.sqrt(max(1.0 - a_prev - sigma**2, 0.0))
    out = math.sqrt(a_prev) * x0 + direction * eps
    if sigma > 0 and noise is not None:
        out = out + sigma * noise
    return out


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
        noise = _randn(x, generator) if eta > 0 and t_prev >= 0 else None
        return ddim_step(schedule, x0, eps, t, t_prev, eta, noise)

    return _vp_loop(step, denoise, schedule, x, grid, generator, hook, resample)


# ------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ------------------------------------------------------------------------------------------------
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
            a_t, a_next = _a(schedule, t), _a(schedule, t_next)
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


# ------------------------------------------------------------------------------------------------
# Rectified flow
# ------------------------------------------------------------------------------------------------
def flow_time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` times from 1 to 0, evenly spaced then shifted (:func:`shift_time`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return [float(v) for v in shift_time(t, shift)]


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


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    """A named sampler: its function, the model family it needs and its cost.

    Attributes:
        name: Canonical name.
        family: ``"vp"`` (needs a denoiser of a noise-schedule model) or ``"flow"`` (needs a
            velocity of a rectified-flow model).
        fn: The sampling function.
        evals_per_step: Net evaluations per step (Heun: 2).
        stochastic: Whether it draws step noise.
    """

    name: str
    family: str
    fn: Callable[..., Tensor]
    evals_per_step: int = 1
    stochastic: bool = False

    def evaluations(self, steps: int) -> int:
        """Net evaluations for ``steps`` steps."""
        return self.evals_per_step * steps


#: Samplers by canonical name.
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler("ddpm", "vp", ddpm_sample, stochastic=True),
    "ddim": Sampler("ddim", "vp", ddim_sample),
    "dpmpp_2m": Sampler("dpmpp_2m", "vp", dpmpp_2m_sample),
    "euler": Sampler("euler", "flow", euler_sample),
    "heun": Sampler("heun", "flow", heun_sample, evals_per_step=2),
}
_ALIASES = {
    "dpm++2m": "dpmpp_2m",
    "dpm++": "dpmpp_2m",
    "dpm_solver++": "dpmpp_2m",
    "dpmsolver++": "dpmpp_2m",
    "rflow": "euler",
    "rflow_euler": "euler",
    "rflow_heun": "heun",
}


def get_sampler(name: str) -> Sampler:
    """The :class:`Sampler` called ``name`` (case-insensitive; aliases such as ``dpm++2m``)."""
    key = str(name).lower().replace("-", "_")
    key = _ALIASES.get(key, _ALIASES.get(str(name).lower(), key))
    if key not in SAMPLERS:
        raise ValueError(
            f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} "
            f"(aliases: {', '.join(_ALIASES)})"
        )
    return SAMPLERS[key]
