"""Tests for the building blocks in medgen.nn, at tiny 2D and 3D shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from medgen.nn import (
    ConvBlock,
    DiagonalGaussian,
    Downsample,
    ResBlock,
    SelfAttention,
    Upsample,
    avg_pool_nd,
    conv_nd,
    conv_transpose_nd,
    get_act_layer,
    get_norm_layer,
    timestep_embedding,
)

SPATIAL = {2: (16, 16), 3: (8, 8, 8)}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values, so zero-initialised layers take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return module


def _input(spatial_dims: int, channels: int, batch: int = 2, seed: int = 1, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *SPATIAL[spatial_dims], generator=g, **kw)


# --------------------------------------------------------------------------------------------------
# factories


@pytest.mark.parametrize(
    "spatial_dims, conv, convt, pool",
    [
        (2, nn.Conv2d, nn.ConvTranspose2d, nn.AvgPool2d),
        (3, nn.Conv3d, nn.ConvTranspose3d, nn.AvgPool3d),
    ],
)
def test_layer_classes(spatial_dims, conv, convt, pool):
    assert conv_nd(spatial_dims) is conv
    assert conv_transpose_nd(spatial_dims) is convt
    assert avg_pool_nd(spatial_dims) is pool


@pytest.mark.parametrize("bad", [1, 4, 0, True])
def test_layer_classes_reject_spatial_dims(bad):
    for factory in (conv_nd, conv_transpose_nd, avg_pool_nd):
        with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
            factory(bad)


@pytest.mark.parametrize(
    "norm, spatial_dims, channels, cls, groups",
    [
        ("group", 2, 64, nn.GroupNorm, 32),
        ("group", 3, 12, nn.GroupNorm, 4),  # gcd(32, 12)
        ("group", 2, 7, nn.GroupNorm, 1),
        (("group", {"num_groups": 8}), 2, 16, nn.GroupNorm, 8),
        (("group", {"num_groups": 8}), 2, 12, nn.GroupNorm, 4),  # gcd(8, 12)
        ("layer", 3, 16, nn.GroupNorm, 1),
        ("instance", 2, 8, nn.InstanceNorm2d, None),
        ("instance", 3, 8, nn.InstanceNorm3d, None),
        ("batch", 2, 8, nn.BatchNorm2d, None),
        ("batch", 3, 8, nn.BatchNorm3d, None),
        ("none", 2, 8, nn.Identity, None),
        (None, 3, 8, nn.Identity, None),
    ],
)
def test_get_norm_layer_names(norm, spatial_dims, channels, cls, groups):
    layer = get_norm_layer(norm, spatial_dims, channels)
    assert type(layer) is cls
    if groups is not None:
        assert layer.num_groups == groups
        assert layer.num_channels == channels
    x = torch.randn(2, channels, *SPATIAL[spatial_dims])
    assert layer(x).shape == x.shape


def test_get_norm_layer_defaults_and_kwargs():
    assert get_norm_layer("instance", 2, 8).affine is True
    assert get_norm_layer(("instance", {"affine": False}), 2, 8).affine is False
    assert get_norm_layer(("group", {"num_groups": 4, "eps": 1e-3}), 3, 8).eps == 1e-3
    # The layer actually normalises: each group of a GroupNorm output has ~zero mean, unit var.
    y = get_norm_layer("layer", 2, 8)(torch.randn(3, 8, 4, 4) * 5 + 2)
    torch.testing.assert_close(y.flatten(1).mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        y.flatten(1).var(1, unbiased=False), torch.ones(3), atol=1e-3, rtol=0
    )


def test_get_norm_layer_class_and_callable():
    layer = get_norm_layer(nn.BatchNorm2d, 2, 6)
    assert isinstance(layer, nn.BatchNorm2d) and layer.num_features == 6
    layer = get_norm_layer((nn.BatchNorm3d, {"momentum": 0.3}), 3, 6)
    assert isinstance(layer, nn.BatchNorm3d) and layer.momentum == 0.3
    layer = get_norm_layer(lambda c: nn.GroupNorm(2, c), 2, 6)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 2


def test_get_norm_layer_rejects_unknown():
    with pytest.raises(ValueError, match="Unknown norm 'weird'") as info:
        get_norm_layer("weird", 2, 8)
    for name in ("group", "instance", "batch", "layer", "none"):
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="spatial_dims"):
        get_norm_layer("group", 1, 8)
    with pytest.raises(ValueError, match="tuple"):
        get_norm_layer(("group", 8), 2, 8)


@pytest.mark.parametrize(
    "act, cls",
    [
        ("silu", nn.SiLU),
        ("swish", nn.SiLU),
        ("relu", nn.ReLU),
        ("leakyrelu", nn.LeakyReLU),
        ("gelu", nn.GELU),
        ("tanh", nn.Tanh),
        ("sigmoid", nn.Sigmoid),
        ("elu", nn.ELU),
        ("none", nn.Identity),
        (None, nn.Identity),
        ("SiLU", nn.SiLU),
    ],
)
def test_get_act_layer_names(act, cls):
    assert type(get_act_layer(act)) is cls


def test_get_act_layer_kwargs_and_class():
    x = torch.tensor([-1.0, 2.0])
    leaky = get_act_layer("leakyrelu")
    assert leaky.negative_slope == 0.2
    torch.testing.assert_close(leaky(x), torch.tensor([-0.2, 2.0]))
    assert get_act_layer(("leakyrelu", {"negative_slope": 0.1})).negative_slope == 0.1
    assert get_act_layer(("gelu", {"approximate": "tanh"})).approximate == "tanh"
    assert isinstance(get_act_layer(nn.Mish), nn.Mish)
    elu = get_act_layer((nn.ELU, {"alpha": 0.5}))
    assert isinstance(elu, nn.ELU) and elu.alpha == 0.5


def test_get_act_layer_rejects_unknown():
    with pytest.raises(ValueError, match="Unknown act 'wobble'") as info:
        get_act_layer("wobble")
    for name in ("silu", "relu", "leakyrelu", "gelu", "tanh", "sigmoid", "elu", "none"):
        assert repr(name) in str(info.value)


# --------------------------------------------------------------------------------------------------
# ResBlock / ConvBlock

RES_CASES = [
    # spatial_dims, in, out, emb_channels, scale_shift
    (2, 8, 8, None, True),
    (2, 8, 16, None, True),
    (2, 8, 16, 12, True),
    (2, 16, 8, 12, False),
    (3, 8, 8, None, True),
    (3, 8, 16, 12, True),
    (3, 16, 16, 12, False),
]


@pytest.mark.parametrize("spatial_dims, cin, cout, emb_ch, scale_shift", RES_CASES)
def test_resblock_shape(spatial_dims, cin, cout, emb_ch, scale_shift):
    block = ResBlock(
        spatial_dims, cin, cout, emb_ch, norm_num_groups=4, scale_shift=scale_shift
    ).eval()
    x = _input(spatial_dims, cin)
    emb = torch.randn(2, emb_ch) if emb_ch else None
    y = block(x, emb)
    assert y.shape == (2, cout, *SPATIAL[spatial_dims])
    assert isinstance(block.skip, nn.Identity) == (cin == cout)
    assert block.norm1.num_groups == 4
    if emb_ch is not None:
        assert block.emb_proj[-1].out_features == (2 * cout if scale_shift else cout)


@pytest.mark.parametrize("spatial_dims, cin, cout, emb_ch, scale_shift", RES_CASES)
def test_resblock_is_skip_at_init(spatial_dims, cin, cout, emb_ch, scale_shift):
    block = ResBlock(spatial_dims, cin, cout, emb_ch, norm_num_groups=4, scale_shift=scale_shift)
    assert torch.count_nonzero(block.conv2.weight) == 0
    x = _input(spatial_dims, cin)
    emb = torch.randn(2, emb_ch) if emb_ch else None
    torch.testing.assert_close(block(x, emb), block.skip(x))


def _reference_resblock(block: ResBlock, x: torch.Tensor, emb: torch.Tensor | None):
    """The ResBlock equations written out with functional ops from the block's weights."""
    conv = F.conv2d if x.dim() == 4 else F.conv3d

    def gn(norm, h):
        return F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)

    h = conv(F.silu(gn(block.norm1, x)), block.conv1.weight, block.conv1.bias, padding=1)
    if emb is not None:
        lin = block.emb_proj[-1]
        e = F.linear(F.silu(emb), lin.weight, lin.bias)
        e = e.reshape(*e.shape, *([1] * (x.dim() - 2)))
        if block.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = gn(block.norm2, h) * (1 + scale) + shift
        else:
            h = gn(block.norm2, h + e)
    else:
        h = gn(block.norm2, h)
    h = conv(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    skip = x if isinstance(block.skip, nn.Identity) else conv(x, block.skip.weight, block.skip.bias)
    return skip + h


@pytest.mark.parametrize("spatial_dims, cin, cout, emb_ch, scale_shift", RES_CASES)
def test_resblock_matches_reference(spatial_dims, cin, cout, emb_ch, scale_shift):
    block = _randomize(
        ResBlock(spatial_dims, cin, cout, emb_ch, norm_num_groups=4, scale_shift=scale_shift)
    ).eval()
    x = _input(spatial_dims, cin)
    emb = torch.randn(2, emb_ch) if emb_ch else None
    out = block(x, emb)
    torch.testing.assert_close(out, _reference_resblock(block, x, emb), atol=1e-5, rtol=1e-5)
    if emb is not None:
        # The embedding changes the output once the residual branch is non-zero.
        assert not torch.allclose(out, block(x, emb + 1.0), atol=1e-3)


def test_resblock_emb_mismatch_errors():
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="pass `emb`"):
        ResBlock(2, 8, emb_channels=4, norm_num_groups=4)(x)
    with pytest.raises(ValueError, match="emb_channels=None"):
        ResBlock(2, 8, norm_num_groups=4)(x, torch.randn(1, 4))
    with pytest.raises(ValueError, match="spatial_dims"):
        ResBlock(1, 8)
    with pytest.raises(ValueError, match="dropout"):
        ResBlock(2, 8, dropout=1.0)


