"""Evaluation protocols: BCI's 8-bit PSNR / scikit-image SSIM and the float protocol (MAE, r)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

skimage_data = pytest.importorskip("skimage.data")
skimage_metrics = pytest.importorskip("skimage.metrics")

import medgen  # noqa: E402
from medgen.data.io import MedgenIOError, write  # noqa: E402
from medgen.metrics import (  # noqa: E402
    BCIMetrics,
    PairwiseMetrics,
    bci_metrics,
    evaluate_folders,
    evaluate_paired,
    mae,
    pearson_r,
    ssim,
    to_uint8_bci,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) numpy -> (C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))


def _skimage_bci(fake: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """What BCI's evaluation script computes for one (H, W, 3) uint8 pair."""
    psnr = skimage_metrics.peak_signal_noise_ratio(real, fake, data_range=255)
    ssim_value = skimage_metrics.structural_similarity(fake, real, data_range=255, channel_axis=-1)
    return psnr, ssim_value


@pytest.fixture(scope="module")
def rgb_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Real 8-bit RGB crops (astronaut, IHC) of several sizes and degraded versions of them."""
    rng = np.random.default_rng(0)
    astronaut = skimage_data.astronaut()
    ihc = skimage_data.immunohistochemistry()
    crops = [
        ("astro_a", astronaut[40:168, 150:278]),
        ("astro_b", astronaut[200:296, 20:180]),
        ("ihc_a", ihc[:128, :128]),
        ("ihc_b", ihc[300:390, 250:371]),
    ]
    pairs = []
    for i, (name, real) in enumerate(crops):
        noise = rng.normal(0, 6 + 8 * i, real.shape)
        fake = np.clip(real.astype(np.float64) * 0.9 + 12 + noise, 0, 255).astype(np.uint8)
        pairs.append((name, np.ascontiguousarray(real), fake))
    return pairs


@pytest.fixture(scope="module")
def rgb_folders(tmp_path_factory, rgb_pairs):
    root = tmp_path_factory.mktemp("bci")
    for name, real, fake in rgb_pairs:
        write(_chw(real), root / "real" / f"{name}.png")
        write(_chw(fake), root / "fake" / f"{name}.png")
    return root / "real", root / "fake"


# --------------------------------------------------------------------------------- BCI protocol


def test_ssim_sample_covariance_equals_skimage_defaults(rgb_pairs):
    for _, real, fake in rgb_pairs:
        ours = ssim(
            _chw(fake)[None].double(),
            _chw(real)[None].double(),
            data_range=255,
            kernel_size=7,
            gaussian=False,
            sample_covariance=True,
        )
        expected = skimage_metrics.structural_similarity(
            fake, real, data_range=255, channel_axis=-1
        )
        assert float(ours) == pytest.approx(expected, abs=1e-10)
    # 3D volume: the window is 7x7x7, N = 343
    gen = np.random.default_rng(1)
    a = gen.uniform(0, 1, (12, 14, 10))
    b = np.clip(a + gen.normal(0, 0.1, a.shape), 0, 1)
    ours = ssim(
        torch.from_numpy(b)[None, None],
        torch.from_numpy(a)[None, None],
        data_range=1.0,
        kernel_size=7,
        gaussian=False,
        sample_covariance=True,
    )
    expected = skimage_metrics.structural_similarity(b, a, data_range=1.0)
    assert float(ours) == pytest.approx(expected, abs=1e-10)


def test_sample_covariance_default_unchanged(rgb_pairs):
    _, real, fake = rgb_pairs[0]
    x, y = _chw(fake)[None].double(), _chw(real)[None].double()
    default = ssim(x, y, data_range=255, kernel_size=7, gaussian=False)
    population = skimage_metrics.structural_similarity(
        fake, real, data_range=255, channel_axis=-1, use_sample_covariance=False
    )
    assert float(default) == pytest.approx(population, abs=1e-10)
    accumulated = PairwiseMetrics(255, metrics="ssim")(x, y)["ssim"]  # float32 state
    assert float(ssim(x, y, data_range=255)) == pytest.approx(float(accumulated), rel=1e-6)


def test_bci_folders_equal_skimage(rgb_folders, rgb_pairs):
    real, fake = rgb_folders
    result = evaluate_folders(real, fake, protocol="bci")
    expected = [_skimage_bci(f, r) for _, r, f in rgb_pairs]
    assert result["mode"] == "paired" and result["n"] == len(rgb_pairs)
    assert result["data_range"] == 255.0
    assert result["psnr"] == pytest.approx(np.mean([e[0] for e in expected]), abs=1e-6)
    assert result["ssim"] == pytest.approx(np.mean([e[1] for e in expected]), abs=1e-6)
    assert result["protocol"].startswith("bci") and "7x7 uniform" in result["protocol"]
    assert "n=4" in result["protocol"] and "mixed sizes" in result["protocol"]
    assert "ms_ssim" not in result and "mae" not in result
    json.dumps(result)
    # the same folders under the float protocol give different (Gaussian-window) SSIM
    default = evaluate_folders(real, fake)
    assert default["protocol"].startswith("float")
    assert default["psnr"] == pytest.approx(result["psnr"], rel=1e-5)
    assert abs(default["ssim"] - result["ssim"]) > 1e-3


def test_bci_from_float_tensors_truncates_like_tensor2im(rgb_pairs):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 24, generator=gen) * 2 - 1
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, -0.999, 0.9999])
    reference = ((x.numpy() + 1) / 2.0 * 255.0).astype(np.uint8)  # pix2pix util.tensor2im
    assert torch.equal(to_uint8_bci(x), torch.from_numpy(reference))
    unit = (x + 1) / 2
    assert torch.equal(
        to_uint8_bci(unit, value_range=(0, 1)),
        torch.from_numpy((unit.numpy() * 255.0).astype(np.uint8)),
    )
    assert to_uint8_bci(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped, not wrapped
    u8 = torch.randint(0, 256, (3, 4), dtype=torch.uint8)
    assert to_uint8_bci(u8) is u8
    with pytest.raises(TypeError, match="int32"):
        to_uint8_bci(torch.zeros(2, dtype=torch.int32))

    # metrics of float tensors == scikit-image on the truncated uint8 images
    _, real, fake = rgb_pairs[2]
    real_f = _chw(real)[None].float() / 127.5 - 1
    fake_f = _chw(fake)[None].float() / 127.5 - 1
    values = bci_metrics(fake_f, real_f)
    real8 = np.moveaxis(to_uint8_bci(real_f)[0].numpy(), 0, -1)
    fake8 = np.moveaxis(to_uint8_bci(fake_f)[0].numpy(), 0, -1)
    expected = _skimage_bci(fake8, real8)
    assert float(values["psnr"]) == pytest.approx(expected[0], abs=1e-6)
    assert float(values["ssim"]) == pytest.approx(expected[1], abs=1e-6)
    same = evaluate_paired(fake_f, real_f, protocol="bci")
    assert float(same["ssim"]) == float(values["ssim"])


def test_bci_metrics_accumulate(rgb_pairs):
    metric = BCIMetrics(value_range=(0, 255), prefix="val/")
    expected = []
    for _, real, fake in rgb_pairs[:2]:
        metric.update(_chw(fake)[None], _chw(real)[None])
        expected.append(_skimage_bci(fake, real))
    out = metric.compute()
    assert float(out["val/psnr"]) == pytest.approx(np.mean([e[0] for e in expected]), abs=1e-9)
    assert float(out["val/ssim"]) == pytest.approx(np.mean([e[1] for e in expected]), abs=1e-9)


def test_bci_errors(rgb_folders, tmp_path):
    real, fake = rgb_folders
    with pytest.raises(ValueError, match="paired"):
        evaluate_folders(real, fake, protocol="bci", mode="unpaired")
    with pytest.raises(ValueError, match="data_range=255"):
        evaluate_folders(real, fake, protocol="bci", data_range=1.0)
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_folders(real, fake, protocol="nope")
    partial = tmp_path / "partial"
    write(torch.zeros(3, 16, 16, dtype=torch.uint8), partial / "astro_a.png")
    with pytest.raises(MedgenIOError, match="protocol='bci' is paired only") as info:
        evaluate_folders(real, partial, protocol="bci")
    assert "ihc_b.png" in str(info.value)
    # 16-bit files are not what BCI's script reads
    deep_real, deep_fake = tmp_path / "r16", tmp_path / "f16"
    write(np.full((1, 16, 16), 1000, dtype=np.uint16), deep_real / "a.png")
    write(np.full((1, 16, 16), 900, dtype=np.uint16), deep_fake / "a.png")
    with pytest.raises(MedgenIOError, match="uint16") as info:
        evaluate_folders(deep_real, deep_fake, protocol="bci")
    assert str(deep_real / "a.png") in str(info.value)


# ------------------------------------------------------------------------------- float protocol


def _numpy_pearson(fake: np.ndarray, real: np.ndarray) -> float:
    """(C, ...) arrays: Pearson r per channel over all voxels, then the mean over channels."""
    rs = [np.corrcoef(f.ravel(), r.ravel())[0, 1] for f, r in zip(fake, real, strict=True)]
    return float(np.mean(rs))


def test_mae_and_pearson_against_numpy():
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 2, 17, 13), (2, 1, 6, 7, 8)]:
        real = torch.rand(shape, generator=gen) * 300 - 100
        fake = 0.7 * real + 20 * torch.randn(shape, generator=gen)
        per_mae = mae(fake, real, reduction="none")
        per_r = pearson_r(fake, real, reduction="none")
        for i in range(shape[0]):
            f, r = fake[i].double().numpy(), real[i].double().numpy()
            assert float(per_mae[i]) == pytest.approx(np.abs(f - r).mean(), rel=1e-12)
            assert float(per_r[i]) == pytest.approx(_numpy_pearson(f, r), rel=1e-12)
        assert float(mae(fake, real)) == pytest.approx(float(per_mae.mean()), rel=1e-12)
    x = torch.rand(1, 2, 8, 8)
    assert float(pearson_r(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-12)
    assert float(pearson_r(x, -x)) == pytest.approx(-1.0, abs=1e-12)
    flat = x.clone()
    flat[:, 1] = 0.5
    assert torch.isnan(pearson_r(flat, x))  # constant channel: undefined, as in scipy


@pytest.mark.filterwarnings("ignore:MS-SSIM")
def test_float_folders_mae_pearson(rgb_folders, rgb_pairs):
    real, fake = rgb_folders
    result = evaluate_folders(real, fake, protocol="float")
    assert result == evaluate_folders(real, fake)  # float is the default
    maes = [np.abs(f.astype(np.float64) - r).mean() for _, r, f in rgb_pairs]
    rs = [_numpy_pearson(np.moveaxis(f, -1, 0), np.moveaxis(r, -1, 0)) for _, r, f in rgb_pairs]
    assert result["mae"] == pytest.approx(np.mean(maes), rel=1e-6)
    assert result["pearson_r"] == pytest.approx(np.mean(rs), rel=1e-6)
    assert "mae" in result["protocol"] and "pearson_r" in result["protocol"]
    for key in ("mode", "n", "data_range", "psnr", "ssim", "ms_ssim"):
        assert key in result
    direct = evaluate_paired(
        _chw(rgb_pairs[0][2])[None].float(), _chw(rgb_pairs[0][1])[None].float(), data_range=255
    )
    assert set(direct) == {"psnr", "ssim", "ms_ssim", "mae", "pearson_r"}
    assert float(direct["mae"]) == pytest.approx(maes[0], rel=1e-9)


# ------------------------------------------------------------------------------------ CLI path


def test_medgen_eval_protocol_bci_writes_json(rgb_folders, rgb_pairs, tmp_path):
    real, fake = rgb_folders
    output = tmp_path / "bci.json"
    cfg = medgen.api.compose(
        "eval", [f"real={real}", f"fake={fake}", "protocol=bci", f"output={output}"]
    )
    assert cfg.protocol == "bci"
    medgen.api.evaluate(cfg)
    written = json.loads(output.read_text())
    expected = [_skimage_bci(f, r) for _, r, f in rgb_pairs]
    assert written["protocol"].startswith("bci")
    assert written["psnr"] == pytest.approx(np.mean([e[0] for e in expected]), abs=1e-6)
    assert written["ssim"] == pytest.approx(np.mean([e[1] for e in expected]), abs=1e-6)


def test_eval_config_has_protocol_default():
    cfg = medgen.api.compose("eval", ["real=a", "fake=b"])
    assert cfg.protocol == "float"
