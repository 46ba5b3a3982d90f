"""Metrics for generated medical images.

- :mod:`~medgen.metrics.pairwise`: PSNR, SSIM, MS-SSIM for paired images and volumes, with an
  explicit ``data_range``, plus MAE and Pearson r; :class:`PairwiseMetrics` accumulates them as
  torchmetrics metrics.
- :mod:`~medgen.metrics.protocols`: named evaluation protocols for translation, ``"float"`` and
  ``"bci"`` (BCI's 8-bit PSNR / scikit-image SSIM), with :class:`BCIMetrics` for validation.
- :mod:`~medgen.metrics.fidelity`: offline feature extractors and distribution distances (FID,
  KID, RBF-MMD) for unpaired sets.
- :mod:`~medgen.metrics.evaluate`: :func:`evaluate_folders`, the folder-to-folder entry point.
- :mod:`~medgen.metrics.suite`: :func:`evaluate_generation`, fidelity, diversity, memorisation and
  utility of a synthetic set, with a report (:mod:`~medgen.metrics.report`).
- :mod:`~medgen.metrics.prdc`, :mod:`~medgen.metrics.diversity`, :mod:`~medgen.metrics.audit`,
  :mod:`~medgen.metrics.utility`, :mod:`~medgen.metrics.bootstrap`: the measures themselves;
  :mod:`~medgen.metrics.extraction` (2D / 2.5D / 3D feature protocols) and
  :mod:`~medgen.metrics.cache` (feature cache); :mod:`~medgen.metrics.streaming`
  (:class:`FrechetDistance`, a DDP-synced torchmetrics metric).
"""

from medgen.metrics.audit import AuditResult, memorisation_audit
from medgen.metrics.bootstrap import bootstrap_ci
from medgen.metrics.cache import FeatureCache
from medgen.metrics.diversity import pairwise_ms_ssim
from medgen.metrics.evaluate import evaluate_folders
from medgen.metrics.extraction import FEATURE_PROTOCOLS, extract_features, slice_indices
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
from medgen.metrics.prdc import prdc
from medgen.metrics.protocols import (
    PROTOCOLS,
    BCIMetrics,
    bci_metrics,
    evaluate_paired,
    float_metrics,
    to_uint8_bci,
)
from medgen.metrics.report import write_report
from medgen.metrics.streaming import FrechetDistance
from medgen.metrics.suite import evaluate_generation
from medgen.metrics.utility import dice_per_image, read_labelled_folder, roc_auc, tstr

__all__ = [
    "FEATURE_PROTOCOLS",
    "MS_SSIM_BETAS",
    "PROTOCOLS",
    "AuditResult",
    "BCIMetrics",
    "FeatureCache",
    "FrechetDistance",
    "PairwiseMetrics",
    "PixelFeatures",
    "RandomConvFeatures",
    "TorchvisionFeatures",
    "bci_metrics",
    "bootstrap_ci",
    "dice_per_image",
    "evaluate_folders",
    "evaluate_generation",
    "extract_features",
    "evaluate_paired",
    "float_metrics",
    "frechet_distance",
    "kernel_inception_distance",
    "mae",
    "memorisation_audit",
    "mmd_rbf",
    "ms_ssim",
    "ms_ssim_betas",
    "pairwise_ms_ssim",
    "pearson_r",
    "prdc",
    "psnr",
    "read_labelled_folder",
    "roc_auc",
    "slice_indices",
    "ssim",
    "to_uint8_bci",
    "tstr",
    "write_report",
]