@pytest.mark.parametrize("norm", ["instance", "batch", "layer", ("group", {"num_groups": 2})])
def test_resblock_other_norms_and_acts(norm):
    block = _randomize(ResBlock(3, 8, 4, norm=norm, act="leakyrelu")).eval()
    x = _input(3, 8)
    y = block(x)
    assert y.shape == (2, 4, 8, 8, 8) and torch.isfinite(y).all()
    assert isinstance(block.act1, nn.LeakyReLU)
    if isinstance(norm, tuple):
        assert block.norm1.num_groups == 2


def test_resblock_dropout_active_only_in_training():
    block = _randomize(ResBlock(2, 8, dropout=0.5, norm_num_groups=4))
    x = _input(2, 8)
    block.train()
    torch.manual_seed(0)
    a = block(x)
    torch.manual_seed(1)
    b = block(x)
    assert not torch.allclose(a, b)
    block.eval()
    torch.testing.assert_close(block(x), block(x))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_resblock_channels_last_and_float64(spatial_dims):
    block = _randomize(ResBlock(spatial_dims, 8, 16, 6, norm_num_groups=4)).eval()
    x = _input(spatial_dims, 8)
    emb = torch.randn(2, 6)
    ref = block(x, emb)
    y = block(x.to(memory_format=CHANNELS_LAST[spatial_dims]), emb)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    block64 = block.double()
    y64 = block64(x.double(), emb.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_convblock(spatial_dims):
    block = ConvBlock(spatial_dims, 8, 4, norm_num_groups=4)
    assert block.norm.num_groups == 4
    y = block(_input(spatial_dims, 8))
    assert y.shape == (2, 4, *SPATIAL[spatial_dims])
    with pytest.raises(ValueError, match="odd"):
        ConvBlock(spatial_dims, 8, 4, kernel_size=2)


# --------------------------------------------------------------------------------------------------
# Downsample / Upsample


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["conv", "avgpool", "fir"])
@pytest.mark.parametrize("cout", [None, 16])
def test_downsample_shape(spatial_dims, mode, cout):
    block = Downsample(spatial_dims, 8, cout, mode=mode)
    y = block(_input(spatial_dims, 8))
    half = tuple(s // 2 for s in SPATIAL[spatial_dims])
    assert y.shape == (2, cout or 8, *half)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_downsample_avgpool_is_mean(spatial_dims):
    x = _input(spatial_dims, 8)
    y = Downsample(spatial_dims, 8, mode="avgpool")(x)
    pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
    torch.testing.assert_close(y, pool(x, 2))
    # First output element is the mean of the first 2^d input block.
    block = x[0, 0][(slice(0, 2),) * spatial_dims]
    torch.testing.assert_close(y[(0, 0) + (0,) * spatial_dims], block.mean())
    assert len(list(Downsample(spatial_dims, 8, mode="avgpool").parameters())) == 0


def test_downsample_conv_config():
    conv = Downsample(3, 4, 6, mode="conv").op
    assert conv.kernel_size == (3, 3, 3) and conv.stride == (2, 2, 2) and conv.padding == (1, 1, 1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["nearest_conv", "transpose", "fir"])
@pytest.mark.parametrize("cout", [None, 4])
def test_upsample_shape(spatial_dims, mode, cout):
    block = Upsample(spatial_dims, 8, cout, mode=mode)
    y = block(_input(spatial_dims, 8))
    double = tuple(s * 2 for s in SPATIAL[spatial_dims])
    assert y.shape == (2, cout or 8, *double)
    conv_cls = conv_transpose_nd(spatial_dims) if mode == "transpose" else conv_nd(spatial_dims)
    assert type(block.conv) is conv_cls


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fir_sampling_parameters_and_constants(spatial_dims):
    # The FIR filters carry no parameters: each mode has exactly one 3x3 conv's worth.
    down = Downsample(spatial_dims, 8, 4, mode="fir")
    up = Upsample(spatial_dims, 8, 4, mode="fir")
    expected = 8 * 4 * 3**spatial_dims + 4
    assert sum(p.numel() for p in down.parameters()) == expected
    assert sum(p.numel() for p in up.parameters()) == expected
    # With a centred delta kernel the conv is the identity, so a constant stays constant in the
    # interior after anti-aliased down- and up-sampling (unit DC gain).
    x = torch.full((1, 1, *(8,) * spatial_dims), 3.0)
    for block in (Downsample(spatial_dims, 1, mode="fir"), Upsample(spatial_dims, 1, mode="fir")):
        conv = block.op[1] if isinstance(block, Downsample) else block.conv
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[(0, 0) + (1,) * spatial_dims] = 1.0
            conv.bias.zero_()
        y = block(x)
        inner = y[(0, 0) + (slice(2, -2),) * spatial_dims]
        torch.testing.assert_close(inner, torch.full_like(inner, 3.0))


def test_upsample_nearest_repeats_pixels():
    block = Upsample(2, 1, mode="nearest_conv")
    with torch.no_grad():
        block.conv.weight.zero_()
        block.conv.weight[0, 0, 1, 1] = 1.0  # identity 3x3 kernel
        block.conv.bias.zero_()
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3.0]])
    torch.testing.assert_close(block(x)[0, 0], expected)


