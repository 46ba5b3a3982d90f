"""Discrete-time variance-preserving noise schedules, held as buffers.

The forward process of a DDPM (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS
2020, Eq. 4) noises a clean sample ``x_0`` in closed form::

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),    alpha_bar_t = prod_{s<=t} (1 - beta_s)

for integer timesteps ``t = 0, ..., T - 1`` (0-based: ``alpha_bar[0] = 1 - beta[0]``). A schedule is
the sequence ``beta_t``, or equivalently ``alpha_bar_t``; the signal-to-noise ratio is
``SNR_t = alpha_bar_t / (1 - alpha_bar_t)`` (Kingma et al., "Variational Diffusion Models",
NeurIPS 2021).

Schedules (``kind``):

- ``linear``: ``beta_t`` evenly spaced from ``beta_start = 1e-4`` to ``beta_end = 0.02`` (Ho et al.
  2020, Sec. 4).
- ``scaled_linear``: ``sqrt(beta_t)`` evenly spaced, defaults ``1e-4 .. 0.02`` as MONAI's and
  diffusers' schedulers (so a MONAI config without explicit betas gives the same schedule). The
  latent diffusion / Stable Diffusion betas (Rombach et al., CVPR 2022) are
  :data:`STABLE_DIFFUSION_BETAS` ``= (0.00085, 0.012)``: pass them as ``beta_start`` /
  ``beta_end``. They were the default up to medgen 0.1.0; configs stored by that version keep
  them (:func:`upgrade_stored_schedule`).
- ``cosine``: ``alpha_bar(t) = f(t) / f(0)`` with ``f(t) = cos^2((t / T + s) / (1 + s) * pi / 2)``,
  ``s = 0.008``, computed in float64, betas clipped to ``max_beta`` (Nichol & Dhariwal, "Improved
  Denoising Diffusion Probabilistic Models", ICML 2021, Eq. 17 and Sec. 3.2: 0.999, the
  default, also MONAI's and diffusers'; the DDPM code of Medical Diffusion, Khader et al. 2023,
  and of lucidrains' denoising-diffusion-pytorch that it builds on clips at 0.9999, which only
  changes the last betas).
- ``sigmoid``: ``alpha_bar(t) = (sigmoid(end / tau) - sigmoid((t/T (end - start) + start) / tau)) /
  (sigmoid(end / tau) - sigmoid(start / tau))`` (Jabri et al., "Scalable Adaptive Computation for
  Iterative Generation", ICML 2023; Chen, "On the Importance of Noise Scheduling for Diffusion
  Models", 2023, Algorithm 1; defaults ``start=-3, end=3, tau=1``), betas clipped to 0.999.

The linear betas are those of ``T = 1000``; with fewer steps the chain ends less noisy
(``alpha_bar_{T-1}`` is about 0.05 for ``T = 300``), so scale ``beta_end`` by ``1000 / T`` as
Nichol & Dhariwal do, or use the cosine or sigmoid schedule, which adapt to any ``T``.

Continuous schedules are sampled as MONAI does for the cosine one: ``alpha_bar[i] = gamma((i + 1)
/ T)``, so index ``T - 1`` is (nearly) pure noise and index 0 is barely noisy.

The linear and scaled-linear betas come from MONAI's ``NoiseSchedules`` (the same numbers as
``monai.networks.schedulers.DDPMScheduler``, so MONAI-trained nets drop in); the cosine betas
are computed here in float64 (MONAI's are float32 and clipped at 0.999 inside, which leaves no
room for another clip; the two agree to float32 rounding, about 1e-7); MONAI's
``sigmoid_beta`` is a sigmoid in *beta*, not the sigmoid-in-``alpha_bar`` schedule of Jabri et al.
/ Chen, which is ours. MONAI's schedulers are stateful step objects (``set_timesteps`` then
``step``) with the prediction type fixed at construction; medgen keeps the schedule (this module)
apart from the objective and the sampler, so only the betas are taken from MONAI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SCHEDULES",
    "STABLE_DIFFUSION_BETAS",
    "NoiseSchedule",
    "cosine_alpha_bar",
    "make_betas",
    "resolve_schedule",
    "sigmoid_alpha_bar",
    "upgrade_stored_schedule",
]

#: Names of the available schedules.
SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")

#: ``(beta_start, beta_end)`` of latent diffusion / Stable Diffusion's scaled-linear schedule
#: (Rombach et al. 2022), the ``scaled_linear`` default of medgen 0.1.0.
STABLE_DIFFUSION_BETAS = (0.00085, 0.012)

# MONAI's and diffusers' defaults for both (DDPMScheduler beta_start=1e-4, beta_end=0.02).
_DEFAULT_BETAS = {"linear": (1e-4, 2e-2), "scaled_linear": (1e-4, 2e-2)}
_DEFAULT_MAX_BETA = 0.999


def sigmoid_alpha_bar(
    t: Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0, clip_min: float = 1e-9
) -> Tensor:
    """The sigmoid schedule ``gamma(t) = alpha_bar(t)`` for ``t`` in ``[0, 1]`` (Chen 2023, Alg. 1).

    Args:
        t: Continuous times in ``[0, 1]``, any shape.
        start: Left end of the sigmoid's input range.
        end: Right end of the sigmoid's input range.
        tau: Temperature; larger values make the schedule closer to linear in ``alpha_bar``.
        clip_min: Lower clip, so that ``alpha_bar`` stays positive.

    Returns:
        ``alpha_bar(t)``, same shape as ``t``; ``alpha_bar(0) = 1``.
    """
    t = t.to(torch.float64)
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    out = torch.sigmoid((t * (end - start) + start) / tau)
    return ((v_end - out) / (v_end - v_start)).clamp(clip_min, 1.0)


def _betas_from_alpha_bar(alpha_bar: Tensor, max_beta: float) -> Tensor:
    """Betas of ``alpha_bar`` sampled at ``0, 1/T, ..., 1`` (``T + 1`` values), clipped."""
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0.0, max_beta)


def make_betas(
    kind: str,
    num_train_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 0.008,
    sigmoid_start: float = -3.0,
    sigmoid_end: float = 3.0,
    sigmoid_tau: float = 1.0,
    max_beta: float = _DEFAULT_MAX_BETA,
) -> Tensor:
    """The ``(T,)`` betas of a named schedule (float32).

    Args:
        kind: One of :data:`SCHEDULES`.
        num_train_timesteps: ``T``.
        beta_start: First beta of ``linear`` / ``scaled_linear`` (default 1e-4 for both).
        beta_end: Last beta of ``linear`` / ``scaled_linear`` (default 0.02 for both; Stable
            Diffusion's scaled-linear betas are :data:`STABLE_DIFFUSION_BETAS`).
        cosine_s: Offset ``s`` of the cosine schedule.
        sigmoid_start: ``start`` of the sigmoid schedule.
        sigmoid_end: ``end`` of the sigmoid schedule.
        sigmoid_tau: ``tau`` of the sigmoid schedule.
        max_beta: Upper clip of the betas of the cosine and sigmoid schedules (0.999; Medical
            Diffusion's cosine: 0.9999).

    Returns:
        Betas of shape ``(T,)``.

    Raises:
        ValueError: For an unknown ``kind`` or invalid values.
    """
    from monai.networks.schedulers import NoiseSchedules

    if kind not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
    if kind in _DEFAULT_BETAS:
        lo, hi = _DEFAULT_BETAS[kind]
        lo = lo if beta_start is None else float(beta_start)
        hi = hi if beta_end is None else float(beta_end)
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {lo}, {hi}")
        name = "linear_beta" if kind == "linear" else "scaled_linear_beta"
        return NoiseSchedules[name](num_train_timesteps, beta_start=lo, beta_end=hi).float()
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta}")
    if kind == "cosine":
        t = torch.linspace(0.0, 1.0, num_train_timesteps + 1, dtype=torch.float64)
        return _betas_from_alpha_bar(cosine_alpha_bar(t, cosine_s), max_beta).float()
    if sigmoid_end <= sigmoid_start or sigmoid_tau <= 0:
        raise ValueError("the sigmoid schedule needs sigmoid_start < sigmoid_end and tau > 0")
    t = torch.linspace(0.0, 1.0, num_train_timesteps + 1, dtype=torch.float64)
    alpha_bar = sigmoid_alpha_bar(t, sigmoid_start, sigmoid_end, sigmoid_tau)
    return _betas_from_alpha_bar(alpha_bar, max_beta).float()


def resolve_schedule(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """``schedule`` (:class:`NoiseSchedule` kwargs) with the defaults its kind uses written out.

    A model records the resolved schedule, so that what it was trained with does not change when
    a default does: ``kind``, ``num_train_timesteps``, and ``beta_start``/``beta_end`` (linear,
    scaled-linear) or ``max_beta`` (cosine, sigmoid) are always present.
    """
    out = dict(schedule or {})
    kind = out.setdefault("kind", "linear")
    out.setdefault("num_train_timesteps", 1000)
    if kind in _DEFAULT_BETAS:
        lo, hi = _DEFAULT_BETAS[kind]
        if out.get("beta_start") is None:
            out["beta_start"] = lo
        if out.get("beta_end") is None:
            out["beta_end"] = hi
    elif kind in SCHEDULES and out.get("max_beta") is None:
        out["max_beta"] = _DEFAULT_MAX_BETA
    return out


def upgrade_stored_schedule(schedule: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The schedule a config stored by medgen 0.1.0 meant, or ``None`` if it means the same today.

    medgen 0.1.0 recorded the schedule as given, and its ``scaled_linear`` default was
    :data:`STABLE_DIFFUSION_BETAS`; a stored ``scaled_linear`` schedule without ``beta_start`` /
    ``beta_end`` therefore gets those (today's configs always record them, see
    :func:`resolve_schedule`).
    """
    stored = dict(schedule or {})
    if stored.get("kind") != "scaled_linear":
        return None
    missing = [i for i, k in enumerate(("beta_start", "beta_end")) if stored.get(k) is None]
    if not missing:
        return None
    for i in missing:
        stored[("beta_start", "beta_end")[i]] = STABLE_DIFFUSION_BETAS[i]
    return resolve_schedule(stored)


def broadcast_to_batch(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` to broadcast against ``like`` ``(B, C, *spatial)``."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class NoiseSchedule(nn.Module):
    """A variance-preserving noise schedule; ``betas``, ``alphas``, ``alphas_cumprod`` are buffers.

    The buffers are not persistent (they are a function of the constructor arguments), so a
    checkpoint does not pin them and they follow the module across devices. Timesteps are 0-based
    integers; every method also accepts ``t = -1``, meaning the clean data (``alpha_bar = 1``),
    which is where samplers end.

    Args:
        kind: One of :data:`SCHEDULES`.
        num_train_timesteps: Number of training timesteps ``T``.
        **kwargs: Further arguments of :func:`make_betas` (``beta_start``, ``beta_end``,
            ``cosine_s``, ``sigmoid_start``, ``sigmoid_end``, ``sigmoid_tau``, ``max_beta``).

    Example:
        >>> schedule = NoiseSchedule("cosine", 300)
        >>> x_t = schedule.add_noise(x0, torch.randn_like(x0), t)  # doctest: +SKIP
    """

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor

    def __init__(self, kind: str = "linear", num_train_timesteps: int = 1000, **kwargs) -> None:
        super().__init__()
        betas = make_betas(kind, num_train_timesteps, **kwargs)
        self.kind = kind
        self.num_train_timesteps = int(num_train_timesteps)
        alphas = 1.0 - betas.double()
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas", alphas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(alphas, 0).float(), persistent=False)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_train_timesteps={self.num_train_timesteps}"

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """``alpha_bar_t`` for integer timesteps ``t`` (any shape; ``-1`` gives 1)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        ones = torch.ones((), dtype=self.alphas_cumprod.dtype, device=t.device)
        return torch.where(t < 0, ones, self.alphas_cumprod[t.clamp(min=0)])

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` (infinite at ``t = -1``)."""
        a = self.alpha_bar(t).double()
        return (a / (1.0 - a)).float()

    def log_snr(self, t: Tensor | int) -> Tensor:
        """``lambda_t = log(alpha_t / sigma_t) = log(SNR_t) / 2`` in float64 (DPM-Solver's time)."""
        a = self.alpha_bar(t).double()
        return 0.5 * (torch.log(a) - torch.log1p(-a))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample ``q(x_t | x_0)``: ``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise``.

        Args:
            x0: Clean samples ``(B, C, *spatial)``.
            noise: Standard normal noise, same shape.
            t: Timesteps ``(B,)`` (or one for the batch).

        Returns:
            ``x_t``, same shape as ``x0``.
        """
        a = broadcast_to_batch(self.alpha_bar(t).expand(x0.shape[0]), x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def sample_timesteps(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        """Uniform training timesteps ``(B,)`` in ``0 .. T - 1`` (from the global RNG)."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), device=device)


def cosine_alpha_bar(t: Tensor, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's ``alpha_bar(t) = f(t) / f(0)`` for continuous ``t`` in ``[0, 1]``."""
    t = t.to(torch.float64)

    def f(u: Tensor) -> Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return f(t) / f(torch.zeros((), dtype=torch.float64))
