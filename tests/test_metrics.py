"""Tests for medgen.metrics: pairwise metrics against formulas and references, fidelity, folders."""

from __future__ import annotations

import hashlib
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

skimage_data = pytest.importorskip("skimage.data")
skimage_metrics = pytest.importorskip("skimage.metrics")

from medgen.data.io import MedgenIOError, write  # noqa: E402
from medgen.metrics import (  # noqa: E402
    MS_SSIM_BETAS,
    PairwiseMetrics,
    PixelFeatures,
    RandomConvFeatures,
    TorchvisionFeatures,
    evaluate_folders,
    frechet_distance,
    kernel_inception_distance,
    mmd_rbf,
    ms_ssim,
    ms_ssim_betas,
    psnr,
    ssim,
)


@pytest.fixture(scope="module")
def camera_pair() -> tuple[np.ndarray, np.ndarray]:
    """A real image (scikit-image camera, non-square crop) and a noisy version, float64 in 0..255."""
    clean = skimage_data.camera()[::2, ::2][:200, :150].astype(np.float64)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 20, clean.shape), 0, 255)
    return clean, noisy


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))[None, None]


# ------------------------------------------------------------------------------------------ PSNR


def test_psnr_matches_formula_per_image():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(3, 2, 16, 20, generator=gen, dtype=torch.float64) * 2
    pred = target + 0.1 * torch.randn(3, 2, 16, 20, generator=gen, dtype=torch.float64)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    by_hand = 10 * torch.log10(2.0**2 / mse)
    torch.testing.assert_close(psnr(pred, target, data_range=2.0, reduction="none"), by_hand)
    torch.testing.assert_close(psnr(pred, target, data_range=2.0), by_hand.mean())
    with pytest.raises(TypeError):
        psnr(pred, target, 2.0)  # data_range is keyword-only
    with pytest.raises(TypeError):
        psnr(pred, target)  # and never defaulted


# ------------------------------------------------------------------------------------------ SSIM


def test_ssim_uniform_window_matches_skimage(camera_pair):
    clean, noisy = camera_pair
    expected = skimage_metrics.structural_similarity(
        noisy,
        clean,
        data_range=255,
        win_size=7,
        gaussian_weights=False,
        use_sample_covariance=False,
    )
    ours = ssim(_t(noisy), _t(clean), data_range=255, kernel_size=7, gaussian=False)
    assert abs(float(ours) - expected) < 1e-10
    # scikit-image's default (sample covariance) differs slightly; we document this convention.
    default = skimage_metrics.structural_similarity(noisy, clean, data_range=255, win_size=7)
    assert 0 < abs(float(ours) - default) < 1e-2


