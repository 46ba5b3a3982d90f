"""Precision, recall, density and coverage of generated samples in a feature space.

All four come from k-nearest-neighbour balls around samples, with Euclidean distances in float64:

- ``precision`` (Kynkäänniemi, Karras, Laine, Lehtinen, Aila, "Improved precision and recall
  metric for assessing generative models", NeurIPS 2019, Eq. 1-2): the fraction of fake samples
  inside the real manifold, the union of balls around every real sample with the radius of its
  k-th nearest real neighbour; ``recall``: the fraction of real samples inside the fake manifold.
- ``density`` and ``coverage`` (Naeem, Oh, Uh, Choi, Yoo, "Reliable fidelity and diversity metrics
  for generative models", ICML 2020, Eq. 3-4): density counts how many real balls hold each fake
  sample, ``(1 / kM) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]`` (about 1 when the sets match; above
  1 when fakes crowd in dense real regions); coverage is the fraction of real balls that hold at
  least one fake sample.

A point is inside a ball when its distance is strictly below the radius (as Naeem et al.'s
reference code); the k-th neighbour excludes the point itself.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from medgen.metrics.fidelity import as_features

__all__ = ["knn_radii", "prdc"]


def knn_radii(feats: Tensor, k: int) -> Tensor:
    """Distance of each row of ``(N, F)`` ``feats`` to its k-th nearest other row, ``(N,)``."""
    distances = torch.cdist(feats, feats)
    # the smallest distance is the point itself (0); the k-th other neighbour is at index k
    return distances.kthvalue(k + 1, dim=1).values


def prdc(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` features.

    Args:
        real: ``(N, F)`` real features.
        fake: ``(M, F)`` fake features.
        k: neighbourhood size (5 in both papers).

    Returns:
        ``{"precision", "recall", "density", "coverage"}`` as Python floats.

    Raises:
        ValueError: fewer than ``k + 1`` samples in a set, different widths, NaN.
    """
    x, y = as_features(real, "real"), as_features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: {x.shape[1]} vs {y.shape[1]}")
    if k < 1 or min(len(x), len(y)) < k + 1:
        raise ValueError(
            f"prdc with k={k} needs at least {k + 1} samples per set, got {len(x)} real and "
            f"{len(y)} fake"
        )
    r_real, r_fake = knn_radii(x, k), knn_radii(y, k)
    d = torch.cdist(x, y)  # (N, M): real i to fake j
    in_real_ball = d < r_real[:, None]
    in_fake_ball = d < r_fake[None, :]
    return {
        "precision": float(in_real_ball.any(dim=0).double().mean()),
        "recall": float(in_fake_ball.any(dim=1).double().mean()),
        "density": float(in_real_ball.double().sum() / (k * len(y))),
        "coverage": float(in_real_ball.any(dim=1).double().mean()),
    }
