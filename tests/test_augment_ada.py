"""ADA: the adaptive-p controller, the augmentation pipeline in 2D and 3D, and its non-leaking."""

from __future__ import annotations

import math

import pytest
import torch

from medgen.augment import AdaptiveAugment, warp_affine
from medgen.augment.ada import OPERATIONS

ONLY = {name: 0.0 for name in OPERATIONS}


def _only(*names: str, **kwargs) -> dict:
    return {**ONLY, **{n: 1.0 for n in names}, **kwargs}


def test_controller_rises_when_d_overfits_and_falls_otherwise():
    ada = AdaptiveAugment(2, p=0.5, target=0.6, interval=4, kimg=1.0)
    confident = torch.full((8, 1), 3.0)  # sign +1 everywhere: r_t = 1 > 0.6
    for step in range(1, 9):
        ada.observe(confident)
        r_t = ada.step()
        if step % 4:
            assert r_t is None and float(ada.p) == pytest.approx(0.5 + (step // 4) * 0.032)
        else:
            assert r_t == 1.0
    # Two updates of 32 images each, kimg = 1: p += 2 * 32 / 1000.
    assert float(ada.p) == pytest.approx(0.5 + 0.064)
    unsure = torch.tensor([[1.0], [-1.0], [2.0], [-0.5]])  # r_t = 0 < 0.6
    for _ in range(4):
        ada.observe(unsure)
        ada.step()
    assert float(ada.p) == pytest.approx(0.564 - 16 / 1000)
    # p stays in [0, max_p], and a fixed-p pipeline never moves.
    low = AdaptiveAugment(2, p=0.0, interval=1, kimg=1.0)
    low.observe(-torch.ones(4, 1))
    low.step()
    assert float(low.p) == 0.0
    fixed = AdaptiveAugment(2, p=0.3, target=None, interval=1)
    fixed.observe(torch.ones(4, 1))
    assert fixed.step() is None and float(fixed.p) == pytest.approx(0.3)


def test_controller_state_resumes_from_a_state_dict():
    a = AdaptiveAugment(2, p=0.2, interval=4, kimg=1.0)
    for _ in range(6):
        a.observe(torch.ones(4, 1))
        a.step()
    b = AdaptiveAugment(2, interval=4, kimg=1.0)
    b.load_state_dict(a.state_dict())
    for module in (a, b):  # two more steps complete the second interval
        for _ in range(2):
            module.observe(-torch.ones(4, 1))
            module.step()
    assert float(a.p) == float(b.p) and int(a.steps) == int(b.steps) == 8
    assert float(a.p) == pytest.approx(0.2 + 0.016 - 0.016)  # +16 images, then r_t = 0 -> -16


def test_reduce_sums_the_statistics_of_every_rank():
    ada = AdaptiveAugment(2, p=0.5, interval=1, kimg=1.0)
    ada.observe(torch.ones(2, 1))
    # Another rank saw 6 samples with sign -1: r_t = (2 - 6) / 8 < 0.6, over 8 images.
    r_t = ada.step(lambda t: t + torch.tensor([-6.0, 6.0], dtype=t.dtype))
    assert r_t == pytest.approx(-0.5)
    assert float(ada.p) == pytest.approx(0.5 - 8 / 1000)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_identity_at_p0_and_in_eval_and_gradients_flow(spatial_dims):
    x = torch.randn(4, 2, *(8,) * spatial_dims, requires_grad=True)
    assert AdaptiveAugment(spatial_dims, p=0.0)(x) is x
    full = AdaptiveAugment(spatial_dims, p=1.0, cutout=1.0)
    assert full.eval()(x) is x
    torch.manual_seed(0)
    y = full.train()(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_kornia_and_own_warp_agree_in_2d():
    torch.manual_seed(0)
    ada = AdaptiveAugment(2, p=1.0)
    x = torch.randn(6, 1, 12, 12)
    matrix = ada.geometric_matrix(x)
    from medgen.augment.ada import _warp_kornia_2d

    torch.testing.assert_close(
        _warp_kornia_2d(x, matrix), warp_affine(x, matrix), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pixel_blits_are_exact(spatial_dims):
    """Flips, quarter turns and integer shifts move voxels without interpolation."""
    d = spatial_dims
    x = torch.randn(1, 1, *(6,) * d)
    eye = torch.eye(d + 1)[None]
    flip = eye.clone()
    flip[0, 0, 0] = -1.0  # grid order: coordinate 0 is the last tensor axis
    torch.testing.assert_close(warp_affine(x, flip), x.flip(-1), atol=1e-5, rtol=0)
    shift = eye.clone()
    shift[0, 0, d] = 2.0  # output(u) = input(u + 2) along the last axis
    shifted = warp_affine(x, shift)
    torch.testing.assert_close(shifted[..., :4], x[..., 2:], atol=1e-5, rtol=0)
    turn = eye.clone()
    turn[0, :2, :2] = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    torch.testing.assert_close(
        warp_affine(x, turn), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0
    )


def test_operation_probabilities_follow_p():
    """Each operation fires with probability p * multiplier; x-flips with p / 2."""
    torch.manual_seed(0)
    x = torch.arange(8.0).reshape(1, 1, 1, 8).expand(4000, 1, 8, 8).contiguous()
    for p in (0.2, 0.6):
        y = AdaptiveAugment(2, p=p, **_only("xflip"))(x)
        flipped = (y[:, 0, 0, 0] > 3.5).float().mean()
        assert float(flipped) == pytest.approx(p / 2, abs=0.03)
        y = AdaptiveAugment(2, p=p, **_only("brightness"))(x)
        changed = ((y - x).abs().flatten(1).amax(1) > 0).float().mean()
        assert float(changed) == pytest.approx(p, abs=0.03)


def test_augmented_statistics_stay_invertible_below_p1():
    """The fast no-leak check on the pipeline itself (ADA, sec. 2).

    Images brighter on the left, through x-flips, quarter turns and integer shifts: a quarter
    turn (probability p) makes the orientation uniform, so the left-right asymmetry ``a`` of
    augmented batches drops to about ``a * (1 - p) ** 2`` (the flips' ``1 - p`` times the turns'
    ``1 - p``). It stays positive for every p < 1, so the clean orientation can be told from
    augmented data and the generator is not rewarded for flipped samples (no leak); at p = 1
    every orientation is equally likely and the orientation is lost.
    """
    torch.manual_seed(0)
    x = torch.zeros(8000, 1, 16, 16)
    x[..., :8] = 1.0  # left half bright

    def asymmetry(p: float) -> float:
        y = AdaptiveAugment(2, p=p, **_only("xflip", "rotate90", "xint"))(x)
        return float(y[..., :8].mean() - y[..., 8:].mean())

    values = [asymmetry(p) for p in (0.0, 0.4, 0.7, 1.0)]
    assert values[0] == pytest.approx(1.0)
    assert values[0] > values[1] > values[2] > 0.05  # invertible: the orientation survives
    assert values[2] == pytest.approx(0.3**2, abs=0.04)
    assert abs(values[3]) < 0.04  # p = 1: uniform orientations, nothing left to recover


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_scaling_and_rotation_keep_the_mean_of_a_constant(spatial_dims):
    """Reflection padding: a constant image stays constant under any warp."""
    torch.manual_seed(0)
    x = torch.full((4, 1, *(8,) * spatial_dims), 0.3)
    y = AdaptiveAugment(spatial_dims, p=1.0, **_only("scale", "rotate", "aniso"))(x)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_contrast_keeps_the_mean_and_cutout_fills_a_box():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    y = AdaptiveAugment(2, p=1.0, **_only("contrast"))(x)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    x = torch.ones(16, 1, 8, 8, 8)
    y = AdaptiveAugment(3, p=1.0, **_only("cutout"), cutout_fill=-1.0)(x)
    filled = (y == -1.0).flatten(1).float().sum(1)
    # A box of half of each side around a random centre (clipped at the borders): <= 4^3 voxels.
    assert bool((filled > 0).all()) and bool((filled <= 64).all())
    assert set(y.unique().tolist()) == {-1.0, 1.0}


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="max_p"):
        AdaptiveAugment(2, p=0.5, max_p=0.2)
    with pytest.raises(ValueError, match="xflip=-1"):
        AdaptiveAugment(2, xflip=-1.0)
    with pytest.raises(ValueError, match=r"expects \(B, C, \*spatial\)"):
        AdaptiveAugment(3, p=0.5)(torch.zeros(1, 1, 4, 4))
    assert math.isclose(AdaptiveAugment(2, kimg=500).kimg, 500.0)
