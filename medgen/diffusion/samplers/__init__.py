"""Samplers: DDPM, DDIM, DPM-Solver++(2M) and rectified-flow Euler / Heun, in an open registry.

Every sampler turns noise into data by calling a model function and is a plain function of
tensors, so it works on any device and under ``torch.compile``. Each lives in its own module here
and registers itself with :func:`register_sampler` and its capability flags (family, stochastic,
order, default steps, ``eta``, RePaint resampling); :class:`medgen.models.Diffusion` picks and
checks samplers by those flags alone. Every module of this package is imported with it, so a new
sampler is one file here (or anywhere, imported before use) plus a test; see
``docs/models/diffusion.md``, "Adding a sampler".

Two model interfaces (families) exist, one per :class:`~medgen.diffusion.process.DiffusionProcess`:

- variance-preserving samplers (``ddpm``, ``ddim``, ``dpmpp_2m``) take a *denoiser*
  ``denoise(x_t, t) -> (x0_hat, eps_hat)`` with an integer timestep ``t`` of a
  :class:`~medgen.diffusion.NoiseSchedule` (the process converts the net's raw prediction with
  :func:`~medgen.diffusion.predict_x0_eps` and clips; the model applies guidance);
- flow samplers (``euler``, ``heun``) take a *velocity* ``velocity(x_t, t) -> v`` with ``t`` in
  ``[0, 1]`` (``x_t = (1 - t) x_0 + t eps``, ``v = eps - x_0``).

All of them accept a ``hook(x, t_next) -> x`` called after every step with the time just reached
(``-1`` / ``0.0`` for clean data): :func:`medgen.diffusion.inpainting.repaint_hook` uses it for
RePaint-style inpainting (Lugmayr et al., "RePaint", CVPR 2022), which replaces the known region
with the known image noised to ``t_next``. ``ddpm`` and ``ddim`` also take RePaint's ``resample``
(jump length 1): after each step the sample is re-noised to the step's start and the step
repeated, harmonising the known and generated regions.

Step noise (``ddpm``, ``ddim`` with ``eta > 0``, resampling) is drawn on the CPU from
``generator`` and then moved, so a seed gives the same samples on every device. Time grids are in
:mod:`~medgen.diffusion.samplers.common` (trailing timestep spacing, Lin et al., WACV 2024).

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

import importlib
import pkgutil

# The built-in samplers (each registers itself on import).
from medgen.diffusion.samplers.common import flow_time_grid, step_noise, timestep_grid
from medgen.diffusion.samplers.ddim import ddim_sample, ddim_step
from medgen.diffusion.samplers.ddpm import ddpm_coefficients, ddpm_sample, ddpm_step
from medgen.diffusion.samplers.dpmpp_2m import dpmpp_2m_sample
from medgen.diffusion.samplers.euler import euler_sample
from medgen.diffusion.samplers.heun import heun_sample
from medgen.diffusion.samplers.registry import (
    SAMPLER_FAMILIES,
    SAMPLERS,
    Sampler,
    get_sampler,
    list_samplers,
    register_sampler,
    unregister_sampler,
)

__all__ = [
    "SAMPLERS",
    "SAMPLER_FAMILIES",
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
    "list_samplers",
    "register_sampler",
    "step_noise",
    "timestep_grid",
    "unregister_sampler",
]

# Any further module dropped into this package registers its sampler(s) on import.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")
del _module
