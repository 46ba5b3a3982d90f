"""Full-reference metrics for paired images and volumes: PSNR, SSIM, MS-SSIM, MAE, Pearson r.

Every function takes ``(B, C, H, W)`` or ``(B, C, D, H, W)`` tensors and a keyword-only
``data_range`` (the width of the intensity scale, e.g. 255 for 8-bit, 65535 for 16-bit, 1 for
``[0, 1]`` floats; never guessed from the data). Each returns the mean of the per-image values
over the batch, or the per-image values with ``reduction="none"``. Inputs are **not** clamped to
the data range: a prediction that overshoots is measured as it is.

PSNR goes through :func:`torchmetrics.functional.peak_signal_noise_ratio`. SSIM and MS-SSIM are
our own (about 60 lines) because torchmetrics 1.9 deviates from the published definition in ways we
measured: (1) with a Gaussian window it ignores ``kernel_size`` (it derives the size from
``sigma``); (2) it averages the SSIM map over reflection-padded borders, which differs from
scikit-image and Wang et al.'s reference code by up to 5e-3 at an 11x11 window on a 200x150 image;
(3) its MS-SSIM size check is only right for exactly five scales and ignores the depth of volumes.
Here the SSIM map is computed on the *valid* region only (every window fully inside the image),
exactly like ``skimage.metrics.structural_similarity(..., use_sample_covariance=False)`` and like
torchmetrics' own SSIM map with its padded border cut off; both equalities are tested. With
``sample_covariance=True`` it is scikit-image's default ``use_sample_covariance=True`` instead.

MAE and Pearson r (used e.g. by COMI, Zhang et al., CSBJ 2022) need no data range: MAE is in the
data's units, Pearson r is scale-free.

References:
    Wang, Bovik, Sheikh, Simoncelli. "Image quality assessment: from error visibility to structural
    similarity." IEEE TIP 13(4), 2004 (SSIM, Eq. 13; window 11x11 Gaussian, sigma 1.5,
    K1 = 0.01, K2 = 0.03).
    Wang, Simoncelli, Bovik. "Multiscale structural similarity for image quality assessment."
    Asilomar Conference on Signals, Systems and Computers, 2003 (MS-SSIM, Eq. 7 and the five
    exponents 0.0448, 0.2856, 0.3001, 0.2363, 0.1333).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio

__all__ = [
    "MS_SSIM_BETAS",
    "PairwiseMetrics",
    "mae",
    "ms_ssim",
    "ms_ssim_betas",
    "pearson_r",
    "psnr",
    "reduce_batch",
    "ssim",
]

#: MS-SSIM exponents for scales 1 (finest) to 5, Wang et al. 2003.
MS_SSIM_BETAS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

_REDUCTIONS = ("mean", "none")


def _prepare(pred: Tensor, target: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """Validate shapes and data range; return both in one floating dtype (at least float32)."""
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError("pred and target must be torch tensors")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if pred.ndim not in (4, 5):
        raise ValueError(
            f"expected (B, C, H, W) or (B, C, D, H, W) tensors, got shape {tuple(pred.shape)}"
        )
    if isinstance(data_range, bool) or not float(data_range) > 0:
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    dtype = torch.promote_types(pred.dtype, target.dtype)
    if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return pred.to(dtype), target.to(dtype)


def reduce_batch(values: Tensor, reduction: str) -> Tensor:
    """Reduce per-image values ``(B,)`` over the batch as ``reduction`` says.

    Args:
        values: One value per image, ``(B,)``.
        reduction: ``"mean"`` (the batch mean, a scalar) or ``"none"`` (``values`` unchanged).

    Returns:
        A scalar or ``values``.

    Raises:
        ValueError: An unknown ``reduction``.
    """
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


_reduce = reduce_batch  # the old private name


def psnr(pred: Tensor, target: Tensor, *, data_range: float, reduction: str = "mean") -> Tensor:
    """Peak signal-to-noise ratio ``10 * log10(data_range**2 / MSE)`` in dB, per image.

    The MSE is taken over all channels and voxels of one image; the batch value is the mean of the
    per-image PSNRs (not the PSNR of the batch MSE). Identical images give ``inf``.

    Args:
        pred: ``(B, C, *spatial)`` prediction.
        target: reference of the same shape.
        data_range: width of the intensity scale (keyword-only, required).
        reduction: ``"mean"`` over the batch or ``"none"`` for ``(B,)`` values.

    Returns:
        Scalar or ``(B,)`` tensor.
    """
    pred, target = _prepare(pred, target, data_range)
    per_image = peak_signal_noise_ratio(
        pred,
        target,
        data_range=float(data_range),
        dim=tuple(range(1, pred.ndim)),
        reduction="none",
    )
    return reduce_batch(per_image, reduction)


@functools.lru_cache(maxsize=32)
def _window_cpu(kernel_size: int, sigma: float, gaussian: bool) -> Tensor:
    if gaussian:
        x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
        window = torch.exp(-(x**2) / (2 * sigma**2))
    else:
        window = torch.ones(kernel_size, dtype=torch.float64)
    return window / window.sum()


def _filter_valid(x: Tensor, window: Tensor) -> Tensor:
    """Separable filtering of ``(N, C, *spatial)`` with a 1D window along every spatial axis, no padding."""
    n, c, *spatial = x.shape
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    y = x.reshape(n * c, 1, *spatial)
    for axis in range(len(spatial)):
        shape = [1, 1] + [1] * len(spatial)
        shape[2 + axis] = window.numel()
        y = conv(y, window.view(shape))
    return y.reshape(n, c, *y.shape[2:])


def _check_kernel(kernel_size: int, sigma: float) -> None:
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")


def _ssim_terms(
    pred: Tensor,
    target: Tensor,
    data_range: float,
    kernel_size: int,
    sigma: float,
    gaussian: bool,
    k1: float,
    k2: float,
    sample_covariance: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-image mean SSIM and mean contrast-structure term ``cs`` over the valid region.

    ``SSIM = l * cs`` with ``l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)`` and
    ``cs = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2)`` (Wang et al. 2004, Eq. 13),
    local statistics weighted by the window, population (biased) moments; with
    ``sample_covariance`` the (co)variances are multiplied by ``N / (N - 1)``, ``N`` the number of
    voxels in the window (scikit-image's ``use_sample_covariance=True``).
    """
    spatial = pred.shape[2:]
    if min(spatial) < kernel_size:
        raise ValueError(
            f"images of spatial size {tuple(spatial)} are smaller than the SSIM window "
            f"kernel_size={kernel_size}"
        )
    window = _window_cpu(int(kernel_size), float(sigma), bool(gaussian)).to(pred.device, pred.dtype)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    # Shift both images by the same per-channel offset: variances and covariance are unchanged, but
    # E[x^2] - E[x]^2 loses far less precision in float32 for data far from zero (16-bit, HU).
    offset = target.mean(dim=tuple(range(2, target.ndim)), keepdim=True)
    p, t = pred - offset, target - offset
    stats = _filter_valid(torch.cat([p, t, p * p, t * t, p * t]), window)
    mu_p, mu_t, e_pp, e_tt, e_pt = stats.split(pred.shape[0])
    var_p = e_pp - mu_p * mu_p
    var_t = e_tt - mu_t * mu_t
    cov = e_pt - mu_p * mu_t
    if sample_covariance:
        n = kernel_size ** len(spatial)
        var_p, var_t, cov = (v * (n / (n - 1)) for v in (var_p, var_t, cov))
    mu_p = mu_p + offset
    mu_t = mu_t + offset
    cs_map = (2 * cov + c2) / (var_p + var_t + c2)
    luminance = (2 * mu_p * mu_t + c1) / (mu_p * mu_p + mu_t * mu_t + c1)
    ssim_map = luminance * cs_map
    return ssim_map.flatten(1).mean(1), cs_map.flatten(1).mean(1)


