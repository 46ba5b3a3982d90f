"""Tests for the AGGrGAN aggregation ops: SSIM selection, sharpness merge, style transfer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medgen.losses import VGGFeatures
from medgen.models.aggrgan import (
    aggregate,
    sharpness_merge,
    sharpness_weights,
    ssim_select,
    style_transfer,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _smooth(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Smooth random images in [0, 1]: upsampled noise, so SSIM has structure to compare."""
    g = torch.Generator().manual_seed(seed)
    b, c, *spatial = shape
    coarse = torch.rand(b, c, *[max(s // 4, 2) for s in spatial], generator=g)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(coarse, size=tuple(spatial), mode=mode, align_corners=False)


def _noisy(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def style_vgg() -> VGGFeatures:
    # the re-implementation's layers: features indices 0, 5, 10 of VGG-19
    return VGGFeatures.random("vgg19", layers=(0, 5, 10), seed=0)


# ---- selection


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_selection_with_reference_picks_the_noisy_copies_in_order(spatial):
    reference = _smooth((3, 1, *spatial), seed=0)
    candidates = torch.stack(
        [
            _noisy(reference, 0.15, seed=1),  # a noisier copy: second
            _smooth((3, 1, *spatial), seed=7),  # unrelated: dropped
            _noisy(reference, 0.03, seed=2),  # a close copy: first
        ]
    )
    selected, indices, scores = ssim_select(candidates, reference, k=2)
    assert selected.shape == (2, 3, 1, *spatial)
    assert indices.dtype == torch.long and indices.shape == (2, 3)
    assert scores.shape == (3, 3)
    assert indices.tolist() == [[2, 2, 2], [0, 0, 0]]
    assert torch.equal(selected[0], candidates[2]) and torch.equal(selected[1], candidates[0])
    assert (scores[2] > scores[0]).all() and (scores[0] > scores[1]).all()
    # one reference broadcast to every sample
    shared = reference[:1]
    _, idx_shared, scores_shared = ssim_select(candidates[:, :1], shared, k=1)
    assert idx_shared.tolist() == [[2]]
    torch.testing.assert_close(scores_shared, scores[:, :1])


def test_selection_per_sample_can_differ():
    reference = _smooth((2, 1, 24, 24), seed=0)
    good, bad = _noisy(reference, 0.02, 3), _smooth((2, 1, 24, 24), seed=9)
    # sample 0: candidate 0 is good; sample 1: candidate 1 is good
    candidates = torch.stack([torch.stack([good[0], bad[1]]), torch.stack([bad[0], good[1]])])
    _, indices, _ = ssim_select(candidates, reference, k=1)
    assert indices.tolist() == [[0, 1]]


def test_mutual_ssim_picks_the_two_similar_candidates():
    base = _smooth((2, 1, 32, 32), seed=4)
    candidates = torch.stack(
        [_noisy(base, 0.05, 5), _smooth((2, 1, 32, 32), seed=11), _noisy(base, 0.05, 6)]
    )
    selected, indices, scores = ssim_select(candidates, k=2)
    assert sorted(indices[:, 0].tolist()) == [0, 2] and sorted(indices[:, 1].tolist()) == [0, 2]
    assert (scores[1] < scores[0]).all() and (scores[1] < scores[2]).all()
    assert selected.shape == (2, 2, 1, 32, 32)


def test_selection_keeps_gradients_and_checks_arguments():
    candidates = _smooth((3, 2, 1, 16, 16), seed=0).view(3, 2, 1, 16, 16).requires_grad_(True)
    selected, _, scores = ssim_select(candidates, k=2)
    assert not scores.requires_grad
    selected.sum().backward()
    assert candidates.grad.abs().sum() > 0
    small = torch.rand(3, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="smaller than the SSIM window kernel_size=11") as info:
        ssim_select(small)
    assert "kernel_size <= 7" in str(info.value)
    assert ssim_select(small, kernel_size=7)[1].shape == (2, 1)
    with pytest.raises(ValueError, match="k must be"):
        ssim_select(small, k=4, kernel_size=7)
    with pytest.raises(ValueError, match="two candidates"):
        ssim_select(small[:1], k=1, kernel_size=7)
    with pytest.raises(ValueError, match="reference must be"):
        ssim_select(small, torch.rand(2, 1, 8, 8), kernel_size=7)
    with pytest.raises(ValueError, match=r"\(K, B, C, H, W\)"):
        ssim_select(torch.rand(3, 1, 8, 8))


# ---- sharpness weights and merge


def _blur(x: torch.Tensor, passes: int = 3) -> torch.Tensor:
    dims = x.ndim - 2
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    pad = (1, 1) * dims
    for _ in range(passes):
        x = pool(F.pad(x, pad, mode="replicate"), 3, stride=1)
    return x


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_weights_sum_to_one_and_favour_the_sharp_candidate(spatial):
    # a sharp binary texture, the same texture blurred, and a smooth image
    g = torch.Generator().manual_seed(0)
    coarse = (torch.rand(2, 2, *[n // 2 for n in spatial], generator=g) > 0.5).float()
    sharp = F.interpolate(coarse, scale_factor=2, mode="nearest")
    blurred = _blur(sharp)
    other = _smooth((2, 2, *spatial), seed=3)
    images = torch.stack([sharp, blurred, other])
    weights = sharpness_weights(images, sigma=2.0)
    assert weights.shape == images.shape
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(2, 2, *spatial))
    assert torch.equal(weights[:, :, 0], weights[:, :, 1])  # one weight per pixel for all channels
    assert (weights[0] > weights[1]).all()  # the sharp texture wins everywhere
    assert weights[0].mean() > 0.6
    two = sharpness_weights(torch.stack([sharp, blurred]), sigma=2.0)
    assert (two[0] > 0.5).all() and two[0].mean() > 0.75


def test_flat_images_get_equal_weights():
    flat = torch.stack([torch.full((1, 1, 8, 8), v) for v in (0.1, 0.5, 0.9, 0.3)])
    weights = sharpness_weights(flat)
    torch.testing.assert_close(weights, torch.full_like(flat, 0.25))
    volumes = torch.zeros(2, 1, 1, 6, 6, 6)
    torch.testing.assert_close(sharpness_weights(volumes, sigma=0.0), torch.full_like(volumes, 0.5))
    # one flat and one textured candidate: the textured one gets all the weight where it has edges
    mixed = torch.stack([torch.zeros(1, 1, 16, 16), _smooth((1, 1, 16, 16), seed=2)])
    w = sharpness_weights(mixed)
    torch.testing.assert_close(w.sum(0), torch.ones(1, 1, 16, 16))
    assert (w[1] > 0.99).all()


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_merge_of_identical_candidates_returns_them(spatial):
    image = _smooth((2, 3, *spatial), seed=5)
    merged = sharpness_merge(torch.stack([image, image, image]))
    assert merged.shape == image.shape
    torch.testing.assert_close(merged, image)


def test_merge_follows_the_weights_and_is_differentiable():
    images = torch.stack([_smooth((1, 1, 16, 16), seed=s) for s in (1, 2)]).requires_grad_(True)
    merged = sharpness_merge(images, sigma=1.0)
    weights = sharpness_weights(images, sigma=1.0)
    torch.testing.assert_close(merged, (weights * images).sum(0))
    merged.sum().backward()
    torch.testing.assert_close(images.grad, weights)
    with pytest.raises(ValueError, match="sigma"):
        sharpness_weights(images, sigma=-1.0)


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_aggregate_selects_then_merges(spatial):
    reference = _smooth((2, 1, *spatial), seed=0)
    candidates = torch.stack(
        [_noisy(reference, 0.1, 1), _smooth((2, 1, *spatial), seed=8), _noisy(reference, 0.02, 2)]
    )
    merged, selection = aggregate(candidates, reference, k=2)
    assert merged.shape == reference.shape
    assert selection["indices"].tolist() == [[2, 2], [0, 0]]
    assert selection["scores"].shape == (3, 2)
    expected = sharpness_merge(candidates[[2, 0]])
    torch.testing.assert_close(merged, expected)
    merged_mutual, selection_mutual = aggregate(candidates)
    assert merged_mutual.shape == reference.shape and selection_mutual["indices"].shape == (2, 2)


# ---- style transfer


def _stripes(size: int) -> torch.Tensor:
    x = torch.linspace(0, 1, size)
    return (0.5 + 0.5 * torch.sign(torch.sin(25 * x))).expand(size, size)[None, None].clone()


def _content(batch: int, size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return (0.5 + 0.3 * torch.sin(6 * xx) * torch.cos(4 * yy)).expand(batch, 1, size, size).clone()


def test_style_transfer_lowers_the_style_loss(style_vgg):
    content, style = _content(2, 32), _stripes(32)
    out, history = style_transfer(
        content,
        style,
        style_vgg,
        content_layers=(10,),
        style_layers=(0, 5, 10),
        content_weight=0.0,  # random VGG features: the style term alone must be optimised
        style_weight=10.0,
        steps=30,
        lr=0.01,
        return_history=True,
    )
    assert out.shape == content.shape and out.dtype == content.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert set(history) == {"total", "content", "style"} and len(history["style"]) == 30
    assert history["style"][-1] < 0.5 * history["style"][0]
    assert history["content"][0] == 0.0  # initialised from the content
    assert not torch.equal(out, content)


def test_style_transfer_defaults_shapes_and_errors(style_vgg):
    content = _content(2, 16)
    # weights balance: with content weight the result stays near the content
    out = style_transfer(
        content, _stripes(24), style_vgg, content_layers=(10,), style_layers=(0, 5), steps=3
    )
    assert out.shape == content.shape
    # a batch of style images, value range other than [0, 1], noise initialisation
    shifted = VGGFeatures.random("vgg19", layers=(0, 5), value_range=(-1.0, 1.0))
    out = style_transfer(
        content * 2 - 1,
        torch.rand(2, 1, 16, 16) * 2 - 1,
        shifted,
        content_layers=(5,),
        style_layers=(0,),
        steps=2,
        init="noise",
    )
    assert out.shape == content.shape and out.min() >= -1 and out.max() <= 1
    # volumes are stylised per axial slice; style a 2D image or a volume of the same depth
    volume = torch.rand(2, 1, 4, 16, 16)
    assert (
        style_transfer(
            volume, _stripes(16), style_vgg, content_layers=(5,), style_layers=(0,), steps=1
        ).shape
        == volume.shape
    )
    out_vol = style_transfer(
        volume,
        torch.rand(1, 1, 4, 16, 16),
        style_vgg,
        content_layers=(5,),
        style_layers=(0,),
        steps=1,
    )
    assert out_vol.shape == volume.shape
    # zero steps returns the (clamped) content, slices back in place
    torch.testing.assert_close(
        style_transfer(
            volume, _stripes(16), style_vgg, content_layers=(5,), style_layers=(0,), steps=0
        ),
        volume,
    )
    with pytest.raises(ValueError, match="deeper than this extractor"):
        style_transfer(content, _stripes(16), style_vgg, steps=1)  # Gatys' default layers
    with pytest.raises(ValueError, match="value_range"):
        style_transfer(
            content,
            _stripes(16),
            style_vgg,
            style_layers=(0,),
            content_layers=(5,),
            value_range=(0, 255),
        )
    with pytest.raises(ValueError, match="style batch"):
        style_transfer(
            content, torch.rand(3, 1, 16, 16), style_vgg, style_layers=(0,), content_layers=(5,)
        )
    with pytest.raises(ValueError, match="depth"):
        style_transfer(
            volume, torch.rand(1, 1, 3, 16, 16), style_vgg, style_layers=(0,), content_layers=(5,)
        )


def test_style_transfer_works_under_no_grad(style_vgg):
    with torch.no_grad():
        out, history = style_transfer(
            _content(1, 16),
            _stripes(16),
            style_vgg,
            content_layers=(5,),
            style_layers=(0,),
            steps=2,
            return_history=True,
        )
    assert out.shape == (1, 1, 16, 16) and len(history["total"]) == 2
    assert all(p.grad is None for p in style_vgg.parameters())
