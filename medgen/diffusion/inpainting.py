"""RePaint-style inpainting as a sampler hook, for any process and any sampler.

Lugmayr, Danelljan, Romero, Yu, Timofte, Van Gool. "RePaint: Inpainting using Denoising Diffusion
Probabilistic Models." CVPR 2022 (Algorithm 1): after every step, the region to keep is replaced by
the known image noised to the time just reached, ``q(x_t | x_0 = known)``, so the generated region
is denoised in the context of the known one. Resampling (repeating a step after re-noising it)
is a sampler capability (``supports_resample``), not part of the hook.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medgen.diffusion.process import DiffusionProcess
from medgen.diffusion.samplers.common import Hook

__all__ = ["repaint_hook"]


def repaint_hook(
    process: DiffusionProcess, known: Tensor, mask: Tensor, generator: torch.Generator | None
) -> Hook:
    """A ``hook(x, t_next) -> x`` that keeps ``known`` (noised to ``t_next``) where ``mask`` is 0.

    Args:
        process: The model's process (:meth:`~DiffusionProcess.noise_to` noises ``known``).
        known: The known image in the net's space, ``(B, C, *spatial)``.
        mask: ``(B, 1, *spatial)``: 1 where to generate, 0 where ``known`` is kept.
        generator: CPU generator of the noise (one draw per step, after the step's own noise).

    Returns:
        The hook to pass to a sampler.
    """

    def hook(x: Tensor, t_next: float) -> Tensor:
        noise = torch.randn(x.shape, generator=generator).to(x)
        noised = process.noise_to(known, noise, t_next)
        return mask * x + (1.0 - mask) * noised

    return hook
