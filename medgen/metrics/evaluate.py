"""Evaluate a folder of generated images against a folder of real ones.

:func:`evaluate_folders` reads both folders with :func:`medgen.data.io.read` and returns a
JSON-friendly dict. With files of the same names in both folders it measures each pair (PSNR, SSIM,
MS-SSIM, MAE, Pearson r via :class:`~medgen.metrics.pairwise.PairwiseMetrics`: the ``"float"``
protocol; or BCI's 8-bit PSNR/SSIM with ``protocol="bci"``, see :mod:`medgen.metrics.protocols`);
otherwise it compares the two sets as distributions (FID and KID on features from
:mod:`medgen.metrics.fidelity`). The ``protocol`` entry states in one line what exactly was
computed, so a number in a paper can be reproduced.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from medgen.data.io import MedgenIOError, files_by_stem, list_images, read
from medgen.metrics.fidelity import (
    PixelFeatures,
    RandomConvFeatures,
    TorchvisionFeatures,
    frechet_distance,
    kernel_inception_distance,
)
from medgen.metrics.pairwise import PairwiseMetrics, ms_ssim_betas
from medgen.metrics.protocols import BCI_DESCRIPTION, PROTOCOLS, bci_metrics

__all__ = ["evaluate_folders"]

_RANGE_BY_DTYPE = {"uint8": 255.0, "uint16": 65535.0, "bool": 1.0}
_EXTRACTORS = ("pixels", "random_conv", "inception_v3", "resnet50")


def _load(path: Path) -> tuple[Tensor, str]:
    """Read one file; return a plain tensor and the dtype name stored in the file."""
    image = read(path)
    source = str(image.meta.get("source_dtype", str(image.dtype).removeprefix("torch.")))
    tensor = image.as_tensor()
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise MedgenIOError(f"{path}: image contains {bad} NaN/Inf values")
    if tensor.ndim not in (3, 4):
        raise MedgenIOError(
            f"{path}: expected a 2D image or 3D volume, got shape {tuple(tensor.shape)}"
        )
    return tensor, source


class _RangeResolver:
    """Derive ``data_range`` from file dtypes when the caller did not give one."""

    def __init__(self, data_range: float | None) -> None:
        if data_range is not None and not (
            math.isfinite(float(data_range)) and float(data_range) > 0
        ):
            raise ValueError(f"data_range must be a positive number, got {data_range!r}")
        self.given = None if data_range is None else float(data_range)
        self.derived: float | None = None
        self.source: str | None = None
        self.first: Path | None = None

    def check(self, path: Path, source_dtype: str) -> None:
        if self.given is not None:
            return
        value = _RANGE_BY_DTYPE.get(source_dtype)
        if value is None:
            raise MedgenIOError(
                f"{path}: holds {source_dtype} values, which have no fixed range; pass "
                "data_range=R (medgen-eval data_range=R: the width of the intensity scale, e.g. "
                "1.0 for [0, 1] or 4095 for 12-bit CT)"
            )
        if self.derived is None:
            self.derived, self.source, self.first = value, source_dtype, path
        elif value != self.derived:
            raise MedgenIOError(
                f"{path}: holds {source_dtype} values but {self.first} holds {self.source}; pass "
                "data_range=... explicitly to compare files of different bit depths"
            )

    @property
    def value(self) -> float:
        return self.given if self.given is not None else float(self.derived)

    def describe(self) -> str:
        if self.given is not None:
            return f"data_range={self.given:g} (given)"
        return f"data_range={self.value:g} (from {self.source} files)"


def _paired(
    real_stems: dict[str, Path],
    fake_stems: dict[str, Path],
    resolver: _RangeResolver,
    batch_size: int,
    device: torch.device,
) -> dict:
    stems = sorted(real_stems)
    metrics: PairwiseMetrics | None = None
    shapes: set[tuple[int, ...]] = set()
    pending: list[tuple[Tensor, Tensor]] = []
    skipped_windowed = False

    def flush() -> None:
        nonlocal metrics, skipped_windowed
        if not pending:
            return
        pred = torch.stack([f for _, f in pending]).to(device, torch.float32)
        target = torch.stack([r for r, _ in pending]).to(device, torch.float32)
        if metrics is None:
            metrics = PairwiseMetrics(
                data_range=resolver.value,
                spatial_dims=pred.ndim - 2,
                metrics=("psnr", "ssim", "ms_ssim", "mae", "pearson_r"),
            )
            metrics.to(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics.update(pred, target)
        skipped_windowed |= any("skipping" in str(w.message) for w in caught)
        pending.clear()

    spatial_dims = None
    for stem in stems:
        real_path, fake_path = real_stems[stem], fake_stems[stem]
        real, real_dtype = _load(real_path)
        fake, fake_dtype = _load(fake_path)
        if real.shape != fake.shape:
            raise MedgenIOError(
                f"shape mismatch in pair {stem!r}: {real_path} is {tuple(real.shape)} but "
                f"{fake_path} is {tuple(fake.shape)}"
            )
        if spatial_dims is None:
            spatial_dims = real.ndim - 1
        elif real.ndim - 1 != spatial_dims:
            raise MedgenIOError(
                f"{real_path}: {real.ndim - 1}D image among {spatial_dims}D images; evaluate 2D "
                "and 3D data separately"
            )
        resolver.check(real_path, real_dtype)
        resolver.check(fake_path, fake_dtype)
        if pending and (len(pending) == batch_size or pending[0][0].shape != real.shape):
            flush()
        pending.append((real, fake))
        shapes.add(tuple(real.shape[1:]))
    flush()
    assert metrics is not None
    values = {k: float(v) for k, v in metrics.compute().items()}

    if len(shapes) == 1:
        spatial = next(iter(shapes))
        try:
            scales = f"{len(ms_ssim_betas(spatial))} of 5 scales"
        except ValueError:
            scales = "not computed (images smaller than the window)"
        size = "x".join(str(s) for s in spatial)
    else:
        scales, size = "scales by image size", "mixed sizes"
    protocol = (
        f"float protocol, paired by file name, n={len(stems)}, {size}, {resolver.describe()}, "
        "no clamping; psnr: mean over images of 10*log10(R^2/MSE); ssim: 11-voxel Gaussian "
        "window sigma 1.5, K1=0.01 K2=0.03, valid region, mean over images; "
        f"ms_ssim: Wang 2003 betas, {scales}, mean over images; mae: mean |fake-real| in data "
        "units, mean over images; pearson_r: over all voxels per channel, mean over channels, "
        "mean over images"
    )
    result = {
        "mode": "paired",
        "n": len(stems),
        "data_range": resolver.value,
        "protocol": protocol,
        "psnr": values.get("psnr"),
        "ssim": values.get("ssim"),
        "ms_ssim": values.get("ms_ssim"),
        "mae": values.get("mae"),
        "pearson_r": values.get("pearson_r"),
    }
    if skipped_windowed:
        result["protocol"] += "; ssim/ms_ssim skipped: images smaller than the window"
    return result


def _paired_bci(
    real_stems: dict[str, Path], fake_stems: dict[str, Path], device: torch.device
) -> dict:
    """BCI's evaluation (Liu et al. 2022): 8-bit files as stored, PSNR and scikit-image SSIM."""
    psnrs: list[float] = []
    ssims: list[float] = []
    shapes: set[tuple[int, ...]] = set()
    dropped_alpha = False
    for stem in sorted(real_stems):
        pair = []
        for path in (real_stems[stem], fake_stems[stem]):
            tensor, dtype = _load(path)
            if dtype != "uint8":
                raise MedgenIOError(
                    f"{path}: protocol='bci' compares 8-bit images as BCI's evaluation script "
                    f"does, but this file holds {dtype} values; save the images as 8-bit PNG "
                    "(medgen.metrics.protocols.to_uint8_bci converts a [-1, 1] or [0, 1] tensor "
                    "the way the script does) or use protocol='float' with data_range=..."
                )
            if tensor.ndim != 3:
                raise MedgenIOError(
                    f"{path}: protocol='bci' is for 2D images, got shape {tuple(tensor.shape)}"
                )
            if tensor.shape[0] in (2, 4):  # like cv2.imread(path) in the script: no alpha
                tensor, dropped_alpha = tensor[:-1], True
            pair.append(tensor)
        real, fake = pair
        if real.shape != fake.shape:
            raise MedgenIOError(
                f"shape mismatch in pair {stem!r}: {real_stems[stem]} is {tuple(real.shape)} but "
                f"{fake_stems[stem]} is {tuple(fake.shape)}"
            )
        if min(real.shape[1:]) < 7:
            raise MedgenIOError(
                f"{real_stems[stem]}: image of size {tuple(real.shape[1:])} is smaller than the "
                "7x7 SSIM window of protocol='bci'"
            )
        values = bci_metrics(fake[None].to(device), real[None].to(device), reduction="none")
        psnrs.append(float(values["psnr"][0]))
        ssims.append(float(values["ssim"][0]))
        shapes.add(tuple(real.shape))
    n = len(psnrs)
    size = "x".join(str(s) for s in next(iter(shapes))) if len(shapes) == 1 else "mixed sizes"
    protocol = f"{BCI_DESCRIPTION}; paired by file name, n={n}, {size}"
    if dropped_alpha:
        protocol += ", alpha channel dropped"
    return {
        "mode": "paired",
        "n": n,
        "data_range": 255.0,
        "protocol": protocol,
        "psnr": math.fsum(psnrs) / n,
        "ssim": math.fsum(ssims) / n,
    }


