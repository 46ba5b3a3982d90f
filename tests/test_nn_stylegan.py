"""Tests for the FIR resampling layers and StyleGAN2 building blocks, at tiny 2D and 3D shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medgen.nn import (
    Blur,
    EqualConv,
    EqualLinear,
    FIRDownsample,
    FIRUpsample,
    ModulatedConv,
    NoiseInjection,
    make_fir_kernel,
    upfirdn,
)

DIMS = (2, 3)
SPATIAL = {2: (8, 8), 3: (4, 4, 4)}
CONV = {2: F.conv2d, 3: F.conv3d}
CONV_T = {2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _interior(x: torch.Tensor, margin: int) -> torch.Tensor:
    """Crop ``margin`` samples from both ends of every spatial axis."""
    return x[(Ellipsis, *(slice(margin, -margin),) * (x.ndim - 2))]


def _naive_upfirdn(x, kernel, up=1, down=1, pad=(0, 0)):
    """Textbook upfirdn: zero-insertion, pad, true convolution (flipped kernel), subsample."""
    d = x.ndim - 2
    b, c, *n = x.shape
    u = x.new_zeros(b, c, *(s * up for s in n))
    u[(Ellipsis, *(slice(None, None, up),) * d)] = x
    u = F.pad(u, [pad[0], pad[1]] * d)
    k = kernel.flip(list(range(d)))[None, None].repeat(c, 1, *(1,) * d)
    y = CONV[d](u, k, groups=c)
    return y[(Ellipsis, *(slice(None, None, down),) * d)]


# --------------------------------------------------------------------------------------------------
# FIR kernel and upfirdn


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_make_fir_kernel(spatial_dims):
    k = make_fir_kernel([1, 3, 3, 1], spatial_dims)
    assert k.shape == (4,) * spatial_dims
    assert k.dtype == torch.float32
    torch.testing.assert_close(k.sum(), torch.tensor(1.0))
    t = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    outer = t[:, None] * t if spatial_dims == 2 else t[:, None, None] * t[:, None] * t
    torch.testing.assert_close(k, outer)
    raw = make_fir_kernel([1, 2, 1], spatial_dims, normalize=False, gain=2.0)
    assert raw.sum().item() == pytest.approx(2.0 * 4**spatial_dims)


def test_make_fir_kernel_rejects_bad_taps():
    with pytest.raises(ValueError, match="non-empty 1D"):
        make_fir_kernel([], 2)
    with pytest.raises(ValueError, match="non-empty 1D"):
        make_fir_kernel([[1, 2], [3, 4]], 2)
    with pytest.raises(ValueError, match="sum to 0"):
        make_fir_kernel([1, -1], 2)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        make_fir_kernel([1, 1], 1)


def _numpy_upfirdn_1d(h: np.ndarray, x: np.ndarray, up: int, down: int) -> np.ndarray:
    """Textbook 1D upfirdn (as ``scipy.signal.upfirdn``): zero-stuff, full convolution, subsample."""
    u = np.zeros((len(x) - 1) * up + 1)
    u[::up] = x
    return np.convolve(u, h)[::down]


@pytest.mark.parametrize("up, down", [(1, 2), (2, 1), (2, 2), (3, 2)])
def test_upfirdn_matches_numpy_textbook(up, down):
    taps = torch.tensor([1.0, 2.0, 5.0, -1.0], dtype=torch.float64)  # asymmetric: tests the flip
    x = _randn(2, 3, 7, 6, dtype=torch.float64)
    h = taps.numpy()
    ref = np.apply_along_axis(lambda v: _numpy_upfirdn_1d(h, v, up, down), 2, x.numpy())
    ref = torch.from_numpy(np.apply_along_axis(lambda v: _numpy_upfirdn_1d(h, v, up, down), 3, ref))
    pad = (3, 4 - up)  # the "full" output: (k - 1, k - up)
    full = taps[:, None] * taps
    torch.testing.assert_close(upfirdn(x, full, up, down, pad), ref)
    torch.testing.assert_close(upfirdn(x, taps, up, down, pad), ref)  # separable


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize(
    "up, down, pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (0, -1)), (3, 1, 4)]
)
def test_upfirdn_matches_naive(spatial_dims, up, down, pad):
    x = _randn(2, 3, *(5,) * spatial_dims, dtype=torch.float64)
    taps = torch.tensor([2.0, -1.0, 4.0], dtype=torch.float64)
    kernel = make_fir_kernel(taps, spatial_dims, normalize=False).double()
    pair = (pad, pad) if isinstance(pad, int) else pad
    ref = _naive_upfirdn(x, kernel, up, down, pair)
    out = upfirdn(x, kernel, up=up, down=down, pad=pad)
    n_out = (5 * up + sum(pair) - 3) // down + 1
    assert out.shape == (2, 3, *(n_out,) * spatial_dims)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(upfirdn(x, taps, up=up, down=down, pad=pad), ref)


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_upfirdn_plain_equals_depthwise_conv(spatial_dims):
    x = _randn(2, 4, *SPATIAL[spatial_dims])
    kernel = make_fir_kernel([1, 3, 3, 1], spatial_dims)
    weight = kernel[None, None].repeat(4, 1, *(1,) * spatial_dims)
    ref = CONV[spatial_dims](F.pad(x, [2, 1] * spatial_dims), weight, groups=4)
    torch.testing.assert_close(upfirdn(x, kernel, pad=(2, 1)), ref)


def test_upfirdn_rejects_bad_input():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="1D .* or 2D"):
        upfirdn(x, torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        upfirdn(torch.zeros(1, 1, 4), torch.ones(2))
    with pytest.raises(ValueError, match=">= 1"):
        upfirdn(x, torch.ones(2), up=0)
    with pytest.raises(ValueError, match="pair"):
        upfirdn(x, torch.ones(2), pad=(1, 2, 3))


def test_upfirdn_gradcheck():
    x2 = _randn(1, 2, 4, 3, dtype=torch.float64).requires_grad_()
    k2 = make_fir_kernel([1, 3, 3, 1], 2).double()
    assert torch.autograd.gradcheck(
        lambda t: upfirdn(t, k2, up=2, pad=(2, 1)), (x2,), fast_mode=True
    )
    assert torch.autograd.gradcheck(lambda t: upfirdn(t, k2, down=2, pad=(1, 1)), (x2,))
    x3 = _randn(1, 1, 4, 3, 3, dtype=torch.float64).requires_grad_()
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: upfirdn(t, taps, up=2, down=3, pad=1), (x3,))


# --------------------------------------------------------------------------------------------------
# Blur / FIRDownsample / FIRUpsample


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_blur_keeps_size_and_constants(spatial_dims):
    blur = Blur(spatial_dims)
    x = torch.full((2, 3, *(8,) * spatial_dims), 2.5)
    y = blur(x)
    assert y.shape == x.shape
    torch.testing.assert_close(_interior(y, 2), torch.full_like(_interior(y, 2), 2.5))
    # upsample_factor is a gain of factor ** spatial_dims; explicit pads change the size.
    assert Blur(spatial_dims, upsample_factor=2).kernel.sum().item() == pytest.approx(
        2**spatial_dims
    )
    assert Blur(spatial_dims, pad=(1, 1))(x).shape[2:] == (7,) * spatial_dims


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 2, 1), (1, 1)])
def test_fir_downsample(spatial_dims, taps):
    down = FIRDownsample(spatial_dims, taps)
    x = torch.full((2, 3, *(8,) * spatial_dims), -1.5)
    y = down(x)
    assert y.shape == (2, 3, *(4,) * spatial_dims)
    torch.testing.assert_close(_interior(y, 1), torch.full_like(_interior(y, 1), -1.5))
    assert down(torch.zeros(1, 1, *(7,) * spatial_dims)).shape[2:] == (3,) * spatial_dims


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_fir_downsample_box_is_avg_pool(spatial_dims):
    x = _randn(2, 3, *SPATIAL[spatial_dims])
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[spatial_dims]
    torch.testing.assert_close(FIRDownsample(spatial_dims, (1, 1))(x), pool(x, 2))


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 2, 1)])
def test_fir_upsample(spatial_dims, taps):
    up = FIRUpsample(spatial_dims, taps)
    x = torch.full((2, 3, *(4,) * spatial_dims), 0.75)
    y = up(x)
    assert y.shape == (2, 3, *(8,) * spatial_dims)
    torch.testing.assert_close(_interior(y, 2), torch.full_like(_interior(y, 2), 0.75))
    # DC gain 1: a signal that vanishes near the borders keeps its mean exactly.
    z = F.pad(_randn(2, 3, *(4,) * spatial_dims), [2, 2] * spatial_dims)
    torch.testing.assert_close(
        up(z).mean(dim=tuple(range(2, 2 + spatial_dims))),
        z.mean(dim=tuple(range(2, 2 + spatial_dims))),
    )


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_fir_upsample_box_is_nearest(spatial_dims):
    x = _randn(2, 3, *SPATIAL[spatial_dims])
    ref = F.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(FIRUpsample(spatial_dims, (1, 1))(x), ref)


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_fir_modules_hold_non_persistent_kernel(spatial_dims):
    for module in (Blur(spatial_dims), FIRDownsample(spatial_dims), FIRUpsample(spatial_dims)):
        assert sum(p.numel() for p in module.parameters()) == 0
        assert dict(module.state_dict()) == {}
        assert "kernel" in dict(module.named_buffers())
        module = module.double()
        assert module.kernel.dtype == torch.float64
        y = module(_randn(1, 2, *SPATIAL[spatial_dims], dtype=torch.float64))
        assert y.dtype == torch.float64
        with pytest.raises(ValueError, match="expects"):
            module(torch.zeros(1, 2, *(4,) * (5 - spatial_dims)))


# --------------------------------------------------------------------------------------------------
# parameter tables


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: EqualLinear(8, 16), 8 * 16 + 16),
        (lambda: EqualLinear(8, 16, bias=False), 8 * 16),
        (lambda: EqualConv(2, 3, 5, 3), 5 * 3 * 3**2 + 5),
        (lambda: EqualConv(3, 3, 5, 3), 5 * 3 * 3**3 + 5),
        (lambda: EqualConv(3, 3, 5, 1, bias=False), 5 * 3),
        (lambda: ModulatedConv(2, 4, 6, 3, style_dim=8), 6 * 4 * 3**2 + 8 * 4 + 4),
        (lambda: ModulatedConv(3, 4, 6, 3, style_dim=8), 6 * 4 * 3**3 + 8 * 4 + 4),
        (lambda: ModulatedConv(3, 4, 6, 3, style_dim=8, up=True), 6 * 4 * 3**3 + 8 * 4 + 4),
        (lambda: ModulatedConv(2, 4, 6, 1, style_dim=8, demodulate=False), 6 * 4 + 8 * 4 + 4),
        (lambda: NoiseInjection(2), 1),
        (lambda: NoiseInjection(3), 1),
    ],
)
def test_parameter_counts(make, expected):
    assert _n_params(make()) == expected


# --------------------------------------------------------------------------------------------------
# equalised learning rate


@pytest.mark.parametrize("lr_multiplier", [1.0, 0.01])
def test_equal_linear(lr_multiplier):
    torch.manual_seed(0)
    layer = EqualLinear(64, 32, bias_init=0.5, lr_multiplier=lr_multiplier)
    assert layer.weight.std().item() == pytest.approx(1.0 / lr_multiplier, rel=0.1)
    w = layer.effective_weight()
    torch.testing.assert_close(w, layer.weight * lr_multiplier / math.sqrt(64))
    b = layer.effective_bias()
    torch.testing.assert_close(b, torch.full((32,), 0.5))  # bias_init is the effective value
    x = _randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, w, b))
    act = EqualLinear(64, 32, lr_multiplier=lr_multiplier, activation="lrelu")
    ref = F.leaky_relu(F.linear(x, act.effective_weight(), act.effective_bias()), 0.2)
    torch.testing.assert_close(act(x), ref * math.sqrt(2))
    assert isinstance(EqualLinear(4, 4, activation="tanh").act, nn.Tanh)
    assert EqualLinear(4, 4, bias=False).effective_bias() is None


def test_equal_linear_rejects_bad_lr_multiplier():
    with pytest.raises(ValueError, match="lr_multiplier"):
        EqualLinear(4, 4, lr_multiplier=0.0)


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_equal_conv(spatial_dims, stride, padding):
    conv = EqualConv(spatial_dims, 3, 5, 3, stride=stride, padding=padding)
    with torch.no_grad():
        conv.bias.normal_()
    w = conv.effective_weight()
    torch.testing.assert_close(w, conv.weight / math.sqrt(3 * 3**spatial_dims))
    x = _randn(2, 3, *SPATIAL[spatial_dims])
    ref = CONV[spatial_dims](x, w, conv.bias, stride=stride, padding=padding)
    torch.testing.assert_close(conv(x), ref)


# --------------------------------------------------------------------------------------------------
# modulated convolution

# mode -> (up, down). The reference loop hard-codes StyleGAN2's blur paddings for K=3 and 4 taps:
# (1, 1) after the transposed conv, (2, 2) before the strided conv. That these put the outputs on the
# grid of FIRUpsample / FIRDownsample is checked in test_modulated_conv_resampling_grid.
MODES = {"plain": (False, False), "up": (True, False), "down": (False, True)}


def _reference_modconv(m: ModulatedConv, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Per-sample loop: build the (de)modulated weight by hand and call F.conv{2,3}d."""
    d = m.spatial_dims
    k = m.kernel_size
    outs = []
    for b in range(x.shape[0]):
        s = style[b] @ (m.affine.weight / math.sqrt(m.style_dim)).t() + m.affine.bias  # (C_in,)
        w = m.weight / math.sqrt(m.in_channels * k**d) * s.reshape(1, -1, *(1,) * d)
        if m.demodulate:
            norm = torch.sqrt(w.square().sum(dim=tuple(range(1, d + 2))) + 1e-8)
            w = w / norm.reshape(-1, 1, *(1,) * d)
        xb = x[b : b + 1]
        if m.up:
            y = CONV_T[d](xb, w.transpose(0, 1), stride=2)
            y = upfirdn(y, make_fir_kernel((1, 3, 3, 1), d, gain=2.0**d), pad=(1, 1))
        elif m.down:
            y = upfirdn(xb, make_fir_kernel((1, 3, 3, 1), d), pad=(2, 2))
            y = CONV[d](y, w, stride=2)
        else:
            y = CONV[d](xb, w, padding=k // 2)
        outs.append(y)
    return torch.cat(outs)


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_matches_reference_loop(spatial_dims, mode, demodulate):
    up, down = MODES[mode]
    torch.manual_seed(0)
    m = ModulatedConv(spatial_dims, 3, 4, 3, style_dim=5, demodulate=demodulate, up=up, down=down)
    with torch.no_grad():
        m.affine.bias.normal_()  # styles away from 1, so modulation matters
    x = _randn(2, 3, *SPATIAL[spatial_dims], seed=1)
    style = _randn(2, 5, seed=2)
    ref = _reference_modconv(m, x, style)
    factor = 2.0 if up else 0.5 if down else 1.0
    n_out = tuple(int(n * factor) for n in SPATIAL[spatial_dims])
    assert ref.shape == (2, 4, *n_out)
    torch.testing.assert_close(m(x, style), ref, atol=1e-5, rtol=1e-5)
    m.fused_modconv = False
    torch.testing.assert_close(m(x, style), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("mode", ["up", "down"])
def test_modulated_conv_resampling_grid(spatial_dims, kernel_size, mode):
    """With a centred delta weight and unit styles, resampling equals FIRUpsample / FIRDownsample."""
    up, down = MODES[mode]
    m = ModulatedConv(spatial_dims, 2, 2, kernel_size, 4, demodulate=False, up=up, down=down)
    with torch.no_grad():
        m.weight.zero_()
        centre = (kernel_size // 2,) * spatial_dims
        for c in range(2):
            m.weight[(c, c, *centre)] = 1.0 / m.weight_scale
        m.affine.weight.zero_()  # styles = bias = 1
    x = _randn(2, 2, *SPATIAL[spatial_dims])
    ref = (FIRUpsample if up else FIRDownsample)(spatial_dims)(x)
    torch.testing.assert_close(m(x, _randn(2, 4)), ref)


@pytest.mark.parametrize("spatial_dims, size, channels", [(2, 32, 32), (3, 12, 16)])
def test_modulated_conv_demodulation_gives_unit_std(spatial_dims, size, channels):
    torch.manual_seed(0)
    m = ModulatedConv(spatial_dims, channels, 8, 3, style_dim=16)
    x = _randn(4, channels, *(size,) * spatial_dims, seed=3)
    style = _randn(4, 16, seed=4) * 2
    with torch.no_grad():
        y = _interior(m(x, style), 1)  # zero padding lowers the variance at the borders
        std = y.transpose(0, 1).reshape(8, -1).std(dim=1)
        torch.testing.assert_close(std, torch.ones(8), atol=0.1, rtol=0)
        m.demodulate = False  # without demodulation the std follows the styles
        std_raw = _interior(m(x, style), 1).transpose(0, 1).reshape(8, -1).std(dim=1)
        assert (std_raw - 1).abs().max() > 0.1


def test_modulated_conv_rejects_bad_config():
    with pytest.raises(ValueError, match="both upsample and downsample"):
        ModulatedConv(2, 2, 2, 3, 4, up=True, down=True)
    with pytest.raises(ValueError, match="odd"):
        ModulatedConv(2, 2, 2, 4, 4)
    assert ModulatedConv(2, 2, 2, 4, 4, up=True)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4)).shape[
        2:
    ] == (8, 8)
    with pytest.raises(ValueError, match="expects x"):
        ModulatedConv(3, 2, 2, 3, 4)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4))


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_modulated_conv_float64_and_gradients(spatial_dims):
    m = ModulatedConv(spatial_dims, 2, 3, 3, style_dim=4, up=True).double()
    x = _randn(1, 2, *(3,) * spatial_dims, dtype=torch.float64).requires_grad_()
    style = _randn(1, 4, dtype=torch.float64).requires_grad_()
    y = m(x, style)
    assert y.dtype == torch.float64 and y.shape == (1, 3, *(6,) * spatial_dims)
    if spatial_dims == 2:
        assert torch.autograd.gradcheck(m, (x, style), fast_mode=True)
    y.square().sum().backward()
    assert m.weight.grad is not None and m.affine.weight.grad is not None


