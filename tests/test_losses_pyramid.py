"""PyramidL1Loss (BCI, Liu et al. 2022) against an independent numpy/scipy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.losses import PyramidL1Loss

ndimage = pytest.importorskip("scipy.ndimage")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _by_hand(pred: np.ndarray, target: np.ndarray, levels: int, weights, blurs: int = 4) -> float:
    """Explicit loops: scipy correlate (torch's 'reflect' is scipy's 'mirror'), then [::2]."""
    ndim = pred.ndim - 2
    x = np.arange(3) - 1.0
    g = np.exp(-(x**2) / 2.0)
    kernel = g if ndim == 1 else np.multiply.outer(g, g)
    if ndim == 3:
        kernel = np.multiply.outer(kernel, g)
    kernel = kernel / kernel.sum()

    def blur(image: np.ndarray) -> np.ndarray:
        out = np.empty_like(image)
        for b in range(image.shape[0]):
            for c in range(image.shape[1]):
                channel = image[b, c]
                for _ in range(blurs):
                    channel = ndimage.correlate(channel, kernel, mode="mirror")
                out[b, c] = channel
        return out

    total = 0.0
    p, t = pred.astype(np.float64), target.astype(np.float64)
    for level in range(levels):
        if level > 0:
            step = (slice(None), slice(None)) + (slice(None, None, 2),) * ndim
            p, t = blur(p)[step], blur(t)[step]
        total += weights[level] * np.abs(p - t).mean()
    return total


@pytest.mark.parametrize(
    ("spatial_dims", "shape", "levels"),
    [(2, (2, 3, 37, 24), 4), (2, (1, 1, 16, 16), 3), (3, (2, 2, 13, 10, 12), 3)],
)
def test_matches_numpy_scipy(spatial_dims, shape, levels):
    gen = torch.Generator().manual_seed(spatial_dims)
    pred = torch.rand(shape, generator=gen, dtype=torch.float64)
    target = torch.rand(shape, generator=gen, dtype=torch.float64)
    loss = PyramidL1Loss(spatial_dims=spatial_dims, num_levels=levels)
    value = loss(pred, target)
    expected = _by_hand(pred.numpy(), target.numpy(), levels, [25.0] * levels)
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(expected, rel=1e-12)
    # float32 too, kernel follows the input dtype
    value32 = loss(pred.float(), target.float())
    assert value32.dtype == torch.float32
    assert float(value32) == pytest.approx(expected, rel=1e-5)


def test_level_weights_sequence_and_blurs():
    gen = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 3, 32, 20, generator=gen, dtype=torch.float64)
    target = torch.rand(2, 3, 32, 20, generator=gen, dtype=torch.float64)
    weights = (1.0, 0.5, 2.0, 4.0)
    loss = PyramidL1Loss(level_weights=weights, num_blurs=2)
    expected = _by_hand(pred.numpy(), target.numpy(), 4, weights, blurs=2)
    assert float(loss(pred, target)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="level_weights has 2 entries"):
        PyramidL1Loss(level_weights=(1.0, 2.0))


def test_zero_for_identical_and_one_level_is_scaled_l1():
    x = torch.rand(2, 3, 16, 16)
    assert float(PyramidL1Loss()(x, x.clone())) == 0.0
    y = torch.rand(2, 3, 16, 16)
    one = PyramidL1Loss(num_levels=1)(x, y)
    torch.testing.assert_close(one, 25.0 * torch.nn.functional.l1_loss(x, y))


def test_gradient_flows_and_kernel_is_not_saved():
    loss = PyramidL1Loss(spatial_dims=3, num_levels=2)
    pred = torch.rand(1, 2, 8, 8, 8, requires_grad=True)
    loss(pred, torch.rand(1, 2, 8, 8, 8)).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum() > 0
    assert "kernel" not in loss.state_dict() and loss.kernel.shape == (1, 1, 3, 3, 3)
    assert float(loss.kernel.sum()) == pytest.approx(1.0, abs=1e-15)


def test_small_image_error_names_the_size():
    loss = PyramidL1Loss(num_levels=4)
    loss(torch.rand(1, 1, 5, 5), torch.rand(1, 1, 5, 5))  # 5 -> 3 -> 2 -> 1: just fits
    with pytest.raises(ValueError, match=r"\(4, 9\).*at least 5 pixels"):
        loss(torch.rand(1, 1, 4, 9), torch.rand(1, 1, 4, 9))
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="spatial_dims"):
        PyramidL1Loss(spatial_dims=1)
