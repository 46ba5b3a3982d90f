"""Memorisation audit: is any synthetic sample a copy of a training image?

Diffusion models trained on medical images copy a share of their training images (Dar, Ghanaat,
Kahmann, Engelhardt, "Unconditional latent diffusion models memorize patient imaging data:
implications for openly sharing synthetic data", 2024; for natural images: Carlini et al.,
"Extracting training data from diffusion models", USENIX Security 2023; Somepalli et al.,
"Diffusion art or digital forgery?", CVPR 2023). :func:`memorisation_audit` finds, for every
synthetic sample, its nearest training image

- in pixel space: the normalised (Pearson) correlation of the two images on a common grid (the
  channel mean, average-pooled to ``size`` voxels per axis: 64 for 2D, 16 for 3D), maximised over
  the sample's flips along each axis and its shifts by up to ``max_shift`` grid cells per axis
  (circular), so mirrored and slightly moved copies are found;
- in feature space (when an extractor or features are given): the Euclidean distance.

The *baseline* is the same measure from every held-out real image (``holdout``: real images the
model was not trained on) to the training set: how close an independent image of the same
population comes by chance. Without a held-out set, the leave-one-out distances among the
training images are used instead (and the summary says so).

Threshold (documented in docs/evaluation.md): with pixel distance ``d = 1 - correlation``, a
sample is flagged when ``d < ratio * quantile(baseline d, q)``, by default half the 5th
percentile (``ratio=0.5, q=0.05``) of the held-out-to-training distances: markedly closer to a
training image than all but the closest 5% of genuinely independent images. The same rule applies
to feature distances. The copy rate is the fraction of samples flagged by either.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AuditResult", "memorisation_audit", "pixel_nearest", "prepare_grid"]


def prepare_grid(images: Sequence[Tensor] | Tensor, size: int) -> Tensor:
    """Channel mean of each ``(C, *spatial)`` image, average-pooled to ``size`` per axis."""
    out = []
    for x in images:
        x = x.float().mean(dim=0, keepdim=True)[None]
        pool = F.adaptive_avg_pool2d if x.ndim == 4 else F.adaptive_avg_pool3d
        out.append(pool(x, size)[0, 0])
    return torch.stack(out)


def _normalise(x: Tensor) -> Tensor:
    flat = x.flatten(1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _variants(x: Tensor, max_shift: int) -> tuple[Tensor, list[str]]:
    """``(N, V, *grid)`` flipped and shifted versions of ``(N, *grid)``, with their names."""
    dims = x.ndim - 1
    flips: list[tuple[str, Tensor]] = [("", x)]
    flips += [(f"flip{a}", x.flip(a + 1)) for a in range(dims)]
    shifts = list(itertools.product(range(-max_shift, max_shift + 1), repeat=dims))
    out, names = [], []
    for name, flipped in flips:
        for shift in shifts:
            moved = flipped.roll(shift, dims=tuple(range(1, dims + 1))) if any(shift) else flipped
            out.append(moved)
            label = [name] if name else []
            if any(shift):
                label.append("shift" + ",".join(str(s) for s in shift))
            names.append("+".join(label) or "identity")
    return torch.stack(out, dim=1), names


def pixel_nearest(
    queries: Tensor,
    references: Tensor,
    max_shift: int = 2,
    exclude_self: bool = False,
    batch_size: int = 32,
) -> tuple[Tensor, Tensor, list[str]]:
    """Best correlation of each query (over its flips and shifts) with any reference.

    Args:
        queries: ``(N, *grid)`` (from :func:`prepare_grid`).
        references: ``(M, *grid)``.
        max_shift: largest circular shift per axis, in grid cells.
        exclude_self: queries and references are the same set: ignore query ``i`` vs reference
            ``i`` (leave-one-out).
        batch_size: queries per matrix product.

    Returns:
        ``(similarity (N,), nearest index (N,), transform name per query)``.
    """
    # float32 products: correlations to ~1e-6, far below any threshold in use, at twice the speed
    refs = _normalise(references).float()
    best, nearest, how = [], [], []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        variants, names = _variants(chunk, max_shift)
        v = variants.shape[1]
        sims = (_normalise(variants.flatten(0, 1)).float() @ refs.T).view(len(chunk), v, len(refs))
        if exclude_self:
            rows = torch.arange(len(chunk))
            sims[rows, :, start + rows] = -2.0
        per_ref, which = sims.max(dim=1)  # (n, M): best variant per reference
        value, index = per_ref.max(dim=1)
        best.append(value)
        nearest.append(index)
        how += [names[int(which[i, index[i]])] for i in range(len(chunk))]
    return torch.cat(best), torch.cat(nearest), how


def _feature_nearest(
    queries: Tensor, references: Tensor, exclude_self: bool = False
) -> tuple[Tensor, Tensor]:
    d = torch.cdist(queries.double(), references.double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(dim=1)


def _threshold(baseline: Tensor, quantile: float, ratio: float) -> float:
    return ratio * float(torch.quantile(baseline.double(), quantile))


@dataclass
class AuditResult:
    """Per-sample nearest training images, baselines, thresholds and flags of an audit."""

    pixel_similarity: Tensor
    pixel_nearest: Tensor
    pixel_transform: list[str]
    baseline_pixel_similarity: Tensor
    pixel_threshold: float
    flagged_pixel: Tensor
    feature_distance: Tensor | None = None
    feature_nearest: Tensor | None = None
    baseline_feature_distance: Tensor | None = None
    feature_threshold: float | None = None
    flagged_feature: Tensor | None = None
    baseline: str = "holdout"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> Tensor:
        """``(N,)`` bool: flagged in pixel or in feature space."""
        if self.flagged_feature is None:
            return self.flagged_pixel
        return self.flagged_pixel | self.flagged_feature

    def top_k(self, k: int = 8) -> list[int]:
        """Indices of the ``k`` samples with the highest pixel correlation to a training image."""
        order = torch.argsort(self.pixel_similarity, descending=True)
        return [int(i) for i in order[:k]]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly numbers: copy rate, thresholds, distances against the baseline."""
        out: dict[str, Any] = {
            "n_samples": len(self.pixel_similarity),
            "n_baseline": len(self.baseline_pixel_similarity),
            "baseline": self.baseline,
            "copy_rate": float(self.flagged.double().mean()),
            "n_flagged": int(self.flagged.sum()),
            "flagged": [int(i) for i in torch.nonzero(self.flagged).flatten()],
            "pixel": {
                "threshold_correlation": 1.0 - self.pixel_threshold,
                "copy_rate": float(self.flagged_pixel.double().mean()),
                "sample_to_train_median": float(self.pixel_similarity.median()),
                "baseline_to_train_median": float(self.baseline_pixel_similarity.median()),
                "sample_to_train_max": float(self.pixel_similarity.max()),
                "baseline_to_train_max": float(self.baseline_pixel_similarity.max()),
            },
            "settings": dict(self.settings),
        }
        if self.feature_distance is not None:
            assert self.baseline_feature_distance is not None and self.flagged_feature is not None
            out["feature"] = {
                "threshold_distance": self.feature_threshold,
                "copy_rate": float(self.flagged_feature.double().mean()),
                "sample_to_train_median": float(self.feature_distance.median()),
                "baseline_to_train_median": float(self.baseline_feature_distance.median()),
                "sample_to_train_min": float(self.feature_distance.min()),
                "baseline_to_train_min": float(self.baseline_feature_distance.min()),
            }
        return out

    def save_pairs_figure(
        self,
        path: str | Path,
        samples: Sequence[Tensor],
        train: Sequence[Tensor],
        k: int = 8,
    ) -> Path:
        """Side-by-side figure of the ``k`` closest (sample, training image) pairs."""
        from medgen.metrics.figures import save_pairs

        rows = []
        for i in self.top_k(k):
            j = int(self.pixel_nearest[i])
            flag = " FLAGGED" if bool(self.flagged[i]) else ""
            label = (
                f"sample {i} / train {j}: r={float(self.pixel_similarity[i]):.3f} "
                f"({self.pixel_transform[i]}){flag}"
            )
            rows.append((samples[i], train[j], label))
        return save_pairs(path, rows)