def ssim(
    pred: Tensor,
    target: Tensor,
    *,
    data_range: float,
    kernel_size: int = 11,
    sigma: float = 1.5,
    gaussian: bool = True,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
    sample_covariance: bool = False,
) -> Tensor:
    """Structural similarity (Wang et al. 2004) for 2D images or 3D volumes.

    The SSIM map is computed with a separable ``kernel_size`` window (Gaussian with ``sigma``,
    normalised to sum 1, or uniform when ``gaussian=False``) at every position where the window
    lies fully inside the image, and averaged over those positions and the channels. This is
    ``skimage.metrics.structural_similarity(x, y, data_range=R, win_size=k,
    gaussian_weights=not uniform, sigma=sigma, use_sample_covariance=False)``; scikit-image's
    default ``use_sample_covariance=True`` rescales variances by ``N / (N - 1)`` and gives slightly
    different values; pass ``sample_covariance=True`` for those. scikit-image's defaults
    (``structural_similarity(x, y, data_range=R)``, also with ``channel_axis``) are therefore
    ``ssim(x, y, data_range=R, kernel_size=7, gaussian=False, sample_covariance=True)``.

    Args:
        pred: ``(B, C, *spatial)`` prediction, 2 or 3 spatial dims, each at least ``kernel_size``.
        target: reference of the same shape.
        data_range: width of the intensity scale (keyword-only, required); sets
            ``C1 = (k1 R)^2`` and ``C2 = (k2 R)^2``.
        kernel_size: odd window size.
        sigma: Gaussian standard deviation (ignored for the uniform window).
        gaussian: Gaussian (default) or uniform window.
        k1: luminance stabiliser.
        k2: contrast stabiliser.
        reduction: ``"mean"`` over the batch or ``"none"`` for ``(B,)`` values.
        sample_covariance: unbiased local (co)variances, ``N / (N - 1)`` times the population
            ones for a window of ``N`` voxels (scikit-image's default); off by default
            (Wang et al.'s definition).

    Returns:
        Scalar or ``(B,)`` tensor; identical images give exactly 1.
    """
    pred, target = _prepare(pred, target, data_range)
    _check_kernel(kernel_size, sigma)
    values, _ = _ssim_terms(
        pred,
        target,
        float(data_range),
        kernel_size,
        sigma,
        gaussian,
        k1,
        k2,
        sample_covariance=bool(sample_covariance),
    )
    return reduce_batch(values, reduction)