def _make_extractor(
    name: str | nn.Module, spatial_dims: int, weights_path, sha256: str | None
) -> tuple[nn.Module, str]:
    if isinstance(name, nn.Module):
        return name, type(name).__name__
    if name == "pixels":
        size = 16 if spatial_dims == 2 else 8  # 8^3 = 512 features keep 3D covariances small
        return PixelFeatures(size), f"pixels ({size}-per-axis average pool of the channel mean)"
    if name == "random_conv":
        return RandomConvFeatures(
            spatial_dims=spatial_dims, seed=0
        ), "random_conv (seed 0, width 64)"
    if name in ("inception_v3", "resnet50"):
        if weights_path is None:
            raise ValueError(
                f"feature_extractor={name!r} needs weights_path= (a local torchvision state dict); "
                "medgen never downloads weights"
            )
        return TorchvisionFeatures(
            name, weights_path, sha256=sha256
        ), f"{name} ({Path(weights_path).name})"
    raise ValueError(
        f"feature_extractor must be one of {_EXTRACTORS} or an nn.Module, got {name!r}"
    )


@torch.inference_mode()
def _features(
    files: list[Path],
    extractor: nn.Module,
    resolver: _RangeResolver,
    batch_size: int,
    device: torch.device,
    spatial_dims: int,
) -> Tensor:
    """Stream ``files`` through ``extractor`` in batches of equal shape; ``(N, F)`` float64."""
    out: list[Tensor] = []
    pending: list[Tensor] = []

    def flush() -> None:
        x = torch.stack(pending).to(device, torch.float32) / resolver.value
        out.append(extractor(x).to("cpu", torch.float64))
        pending.clear()

    for path in files:
        tensor, dtype = _load(path)
        resolver.check(path, dtype)
        if tensor.ndim - 1 != spatial_dims:
            raise MedgenIOError(
                f"{path}: {tensor.ndim - 1}D image among {spatial_dims}D images; evaluate 2D and "
                "3D data separately"
            )
        if pending and (len(pending) == batch_size or pending[0].shape != tensor.shape):
            flush()
        pending.append(tensor)
    if pending:
        flush()
    return torch.cat(out)


