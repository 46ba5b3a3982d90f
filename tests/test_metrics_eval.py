"""Measures of the evaluation suite against formulas and brute force: precision/recall/density/
coverage, bootstrap intervals, MS-SSIM diversity, 2.5D slice selection, the feature cache, the
streaming (DDP-summed) Fréchet distance, ROC AUC / Dice, the memorisation audit (planted copies)
and train-synthetic-test-real."""

from __future__ import annotations

import pytest
import torch

from medgen.data.phantoms import head_phantom
from medgen.features import PixelFeatures, RandomConvFeatures
from medgen.metrics import (
    FeatureCache,
    FrechetDistance,
    bootstrap_ci,
    dice_per_image,
    extract_features,
    frechet_distance,
    memorisation_audit,
    pairwise_ms_ssim,
    prdc,
    roc_auc,
    slice_indices,
    tstr,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _prdc_loops(real, fake, k):
    def radius(x, i):
        d = sorted(float((x[i] - x[j]).norm()) for j in range(len(x)) if j != i)
        return d[k - 1]

    rr = [radius(real, i) for i in range(len(real))]
    rf = [radius(fake, j) for j in range(len(fake))]
    inside = [
        [float((real[i] - fake[j]).norm()) < rr[i] for j in range(len(fake))]
        for i in range(len(real))
    ]
    precision = sum(any(inside[i][j] for i in range(len(real))) for j in range(len(fake))) / len(
        fake
    )
    recall = sum(
        any(float((real[i] - fake[j]).norm()) < rf[j] for j in range(len(fake)))
        for i in range(len(real))
    ) / len(real)
    density = sum(sum(row) for row in inside) / (k * len(fake))
    coverage = sum(any(row) for row in inside) / len(real)
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_prdc_matches_the_definitions_by_brute_force():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(30, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(25, 4, generator=g, dtype=torch.float64) * 1.3 + 0.4
    got = prdc(real, fake, k=3)
    want = _prdc_loops(real, fake, 3)
    assert got == pytest.approx(want, abs=1e-12)
    same = prdc(real, real, k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc(real, fake + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(
        ValueError, match="needs at least 6 samples per set, got 30 real and 5 fake"
    ):
        prdc(real, fake[:5], k=5)


def test_bootstrap_interval_of_a_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, generator=g, dtype=torch.float64) + 3.0
    out = bootstrap_ci(lambda a: float(a.mean()), (x,), n_boot=300, seed=0)
    assert out["value"] == pytest.approx(float(x.mean()))
    se = float(x.std()) / 20.0  # sigma / sqrt(n)
    assert out["ci_low"] < out["value"] < out["ci_high"]
    assert out["ci_high"] - out["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap_ci(lambda a: float(a.mean()), (x,), n_boot=50, seed=3) == bootstrap_ci(
        lambda a: float(a.mean()), (x,), n_boot=50, seed=3
    )
    with pytest.raises(ValueError, match="one length"):
        bootstrap_ci(lambda a, b: 0.0, (x, x[:3]), paired=True)


def test_pairwise_ms_ssim_diversity():
    images = torch.stack([head_phantom(2, 32, index=i) for i in range(6)])
    diverse = pairwise_ms_ssim(images, data_range=1.0, pairs=100)
    collapsed = pairwise_ms_ssim(images[:1].expand(6, -1, -1, -1), data_range=1.0)
    assert diverse["pairs"] == 15 and collapsed["mean"] == pytest.approx(1.0, abs=1e-6)
    assert diverse["mean"] < 0.95 and diverse["measure"].startswith("ms_ssim")
    assert diverse["ci_low"] <= diverse["mean"] <= diverse["ci_high"]
    small = pairwise_ms_ssim(images[:, :, :8, :8], data_range=1.0)
    assert small["measure"].startswith("ssim (window 7")


def test_slice_selection_as_maisi_and_2p5d_shapes():
    assert slice_indices(10, 0.4) == [3, 4, 5, 6]  # int(0.3 * 10) .. int(0.7 * 10) - 1
    assert slice_indices(10, 0.4, every_k=2) == [3, 5]
    assert slice_indices(7) == list(range(7))
    volumes = torch.rand(2, 1, 8, 10, 12)
    feats = extract_features(volumes, PixelFeatures(4), "2.5d")
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "axis0": (16, 16),
        "axis1": (20, 16),
        "axis2": (24, 16),
    }
    # a slice feature is that slice's pooled pixels
    torch.testing.assert_close(
        feats["axis1"][3], PixelFeatures(4)(volumes[0:1, :, :, 3]).double()[0]
    )
    with pytest.raises(ValueError, match="needs 3D volumes"):
        extract_features(torch.rand(2, 1, 8, 8), PixelFeatures(4), "2.5d")


def test_feature_cache(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    calls = []

    def compute():
        calls.append(1)
        return {"all": torch.arange(6.0).view(2, 3)}

    a = cache.get_or_compute({"x": 1}, compute)
    b = cache.get_or_compute({"x": 1}, compute)
    torch.testing.assert_close(a, b)
    assert len(calls) == 1 and cache.hits == 1
    cache.get_or_compute({"x": 2}, compute)
    assert len(calls) == 2
    for f in (tmp_path / "c").iterdir():
        f.write_bytes(b"truncated")
    cache.get_or_compute({"x": 1}, compute)
    assert len(calls) == 3


def test_streaming_frechet_distance_equals_batch_and_sums_over_ranks():
    ext = RandomConvFeatures(2, width=4)
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(20, 1, 16, 16, generator=g), torch.rand(18, 1, 16, 16, generator=g) ** 2
    want = frechet_distance(ext(real), ext(fake))
    whole = FrechetDistance(ext, 32)
    whole.update(real, real=True)
    whole.update(fake, real=False)
    assert float(whole.compute()) == pytest.approx(want, rel=1e-4)
    # two "ranks" with half the data each: their summed states give the same value
    ranks = [FrechetDistance(ext, 32) for _ in range(2)]
    for r, m in enumerate(ranks):
        m.update(real[r::2], real=True)
        m.update(fake[r::2], real=False)
    ranks[0].merge_state(ranks[1])
    assert float(ranks[0].compute()) == pytest.approx(want, rel=1e-4)
    whole.reset()  # keeps the real statistics
    assert int(whole.real_n) == 20 and int(whole.fake_n) == 0


def test_roc_auc_and_dice():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # pairs (pos > neg): 0.35>0.1, 0.8>both, 0.4>0.1, 0.4 ties 0.4 -> (1 + 2 + 1 + 0.5) / 6
    assert roc_auc(scores, labels) == pytest.approx(4.5 / 6)
    pred = torch.zeros(2, 1, 4, 4)
    target = torch.zeros(2, 1, 4, 4)
    pred[0, 0, :2] = 1
    target[0, 0, 1:3] = 1
    assert dice_per_image(pred, target).tolist() == pytest.approx([0.5, 1.0])


@pytest.fixture(scope="module")
def phantoms_2d():
    train = [head_phantom(2, 32, index=i) for i in range(20)]
    holdout = [head_phantom(2, 32, index=100 + i) for i in range(10)]
    independent = [head_phantom(2, 32, index=200 + i) for i in range(12)]
    return train, holdout, independent


def test_audit_finds_planted_copies_and_spares_independent_samples(phantoms_2d, tmp_path):
    train, holdout, independent = phantoms_2d
    g = torch.Generator().manual_seed(0)
    planted = [
        train[3].clone(),  # exact copy
        train[5].flip(-1),  # mirrored
        train[7].roll((2, -1), dims=(1, 2)),  # shifted by 2 and 1 pixels
        train[9] + 0.03 * torch.randn(train[9].shape, generator=g),  # noisy copy
    ]
    samples = independent + planted
    result = memorisation_audit(samples, train, holdout, extractor=RandomConvFeatures(2, width=8))
    n = len(independent)
    assert result.flagged.nonzero().flatten().tolist() == [n, n + 1, n + 2, n + 3]
    assert result.pixel_nearest[n:].tolist() == [3, 5, 7, 9]
    assert result.pixel_transform[n] == "identity" and "flip" in result.pixel_transform[n + 1]
    assert "shift" in result.pixel_transform[n + 2]
    summary = result.summary()
    assert summary["copy_rate"] == pytest.approx(4 / len(samples))
    assert summary["baseline"] == "holdout" and summary["n_baseline"] == 10
    assert summary["pixel"]["baseline_to_train_max"] < summary["pixel"]["threshold_correlation"]
    assert result.top_k(4) == sorted(
        result.top_k(4), key=lambda i: -float(result.pixel_similarity[i])
    )
    assert set(result.top_k(4)) == {n, n + 1, n + 2, n + 3}
    figure = result.save_pairs_figure(tmp_path / "pairs.png", samples, train, k=3)
    assert figure.stat().st_size > 5000
    # no held-out set: leave-one-out among the training images; the same copies are found
    loo = memorisation_audit(samples, train)
    assert loo.summary()["baseline"].startswith("leave-one-out")
    assert loo.flagged_pixel.nonzero().flatten().tolist() == [n, n + 1, n + 2, n + 3]


def test_audit_3d_downsampled_volumes():
    train = [head_phantom(3, 16, index=i) for i in range(6)]
    samples = [head_phantom(3, 16, index=50 + i) for i in range(4)] + [train[2].flip(-1)]
    result = memorisation_audit(samples, train, size=8)
    assert result.settings["grid"] == 8 and result.settings["max_shift"] == 1
    assert result.flagged.nonzero().flatten().tolist() == [4]
    assert int(result.pixel_nearest[4]) == 2


def _contrast_set(indices):
    images = [head_phantom(2, 16, index=i, contrast="t1" if i % 2 else "t2") for i in indices]
    return torch.stack(images), torch.tensor([i % 2 for i in indices])


def test_tstr_classification_auc_with_intervals():
    real, synthetic, test = (
        _contrast_set(range(16)),
        _contrast_set(range(50, 66)),
        _contrast_set(range(100, 124)),
    )
    out = tstr(real, synthetic, test, steps=30, n_boot=50)
    assert out["metric"] == "roc_auc" and out["n_test"] == 24
    for regime in ("real", "synthetic", "real+synthetic"):
        r = out[regime]
        assert r["value"] > 0.9, (regime, r)
        assert 0.0 <= r["ci_low"] <= r["ci_high"] <= 1.0
    assert out["real+synthetic"]["n_train"] == 32
    with pytest.raises(ValueError, match="utility set 'synthetic': images are"):
        tstr(real, (synthetic[0][:, :, :8, :8], synthetic[1]), test)


def test_tstr_segmentation_dice():
    def seg(indices):
        images = torch.stack([head_phantom(2, 16, index=i) for i in indices])
        return images, (images > 0.3).float()

    out = tstr(
        seg(range(8)),
        seg(range(20, 28)),
        seg(range(40, 48)),
        task="segmentation",
        steps=15,
        n_boot=30,
        regimes=("synthetic",),
    )
    assert out["metric"] == "dice" and set(out) >= {"synthetic"} and "real" not in out
    assert 0.0 <= out["synthetic"]["value"] <= 1.0


def test_frechet_distance_with_fewer_samples_than_features_is_exact():
    """The singular-value path (N <= F) equals the eigendecomposition formula (whose square roots
    of near-zero eigenvalues carry round-off of about 1e-8)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(10, 40, generator=g, dtype=torch.float64)
    b = torch.randn(12, 40, generator=g, dtype=torch.float64) * 1.2 + 0.3
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root @ cov_b @ root
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    want = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    with pytest.warns(UserWarning, match="singular"):
        assert frechet_distance(a, b) == pytest.approx(float(want), rel=1e-6)
