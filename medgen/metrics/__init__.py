"""Metrics for generated medical images.

- :mod:`~medgen.metrics.pairwise`: PSNR, SSIM, MS-SSIM for paired images and volumes, with an
  explicit ``data_range``; :class:`PairwiseMetrics` accumulates them as torchmetrics metrics.
- :mod:`~medgen.metrics.fidelity`: offline feature extractors and distribution distances (FID,
  KID, RBF-MMD) for unpaired sets.
- :mod:`~medgen.metrics.evaluate`: :func:`evaluate_folders`, the folder-to-folder entry point.
"""

from medgen.metrics.evaluate import evaluate_folders
from medgen.metrics.fidelity import (
    PixelFeatures,
    RandomConvFeatures,
    TorchvisionFeatures,
    frechet_distance,
    kernel_inception_distance,
    mmd_rbf,
)
from medgen.metrics.pairwise import (
    MS_SSIM_BETAS,
    PairwiseMetrics,
    ms_ssim,
    ms_ssim_betas,
    psnr,
    ssim,
)

__all__ = [
    "MS_SSIM_BETAS",
    "PairwiseMetrics",
    "PixelFeatures",
    "RandomConvFeatures",
    "TorchvisionFeatures",
    "evaluate_folders",
    "frechet_distance",
    "kernel_inception_distance",
    "mmd_rbf",
    "ms_ssim",
    "ms_ssim_betas",
    "psnr",
    "ssim",
]
