"""Diffusion processes: variance-preserving diffusion and rectified flow behind one interface.

A :class:`DiffusionProcess` is everything about the method that is neither the net nor the
sampler: how clean data are noised, what the net is trained to predict and with which loss, what
function a sampler integrates, which samplers fit and how they are called, and the defaults
(sampler, steps, clipping). :class:`medgen.models.Diffusion` holds one process and never asks
which one it is.

- :class:`VariancePreservingProcess`: ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``
  over integer timesteps of a :class:`~medgen.diffusion.NoiseSchedule` (Ho et al., "Denoising
  Diffusion Probabilistic Models", NeurIPS 2020, Eq. 4), with an epsilon / v / x0 objective
  (:class:`~medgen.diffusion.DiffusionObjective`); samplers of family ``"vp"`` get a denoiser
  ``(x_t, t) -> (x0_hat, eps_hat)`` (DDPM, Ho et al. 2020; DDIM, Song et al., ICLR 2021;
  DPM-Solver++, Lu et al. 2022).
- :class:`RectifiedFlowProcess`: ``x_t = (1 - t) x_0 + t eps`` for ``t`` in ``[0, 1]`` and the
  velocity ``v = eps - x_0`` as target (Liu, Gong & Liu, "Flow Straight and Fast", ICLR 2023;
  Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023;
  :class:`~medgen.diffusion.RectifiedFlowObjective`); samplers of family ``"flow"`` get a
  velocity ``(x_t, t) -> v`` (Euler; Heun, Karras et al., NeurIPS 2022, Algorithm 1).

The model gives a process its net as ``net_fn(x_t, net_t) -> raw prediction`` with the
conditions (and guidance) already bound, so a process sees neither conditioning nor guidance.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from medgen.diffusion.objectives import (
    DiffusionObjective,
    RectifiedFlowObjective,
    eps_from_x0,
)
from medgen.diffusion.samplers import Sampler
from medgen.diffusion.samplers.common import Denoiser, Hook, Velocity
from medgen.diffusion.schedules import NoiseSchedule, make_betas

__all__ = [
    "PROCESS_PREDICTIONS",
    "DiffusionProcess",
    "NetFn",
    "RectifiedFlowProcess",
    "VariancePreservingProcess",
    "make_process",
]

#: ``net_fn(x_t, net_t) -> raw prediction`` ``(B, C, *spatial)``, ``net_t`` of shape ``(B,)``.
NetFn = Callable[[Tensor, Tensor], Tensor]

#: Prediction types, by process: ``flow`` is rectified flow, the others variance-preserving.
PROCESS_PREDICTIONS = ("epsilon", "v", "x0", "flow")


def _noise_like(x0: Tensor, generator: torch.Generator | None) -> Tensor:
    """Training noise: from ``generator`` on the CPU, else from the global RNG on ``x0``'s device."""
    if generator is None:
        return torch.randn_like(x0)
    return torch.randn(x0.shape, generator=generator).to(x0)