def _unpaired(
    real_files: list[Path],
    fake_files: list[Path],
    resolver: _RangeResolver,
    feature_extractor: str | nn.Module,
    weights_path,
    sha256: str | None,
    batch_size: int,
    device: torch.device,
    kid_subsets: int,
    kid_subset_size: int,
) -> dict:
    first, _ = _load(real_files[0])
    extractor, description = _make_extractor(
        feature_extractor, first.ndim - 1, weights_path, sha256
    )
    extractor = extractor.to(device).eval()
    dims = first.ndim - 1
    real = _features(real_files, extractor, resolver, batch_size, device, dims)
    fake = _features(fake_files, extractor, resolver, batch_size, device, dims)
    if min(len(real), len(fake)) < 2:
        raise MedgenIOError(
            f"FID/KID need at least 2 images per folder, got {len(real)} real and {len(fake)} fake"
        )
    subset_size = min(kid_subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="frechet_distance:")
        fid = frechet_distance(real, fake)
    kid_mean, kid_std = kernel_inception_distance(
        real, fake, subsets=kid_subsets, subset_size=subset_size
    )
    protocol = (
        f"unpaired, {len(real)} real vs {len(fake)} fake, features of x/{resolver.value:g} "
        f"({resolver.describe()}) from {description}, F={real.shape[1]}; fid: Frechet distance of "
        f"Gaussian fits (unbiased covariances); kid: unbiased MMD^2, cubic polynomial kernel "
        f"gamma=1/F coef0=1, {kid_subsets} subsets of {subset_size}, seed 0, mean and std"
    )
    return {
        "mode": "unpaired",
        "n_real": len(real),
        "n_fake": len(fake),
        "data_range": resolver.value,
        "protocol": protocol,
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "feature_extractor": feature_extractor
        if isinstance(feature_extractor, str)
        else description,
    }


