"""Metrics for generated medical images.

- :mod:`~medgen.metrics.pairwise`: PSNR, SSIM, MS-SSIM for paired images and volumes, with an
  explicit ``data_range``, plus MAE and Pearson r; :class:`PairwiseMetrics` accumulates them as
  torchmetrics metrics.
- :mod:`~medgen.metrics.protocols`: named evaluation protocols for translation, ``"float"`` and
  ``"bci"`` (BCI's 8-bit PSNR / scikit-image SSIM), with :class:`BCIMetrics` for validation.
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
    mae,
    ms_ssim,
    ms_ssim_betas,
    pearson_r,
    psnr,
    ssim,
)
from medgen.metrics.protocols import (
    PROTOCOLS,
    BCIMetrics,
    bci_metrics,
    evaluate_paired,
    float_metrics,
    to_uint8_bci,
)

__all__ = [
    "MS_SSIM_BETAS",
    "PROTOCOLS",
    "BCIMetrics",
    "PairwiseMetrics",
    "PixelFeatures",
    "RandomConvFeatures",
    "TorchvisionFeatures",
    "bci_metrics",
    "evaluate_folders",
    "evaluate_paired",
    "float_metrics",
    "frechet_distance",
    "kernel_inception_distance",
    "mae",
    "mmd_rbf",
    "ms_ssim",
    "ms_ssim_betas",
    "pearson_r",
    "psnr",
    "ssim",
    "to_uint8_bci",
]