def memorisation_audit(
    samples: Sequence[Tensor] | Tensor,
    train: Sequence[Tensor] | Tensor,
    holdout: Sequence[Tensor] | Tensor | None = None,
    *,
    extractor: nn.Module | None = None,
    features: dict[str, Tensor] | None = None,
    size: int | None = None,
    max_shift: int | None = None,
    quantile: float = 0.05,
    ratio: float = 0.5,
    batch_size: int = 32,
) -> AuditResult:
    """Audit ``samples`` for copies of ``train`` images (see the module docstring).

    Args:
        samples: synthetic ``(C, *spatial)`` images, in the same units as ``train``.
        train: the training images.
        holdout: real images not used for training (the baseline); ``None``: leave-one-out
            among the training images.
        extractor: optional feature extractor ``(B, C, *spatial) -> (B, F)`` (same-sized images).
        features: optional precomputed ``{"samples", "train", "holdout"}`` features instead.
        size: pixel-space grid side (default 64 for 2D, 16 for 3D, at most the smallest side).
        max_shift: largest shift searched, in grid cells (default 2 for 2D, 1 for 3D).
        quantile: baseline quantile of the threshold.
        ratio: fraction of that quantile below which a sample is flagged.
        batch_size: images per matrix product / forward pass.

    Returns:
        An :class:`AuditResult`.
    """
    samples, train = list(samples), list(train)
    holdout = None if holdout is None else list(holdout)
    if len(samples) < 1 or len(train) < 2:
        raise ValueError(
            f"the audit needs samples and at least 2 training images, got {len(samples)} and "
            f"{len(train)}"
        )
    if not 0 < quantile < 1 or not 0 < ratio <= 1:
        raise ValueError(f"need 0 < quantile < 1 and 0 < ratio <= 1, got {quantile}, {ratio}")
    dims = samples[0].ndim - 1
    for who, items in (("samples", samples), ("train", train), ("holdout", holdout or [])):
        for i, x in enumerate(items):
            if x.ndim - 1 != dims:
                raise ValueError(f"{who}[{i}] is {x.ndim - 1}D among {dims}D samples")
    smallest = min(min(x.shape[1:]) for x in samples + train + (holdout or []))
    size = min(size or (64 if dims == 2 else 16), smallest)
    max_shift = (2 if dims == 2 else 1) if max_shift is None else max_shift
    grid_s, grid_t = prepare_grid(samples, size), prepare_grid(train, size)
    sim, nearest, how = pixel_nearest(grid_s, grid_t, max_shift, batch_size=batch_size)
    if holdout:
        base_sim, _, _ = pixel_nearest(prepare_grid(holdout, size), grid_t, max_shift)
        baseline = "holdout"
    else:
        base_sim, _, _ = pixel_nearest(grid_t, grid_t, max_shift, exclude_self=True)
        baseline = "leave-one-out among training images"
    pixel_threshold = _threshold(1.0 - base_sim, quantile, ratio)
    result = AuditResult(
        pixel_similarity=sim.float(),
        pixel_nearest=nearest,
        pixel_transform=how,
        baseline_pixel_similarity=base_sim.float(),
        pixel_threshold=pixel_threshold,
        flagged_pixel=(1.0 - sim) < pixel_threshold,
        baseline=baseline,
        settings={
            "grid": size,
            "max_shift": max_shift,
            "quantile": quantile,
            "ratio": ratio,
            "rule": (
                f"flagged when distance < {ratio:g} x the {quantile:g} quantile of the baseline "
                "distances (pixel distance: 1 - correlation over flips/shifts)"
            ),
        },
    )
    if features is None and extractor is not None:
        from medgen.metrics.extraction import extract_features

        protocol = "2d" if dims == 2 else "3d"

        def run(items: list[Tensor]) -> Tensor:
            return extract_features(items, extractor, protocol, batch_size=batch_size)["all"]

        features = {"samples": run(samples), "train": run(train)}
        if holdout:
            features["holdout"] = run(holdout)
    if features is not None:
        dist, fnear = _feature_nearest(features["samples"], features["train"])
        if holdout and "holdout" in features:
            base_d, _ = _feature_nearest(features["holdout"], features["train"])
        else:
            base_d, _ = _feature_nearest(features["train"], features["train"], exclude_self=True)
        result.feature_distance = dist.float()
        result.feature_nearest = fnear
        result.baseline_feature_distance = base_d.float()
        result.feature_threshold = _threshold(base_d, quantile, ratio)
        result.flagged_feature = dist < result.feature_threshold
    return result
