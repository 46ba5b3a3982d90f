"""Diversity among generated samples: mean MS-SSIM of random pairs (lower is more diverse).

Odena, Olah, Shlens ("Conditional image synthesis with auxiliary classifier GANs", ICML 2017)
introduced the mean MS-SSIM over random pairs of samples of one class as a diversity measure; a
generator that collapses onto a few images scores close to 1. The number is only meaningful next
to the same measure on real images (:func:`pairwise_ms_ssim` of the real set), which is the
diversity the data has.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from medgen.metrics.bootstrap import bootstrap_ci
from medgen.metrics.pairwise import ms_ssim, ms_ssim_betas, ssim

__all__ = ["pairwise_ms_ssim"]


def pairwise_ms_ssim(
    images: Tensor, *, data_range: float, pairs: int = 100, seed: int = 0, batch_size: int = 32
) -> dict[str, float | int | str]:
    """Mean MS-SSIM of ``pairs`` random distinct pairs of ``(N, C, *spatial)`` images.

    Pairs are drawn without repetition when ``N (N - 1) / 2 <= pairs`` (then every pair is used).
    MS-SSIM uses as many scales as the image size allows (see
    :func:`~medgen.metrics.ms_ssim_betas`); images smaller than the 11-voxel window use SSIM with a
    window of their smallest side (odd), stated in ``"measure"``.

    Returns:
        ``{"mean", "std", "ci_low", "ci_high", "pairs", "measure"}``: the interval is a 95%
        percentile bootstrap over the pairs (200 rounds).
    """
    if images.ndim not in (4, 5) or len(images) < 2:
        raise ValueError(f"need (N >= 2, C, *spatial) images, got {tuple(images.shape)}")
    n = len(images)
    all_pairs = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    if all_pairs <= pairs:
        index = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    else:
        index = np.empty((pairs, 2), dtype=np.int64)
        seen: set[tuple[int, int]] = set()
        count = 0
        while count < pairs:
            i, j = sorted(rng.choice(n, 2, replace=False).tolist())
            if (i, j) not in seen:
                seen.add((i, j))
                index[count] = (i, j)
                count += 1
    spatial = images.shape[2:]
    try:
        scales = len(ms_ssim_betas(spatial))
        measure = f"ms_ssim ({scales} scales)"
    except ValueError:
        scales = 0
        window = min(spatial) if min(spatial) % 2 else min(spatial) - 1
        measure = f"ssim (window {window}: images smaller than 11)"
    values = []
    x = images.float()
    for start in range(0, len(index), batch_size):
        chunk = torch.as_tensor(index[start : start + batch_size])
        a, b = x[chunk[:, 0]], x[chunk[:, 1]]
        if scales:
            v = ms_ssim(a, b, data_range=data_range, reduction="none")
        else:
            v = ssim(a, b, data_range=data_range, kernel_size=window, reduction="none")
        values.append(v.double().flatten())
    v = torch.cat(values)
    interval = bootstrap_ci(lambda x: float(x.mean()), (v,), n_boot=200, seed=seed)
    return {
        "mean": float(v.mean()),
        "std": float(v.std()) if len(v) > 1 else math.nan,
        "ci_low": interval["ci_low"],
        "ci_high": interval["ci_high"],
        "pairs": len(v),
        "measure": measure,
    }
