"""Diagonal Gaussian posterior used by variational autoencoders."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DiagonalGaussian"]

_LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussian:
    """Gaussian with diagonal covariance, ``N(mean, diag(exp(logvar)))``.

    Used as the posterior ``q(z | x)`` of a VAE (Kingma & Welling, 2014): :meth:`sample` is the
    reparameterisation trick (Sec. 2.4) and :meth:`kl` is the closed-form KL divergence to the
    standard normal prior (Appendix B). ``logvar`` is clamped to ``[-30, 20]`` for numerical
    stability.

    Args:
        mean: Mean of shape ``(B, C, *spatial)``.
        logvar: Log-variance, same shape as ``mean``.

    Attributes:
        mean: The mean.
        logvar: The clamped log-variance.
        var: ``exp(logvar)``.
        std: ``exp(logvar / 2)``.
    """

    LOGVAR_MIN = -30.0
    LOGVAR_MAX = 20.0

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(
                f"mean and logvar must have the same shape, got {tuple(mean.shape)} and "
                f"{tuple(logvar.shape)}."
            )
        self.mean = mean
        self.logvar = torch.clamp(logvar, self.LOGVAR_MIN, self.LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Build from an encoder output whose channels are ``[mean, logvar]``.

        Args:
            moments: Tensor of shape ``(B, 2C, *spatial)``.

        Returns:
            The distribution with mean ``moments[:, :C]`` and log-variance ``moments[:, C:]``.

        Raises:
            ValueError: If the channel count is odd.
        """
        if moments.dim() < 2 or moments.shape[1] % 2 != 0:
            raise ValueError(
                f"moments must have an even number of channels (dim 1), got shape "
                f"{tuple(moments.shape)}."
            )
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def shape(self) -> torch.Size:
        """Shape ``(B, C, *spatial)`` of one sample."""
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw a reparameterised sample ``mean + std * eps`` with ``eps ~ N(0, I)``.

        Args:
            generator: Optional random generator (on the device of ``mean``) for reproducibility.

        Returns:
            Sample of shape ``(B, C, *spatial)``, differentiable w.r.t. ``mean`` and ``logvar``.
        """
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """Return the mode (the mean), shape ``(B, C, *spatial)``."""
        return self.mean

    def _sum_non_batch(self, x: Tensor) -> Tensor:
        return x.flatten(1).sum(dim=1) if x.dim() > 1 else x

    def kl(self) -> Tensor:
        """KL divergence to ``N(0, I)``, summed over all non-batch dimensions.

        ``KL = 0.5 * sum(mean^2 + var - 1 - logvar)``.

        Returns:
            Tensor of shape ``(B,)``.
        """
        return 0.5 * self._sum_non_batch(self.mean.pow(2) + self.var - 1.0 - self.logvar)

    def nll(self, x: Tensor) -> Tensor:
        """Gaussian negative log-likelihood of ``x``, summed over all non-batch dimensions.

        ``NLL = 0.5 * sum(log(2 pi) + logvar + (x - mean)^2 / var)``.

        Args:
            x: Values of shape ``(B, C, *spatial)``.

        Returns:
            Tensor of shape ``(B,)``.
        """
        return 0.5 * self._sum_non_batch(_LOG_2PI + self.logvar + (x - self.mean).pow(2) / self.var)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype})"