def test_ssim_gaussian_window_matches_skimage_and_torchmetrics_interior(camera_pair):
    from torchmetrics.functional.image import structural_similarity_index_measure

    clean, noisy = camera_pair
    expected = skimage_metrics.structural_similarity(
        noisy, clean, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    ours = float(ssim(_t(noisy), _t(clean), data_range=255))
    assert abs(ours - expected) < 1e-10
    # torchmetrics' SSIM map agrees once its reflection-padded 5-pixel border is cut off.
    _, full = structural_similarity_index_measure(
        _t(noisy), _t(clean), data_range=255.0, return_full_image=True
    )
    assert abs(float(full[..., 5:-5, 5:-5].mean()) - ours) < 1e-10
    # float32 input stays close to the float64 reference.
    assert abs(float(ssim(_t(noisy).float(), _t(clean).float(), data_range=255)) - ours) < 1e-5


def _ssim_3d_by_hand(x: np.ndarray, y: np.ndarray, k: int, data_range: float) -> float:
    """Direct definition: every k^3 window, uniform weights, population moments."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i, j, m in itertools.product(*(range(n - k + 1) for n in x.shape)):
        a = x[i : i + k, j : j + k, m : m + k].ravel()
        b = y[i : i + k, j : j + k, m : m + k].ravel()
        mu_a, mu_b = a.mean(), b.mean()
        cov = ((a - mu_a) * (b - mu_b)).mean()
        num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
        den = (mu_a**2 + mu_b**2 + c1) * (a.var() + b.var() + c2)
        values.append(num / den)
    return float(np.mean(values))


def test_ssim_3d_matches_hand_computation_and_skimage():
    rng = np.random.default_rng(1)
    x = rng.random((7, 8, 9))
    y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    ours = float(ssim(_t(y), _t(x), data_range=1.0, kernel_size=3, gaussian=False))
    assert abs(ours - _ssim_3d_by_hand(y, x, 3, 1.0)) < 1e-12
    big_x = rng.random((16, 18, 20))
    big_y = np.clip(big_x + rng.normal(0, 0.1, big_x.shape), 0, 1)
    expected = skimage_metrics.structural_similarity(
        big_y, big_x, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert abs(float(ssim(_t(big_y), _t(big_x), data_range=1.0)) - expected) < 1e-10


@pytest.mark.filterwarnings("ignore:MS-SSIM. images of spatial size")
def test_identical_images_score_one_in_2d_and_3d():
    for shape in [(2, 3, 40, 36), (2, 1, 24, 26, 28)]:
        x = torch.rand(shape)
        assert torch.allclose(ssim(x, x, data_range=1.0, reduction="none"), torch.ones(2))
        assert torch.allclose(ms_ssim(x, x, data_range=1.0, kernel_size=7), torch.tensor(1.0))
        assert torch.isinf(psnr(x, x, data_range=1.0))


@pytest.mark.filterwarnings("ignore:MS-SSIM. images of spatial size")
def test_3d_shapes_for_all_metrics():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 24, 24, 24, generator=gen)
    pred = (target + 0.05 * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    for fn in (psnr, ssim, ms_ssim):
        per_image = fn(pred, target, data_range=1.0, reduction="none")
        assert per_image.shape == (2,) and torch.isfinite(per_image).all()
        assert fn(pred, target, data_range=1.0).shape == ()
    assert 0 < float(ssim(pred, target, data_range=1.0)) < 1
    assert len(ms_ssim_betas((24, 24, 24))) == 2  # 24 >= 11 * 2 but < 11 * 4


# --------------------------------------------------------------------------------------- MS-SSIM


def test_ms_ssim_scale_reduction_on_64x64():
    betas = ms_ssim_betas((64, 64))
    assert len(betas) == 3  # 64 >= 11 * 4 but < 11 * 8
    assert math.isclose(sum(betas), 1.0, rel_tol=1e-12)
    assert np.allclose(np.array(betas) * sum(MS_SSIM_BETAS[:3]), MS_SSIM_BETAS[:3])
    assert ms_ssim_betas((176, 200)) == MS_SSIM_BETAS  # full five scales from 11 * 16 = 176
    assert len(ms_ssim_betas((175, 200))) == 4

    clean = torch.from_numpy(skimage_data.camera()[::8, ::8].astype(np.float32))[None, None]
    noisy = clean + 10 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="fit only 3 of 5 scales"):
        value = ms_ssim(noisy, clean, data_range=255.0)
    assert 0 < float(value) < 1

    # By hand, independently of our code: local statistics with scipy's Gaussian filter (window
    # 2 * round(3.5 * 1.5) + 1 = 11, border cropped), 2x2 block means for the pyramid, and
    # scikit-image's SSIM at the coarsest scale; cs at scales 1-2, renormalised exponents.
    p, t = noisy[0, 0].double().numpy(), clean[0, 0].double().numpy()
    terms = []
    for _ in range(2):
        terms.append(_cs_by_scipy(p, t, 255.0))
        p, t = _halve(p), _halve(t)
    terms.append(
        skimage_metrics.structural_similarity(
            p, t, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )
    by_hand = math.prod(v**b for v, b in zip(terms, betas, strict=True))
    assert abs(float(value) - by_hand) < 1e-5


def _halve(x: np.ndarray) -> np.ndarray:
    h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
    return x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _cs_by_scipy(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    from scipy.ndimage import gaussian_filter

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=1.5, truncate=3.5)[5:-5, 5:-5]

    c2 = (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return float(np.mean((2 * cxy + c2) / (vx + vy + c2)))


def test_too_small_input_raises_with_sizes():
    x = torch.rand(1, 1, 8, 30)
    with pytest.raises(ValueError, match=r"\(8, 30\)"):
        ms_ssim(x, x, data_range=1.0)
    with pytest.raises(ValueError, match="kernel_size=11"):
        ssim(x, x, data_range=1.0)
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, x[..., :20], data_range=1.0)


# ------------------------------------------------------------------------------ PairwiseMetrics


def test_pairwise_metrics_accumulate_like_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(5, 1, 64, 64, generator=gen)
    pred = (target + 0.1 * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    metrics = PairwiseMetrics(data_range=1.0, prefix="val/")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = metrics(pred[:2], target[:2])  # forward: update + this batch's values
        metrics.update(pred[2:], target[2:])
        out = metrics.compute()
        # PSNR is the mean of per-image PSNRs (not the PSNR of the pooled MSE); same for the others.
        expected = {
            "val/psnr": psnr(pred, target, data_range=1.0),
            "val/ssim": ssim(pred, target, data_range=1.0),
            "val/ms_ssim": ms_ssim(pred, target, data_range=1.0),
        }
    assert sorted(out) == sorted(expected) == sorted(batch)
    torch.testing.assert_close(
        batch["val/psnr"], psnr(pred[:2], target[:2], data_range=1.0).float()
    )
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value.float(), rtol=1e-5, atol=1e-6)
    metrics.reset()
    metrics.update(pred[:1], pred[:1] * 0 + target[:1])
    torch.testing.assert_close(
        metrics.compute()["val/psnr"], psnr(pred[:1], target[:1], data_range=1.0)
    )


def test_pairwise_metrics_3d_and_small_images_skip_ms_ssim_once():
    volumes = torch.rand(2, 1, 12, 12, 12)
    metrics3d = PairwiseMetrics(data_range=1.0, spatial_dims=3)
    metrics3d.update(volumes, volumes)
    assert torch.allclose(metrics3d.compute()["ssim"], torch.tensor(1.0))
    with pytest.raises(ValueError, match="spatial_dims=3"):
        metrics3d.update(volumes[:, :, 0], volumes[:, :, 0])

    small = torch.rand(2, 1, 8, 8)
    metrics = PairwiseMetrics(data_range=1.0, metrics=("psnr", "ms_ssim"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics.update(small, small * 0.9)
        metrics.update(small, small * 0.9)
    assert len([w for w in caught if "skipping ms_ssim" in str(w.message)]) == 1
    assert sorted(metrics.compute()) == ["psnr"]


# ------------------------------------------------------------------------------------- fidelity


def _exact_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """Samples whose sample mean and unbiased covariance equal ``mean`` and ``cov`` exactly."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T))).T  # whiten: cov(z) = I
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_identical_and_closed_form():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 8))
    assert abs(frechet_distance(feats, feats)) < 1e-8

    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.5, 0.0])
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    x = _exact_moments(500, mu1, np.diag(a), 1)
    y = _exact_moments(700, mu2, np.diag(b), 2)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(
        closed, rel=1e-9
    )

    # Full covariances against scipy's general matrix square root.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    m1 = rng.normal(size=(5, 5))
    m2 = rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    nu1, nu2 = rng.normal(size=5), rng.normal(size=5)
    x = _exact_moments(300, nu1, s1, 3)
    y = _exact_moments(300, nu2, s2, 4)
    root = scipy_linalg.sqrtm(s1 @ s2).real
    closed = np.sum((nu1 - nu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(x, y) == pytest.approx(closed, rel=1e-8)


def test_kid_same_vs_shifted_distribution():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=gen)
    b = torch.randn(300, 16, generator=gen)
    same_mean, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=100)
    shifted_mean, shifted_std = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same_mean) < 0.05
    assert shifted_mean > 1.0 and shifted_mean > 10 * (abs(same_mean) + same_std)
    assert (same_mean, same_std) == kernel_inception_distance(a, b, subsets=20, subset_size=100)

    # One subset of everything equals torchmetrics' unbiased polynomial MMD.
    from torchmetrics.image.kid import poly_mmd

    ours, _ = kernel_inception_distance(a, b + 0.3, subsets=1, subset_size=300)
    reference = poly_mmd(a.double(), (b + 0.3).double(), degree=3, gamma=None, coef=1.0)
    assert ours == pytest.approx(float(reference), rel=1e-9, abs=1e-12)