def _num_scales(spatial_shape: Sequence[int], kernel_size: int, max_scales: int) -> int:
    """Largest number of scales ``s <= max_scales`` with ``min(spatial) >= kernel_size * 2**(s-1)``.

    Scale ``j`` (1-based) sees ``floor(n / 2**(j-1))`` voxels per side after repeated 2x average
    pooling; a valid window position needs at least ``kernel_size`` of them.
    """
    smallest = min(int(n) for n in spatial_shape)
    scales = 0
    while scales < max_scales and smallest >= kernel_size * 2**scales:
        scales += 1
    return scales


def ms_ssim_betas(
    spatial_shape: Sequence[int],
    kernel_size: int = 11,
    betas: Sequence[float] | None = None,
) -> tuple[float, ...]:
    """Exponents MS-SSIM uses for images of ``spatial_shape``.

    MS-SSIM halves the image ``len(betas) - 1`` times; every scale needs
    ``min(spatial_shape) >= kernel_size * 2**(scale - 1)`` so that at least one window fits. When
    the image is too small for all scales, the largest number of leading (finest) scales that fits
    is used and their exponents are renormalised to sum to 1, so a perfect match still scores 1.

    Args:
        spatial_shape: ``(H, W)`` or ``(D, H, W)``.
        kernel_size: SSIM window size.
        betas: exponents, finest scale first; default :data:`MS_SSIM_BETAS`.

    Returns:
        The exponents actually used (all of ``betas`` when the image is large enough).

    Raises:
        ValueError: if not even one scale fits.
    """
    betas = tuple(float(b) for b in (MS_SSIM_BETAS if betas is None else betas))
    if not betas or any(b < 0 for b in betas) or sum(betas) <= 0:
        raise ValueError(f"betas must be non-negative with a positive sum, got {betas}")
    scales = _num_scales(spatial_shape, kernel_size, len(betas))
    if scales == 0:
        raise ValueError(
            f"images of spatial size {tuple(spatial_shape)} are too small for MS-SSIM with "
            f"kernel_size={kernel_size}: even one scale needs every side >= {kernel_size}"
        )
    if scales == len(betas):
        return betas
    total = sum(betas[:scales])
    return tuple(b / total for b in betas[:scales])