@pytest.mark.parametrize("cls", [Downsample, Upsample])
def test_sampling_rejects_unknown_mode(cls):
    with pytest.raises(ValueError, match="valid modes"):
        cls(2, 8, mode="bicubic")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_sampling_channels_last(spatial_dims):
    x = _input(spatial_dims, 8)
    xcl = x.to(memory_format=CHANNELS_LAST[spatial_dims])
    for block in (
        Downsample(spatial_dims, 8, 4),
        Downsample(spatial_dims, 8, 4, mode="avgpool"),
        Upsample(spatial_dims, 8, 4),
        Upsample(spatial_dims, 8, 4, mode="transpose"),
    ):
        torch.testing.assert_close(block(xcl), block(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# SelfAttention


def _naive_attention(block: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out with explicit matmuls from the block's weights."""
    b, c = x.shape[:2]
    heads, d = block.num_heads, block.head_dim
    h = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    h = h.reshape(b, c, -1)  # (B, C, N)
    qkv = torch.einsum("oc,bcn->bon", block.qkv.weight.flatten(1), h)
    qkv = qkv + block.qkv.bias[None, :, None]
    q, k, v = qkv.chunk(3, dim=1)  # each (B, C, N), channels ordered (head, d)
    q, k, v = (t.reshape(b, heads, d, -1).transpose(-1, -2) for t in (q, k, v))  # (B, H, N, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(-1, -2).reshape(b, c, -1)  # (B, C, N)
    out = torch.einsum("oc,bcn->bon", block.proj_out.weight.flatten(1), out)
    out = out + block.proj_out.bias[None, :, None]
    return x + out.reshape(x.shape)


@pytest.mark.parametrize(
    "spatial_dims, channels, head_channels, heads",
    [(2, 8, None, 1), (2, 16, 4, 4), (3, 8, None, 1), (3, 16, 8, 2)],
)
def test_attention_matches_naive(spatial_dims, channels, head_channels, heads):
    block = _randomize(
        SelfAttention(spatial_dims, channels, num_head_channels=head_channels, norm_num_groups=4)
    )
    assert block.num_heads == heads
    x = _input(spatial_dims, channels)
    y = block(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _naive_attention(block, x), atol=1e-5, rtol=1e-4)
    # Attention mixes positions: changing one position changes the output at another.
    x2 = x.clone()
    x2[(0, slice(None)) + (0,) * spatial_dims] += 3.0
    far = (0, slice(None)) + (-1,) * spatial_dims
    assert not torch.allclose(block(x2)[far], y[far])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_attention_identity_at_init_and_formats(spatial_dims):
    block = SelfAttention(spatial_dims, 8, norm_num_groups=4)
    x = _input(spatial_dims, 8)
    torch.testing.assert_close(block(x), x)  # zero-initialised output projection
    _randomize(block)
    ref = block(x)
    y = block(x.to(memory_format=CHANNELS_LAST[spatial_dims]))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y64 = block.double()(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), ref, atol=1e-4, rtol=1e-4)


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible by num_head_channels"):
        SelfAttention(2, 12, num_head_channels=5)


# --------------------------------------------------------------------------------------------------
# timestep embedding


def test_timestep_embedding_values():
    dim, max_period = 8, 10000.0
    t = torch.tensor([0, 1, 250, 999])
    emb = timestep_embedding(t, dim, max_period)
    assert emb.shape == (4, 8) and emb.dtype == torch.float32
    # t = 0: all cosines 1, all sines 0.
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    # First frequency is 1, so column 0 / 4 hold cos(t) / sin(t).
    torch.testing.assert_close(emb[:, 0], torch.cos(t.float()))
    torch.testing.assert_close(emb[:, 4], torch.sin(t.float()))
    # Column k uses frequency max_period ** (-k / half).
    freq = max_period ** (-3 / 4)
    torch.testing.assert_close(emb[2, 3], torch.tensor(math.cos(250 * freq)))
    torch.testing.assert_close(emb[2, 7], torch.tensor(math.sin(250 * freq)))


def test_timestep_embedding_odd_dim_and_float_t():
    t = torch.tensor([0.5, 3.25], dtype=torch.float64)
    emb = timestep_embedding(t, 7, max_period=100.0)
    assert emb.shape == (2, 7)
    torch.testing.assert_close(emb[:, -1], torch.zeros(2))
    freq = 100.0 ** (-1 / 3)
    torch.testing.assert_close(emb[1, 1], torch.tensor(math.cos(3.25 * freq)))
    torch.testing.assert_close(emb[1, 4], torch.tensor(math.sin(3.25 * freq)))
    torch.testing.assert_close(
        timestep_embedding(torch.tensor(2.0), 4), timestep_embedding(torch.tensor([2.0]), 4)
    )
    with pytest.raises(ValueError, match="shape"):
        timestep_embedding(torch.zeros(2, 2), 4)


# --------------------------------------------------------------------------------------------------
# DiagonalGaussian


def _gaussian(shape=(3, 4, 5, 6), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g, dtype=dtype)
    logvar = torch.randn(shape, generator=g, dtype=dtype)
    return mean, logvar


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 2, 3, 4, 5)])
def test_gaussian_kl_matches_torch(shape):
    mean, logvar = _gaussian(shape)
    dist = DiagonalGaussian(mean, logvar)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    expected = expected.flatten(1).sum(1)
    assert dist.kl().shape == (shape[0],)
    torch.testing.assert_close(dist.kl(), expected, atol=1e-4, rtol=1e-5)
    # KL of the prior to itself is zero.
    torch.testing.assert_close(
        DiagonalGaussian(torch.zeros(shape), torch.zeros(shape)).kl(), torch.zeros(shape[0])
    )