def test_mmd_rbf_detects_shift():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(200, 4, generator=gen), torch.randn(200, 4, generator=gen)
    assert abs(mmd_rbf(a, b)) < 0.02
    assert mmd_rbf(a, b + 2.0) > 0.3


def test_feature_extractors_shapes_and_determinism():
    x2 = torch.rand(3, 1, 40, 48)
    x3 = torch.rand(2, 2, 20, 20, 20)
    assert PixelFeatures(8)(x2).shape == (3, 64)
    assert PixelFeatures(4)(x3).shape == (2, 64)

    f1 = RandomConvFeatures(spatial_dims=2, seed=0, width=8)
    torch.manual_seed(123)  # the global RNG must not matter
    f2 = RandomConvFeatures(spatial_dims=2, seed=0, width=8)
    f3 = RandomConvFeatures(spatial_dims=2, seed=1, width=8)
    assert torch.equal(f1(x2), f2(x2))
    assert not torch.allclose(f1(x2), f3(x2))
    assert f1(x2).shape == (3, 64) and f1.num_features == 64
    assert f1(torch.rand(3, 3, 40, 48)).shape == (3, 64)  # RGB is averaged to gray
    assert not any(p.requires_grad for p in f1.parameters())
    f3d = RandomConvFeatures(spatial_dims=3, seed=0, width=4)
    assert f3d(x3).shape == (2, 32)


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet50-random.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_torchvision_features_missing_file(tmp_path):
    missing = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    with pytest.raises(FileNotFoundError) as info:
        TorchvisionFeatures("inception_v3", missing)
    assert str(missing) in str(info.value) and "download" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no weights_path"):
        TorchvisionFeatures("resnet50")


