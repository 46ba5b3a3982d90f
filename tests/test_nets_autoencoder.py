"""Tests for medgen.nets.autoencoder: Encoder and Decoder at tiny 2D and 3D shapes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import medgen.nets.autoencoder as autoencoder_module
from medgen.nets import Decoder, Encoder
from medgen.nn import DiagonalGaussian, ResBlock, SelfAttention, Upsample

SPATIAL = {2: (16, 16), 3: (8, 8, 8)}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}

CASES = [
    # spatial_dims, channels, num_res_blocks, attention_levels, num_head_channels
    (2, [8, 16], 1, None, None),
    (2, [8, 16, 16], 1, [False, False, True], 8),
    (2, [8, 16], [1, 2], [True, True], None),
    (3, [8, 16], 1, None, None),
    (3, [8, 8, 16], 1, [False, False, True], 4),
]


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters everywhere, so the zero-initialised residual branches take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return module


def _kwargs(spatial_dims, channels, num_res_blocks, attention_levels, num_head_channels):
    return {
        "spatial_dims": spatial_dims,
        "channels": channels,
        "num_res_blocks": num_res_blocks,
        "attention_levels": attention_levels,
        "num_head_channels": num_head_channels,
        "norm_num_groups": 4,
    }


def _image(spatial_dims, channels=1, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *SPATIAL[spatial_dims], generator=g)


@pytest.mark.parametrize("case", CASES)
def test_encoder_decoder_shapes_and_round_trip(case):
    kw = _kwargs(*case)
    spatial_dims, channels = case[0], case[1]
    encoder = Encoder(in_channels=1, out_channels=6, **kw)
    decoder = Decoder(in_channels=3, out_channels=1, **kw)
    factor = 2 ** (len(channels) - 1)
    assert encoder.downsample_factor == factor == decoder.upsample_factor

    x = _image(spatial_dims)
    moments = encoder(x)
    latent_spatial = tuple(s // factor for s in SPATIAL[spatial_dims])
    assert moments.shape == (2, 6, *latent_spatial)

    z = DiagonalGaussian.from_moments(moments).sample(torch.Generator().manual_seed(0))
    assert z.shape == (2, 3, *latent_spatial)
    recon = decoder(z)
    assert recon.shape == x.shape


@pytest.mark.parametrize("case", CASES)
def test_structure(case):
    kw = _kwargs(*case)
    channels, num_res_blocks, attention_levels = case[1], case[2], case[3]
    n = len(channels)
    blocks = [num_res_blocks] * n if isinstance(num_res_blocks, int) else num_res_blocks
    attn = attention_levels or [False] * n
    encoder = Encoder(in_channels=1, out_channels=4, **kw)
    decoder = Decoder(in_channels=2, out_channels=1, **kw)

    def count(modules, cls):
        return sum(isinstance(m, cls) for m in modules)

    # Encoder levels full -> lowest resolution; decoder levels lowest -> full resolution.
    for i in range(n):
        enc_level, dec_level = encoder.levels[i], decoder.levels[n - 1 - i]
        for level in (enc_level, dec_level):
            assert count(level, ResBlock) == blocks[i]
            assert count(level, SelfAttention) == (blocks[i] if attn[i] else 0)
        assert enc_level[0].out_channels == channels[i]
        assert dec_level[-1 if not attn[i] else -2].out_channels == channels[i]
    assert len(encoder.downsamples) == len(decoder.upsamples) == n - 1
    for mid in (encoder.mid, decoder.mid):
        assert count(mid, ResBlock) == 2
        assert count(mid, SelfAttention) == int(attn[-1])
    assert encoder.conv_in.out_channels == channels[0]
    assert encoder.conv_out.in_channels == channels[-1]
    assert decoder.conv_in.out_channels == channels[-1]
    assert decoder.conv_out.in_channels == channels[0]
    assert all(m.num_groups == 4 for m in encoder.modules() if isinstance(m, nn.GroupNorm))
    for net in (encoder, decoder):
        heads = {m.num_heads for m in net.modules() if isinstance(m, SelfAttention)}
        head_channels = case[4]
        widths = [c for c, a in zip(channels, attn, strict=True) if a]
        assert heads == {c // head_channels if head_channels else 1 for c in widths}


def test_decoder_transpose_upsampling():
    decoder = Decoder(3, 2, 1, channels=[8, 8, 16], norm_num_groups=4, upsample_mode="transpose")
    assert all(isinstance(u, Upsample) and u.mode == "transpose" for u in decoder.upsamples)
    assert decoder(torch.randn(1, 2, 2, 2, 2)).shape == (1, 1, 8, 8, 8)


def test_encoder_avgpool_downsampling():
    encoder = Encoder(2, 1, 2, channels=[8, 16], norm_num_groups=4, downsample_mode="avgpool")
    assert encoder(torch.randn(1, 1, 16, 16)).shape == (1, 2, 8, 8)


def test_json_friendly_kwargs():
    config = json.loads(
        '{"spatial_dims": 2, "in_channels": 1, "out_channels": 4, "channels": [8, 16],'
        ' "num_res_blocks": [1, 1], "attention_levels": [false, true], "norm_num_groups": 4,'
        ' "num_head_channels": 8, "act": "gelu", "gradient_checkpointing": true}'
    )
    encoder = Encoder(**config)
    assert isinstance(encoder.levels[0][0].act1, nn.GELU)
    assert encoder(torch.randn(1, 1, 8, 8)).shape == (1, 4, 4, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"attention_levels": [True]}, "attention_levels has 1 entries but channels has 2"),
        ({"num_res_blocks": [1, 1, 1]}, "num_res_blocks has 3 entries"),
        ({"num_res_blocks": 0}, "num_res_blocks must be >= 1"),
        ({"channels": []}, "channels must be a non-empty list"),
        ({"num_head_channels": 5}, "divisible by num_head_channels"),
        ({"act": "wobble"}, "Unknown act"),
    ],
)
@pytest.mark.parametrize("cls", [Encoder, Decoder])
def test_argument_validation(cls, kwargs, message):
    base = {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [8, 16],
        "attention_levels": [False, True],
        "norm_num_groups": 4,
    }
    with pytest.raises(ValueError, match=message):
        cls(**{**base, **kwargs})


def test_groups_clipped_to_divide_channels():
    encoder = Encoder(2, 1, 2, channels=[12, 20], norm_num_groups=32)
    groups = {
        (m.num_groups, m.num_channels) for m in encoder.modules() if isinstance(m, nn.GroupNorm)
    }
    assert groups == {(4, 12), (4, 20)}
    assert encoder(torch.randn(1, 1, 8, 8)).shape == (1, 2, 4, 4)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls", [Encoder, Decoder])
def test_gradient_checkpointing_identical(cls, spatial_dims, monkeypatch):
    kw = {
        "spatial_dims": spatial_dims,
        "channels": [8, 16],
        "attention_levels": [False, True],
        "norm_num_groups": 4,
        "num_head_channels": 4,
    }
    in_ch, out_ch = (1, 4) if cls is Encoder else (2, 1)
    plain = _randomize(cls(in_channels=in_ch, out_channels=out_ch, **kw)).train()
    ckpt = cls(in_channels=in_ch, out_channels=out_ch, gradient_checkpointing=True, **kw).train()
    ckpt.load_state_dict(plain.state_dict())

    calls = []
    original = autoencoder_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(autoencoder_module, "checkpoint", counting_checkpoint)

    spatial = SPATIAL[spatial_dims] if cls is Encoder else (4,) * spatial_dims
    x = torch.randn(2, in_ch, *spatial, generator=torch.Generator().manual_seed(3))
    x_plain = x.clone().requires_grad_(True)
    x_ckpt = x.clone().requires_grad_(True)

    y_plain = plain(x_plain)
    assert calls == []
    y_ckpt = ckpt(x_ckpt)
    # Every ResBlock and attention block (levels + mid) went through checkpoint(use_reentrant=False).
    n_blocks = sum(isinstance(m, (ResBlock, SelfAttention)) for m in ckpt.modules())
    assert len(calls) == n_blocks and set(calls) == {False}
    torch.testing.assert_close(y_ckpt, y_plain, atol=1e-6, rtol=0)

    weight = torch.randn_like(y_plain)
    (y_plain * weight).sum().backward()
    (y_ckpt * weight).sum().backward()
    torch.testing.assert_close(x_ckpt.grad, x_plain.grad, atol=1e-6, rtol=0)
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in g_plain.values())

    # No checkpointing without grad or in eval mode.
    calls.clear()
    with torch.no_grad():
        ckpt(x)
    ckpt.eval()
    ckpt(x)
    assert calls == []


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_same_output(spatial_dims):
    kw = {"spatial_dims": spatial_dims, "channels": [8, 16], "attention_levels": [False, True]}
    encoder = _randomize(Encoder(in_channels=1, out_channels=4, norm_num_groups=4, **kw)).eval()
    decoder = _randomize(Decoder(in_channels=4, out_channels=1, norm_num_groups=4, **kw), 1).eval()
    x = _image(spatial_dims)
    ref = decoder(encoder(x))
    fmt = CHANNELS_LAST[spatial_dims]
    encoder.to(memory_format=fmt)
    decoder.to(memory_format=fmt)
    out = decoder(encoder(x.to(memory_format=fmt)))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(spatial_dims, dtype):
    kw = {"spatial_dims": spatial_dims, "channels": [8, 16], "attention_levels": [False, True]}
    encoder = _randomize(Encoder(in_channels=1, out_channels=4, norm_num_groups=4, **kw)).eval()
    decoder = _randomize(Decoder(in_channels=4, out_channels=1, norm_num_groups=4, **kw), 1).eval()
    x = _image(spatial_dims)
    ref = decoder(encoder(x))
    encoder.to(dtype)
    decoder.to(dtype)
    out = decoder(encoder(x.to(dtype)))
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-4 if dtype == torch.float64 else 0.1
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_encoder_no_graph_breaks():
    encoder = Encoder(2, 1, 4, channels=[8, 16], attention_levels=[False, True], norm_num_groups=4)
    explanation = torch._dynamo.explain(encoder)(torch.randn(1, 1, 16, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