def test_gaussian_nll_matches_torch():
    mean, logvar = _gaussian()
    x = torch.randn_like(mean)
    dist = DiagonalGaussian(mean, logvar)
    expected = -Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(dist.nll(x), expected, atol=1e-4, rtol=1e-5)


def test_gaussian_sample_deterministic_and_reparameterised():
    mean, logvar = _gaussian()
    mean.requires_grad_(True)
    logvar.requires_grad_(True)
    dist = DiagonalGaussian(mean, logvar)
    a = dist.sample(torch.Generator().manual_seed(7))
    b = dist.sample(torch.Generator().manual_seed(7))
    c = dist.sample(torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, mean + torch.exp(0.5 * logvar) * eps)
    a.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0
    torch.testing.assert_close(dist.mode(), mean)


def test_gaussian_sample_statistics():
    mean = torch.full((1, 1, 200, 200), 2.0)
    logvar = torch.full_like(mean, math.log(0.25))
    s = DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 2.0) < 0.01
    assert abs(s.std().item() - 0.5) < 0.01


def test_gaussian_clamps_and_from_moments():
    mean = torch.zeros(2, 3, 4, 4)
    logvar = torch.full_like(mean, 100.0)
    logvar[0] = -100.0
    dist = DiagonalGaussian(mean, logvar)
    assert dist.logvar.max() == 20.0 and dist.logvar.min() == -30.0
    assert torch.isfinite(dist.kl()).all()

    moments = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    dist = DiagonalGaussian.from_moments(moments)
    torch.testing.assert_close(dist.mean, moments[:, :3])
    torch.testing.assert_close(dist.logvar, moments[:, 3:])
    assert dist.sample().dtype == torch.float64 and dist.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="even number of channels"):
        DiagonalGaussian.from_moments(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 4))
