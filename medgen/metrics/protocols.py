"""Named evaluation protocols for paired image-to-image translation.

A PSNR or SSIM is only comparable with a published one when it is computed the same way: on the
same bit depth, with the same window, the same variance estimator and the same averaging. Two
protocols are offered, by :func:`evaluate_paired` here and by
:func:`~medgen.metrics.evaluate_folders` / ``medgen-eval protocol=...``:

``"float"`` (medgen's default, for medical data in its own units)
    PSNR ``10 log10(R^2 / MSE)`` with the stated data range ``R``; SSIM with an 11x11 Gaussian
    window, sigma 1.5, population moments (Wang et al. 2004); MS-SSIM (Wang et al. 2003); MAE
    ``mean |fake - real|`` in data units; Pearson r over all voxels of each channel, channels
    averaged (as reported by COMI, Zhang et al., CSBJ 2022). Each is a mean over images.

``"bci"`` (the evaluation script of BCI, Liu et al., CVPR-W 2022, arXiv 2204.11425)
    Both images as 8-bit: a float tensor is mapped to ``0..255`` and *truncated* to ``uint8`` as
    pix2pix's ``tensor2im`` does (``(x + 1) / 2 * 255`` for ``[-1, 1]``); files already 8-bit are
    used as they are. PSNR with data range 255 over all channels; SSIM exactly as
    ``skimage.metrics.structural_similarity(a, b, data_range=255, channel_axis=-1)`` with its
    defaults: 7x7 uniform window, sample covariance ``N / (N - 1)``, K1 = 0.01, K2 = 0.03, valid
    region, per channel then averaged. Each is a mean over images. The published BCI numbers
    (Pyramid pix2pix 21.16 dB / 0.477 on the BCI test set) were computed this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from medgen.metrics.pairwise import mae, ms_ssim, pearson_r, psnr, reduce_batch, ssim

__all__ = [
    "BCI_DESCRIPTION",
    "PROTOCOLS",
    "BCIMetrics",
    "bci_metrics",
    "evaluate_paired",
    "float_metrics",
    "to_uint8_bci",
]

#: Names accepted by ``protocol=``.
PROTOCOLS: tuple[str, ...] = ("float", "bci")

#: One line stating what the ``"bci"`` protocol computes.
BCI_DESCRIPTION = (
    "bci (Liu et al. 2022 evaluation script): 8-bit images (float -> uint8 by truncation); "
    "psnr: 10*log10(255^2/MSE) over all channels; ssim: scikit-image structural_similarity "
    "defaults (7x7 uniform window, sample covariance, K1=0.01 K2=0.03, data_range=255, valid "
    "region, per channel then mean); means over images"
)


def to_uint8_bci(x: Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> Tensor:
    """Convert images to 8 bits the way BCI's / pix2pix's ``tensor2im`` does: truncation.

    ``(x - lo) / (hi - lo) * 255`` in float32, clamped to ``[0, 255]`` and truncated (not
    rounded) to ``uint8``. For ``value_range=(-1, 1)`` that is ``(x + 1) / 2 * 255``, for
    ``(0, 1)`` it is ``x * 255``, bit for bit as in the reference code (which does not clamp; its
    tanh outputs never leave the range). ``uint8`` input is returned unchanged.

    Args:
        x: float images of any shape, or ``uint8`` ones.
        value_range: ``(lo, hi)`` of the float images, ``(-1, 1)`` (tanh output) by default.

    Returns:
        ``uint8`` tensor of the same shape.
    """
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(
            f"expected float images (or uint8 ones), got {x.dtype}; convert integer images "
            "of other bit depths explicitly"
        )
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {tuple(value_range)}")
    scaled = (x.to(torch.float32) - lo) / (hi - lo) * 255.0
    return scaled.clamp_(0.0, 255.0).to(torch.uint8)


def bci_metrics(
    fake: Tensor,
    real: Tensor,
    *,
    value_range: Sequence[float] = (-1.0, 1.0),
    reduction: str = "mean",
) -> dict[str, Tensor]:
    """PSNR and SSIM as BCI's evaluation script computes them (Liu et al. 2022).

    Args:
        fake: ``(B, C, *spatial)`` generated images, float in ``value_range`` or ``uint8``.
        real: reference images of the same shape, float in ``value_range`` or ``uint8``.
        value_range: range of float inputs (see :func:`to_uint8_bci`).
        reduction: ``"mean"`` over the batch or ``"none"`` for ``(B,)`` values.

    Returns:
        ``{"psnr": ..., "ssim": ...}`` as float64 tensors (computed in float64, so they agree with
        scikit-image to ~1e-12).
    """
    if fake.shape != real.shape:
        raise ValueError(
            f"fake and real must have the same shape, got {tuple(fake.shape)} and "
            f"{tuple(real.shape)}"
        )
    fake8 = to_uint8_bci(fake, value_range).to(torch.float64)
    real8 = to_uint8_bci(real, value_range).to(torch.float64)
    # PSNR written out in float64 (torchmetrics takes log(data_range) in float32: ~1e-6 dB off
    # scikit-image); identical images give inf, as in scikit-image.
    mse = (fake8 - real8).square().flatten(1).mean(1)
    per_image_psnr = 10.0 * torch.log10(255.0**2 / mse)
    return {
        "psnr": reduce_batch(per_image_psnr, reduction),
        "ssim": ssim(
            fake8,
            real8,
            data_range=255.0,
            kernel_size=7,
            gaussian=False,
            sample_covariance=True,
            reduction=reduction,
        ),
    }


def float_metrics(
    fake: Tensor,
    real: Tensor,
    *,
    data_range: float,
    reduction: str = "mean",
) -> dict[str, Tensor]:
    """The ``"float"`` protocol: PSNR, SSIM, MS-SSIM with ``data_range``, MAE and Pearson r.

    SSIM/MS-SSIM use the 11x11 Gaussian window (sigma 1.5); MS-SSIM uses fewer scales for small
    images (see :func:`~medgen.metrics.ms_ssim`). Nothing is clamped or quantised.

    Args:
        fake: ``(B, C, *spatial)`` generated images in data units.
        real: reference images of the same shape.
        data_range: width of the intensity scale.
        reduction: ``"mean"`` over the batch or ``"none"`` for ``(B,)`` values.

    Returns:
        ``{"psnr", "ssim", "ms_ssim", "mae", "pearson_r"}``.
    """
    return {
        "psnr": psnr(fake, real, data_range=data_range, reduction=reduction),
        "ssim": ssim(fake, real, data_range=data_range, reduction=reduction),
        "ms_ssim": ms_ssim(fake, real, data_range=data_range, reduction=reduction),
        "mae": mae(fake, real, reduction=reduction),
        "pearson_r": pearson_r(fake, real, reduction=reduction),
    }


def evaluate_paired(
    fake: Tensor,
    real: Tensor,
    protocol: str = "float",
    *,
    data_range: float | None = None,
    value_range: Sequence[float] = (-1.0, 1.0),
    reduction: str = "mean",
) -> dict[str, Tensor]:
    """Paired metrics of one batch under a named protocol (``"float"`` or ``"bci"``).

    Args:
        fake: ``(B, C, *spatial)`` generated images.
        real: reference images of the same shape.
        protocol: ``"float"`` (needs ``data_range``) or ``"bci"`` (uses ``value_range``).
        data_range: width of the intensity scale for ``"float"``.
        value_range: range of float images for ``"bci"``.
        reduction: ``"mean"`` over the batch or ``"none"`` for ``(B,)`` values.

    Returns:
        The protocol's metrics by name.
    """
    if protocol == "bci":
        return bci_metrics(fake, real, value_range=value_range, reduction=reduction)
    if protocol == "float":
        if data_range is None:
            raise ValueError("protocol='float' needs data_range= (the width of the scale)")
        return float_metrics(fake, real, data_range=data_range, reduction=reduction)
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


class BCIMetrics(Metric):
    """Accumulate BCI-protocol PSNR and SSIM (Liu et al. 2022) over batches, DDP-synchronised.

    A torchmetrics :class:`~torchmetrics.Metric` holding float64 sums of the per-image values and
    their count, so a LightningModule can report during validation the numbers the BCI paper
    reports, and :meth:`compute` gives the means over all images (across processes under DDP).

    Args:
        value_range: range of float inputs, ``(-1, 1)`` for tanh generators.
        prefix: prepended to every key of :meth:`compute`, e.g. ``"val/bci_"``.
        **kwargs: passed to :class:`~torchmetrics.Metric`.

    Example:
        >>> m = BCIMetrics(prefix="val/")
        >>> m.update(torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1)
        >>> sorted(m.compute())
        ['val/psnr', 'val/ssim']
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, value_range: Sequence[float] = (-1.0, 1.0), prefix: str = "", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.value_range = tuple(float(v) for v in value_range)
        self.prefix = prefix
        for name in ("psnr_total", "ssim_total"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, fake: Tensor, real: Tensor) -> None:
        """Add a batch of ``(B, C, *spatial)`` generated and reference images."""
        values = bci_metrics(fake, real, value_range=self.value_range, reduction="none")
        self.psnr_total += values["psnr"].sum()
        self.ssim_total += values["ssim"].sum()
        self.count += values["psnr"].numel()

    def compute(self) -> dict[str, Tensor]:
        """Means over all images seen since the last :meth:`reset`."""
        return {
            f"{self.prefix}psnr": self.psnr_total / self.count,
            f"{self.prefix}ssim": self.ssim_total / self.count,
        }
