"""Training objectives: what the net predicts, how the loss is weighted, and the conversions.

Variance-preserving diffusion (:class:`DiffusionObjective`), with ``x_t = a x_0 + s eps``,
``a = sqrt(alpha_bar_t)``, ``s = sqrt(1 - alpha_bar_t)``. The net predicts one of

- ``epsilon``: the noise ``eps`` (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS
  2020, Eq. 14, the "simple" loss);
- ``v``: the velocity ``v = a eps - s x_0`` (Salimans & Ho, "Progressive Distillation for Fast
  Sampling of Diffusion Models", ICLR 2022, Sec. 4 and Appendix D);
- ``x0``: the clean sample ``x_0``.

Given ``x_t``, any one determines the others (:func:`predict_x0_eps`)::

    x_0 = (x_t - s eps) / a        eps = (x_t - a x_0) / s
    x_0 = a x_t - s v              eps = s x_t + a v

Min-SNR-gamma weighting (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting
Strategy", ICCV 2023, Eq. 8 and Sec. 3.4) weights every timestep's loss as ``min(SNR_t, gamma)``
in ``x_0`` space; since ``|eps - eps_hat|^2 = SNR |x_0 - x0_hat|^2`` and ``|v - v_hat|^2 =
(SNR + 1) |x_0 - x0_hat|^2``, the weight on the loss of each prediction type is
``min(SNR, gamma) / SNR`` (epsilon), ``min(SNR, gamma) / (SNR + 1)`` (v), ``min(SNR, gamma)`` (x0)
(:func:`min_snr_weight`).

Rectified flow (:class:`RectifiedFlowObjective`; Liu, Gong & Liu, "Flow Straight and Fast",
ICLR 2023; Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023): ``x_t = (1 - t) x_0
+ t eps`` for continuous ``t`` in ``[0, 1]``, and the net predicts the velocity ``dx_t / dt = eps -
x_0``. Training times are uniform, or logit-normal ``t = sigmoid(u), u ~ N(m, s^2)``, and may be
shifted towards noise with ``t' = shift t / (1 + (shift - 1) t)`` (Esser et al., "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis" (SD3), ICML 2024, Eqs. 19 and 23; MAISI-v2
uses the same shift for large 3D volumes). The net is given ``t * time_scale`` as its timestep, so
it sees the same range (0 .. 1000) as a DDPM net.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from medgen.diffusion.schedules import NoiseSchedule, broadcast_to_batch

__all__ = [
    "LOSSES",
    "PREDICTIONS",
    "DiffusionObjective",
    "RectifiedFlowObjective",
    "eps_from_v",
    "eps_from_x0",
    "min_snr_weight",
    "predict_x0_eps",
    "prediction_target",
    "shift_time",
    "v_from_x0_eps",
    "x0_from_eps",
    "x0_from_v",
]

#: Prediction types of variance-preserving diffusion.
PREDICTIONS = ("epsilon", "v", "x0")
#: Pointwise losses.
LOSSES = ("l2", "l1")


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)``; ``alpha_bar`` broadcasts."""
    return (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    """``eps = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar)``; ``alpha_bar`` broadcasts."""
    return (x_t - alpha_bar.sqrt() * x0) / (1.0 - alpha_bar).sqrt()


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0`` (Salimans & Ho 2022, Sec. 4)."""
    return alpha_bar.sqrt() * eps - (1.0 - alpha_bar).sqrt() * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v``."""
    return alpha_bar.sqrt() * x_t - (1.0 - alpha_bar).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """``eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v``."""
    return (1.0 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * v


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(
            f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}"
        )


def predict_x0_eps(
    pred: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction: str
) -> tuple[Tensor, Tensor]:
    """Convert a net output to the ``(x_0, eps)`` it implies at ``x_t``.

    Args:
        pred: Net output ``(B, C, *spatial)``.
        x_t: Noisy input, same shape.
        alpha_bar: ``alpha_bar_t`` broadcastable to ``x_t`` (e.g. ``(B, 1, 1, 1)``), in ``(0, 1)``.
        prediction: ``"epsilon"``, ``"v"`` or ``"x0"``.

    Returns:
        ``(x0_hat, eps_hat)``, each shaped like ``x_t``.
    """
    _check_prediction(prediction)
    if prediction == "epsilon":
        return x0_from_eps(x_t, pred, alpha_bar), pred
    if prediction == "v":
        return x0_from_v(x_t, pred, alpha_bar), eps_from_v(x_t, pred, alpha_bar)
    return pred, eps_from_x0(x_t, pred, alpha_bar)


def prediction_target(x0: Tensor, eps: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """The regression target of ``prediction`` for clean ``x0`` noised with ``eps``."""
    _check_prediction(prediction)
    if prediction == "epsilon":
        return eps
    if prediction == "v":
        return v_from_x0_eps(x0, eps, alpha_bar)
    return x0


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the loss of ``prediction``.

    Args:
        snr: ``SNR_t`` per sample, ``(B,)``.
        gamma: The clamp ``gamma`` (5 in the paper).
        prediction: ``"epsilon"``, ``"v"`` or ``"x0"``.

    Returns:
        ``(B,)`` weights: ``min(SNR, gamma) / SNR``, ``min(SNR, gamma) / (SNR + 1)`` or
        ``min(SNR, gamma)``.
    """
    _check_prediction(prediction)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {gamma}")
    snr = snr.double()
    clipped = snr.clamp(max=float(gamma))
    if prediction == "epsilon":
        weight = clipped / snr
    elif prediction == "v":
        weight = clipped / (snr + 1.0)
    else:
        weight = clipped
    return weight.float()


def _pointwise(pred: Tensor, target: Tensor, loss: str) -> Tensor:
    """Per-sample mean of the L2 or L1 error, ``(B,)``, in float32."""
    diff = pred.float() - target.float()
    err = diff.square() if loss == "l2" else diff.abs()
    return err.flatten(1).mean(1)


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


@dataclass(frozen=True)
class DiffusionObjective:
    """Loss of a variance-preserving diffusion model: prediction type, pointwise loss, weighting.

    ``loss = mean_b w_b * mean(|pred_b - target_b|^p)`` with ``p = 2`` (``l2``) or 1 (``l1``),
    and ``w_b = 1`` or the min-SNR-gamma weight of the sample's timestep.

    Args:
        prediction: ``"epsilon"``, ``"v"`` or ``"x0"``.
        loss: ``"l2"`` or ``"l1"`` (Medical Diffusion uses L1 on epsilon).
        min_snr_gamma: ``gamma`` of min-SNR weighting, or ``None`` for uniform weights.
    """

    prediction: str = "epsilon"
    loss: str = "l2"
    min_snr_gamma: float | None = None

    def __post_init__(self) -> None:
        _check_prediction(self.prediction)
        _check_loss(self.loss)
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")

    def target(self, x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
        """Regression target for ``x0`` noised with ``noise`` (``alpha_bar`` broadcastable)."""
        return prediction_target(x0, noise, alpha_bar, self.prediction)

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` from a net output (see :func:`predict_x0_eps`)."""
        return predict_x0_eps(pred, x_t, alpha_bar, self.prediction)

    def weights(self, schedule: NoiseSchedule, t: Tensor) -> Tensor | None:
        """Per-sample loss weights ``(B,)`` at timesteps ``t``, or ``None`` when uniform."""
        if self.min_snr_gamma is None:
            return None
        return min_snr_weight(schedule.snr(t), self.min_snr_gamma, self.prediction)

    def __call__(
        self, pred: Tensor, x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule
    ) -> Tensor:
        """Scalar loss of net outputs ``pred`` for clean ``x0``, ``noise`` and timesteps ``t``.

        Args:
            pred: Net output ``(B, C, *spatial)`` at ``schedule.add_noise(x0, noise, t)``.
            x0: Clean samples, same shape.
            noise: The noise used, same shape.
            t: Integer timesteps ``(B,)``.
            schedule: The noise schedule.
        """
        alpha_bar = broadcast_to_batch(schedule.alpha_bar(t).expand(x0.shape[0]), x0)
        per_sample = _pointwise(pred, self.target(x0, noise, alpha_bar), self.loss)
        weights = self.weights(schedule, t.expand(x0.shape[0]))
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.device)
        return per_sample.mean()


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's time shift ``shift t / (1 + (shift - 1) t)`` (Esser et al. 2024, Eq. 23).

    ``shift > 1`` spends more time at high noise, as large images and volumes need; ``t = 0`` and
    ``t = 1`` are fixed points.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclass(frozen=True)
class RectifiedFlowObjective:
    """Rectified-flow / flow-matching loss with velocity prediction ``v = eps - x_0``.

    Args:
        loss: ``"l2"`` or ``"l1"``.
        time_sampling: ``"uniform"`` or ``"logit_normal"`` training times.
        logit_mean: Mean ``m`` of the logit-normal distribution.
        logit_std: Standard deviation ``s`` of the logit-normal distribution.
        shift: Time shift applied to training times (1 = none); samplers use the same shift.
        time_scale: The net receives ``t * time_scale`` as its timestep.
    """

    loss: str = "l2"
    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    time_scale: float = 1000.0

    def __post_init__(self) -> None:
        _check_loss(self.loss)
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(
                f"time_sampling must be 'uniform' or 'logit_normal', got {self.time_sampling!r}"
            )
        if self.logit_std <= 0 or self.shift <= 0 or self.time_scale <= 0:
            raise ValueError("logit_std, shift and time_scale must be positive")

    def sample_time(
        self,
        batch_size: int,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Training times ``(B,)`` in ``(0, 1)``, shifted by :attr:`shift`."""
        if self.time_sampling == "uniform":
            t = torch.rand(batch_size, generator=generator, device=device)
        else:
            u = torch.randn(batch_size, generator=generator, device=device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * u)
        return shift_time(t, self.shift)

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - t) x_0 + t eps`` for times ``t`` ``(B,)``."""
        t = broadcast_to_batch(t.expand(x0.shape[0]), x0)
        return (1.0 - t) * x0 + t * noise

    @staticmethod
    def target(x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity ``dx_t / dt = eps - x_0``."""
        return noise - x0

    @staticmethod
    def to_x0_eps(v: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``x_0 = x_t - t v`` and ``eps = x_t + (1 - t) v`` (``t`` broadcastable)."""
        return x_t - t * v, x_t + (1.0 - t) * v

    def net_time(self, t: Tensor) -> Tensor:
        """The timestep given to the net for flow time ``t``."""
        return t * self.time_scale

    def __call__(self, pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
        """Scalar loss of predicted velocities ``pred`` at ``interpolate(x0, noise, t)``."""
        return _pointwise(pred, self.target(x0, noise), self.loss).mean()
