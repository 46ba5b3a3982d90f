"""Fréchet distance as a torchmetrics ``Metric``: feature sums that DDP reduces by summation.

:class:`FrechetDistance` keeps, per side (real / fake), the sample count, the feature sum and the
sum of outer products in float64. These are ``dist_reduce_fx="sum"`` states, so torchmetrics adds
them over ranks before :meth:`compute` (the same result as one process that saw every sample), and
their size does not grow with the number of samples. The distance is the same formula as
:func:`medgen.metrics.fidelity.frechet_distance` (unbiased covariances, Heusel et al. 2017).
``reset_real=False`` keeps the real statistics across :meth:`reset`, so a training run computes
them once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = ["FrechetDistance"]


class FrechetDistance(Metric):
    """Streaming Fréchet distance on the features of any extractor ``(B, C, *spatial) -> (B, F)``.

    Args:
        extractor: the feature extractor (kept frozen, in eval mode).
        num_features: its output width ``F``.
        reset_real: also clear the real statistics on :meth:`reset`.

    Example::

        fd = FrechetDistance(RandomConvFeatures(2), num_features=512)
        fd.update(real_images, real=True)
        fd.update(fake_images, real=False)
        value = fd.compute()
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, extractor: nn.Module, num_features: int, reset_real: bool = False) -> None:
        super().__init__()
        self.extractor = extractor.eval().requires_grad_(False)
        self.reset_real = reset_real
        f = int(num_features)
        for side in ("real", "fake"):
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_sum", torch.zeros(f, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{side}_outer", torch.zeros(f, f, dtype=torch.float64), dist_reduce_fx="sum"
            )

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:  # type: ignore[override]
        """Add a batch of images (already in the extractor's input units, e.g. ``[0, 1]``)."""
        feats = self.extractor(images.float()).double()
        side = "real" if real else "fake"
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + len(feats))
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + feats.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + feats.T @ feats)

    def _moments(self, side: str) -> tuple[Tensor, Tensor]:
        n = getattr(self, f"{side}_n")
        if n < 2:
            raise ValueError(f"FrechetDistance needs at least 2 {side} samples, got {int(n)}")
        mean = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> Tensor:
        """The Fréchet distance of the Gaussians fitted to the real and fake features."""
        mu_a, cov_a = self._moments("real")
        mu_b, cov_b = self._moments("fake")
        values, vectors = torch.linalg.eigh((cov_a + cov_a.T) / 2)
        root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
        middle = root_a @ cov_b @ root_a
        trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
        value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
        return value.clamp(min=0).float()

    def reset(self) -> None:
        """Clear the fake statistics (and the real ones when ``reset_real``)."""
        if self.reset_real:
            super().reset()
            return
        kept = {k: getattr(self, k).clone() for k in ("real_n", "real_sum", "real_outer")}
        super().reset()
        for k, v in kept.items():
            setattr(self, k, v)