# --------------------------------------------------------------------------------------------------
# noise injection


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_noise_injection(spatial_dims):
    layer = NoiseInjection(spatial_dims)
    x = _randn(2, 3, *SPATIAL[spatial_dims])
    torch.testing.assert_close(layer(x), x)  # strength 0 at init
    noise = _randn(2, 1, *SPATIAL[spatial_dims], seed=5)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    torch.testing.assert_close(layer(x, noise), x + 0.5 * noise)
    a = layer(x, generator=torch.Generator().manual_seed(7))
    b = layer(x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    diff = a - x  # one noise image shared by every channel
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff))
    assert not torch.allclose(a, layer(x, generator=torch.Generator().manual_seed(8)))
    assert layer.double()(x.double()).dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# torch.compile


class _TinySynthesis(nn.Module):
    """The layers of this file in one small forward, compiled once per spatial_dims."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.up = ModulatedConv(spatial_dims, 2, 3, 3, style_dim=4, up=True)
        self.noise = NoiseInjection(spatial_dims)
        self.fir = nn.Sequential(FIRUpsample(spatial_dims), FIRDownsample(spatial_dims))
        self.down = ModulatedConv(
            spatial_dims, 3, 2, 1, style_dim=4, down=True, fused_modconv=False
        )

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        y = self.noise(self.up(x, w), noise)
        return self.down(self.fir(y), w)


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_compiles_without_graph_breaks(spatial_dims):
    """Blur, EqualLinear (the style affine) and upfirdn run inside the modules compiled here."""
    torch.manual_seed(0)
    net = _TinySynthesis(spatial_dims)
    with torch.no_grad():
        net.noise.weight.fill_(0.3)
    x = _randn(2, 2, *(4,) * spatial_dims)
    w = _randn(2, 4, seed=1)
    noise = _randn(2, 1, *(8,) * spatial_dims, seed=2)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    out = compiled(x, w, noise)
    assert out.shape == (2, 2, *(4,) * spatial_dims)
    torch.testing.assert_close(out, net(x, w, noise))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_equal_conv_down_halves_and_keeps_constants(spatial_dims, kernel_size):
    """EqualConv(down=True): blur, then a stride-2 conv (StyleGAN2's discriminator)."""
    conv = EqualConv(spatial_dims, 2, 3, kernel_size, bias=False, down=True)
    x = torch.ones(1, 2, *(8,) * spatial_dims)
    y = conv(x)
    assert y.shape == (1, 3, *(4,) * spatial_dims)
    # Away from the zero-padded border a constant input gives w summed over its taps.
    expected = conv.effective_weight().flatten(1).sum(1)
    centre = (slice(None), slice(None), *(slice(1, 3),) * spatial_dims)
    torch.testing.assert_close(
        y[centre], expected.reshape(1, 3, *(1,) * spatial_dims).expand_as(y[centre])
    )


def test_style_conv_adds_noise_bias_and_activation():
    from medgen.nn.stylegan import StyleConv

    torch.manual_seed(0)
    layer = StyleConv(2, 2, 3, style_dim=4)
    layer.noise.weight.data.fill_(0.5)
    layer.bias.data.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x, w, noise = torch.randn(2, 2, 5, 5), torch.randn(2, 4), torch.randn(2, 1, 5, 5)
    y = layer.conv(x, w) + 0.5 * noise + layer.bias.reshape(1, 3, 1, 1)
    expected = F.leaky_relu(y, 0.2) * math.sqrt(2.0)
    torch.testing.assert_close(layer(x, w, noise), expected)
    clamped = StyleConv(2, 2, 3, style_dim=4, clamp=0.01)
    assert float(clamped(x, w).abs().max()) <= 0.01
    # One generator per sample: the noise of a sample does not depend on the batch.
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    pair = layer(x, w, generator=gens)
    alone = layer(x[1:], w[1:], generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(pair[1:], alone)