def evaluate_folders(
    real: str | Path,
    fake: str | Path,
    *,
    mode: str = "auto",
    data_range: float | None = None,
    feature_extractor: str | nn.Module = "pixels",
    weights_path: str | Path | None = None,
    batch_size: int = 16,
    sha256: str | None = None,
    device: str | torch.device = "cpu",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    protocol: str = "float",
) -> dict:
    """Compare generated images in ``fake`` with real ones in ``real``.

    Modes:

    - ``"paired"``: files are matched by :func:`~medgen.data.io.image_stem` (``a.png`` with
      ``a.png``, ``b.nii.gz`` with ``b.nii.gz``); every name must have a partner. Returns
      ``{"mode", "n", "data_range", "protocol", "psnr", "ssim", "ms_ssim", "mae",
      "pearson_r"}``: means over pairs of the per-pair values (``fake`` is the prediction,
      ``real`` the reference; not clamped). ``ssim``/``ms_ssim`` are ``None`` for images smaller
      than the 11-voxel window; MS-SSIM uses fewer than five scales below 176 voxels per side
      (see :func:`~medgen.metrics.ms_ssim`). ``mae`` is in data units; ``pearson_r`` is NaN for
      an image with a constant channel.
    - ``"unpaired"``: returns ``{"mode", "n_real", "n_fake", "data_range", "protocol", "fid",
      "kid_mean", "kid_std", "feature_extractor"}``, features computed from ``x / data_range``.
    - ``"auto"`` (default): paired when both folders hold exactly the same names, else unpaired.

    Protocols (paired metrics; see :mod:`medgen.metrics.protocols`):

    - ``"float"`` (default): the paired metrics above, on the files' values with ``data_range``.
    - ``"bci"``: BCI's evaluation script (Liu et al., CVPR-W 2022): 8-bit files as stored (an
      alpha channel is dropped, as ``cv2.imread`` does), PSNR with data range 255, SSIM as
      ``skimage.metrics.structural_similarity(a, b, data_range=255, channel_axis=-1)``; returns
      ``{"mode", "n", "data_range", "protocol", "psnr", "ssim"}``. Paired only; 2D 8-bit files
      only.

    ``data_range`` (the width of the intensity scale) is derived from the files when omitted:
    255 for 8-bit and 65535 for 16-bit PNG/TIFF/NIfTI. Float files (e.g. most NIfTI, DICOM in HU)
    have no natural range, and an error asks for it. PSNR of identical images is ``inf``
    (``json.dumps`` writes ``Infinity``).

    Args:
        real: folder of reference images.
        fake: folder of generated images.
        mode: ``"auto"``, ``"paired"`` or ``"unpaired"``.
        data_range: width of the intensity scale; derived from integer dtypes when ``None``.
        feature_extractor: ``"pixels"``, ``"random_conv"``, ``"inception_v3"``, ``"resnet50"``
            (the last two need ``weights_path``), or any ``nn.Module`` mapping images to
            ``(B, F)``.
        weights_path: local torchvision weights for ``inception_v3`` / ``resnet50``.
        batch_size: images per forward pass (consecutive images of equal shape are batched).
        sha256: expected SHA-256 of ``weights_path``.
        device: where to compute.
        kid_subsets: KID subsets.
        kid_subset_size: KID subset size, reduced to the smaller folder's size.
        protocol: ``"float"`` or ``"bci"`` (paired metrics only).

    Returns:
        JSON-friendly dict (Python floats, ints and strings).

    Raises:
        MedgenIOError: missing or empty folder, unreadable file, NaN/Inf, unmatched names in
            paired mode (up to 10 listed), shape mismatch within a pair (both files named), float
            files without ``data_range``; with ``protocol="bci"``: files that are not 8-bit.
        ValueError: unknown ``mode``/``protocol``; ``protocol="bci"`` with ``mode="unpaired"``
            or with a ``data_range`` other than 255.
    """
    if mode not in ("auto", "paired", "unpaired"):
        raise ValueError(f"mode must be 'auto', 'paired' or 'unpaired', got {mode!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "bci":
        if mode == "unpaired":
            raise ValueError(
                "protocol='bci' defines paired metrics (PSNR/SSIM of each generated image against "
                "its real partner); use mode='paired' (or 'auto') with the same file names in "
                "both folders, or protocol='float' for unpaired FID/KID"
            )
        if data_range is not None and float(data_range) != 255.0:
            raise ValueError(
                f"protocol='bci' always uses data_range=255 (8-bit images), got {data_range!r}"
            )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    real, fake = Path(real), Path(fake)
    real_files, fake_files = list_images(real), list_images(fake)
    resolver = _RangeResolver(data_range)
    device = torch.device(device)

    if mode != "unpaired":
        real_stems, fake_stems = files_by_stem(real_files, real), files_by_stem(fake_files, fake)
        matched = set(real_stems) == set(fake_stems)
        if (mode == "paired" or protocol == "bci") and not matched:
            only_real = sorted(set(real_stems) - set(fake_stems))
            only_fake = sorted(set(fake_stems) - set(real_stems))
            listed = [f"{real / real_stems[s].name} (no partner in {fake})" for s in only_real]
            listed += [f"{fake / fake_stems[s].name} (no partner in {real})" for s in only_fake]
            more = len(listed) - 10
            raise MedgenIOError(
                ("protocol='bci' is paired only: " if protocol == "bci" else "")
                + "paired evaluation needs the same file names in both folders; "
                f"{len(listed)} unmatched: {', '.join(listed[:10])}"
                + (f", ... and {more} more" if more > 0 else "")
            )
        if matched and protocol == "bci":
            return _paired_bci(real_stems, fake_stems, device)
        if matched:
            return _paired(real_stems, fake_stems, resolver, batch_size, device)
    return _unpaired(
        real_files,
        fake_files,
        resolver,
        feature_extractor,
        weights_path,
        sha256,
        batch_size,
        device,
        kid_subsets,
        kid_subset_size,
    )
