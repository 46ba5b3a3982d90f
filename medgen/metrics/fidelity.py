"""Distribution metrics for unpaired image sets: feature extractors, FID, KID and RBF-MMD.

Nothing here downloads. Three kinds of feature extractor map ``(B, C, *spatial)`` images to
``(B, F)`` features; they live in :mod:`medgen.features.extractors` and are re-exported here:

- :class:`PixelFeatures`: average-pooled pixels, a transparent baseline with no learned weights.
- :class:`RandomConvFeatures`: a small conv net with fixed random weights drawn from a seed; it is
  sensitive to texture and needs no file, which makes it the extractor for tests and for data far
  from natural images where ImageNet features mean little.
- :class:`TorchvisionFeatures`: Inception-v3 or ResNet-50 pool features from a torchvision state
  dict on local disk (checked by SHA-256 when given).

Distances work on any ``(N, F)`` features, in float64:

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to both sets (FID when
  the features are Inception pool features; Heusel et al. 2017).
- :func:`kernel_inception_distance`: unbiased MMD² with the cubic polynomial kernel, averaged over
  random subsets (KID; Bińkowski et al. 2018).
- :func:`mmd_rbf`: unbiased MMD² with a Gaussian kernel (Gretton et al. 2012).

Values computed with torchvision's Inception weights are *not* comparable to published FIDs, which
use the TF-Inception port of pytorch-fid / torch-fidelity; compare only numbers computed with the
same extractor and weights. For FID during DDP training, pass one of these extractors to
``torchmetrics.image.FrechetInceptionDistance(feature=extractor)``, which syncs the statistics.

References:
    Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter. "GANs trained by a two time-scale update
    rule converge to a local Nash equilibrium." NeurIPS 2017 (FID, Eq. 6).
    Bińkowski, Sutherland, Arbel, Gretton. "Demystifying MMD GANs." ICLR 2018 (KID, Sec. 3 and
    Eq. 3 of Gretton et al. for the unbiased estimator).
    Gretton, Borgwardt, Rasch, Schölkopf, Smola. "A kernel two-sample test." JMLR 13, 2012.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from medgen.features.extractors import PixelFeatures, RandomConvFeatures, TorchvisionFeatures
from medgen.features.imagenet import IMAGENET_MEAN, IMAGENET_STD
from medgen.features.weights import file_sha256, load_state_dict

__all__ = [
    "PixelFeatures",
    "as_features",
    "RandomConvFeatures",
    "TorchvisionFeatures",
    "frechet_distance",
    "kernel_inception_distance",
    "mmd_rbf",
]

# The extractors live in medgen.features (shared with the perceptual loss) and are re-exported
# here; the old private names of the weight helpers stay importable.
_IMAGENET_MEAN = IMAGENET_MEAN
_IMAGENET_STD = IMAGENET_STD
_sha256 = file_sha256
_load_state_dict = load_state_dict


def as_features(x: Tensor | np.ndarray, name: str) -> Tensor:
    """``(N, F)`` features as a float64 CPU tensor; NaN/Inf and other shapes are errors."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, F) features, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_pair(a: Tensor, b: Tensor, minimum: int) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) < minimum:
        raise ValueError(f"need at least {minimum} samples per set, got {len(a)} and {len(b)}")


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017).

    ``d² = |mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})`` with unbiased covariances.
    The trace of the matrix square root is computed as ``tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})`` from
    symmetric eigendecompositions in float64: the same value (the two products are similar
    matrices), but symmetric, so no complex round-off as with a general ``sqrtm``. With no more
    samples than features (singular covariances) the same trace is the sum of the singular
    values of ``X_a X_b^T / sqrt((N_a - 1)(N_b - 1))`` (centred features), which is exact and
    much cheaper. Tiny negative results from round-off are clamped to 0.

    Args:
        feats_a: ``(N_a, F)`` features.
        feats_b: ``(N_b, F)`` features.

    Returns:
        The distance as a Python float.
    """
    a = as_features(feats_a, "feats_a")
    b = as_features(feats_b, "feats_b")
    _check_pair(a, b, 2)
    if min(len(a), len(b)) <= a.shape[1]:
        warnings.warn(
            f"frechet_distance: {len(a)} and {len(b)} samples for {a.shape[1]} features; the "
            "covariances are singular and the estimate is strongly biased",
            stacklevel=2,
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    n, m = len(a), len(b)
    if min(n, m) <= a.shape[1]:
        # Few samples: with centred data X_a, X_b, S_a^{1/2} S_b S_a^{1/2} has the nonzero
        # eigenvalues of S_a S_b, i.e. of M M^T with M = X_a X_b^T / sqrt((n-1)(m-1)); so the
        # trace of its square root is the sum of the singular values of the (n, m) matrix M.
        # Exact, and O(n m F) instead of two F x F eigendecompositions.
        xa, xb = a - mu_a, b - mu_b
        cross = (xa @ xb.T) / math.sqrt((n - 1) * (m - 1))
        trace_root = torch.linalg.svdvals(cross).sum()
        trace_a, trace_b = xa.square().sum() / (n - 1), xb.square().sum() / (m - 1)
    else:
        cov_a, cov_b = (
            torch.cov(a.T).reshape(a.shape[1], -1),
            torch.cov(b.T).reshape(b.shape[1], -1),
        )
        root_a = _sqrtm_psd(cov_a)
        middle = root_a @ cov_b @ root_a
        trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
        trace_a, trace_b = cov_a.trace(), cov_b.trace()
    value = (mu_a - mu_b).square().sum() + trace_a + trace_b - 2 * trace_root
    return max(float(value), 0.0)


def _unbiased_mmd2(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor) -> Tensor:
    m, n = k_xx.shape[0], k_yy.shape[0]
    term_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return term_x + term_y - 2 * k_xy.mean()


def kernel_inception_distance(
    feats_a: Tensor | np.ndarray,
    feats_b: Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with a polynomial kernel (Bińkowski et al. 2018).

    ``k(x, y) = (gamma x·y + coef0) ** degree`` with ``gamma = 1 / F`` by default (the cubic
    kernel of the paper). For each of ``subsets`` rounds, ``subset_size`` samples are drawn without
    replacement from each set and the unbiased MMD² estimate is computed; the result is the mean
    and the (population) standard deviation over rounds, as in torchmetrics and torch-fidelity.
    Sampling uses its own generator seeded with ``seed``. The unbiased estimate can be slightly
    negative when both sets come from one distribution.

    Args:
        feats_a: ``(N_a, F)`` features.
        feats_b: ``(N_b, F)`` features.
        subsets: number of random subsets.
        subset_size: samples per subset; reduced (with a warning) to ``min(N_a, N_b)``.
        degree: polynomial degree.
        gamma: kernel scale, default ``1 / F``.
        coef0: kernel offset.
        seed: subset sampling seed.

    Returns:
        ``(mean, std)`` as Python floats.
    """
    a = as_features(feats_a, "feats_a")
    b = as_features(feats_b, "feats_b")
    _check_pair(a, b, 2)
    if subsets < 1:
        raise ValueError(f"subsets must be positive, got {subsets}")
    size = min(subset_size, len(a), len(b))
    if size < subset_size:
        warnings.warn(
            f"kernel_inception_distance: subset_size={subset_size} exceeds the smaller set "
            f"({min(len(a), len(b))} samples); using {size}",
            stacklevel=2,
        )
    if size < 2:
        raise ValueError(f"subset_size must be at least 2, got {size}")
    gamma = 1.0 / a.shape[1] if gamma is None else float(gamma)
    generator = torch.Generator().manual_seed(seed)

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return (gamma * (x @ y.T) + coef0) ** degree

    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:size]]
        y = b[torch.randperm(len(b), generator=generator)[:size]]
        values.append(_unbiased_mmd2(kernel(x, x), kernel(y, y), kernel(x, y)))
    stacked = torch.stack(values)
    return float(stacked.mean()), float(stacked.std(unbiased=False))


def mmd_rbf(
    feats_a: Tensor | np.ndarray,
    feats_b: Tensor | np.ndarray,
    sigma: float | None = None,
) -> float:
    """Unbiased MMD² with a Gaussian kernel ``exp(-|x - y|² / (2 sigma²))`` (Gretton et al. 2012).

    Args:
        feats_a: ``(N_a, F)`` features.
        feats_b: ``(N_b, F)`` features.
        sigma: bandwidth; default: the median pairwise distance of the pooled samples (the median
            heuristic).

    Returns:
        The estimate as a Python float (may be slightly negative for equal distributions).
    """
    a = as_features(feats_a, "feats_a")
    b = as_features(feats_b, "feats_b")
    _check_pair(a, b, 2)
    pooled = torch.cat([a, b])
    distances = torch.cdist(pooled, pooled).square()
    if sigma is None:
        upper = distances[torch.triu_indices(len(pooled), len(pooled), offset=1).unbind()]
        median = upper.median().sqrt()
        sigma = float(median) if median > 0 else 1.0
    k = torch.exp(-distances / (2 * float(sigma) ** 2))
    n = len(a)
    return float(_unbiased_mmd2(k[:n, :n], k[n:, n:], k[:n, n:]))