def test_torchvision_features_from_local_resnet50(resnet_weights, tmp_path):
    path, sha = resnet_weights
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        TorchvisionFeatures("resnet50", path, sha256="0" * 64)
    extractor = TorchvisionFeatures("resnet50", path, sha256=sha)
    extractor.train()  # must stay in eval mode (batch norm statistics frozen)
    assert not extractor.net.training
    with torch.inference_mode():
        feats = extractor(torch.rand(2, 1, 64, 80))
        volume_feats = extractor(torch.rand(1, 1, 16, 20, 24))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert volume_feats.shape == (1, 3 * 2048)
    bad = tmp_path / "not_resnet.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not a torchvision resnet50"):
        TorchvisionFeatures("resnet50", bad)


# ------------------------------------------------------------------------------ evaluate_folders


@pytest.fixture(scope="module")
def png_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    camera = skimage_data.camera()
    rng = np.random.default_rng(0)
    real, fake = root / "real", root / "fake"
    reals, fakes = [], []
    for i in range(4):
        crop = camera[i * 100 : i * 100 + 96, 50 + i * 60 : 50 + i * 60 + 96]
        noisy = np.clip(crop + rng.normal(0, 8, crop.shape), 0, 255).astype(np.uint8)
        write(crop[None], real / f"case{i}.png")
        write(noisy[None], fake / f"case{i}.png")
        reals.append(crop)
        fakes.append(noisy)
    return real, fake, np.stack(reals)[:, None], np.stack(fakes)[:, None]


