"""Tiled (sliding-window) inference: exactness, scales, tile grid, memory bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medgen.inference import tile_grid, tile_starts, tiled_apply


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _two_convs(spatial_dims: int, cin: int = 2, cout: int = 3) -> nn.Module:
    """Receptive field 5 (radius 2): two 3x3(x3) convolutions with zero padding."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    torch.manual_seed(0)
    return nn.Sequential(conv(cin, 4, 3, padding=1), nn.Tanh(), conv(4, cout, 3, padding=1)).eval()


class _Recorder:
    """Wraps fn; records the shapes it receives."""

    def __init__(self, fn):
        self.fn, self.shapes = fn, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.fn(x)


@pytest.mark.parametrize("shape", [(2, 2, 24, 20), (1, 2, 10, 12, 8)])
def test_one_tile_is_exactly_fn(shape):
    x = torch.rand(shape)
    net = _two_convs(len(shape) - 2)
    with torch.no_grad():
        expected = net(x)
    out = tiled_apply(net, x, tile=shape[2:], overlap=0.5)
    assert torch.equal(out, expected)
    # a larger tile pads (reflect) and crops: shape kept, pointwise values unchanged
    pointwise = lambda t: t * 2 + 1  # noqa: E731
    bigger = tiled_apply(pointwise, x, tile=32)
    assert torch.equal(bigger, x * 2 + 1)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [((2, 3, 50, 37), 16, 0.25), ((1, 2, 19, 23, 17), (8, 10, 6), 0.5), ((1, 1, 40, 9), 12, 0.7)],
)
def test_pointwise_fn_is_exact_with_overlaps(shape, tile, overlap, blend):
    x = torch.randn(shape)
    out = tiled_apply(lambda t: t * 2 + 1, x, tile=tile, overlap=overlap, blend=blend)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, x * 2 + 1)
    # a 1x1 convolution mixes channels but not pixels
    conv = (nn.Conv2d if x.ndim == 4 else nn.Conv3d)(shape[1], 4, 1)
    with torch.no_grad():
        expected = conv(x)
    torch.testing.assert_close(
        tiled_apply(conv, x, tile=tile, overlap=overlap, blend=blend), expected, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    ("shape", "tile"), [((2, 2, 45, 38), 16), ((1, 2, 21, 18, 20), (10, 8, 12))]
)
def test_conv_net_matches_whole_image_when_overlap_covers_receptive_field(shape, tile):
    x = torch.rand(shape)
    net = _two_convs(len(shape) - 2)
    with torch.no_grad():
        expected = net(x)
    # overlap of 0.5 * tile >= 4 voxels = 2 * radius; the 2 voxels at inner tile edges are dropped
    out = tiled_apply(net, x, tile=tile, overlap=0.5, margin=2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # without the margin, edge outputs computed without context are blended in
    blended = tiled_apply(net, x, tile=tile, overlap=0.5)
    assert (blended - expected).abs().max() > 1e-4
    with pytest.raises(ValueError, match="2 \\* margin"):
        tiled_apply(net, x, tile=tile, overlap=0.1, margin=3)


def test_scale_up_and_down():
    torch.manual_seed(0)
    x = torch.rand(2, 2, 40, 28)
    decoder = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2, 3, 3, padding=1)).eval()
    with torch.no_grad():
        expected = decoder(x)
    out = tiled_apply(decoder, x, tile=16, overlap=0.25, scale=2.0, margin=1)
    assert out.shape == (2, 3, 80, 56)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)

    encoder = nn.AvgPool2d(2)
    out = tiled_apply(encoder, x, tile=(12, 10), overlap=0.3, scale=0.5)
    assert out.shape == (2, 2, 20, 14)
    torch.testing.assert_close(out, encoder(x), rtol=0, atol=1e-6)
    # starts are multiples of 2 so every encoded tile lands on the latent grid
    assert all(c % 2 == 0 for corner in tile_grid((40, 28), (12, 10), 0.3, 0.5) for c in corner)

    volume = torch.rand(1, 1, 24, 20, 16)
    out = tiled_apply(nn.AvgPool3d(4), volume, tile=8, overlap=0.5, scale=0.25)
    assert out.shape == (1, 1, 6, 5, 4)
    torch.testing.assert_close(out, nn.AvgPool3d(4)(volume), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 4"):
        tiled_apply(nn.AvgPool3d(4), volume[..., :15], tile=8, scale=0.25)
    with pytest.raises(ValueError, match="expected \\(1, C_out"):
        tiled_apply(nn.AvgPool3d(4), volume, tile=8, scale=0.5)  # wrong scale


def test_tile_count_and_starts():
    assert tile_starts(50, 16, 0.25) == [0, 12, 24, 34]
    assert tile_starts(16, 16, 0.25) == [0] and tile_starts(10, 16, 0.25) == [0]
    assert tile_starts(40, 12, 0.3, multiple=2) == [0, 8, 16, 24, 28]
    x = torch.rand(1, 1, 50, 37)
    per_axis = [tile_starts(50, 16, 0.25), tile_starts(37, 16, 0.25)]
    corners = tile_grid((50, 37), 16, 0.25)
    assert len(corners) == len(per_axis[0]) * len(per_axis[1]) == 4 * 3
    recorder = _Recorder(lambda t: t + 1)
    tiled_apply(recorder, x, tile=16, overlap=0.25)
    assert len(recorder.shapes) == 12
    recorder = _Recorder(lambda t: t + 1)
    tiled_apply(recorder, x, tile=16, overlap=0.25, batch_tiles=5)
    assert [s[0] for s in recorder.shapes] == [5, 5, 2]
    # stride never exceeds tile * (1 - overlap): neighbours overlap by at least that much
    for size, tile, overlap in [(97, 16, 0.25), (200, 33, 0.5), (64, 20, 0.0)]:
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(
            0 < b - a <= tile * (1 - overlap) for a, b in zip(starts[:-1], starts[1:], strict=True)
        )
        assert len(starts) == math.ceil((size - tile) / int(tile * (1 - overlap))) + 1


def test_batch_tiles_equals_one_at_a_time():
    x = torch.rand(2, 2, 33, 41)
    net = _two_convs(2)
    one = tiled_apply(net, x, tile=16, overlap=0.25)
    many = tiled_apply(net, x, tile=16, overlap=0.25, batch_tiles=4, out_channels=3)
    torch.testing.assert_close(many, one, rtol=0, atol=1e-6)
    single_precision = tiled_apply(net, x, tile=16, overlap=0.25, accumulate_dtype=torch.float32)
    torch.testing.assert_close(single_precision, one, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        tiled_apply(net, x, tile=16, out_channels=5)


def test_fn_sees_only_tiles_and_no_graph():
    x = torch.rand(1, 2, 30, 26, 22, requires_grad=True)
    net = _two_convs(3)
    recorder = _Recorder(net)
    out = tiled_apply(recorder, x, tile=(8, 10, 6), overlap=0.25, batch_tiles=2, progress=True)
    largest = max(math.prod(s) for s in recorder.shapes)
    assert largest <= 2 * 1 * 2 * 8 * 10 * 6  # batch_tiles * B * C * tile
    assert largest < x.numel() / 10
    assert all(s[2:] == (8, 10, 6) for s in recorder.shapes)
    assert out.shape == (1, 3, 30, 26, 22) and not out.requires_grad
    assert out.device == x.device


def test_bad_arguments():
    x = torch.rand(1, 1, 20, 20)
    with pytest.raises(ValueError, match="overlap"):
        tiled_apply(lambda t: t, x, tile=8, overlap=1.0)
    with pytest.raises(ValueError, match="blend"):
        tiled_apply(lambda t: t, x, tile=8, blend="linear")
    with pytest.raises(ValueError, match="B, C, H, W"):
        tiled_apply(lambda t: t, x[0], tile=8)
    with pytest.raises(ValueError, match="tile must be"):
        tiled_apply(lambda t: t, x, tile=(8, 8, 8))


def test_out_receives_the_blend_without_a_full_size_buffer(tmp_path):
    """``out=`` gives the same result as the returned buffer, also in a ``.npy`` memmap."""
    import numpy as np

    net = _two_convs(2).eval()
    x = torch.rand(1, 2, 40, 52, generator=torch.Generator().manual_seed(0))
    expected = tiled_apply(net, x, tile=16, overlap=0.5, accumulate_dtype=torch.float32)
    out = torch.full((1, 3, 40, 52), float("nan"))
    result = tiled_apply(net, x, tile=16, overlap=0.5, out=out)
    assert result is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    mapped = np.lib.format.open_memmap(tmp_path / "y.npy", "w+", np.float32, (1, 3, 40, 52))
    tiled_apply(net, x, tile=16, overlap=0.5, out=torch.from_numpy(mapped))
    mapped.flush()
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), expected)
    # one tile (padded, then cropped): copied into out
    one = torch.empty(1, 3, 40, 52)
    tiled_apply(net, x, tile=64, out=one)
    torch.testing.assert_close(one, tiled_apply(net, x, tile=64), rtol=0, atol=0)
    with pytest.raises(ValueError, match="out has shape"):
        tiled_apply(net, x, tile=16, out=torch.empty(1, 3, 40, 50))
    with pytest.raises(ValueError, match="floating"):
        tiled_apply(net, x, tile=16, out=torch.empty(1, 3, 40, 52, dtype=torch.int32))