def ms_ssim(
    pred: Tensor,
    target: Tensor,
    *,
    data_range: float,
    kernel_size: int = 11,
    sigma: float = 1.5,
    betas: Sequence[float] | None = None,
    gaussian: bool = True,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> Tensor:
    """Multi-scale SSIM (Wang et al. 2003, Eq. 7) for 2D images or 3D volumes.

    ``MS-SSIM = prod_{j<M} cs_j ** beta_j * ssim_M ** beta_M``: the contrast-structure term at the
    ``M - 1`` finer scales and the full SSIM at the coarsest, each scale obtained by 2x average
    pooling (in all spatial dims for volumes). The per-scale terms are clamped at 0 before the
    fractional powers (as in torchmetrics' and pytorch-msssim's ``normalize="relu"``); without it,
    anti-correlated images give NaN.

    Scale reduction: with the default five scales and an 11-voxel window, the smallest side must be
    at least 176. Smaller images use the largest number of leading scales that fits, with exponents
    renormalised to sum to 1 (see :func:`ms_ssim_betas`), and a warning; e.g. 64x64 uses three
    scales with exponents ``(0.0448, 0.2856, 0.3001) / 0.6305``. MS-SSIM values computed with
    different numbers of scales are not comparable; report the image size with them.

    Args:
        pred: ``(B, C, *spatial)`` prediction.
        target: reference of the same shape.
        data_range: width of the intensity scale (keyword-only, required).
        kernel_size: odd SSIM window size.
        sigma: Gaussian standard deviation.
        betas: exponents, finest scale first; default :data:`MS_SSIM_BETAS`.
        gaussian: Gaussian (default) or uniform window.
        k1: luminance stabiliser.
        k2: contrast stabiliser.
        reduction: ``"mean"`` over the batch or ``"none"`` for ``(B,)`` values.

    Returns:
        Scalar or ``(B,)`` tensor.

    Raises:
        ValueError: if the images are too small for even one scale (the message gives the sizes).
    """
    pred, target = _prepare(pred, target, data_range)
    _check_kernel(kernel_size, sigma)
    requested = MS_SSIM_BETAS if betas is None else tuple(betas)
    used = ms_ssim_betas(pred.shape[2:], kernel_size, requested)
    if len(used) < len(requested):
        warnings.warn(
            f"MS-SSIM: images of spatial size {tuple(pred.shape[2:])} fit only {len(used)} of "
            f"{len(requested)} scales with kernel_size={kernel_size}; using the first {len(used)} "
            "with exponents renormalised to sum to 1",
            stacklevel=2,
        )
    pool = F.avg_pool2d if pred.ndim == 4 else F.avg_pool3d
    terms = []
    for scale in range(len(used)):
        sim, cs = _ssim_terms(pred, target, float(data_range), kernel_size, sigma, gaussian, k1, k2)
        if scale < len(used) - 1:
            terms.append(torch.relu(cs))
            pred, target = pool(pred, 2), pool(target, 2)
        else:
            terms.append(torch.relu(sim))
    exponents = torch.tensor(used, dtype=pred.dtype, device=pred.device)
    values = torch.prod(torch.stack(terms, dim=0) ** exponents[:, None], dim=0)
    return reduce_batch(values, reduction)


def _wide(x: Tensor) -> Tensor:
    """``x`` in float64 (float32 on MPS, which has no float64)."""
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError("pred and target must be torch tensors")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if pred.ndim < 3:
        raise ValueError(f"expected (B, C, *spatial) tensors, got shape {tuple(pred.shape)}")


def mae(pred: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Mean absolute error ``mean |pred - target|`` per image, in the data's units.

    Computed in float64 over all channels and voxels of each image; not clamped.

    Args:
        pred: ``(B, C, *spatial)`` prediction.
        target: reference of the same shape.
        reduction: ``"mean"`` over the batch or ``"none"`` for ``(B,)`` values.

    Returns:
        Scalar or ``(B,)`` float64 tensor.
    """
    _check_pair(pred, target)
    diff = _wide(pred) - _wide(target)
    return reduce_batch(diff.abs().flatten(1).mean(1), reduction)


def pearson_r(pred: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Pearson correlation coefficient per image: over all voxels of each channel, channels averaged.

    ``r = sum((x - mean x)(y - mean y)) / sqrt(sum((x - mean x)^2) sum((y - mean y)^2))``, computed
    in float64. As in COMI (Zhang et al., CSBJ 2022), a measure of structural agreement that
    ignores global intensity scale and offset. A channel that is constant in either image has no
    correlation and gives NaN (like ``scipy.stats.pearsonr``), which the image's value inherits.

    Args:
        pred: ``(B, C, *spatial)`` prediction.
        target: reference of the same shape.
        reduction: ``"mean"`` over the batch or ``"none"`` for ``(B,)`` values.

    Returns:
        Scalar or ``(B,)`` float64 tensor in ``[-1, 1]``.
    """
    _check_pair(pred, target)
    x = _wide(pred).flatten(2)
    y = _wide(target).flatten(2)
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    r = (x * y).sum(-1) / torch.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    return reduce_batch(r.clamp(-1.0, 1.0).mean(1), reduction)


class _PerImageMean(Metric):
    """Running mean of a per-image metric; states are sums, so they reduce across processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        self.fn = fn
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        values = self.fn(pred, target).detach()
        self.total += values.to(torch.float64).sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).to(torch.float32)


_METRIC_FNS = {
    "psnr": psnr,
    "ssim": ssim,
    "ms_ssim": ms_ssim,
    "mae": mae,
    "pearson_r": pearson_r,
}
_NEEDS_RANGE = ("psnr", "ssim", "ms_ssim")
_WINDOWED = ("ssim", "ms_ssim")  # need at least one full window inside the image


class PairwiseMetrics(nn.Module):
    """Accumulate PSNR, SSIM, MS-SSIM (and optionally MAE, Pearson r) over paired batches.

    Each metric is a torchmetrics :class:`~torchmetrics.Metric` holding the sum of per-image values
    and their count, so :meth:`compute` returns the mean over all images seen (for PSNR: the mean
    of per-image PSNRs, not the PSNR of the pooled MSE) and synchronises across processes under
    DDP. Predictions are **not** clamped into the data range.

    If the images are too small for even one MS-SSIM scale (a side shorter than ``kernel_size``),
    the MS-SSIM entry is skipped (left out of :meth:`compute`) with a single warning; SSIM, which
    needs the same single window, is skipped with it. The number of MS-SSIM scales follows the
    image size (see :func:`ms_ssim`).

    Args:
        data_range: width of the intensity scale (required).
        spatial_dims: 2 for ``(B, C, H, W)``, 3 for ``(B, C, D, H, W)``.
        metrics: any of ``"psnr"``, ``"ssim"``, ``"ms_ssim"``, ``"mae"``, ``"pearson_r"``.
        prefix: prepended to every key of :meth:`compute`, e.g. ``"val/"``.
        kernel_size: SSIM / MS-SSIM window size.
        sigma: Gaussian window standard deviation.
        gaussian: Gaussian (default) or uniform window.
        sample_covariance: unbiased local (co)variances in SSIM (scikit-image's default; see
            :func:`ssim`); MS-SSIM always uses the population ones.

    Example:
        >>> m = PairwiseMetrics(data_range=1.0, metrics=("psnr", "ssim"), prefix="val/")
        >>> m.update(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32))
        >>> sorted(m.compute())
        ['val/psnr', 'val/ssim']
    """

    def __init__(
        self,
        data_range: float,
        spatial_dims: int = 2,
        metrics: Sequence[str] = ("psnr", "ssim", "ms_ssim"),
        prefix: str = "",
        *,
        kernel_size: int = 11,
        sigma: float = 1.5,
        gaussian: bool = True,
        sample_covariance: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if isinstance(metrics, str):
            metrics = (metrics,)
        unknown = [m for m in metrics if m not in _METRIC_FNS]
        if unknown or not metrics:
            raise ValueError(f"unknown metrics {unknown}; choose from {sorted(_METRIC_FNS)}")
        if isinstance(data_range, bool) or not float(data_range) > 0:
            raise ValueError(f"data_range must be a positive number, got {data_range!r}")
        _check_kernel(kernel_size, sigma)
        self.data_range = float(data_range)
        self.spatial_dims = spatial_dims
        self.prefix = prefix
        self.kernel_size = kernel_size
        window = {"kernel_size": kernel_size, "sigma": sigma, "gaussian": gaussian}
        self.metrics = nn.ModuleDict()
        for name in dict.fromkeys(metrics):
            kwargs = {"reduction": "none"}
            if name in _NEEDS_RANGE:
                kwargs["data_range"] = self.data_range
            if name in _WINDOWED:
                kwargs.update(window)
            if name == "ssim" and sample_covariance:
                kwargs["sample_covariance"] = True
            self.metrics[name] = _PerImageMean(functools.partial(_METRIC_FNS[name], **kwargs))
        self._too_small_warned = False

    def _check(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                f"{tuple(target.shape)}"
            )
        if pred.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected {self.spatial_dims + 2}D input (B, C, *spatial) for "
                f"spatial_dims={self.spatial_dims}, got shape {tuple(pred.shape)}"
            )

    def _window_fits(self, pred: Tensor) -> bool:
        if _num_scales(pred.shape[2:], self.kernel_size, 1) > 0:
            return True
        if not self._too_small_warned:
            skipped = [n for n in self.metrics if n in _WINDOWED]
            warnings.warn(
                f"PairwiseMetrics: images of spatial size {tuple(pred.shape[2:])} are smaller than "
                f"the window kernel_size={self.kernel_size}; skipping {', '.join(skipped)} "
                "(pass a smaller kernel_size to compute them)",
                stacklevel=4,  # caller -> torch.no_grad wrapper -> update/forward -> here
            )
            self._too_small_warned = True
        return False

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of ``(B, C, *spatial)`` predictions and references."""
        self._check(pred, target)
        for name, metric in self.metrics.items():
            if name in _WINDOWED and not self._window_fits(pred):
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="MS-SSIM: images of spatial size")
                metric.update(pred, target)

    @torch.no_grad()
    def forward(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Update with a batch and return this batch's values (torchmetrics ``forward`` semantics)."""
        self._check(pred, target)
        out = {}
        for name, metric in self.metrics.items():
            if name in _WINDOWED and not self._window_fits(pred):
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="MS-SSIM: images of spatial size")
                out[f"{self.prefix}{name}"] = metric(pred, target)
        return out

    def compute(self) -> dict[str, Tensor]:
        """Mean of the per-image values over everything seen since the last :meth:`reset`."""
        out = {}
        for name, metric in self.metrics.items():
            if name in _WINDOWED and metric.update_count == 0 and self._too_small_warned:
                continue
            out[f"{self.prefix}{name}"] = metric.compute()
        return out

    def reset(self) -> None:
        """Forget all accumulated values."""
        for metric in self.metrics.values():
            metric.reset()