def test_evaluate_folders_paired(png_folders):
    real, fake, reals, fakes = png_folders
    result = evaluate_folders(real, fake)
    assert result["mode"] == "paired" and result["n"] == 4
    assert result["data_range"] == 255.0
    assert math.isfinite(result["psnr"]) and 20 < result["psnr"] < 50
    assert 0 < result["ssim"] < 1 and 0 < result["ms_ssim"] < 1
    assert "4 of 5 scales" in result["protocol"]  # 96 >= 11 * 8
    target, pred = torch.from_numpy(reals).float(), torch.from_numpy(fakes).float()
    assert result["psnr"] == pytest.approx(float(psnr(pred, target, data_range=255.0)), rel=1e-5)
    assert result["ssim"] == pytest.approx(float(ssim(pred, target, data_range=255.0)), rel=1e-5)
    import json

    json.dumps(result)


def test_evaluate_folders_unpaired(png_folders, tmp_path):
    real, _, _, fakes = png_folders
    other = tmp_path / "generated"
    for i, image in enumerate(fakes):
        write(np.clip(image.astype(np.int32) + 40, 0, 255).astype(np.uint8), other / f"s{i}.png")
    result = evaluate_folders(real, other, kid_subsets=10)
    assert result["mode"] == "unpaired"
    assert (result["n_real"], result["n_fake"]) == (4, 4)
    assert result["feature_extractor"] == "pixels"
    assert result["fid"] > 0 and math.isfinite(result["kid_mean"]) and result["kid_std"] >= 0
    conv = evaluate_folders(real, other, feature_extractor="random_conv", kid_subsets=10)
    assert conv["fid"] > 0 and "random_conv" in conv["protocol"]


def test_evaluate_folders_errors(png_folders, tmp_path):
    real, fake, _, fakes = png_folders
    partial = tmp_path / "partial"
    write(fakes[0], partial / "case0.png")
    write(fakes[1], partial / "other.png")
    with pytest.raises(MedgenIOError) as info:
        evaluate_folders(real, partial, mode="paired")
    message = str(info.value)
    for name in ("case1.png", "case2.png", "case3.png", "other.png"):
        assert name in message

    wrong_shape = tmp_path / "wrong_shape"
    for i in range(4):
        write(fakes[i][:, :80], wrong_shape / f"case{i}.png")
    with pytest.raises(MedgenIOError, match="shape mismatch") as info:
        evaluate_folders(real, wrong_shape)
    assert str(real / "case0.png") in str(info.value)
    assert str(wrong_shape / "case0.png") in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedgenIOError, match="no image files") as info:
        evaluate_folders(real, empty)
    assert str(empty) in str(info.value)


def test_evaluate_folders_float_nifti_needs_data_range(tmp_path):
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        volume = torch.rand(1, 12, 12, 12, generator=gen)
        write(volume, tmp_path / "real" / f"v{i}.nii.gz")
        write(volume * 0.9, tmp_path / "fake" / f"v{i}.nii.gz")
    with pytest.raises(MedgenIOError, match="data_range") as info:
        evaluate_folders(tmp_path / "real", tmp_path / "fake")
    assert "v0.nii.gz" in str(info.value) and "float32" in str(info.value)
    result = evaluate_folders(tmp_path / "real", tmp_path / "fake", data_range=1.0)
    assert result["mode"] == "paired" and result["n"] == 2 and 0 < result["ssim"] < 1

    nan = torch.zeros(1, 12, 12, 12)
    nan[0, 0, 0, 0] = float("nan")
    (tmp_path / "fake" / "v1.nii.gz").unlink()
    np.save(tmp_path / "fake" / "v1.npy", nan.numpy())  # bypass write(), which refuses NaN
    with pytest.raises(MedgenIOError, match="NaN") as info:
        evaluate_folders(tmp_path / "real", tmp_path / "fake", mode="unpaired", data_range=1.0)
    assert "v1.npy" in str(info.value)