class DiffusionProcess(nn.Module, ABC):
    """What a diffusion model's training and sampling need from its forward process.

    An ``nn.Module`` so that schedule buffers follow the model across devices (they are not
    persistent: checkpoints do not hold them).

    Attributes:
        family: The sampler family it accepts (``"vp"`` or ``"flow"``, see
            :func:`~medgen.diffusion.list_samplers`).
        default_sampler: Sampler of a model that names none.
        default_steps: Steps of the default sampler.
        default_val_steps: Steps of the default validation sampler.
        clips_by_default: Whether samples are clipped to ``[-1, 1]`` by default (pixel space).
        num_train_timesteps: ``T``: the VP chain's length, the flow's time scale for the net.
        objective: The training objective.
    """

    family: ClassVar[str]
    default_sampler: ClassVar[str]
    default_steps: ClassVar[int] = 50
    default_val_steps: ClassVar[int] = 20
    clips_by_default: ClassVar[bool] = False

    num_train_timesteps: int
    objective: DiffusionObjective | RectifiedFlowObjective

    @property
    @abstractmethod
    def description(self) -> str:
        """What kind of model it makes, for messages (e.g. ``"a rectified-flow model"``)."""

    @abstractmethod
    def loss(self, net_fn: NetFn, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The scalar training loss of clean ``x0`` ``(B, C, *spatial)``.

        Draws the noise (then the times) from ``generator`` on the CPU when given (validation:
        the same every epoch), else from the global RNG on the data's device.
        """

    @abstractmethod
    def model_function(self, net_fn: NetFn, clip: bool) -> Denoiser | Velocity:
        """The function samplers of :attr:`family` call, from the net's raw prediction."""

    @abstractmethod
    def run_sampler(
        self,
        sampler: Sampler,
        model_fn: Denoiser | Velocity,
        x: Tensor,
        *,
        steps: int,
        generator: torch.Generator | None,
        hook: Hook | None = None,
        **options: Any,
    ) -> Tensor:
        """Call ``sampler`` from start noise ``x`` with the family's calling convention."""

    @abstractmethod
    def noise_to(self, x0: Tensor, noise: Tensor, t: float) -> Tensor:
        """``x0`` noised to sampler time ``t`` (the time a sampler's hook is given)."""

    def accepts(self, sampler: Sampler) -> bool:
        """Whether ``sampler`` fits this process (its family)."""
        return sampler.family == self.family

    def default_sampler_steps(self, sampler: Sampler) -> int:
        """Steps of ``sampler`` when none are asked for (``None`` flag: the full chain ``T``)."""
        if sampler.default_steps is None:
            return self.num_train_timesteps
        return sampler.default_steps


class VariancePreservingProcess(DiffusionProcess):
    """Discrete-time variance-preserving diffusion (DDPM) with an epsilon / v / x0 objective.

    Training (Ho et al. 2020, Algorithm 1; Salimans & Ho, ICLR 2022, for ``v``): ``t`` uniform in
    ``0 .. T - 1``, ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` and the net's
    output regressed onto the objective's target. Sampling: a denoiser that turns the net's
    prediction into ``(x0_hat, eps_hat)``, with ``x0_hat`` clamped to ``[-1, 1]`` (and
    ``eps_hat`` recomputed from it) when clipping.

    Args:
        schedule: The noise schedule.
        objective: Prediction type, loss and weighting.
    """

    family = "vp"
    default_sampler = "ddim"
    clips_by_default = True

    def __init__(self, schedule: NoiseSchedule, objective: DiffusionObjective) -> None:
        super().__init__()
        self.schedule = schedule
        self.objective = objective
        self.num_train_timesteps = schedule.num_train_timesteps

    @property
    def description(self) -> str:
        return f"a {self.objective.prediction}-prediction model"

    def extra_repr(self) -> str:
        return f"prediction={self.objective.prediction!r}, loss={self.objective.loss!r}"

    def loss(self, net_fn: NetFn, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b = x0.shape[0]
        noise = _noise_like(x0, generator)
        if generator is None:
            t = self.schedule.sample_timesteps(b, x0.device)
        else:
            t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator)
            t = t.to(x0.device)
        x_t = self.schedule.add_noise(x0, noise, t)
        return self.objective(net_fn(x_t, t), x0, noise, t, self.schedule)

    def model_function(self, net_fn: NetFn, clip: bool) -> Denoiser:
        """``denoise(x_t, t) -> (x0_hat, eps_hat)`` at integer timestep ``t``."""

        def denoise(x: Tensor, t: int) -> tuple[Tensor, Tensor]:
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            pred = net_fn(x, tt)
            alpha_bar = self.schedule.alpha_bar(t).to(x.device, torch.float32)
            x0, eps = self.objective.to_x0_eps(pred, x, alpha_bar)
            if clip:
                x0 = x0.clamp(-1.0, 1.0)
                eps = eps_from_x0(x, x0, alpha_bar)
            return x0, eps

        return denoise

    def run_sampler(
        self,
        sampler: Sampler,
        model_fn: Denoiser | Velocity,
        x: Tensor,
        *,
        steps: int,
        generator: torch.Generator | None,
        hook: Hook | None = None,
        **options: Any,
    ) -> Tensor:
        return sampler.fn(
            model_fn, self.schedule, x, hook=hook, steps=steps, generator=generator, **options
        )

    def noise_to(self, x0: Tensor, noise: Tensor, t: float) -> Tensor:
        """``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise`` at timestep ``t`` (-1: ``x0``)."""
        a = float(self.schedule.alpha_bar(int(t)))
        return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise


class RectifiedFlowProcess(DiffusionProcess):
    """Rectified flow / flow matching: straight paths from data to noise, velocity target.

    Training: ``t`` from the objective's time distribution (uniform or logit-normal, shifted),
    ``x_t = (1 - t) x_0 + t eps``, the net (given ``t * T`` as its timestep) regressed onto
    ``eps - x_0``. Sampling integrates ``dx/dt = v`` from ``t = 1`` to 0 on the training shift's
    grid; the velocity is not clipped (only the final sample, when the model clips).

    Args:
        objective: Loss, time distribution and shift; its ``time_scale`` is ``T``.
    """

    family = "flow"
    default_sampler = "euler"
    clips_by_default = False

    def __init__(self, objective: RectifiedFlowObjective) -> None:
        super().__init__()
        self.objective = objective
        self.num_train_timesteps = int(objective.time_scale)

    @property
    def description(self) -> str:
        return "a rectified-flow model"

    @property
    def shift(self) -> float:
        """The time shift of training and of the sampling grid (SD3, Esser et al. 2024)."""
        return float(self.objective.shift)

    def extra_repr(self) -> str:
        return f"loss={self.objective.loss!r}, shift={self.shift}"

    def loss(self, net_fn: NetFn, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = _noise_like(x0, generator)
        t = self.objective.sample_time(x0.shape[0], generator=generator).to(x0.device)
        x_t = self.objective.interpolate(x0, noise, t)
        return self.objective(net_fn(x_t, self.objective.net_time(t)), x0, noise)

    def model_function(self, net_fn: NetFn, clip: bool) -> Velocity:
        """``velocity(x_t, t) -> v`` at flow time ``t``; ``clip`` does not apply to velocities."""
        del clip

        def velocity(x: Tensor, t: float) -> Tensor:
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
            return net_fn(x, self.objective.net_time(tt))

        return velocity

    def run_sampler(
        self,
        sampler: Sampler,
        model_fn: Denoiser | Velocity,
        x: Tensor,
        *,
        steps: int,
        generator: torch.Generator | None,
        hook: Hook | None = None,
        **options: Any,
    ) -> Tensor:
        return sampler.fn(
            model_fn, x, hook=hook, steps=steps, generator=generator, shift=self.shift, **options
        )

    def noise_to(self, x0: Tensor, noise: Tensor, t: float) -> Tensor:
        """``(1 - t) x0 + t noise`` at flow time ``t``."""
        return (1.0 - t) * x0 + t * noise


def make_process(
    prediction: str = "epsilon",
    schedule: Mapping[str, Any] | None = None,
    loss: str = "l2",
    min_snr_gamma: float | None = None,
    flow: Mapping[str, Any] | None = None,
) -> DiffusionProcess:
    """The process of a model's settings (the :class:`~medgen.models.Diffusion` arguments).

    Args:
        prediction: ``"epsilon"``, ``"v"``, ``"x0"`` (variance-preserving) or ``"flow"``.
        schedule: :class:`~medgen.diffusion.NoiseSchedule` kwargs; for ``flow`` only
            ``num_train_timesteps`` is used (the scale of the net's time), the rest is only
            validated, so a config switches process by ``prediction`` alone.
        loss: ``"l2"`` or ``"l1"``.
        min_snr_gamma: Min-SNR-gamma weighting (variance-preserving only).
        flow: :class:`~medgen.diffusion.RectifiedFlowObjective` kwargs (``time_sampling``,
            ``logit_mean``, ``logit_std``, ``shift``).

    Returns:
        A :class:`VariancePreservingProcess` or a :class:`RectifiedFlowProcess`.
    """
    if prediction not in PROCESS_PREDICTIONS:
        raise ValueError(
            f"prediction must be one of {', '.join(PROCESS_PREDICTIONS)}, got {prediction!r}"
        )
    schedule = dict(schedule or {})
    if prediction == "flow":
        kind = schedule.pop("kind", "linear")
        num_train_timesteps = int(schedule.pop("num_train_timesteps", 1000))
        make_betas(kind, num_train_timesteps, **schedule)  # validated as for a VP model
        if min_snr_gamma is not None:
            raise ValueError("min_snr_gamma applies to epsilon/v/x0 prediction, not to flow")
        objective = RectifiedFlowObjective(
            loss=loss, time_scale=float(num_train_timesteps), **dict(flow or {})
        )
        return RectifiedFlowProcess(objective)
    return VariancePreservingProcess(
        NoiseSchedule(**schedule), DiffusionObjective(prediction, loss, min_snr_gamma)
    )
