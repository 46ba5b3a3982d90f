"""Tests for medgen.nets.gan: DCGAN generator variants, DCGAN discriminator and WGAN-GP critic.

Shapes, checkpointing, channels-last, dtypes and compile are covered for every net by
``test_nets_common.py``; this file checks what is specific to these nets.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from medgen.nets import DCGANDiscriminator, DCGANGenerator, WGANCritic

CONV_TRANSPOSE = (nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV = (nn.Conv2d, nn.Conv3d)
BATCH_NORMS = nn.modules.batchnorm._BatchNorm


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy CPU waiting for them costs
    far more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(spatial_dims: int, batch: int = 3, channels: int = 1, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *(size,) * spatial_dims, generator=g)


def _layers(net: nn.Module, types: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, types)]


def _num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spatial_dims, image_size",
    [(2, 8), (2, (8, 16)), (3, 8), (3, (8, 16, 16))],
    ids=["2d", "2d-aniso", "3d", "3d-aniso"],
)
@pytest.mark.parametrize("upsample", ["transpose", "nearest_conv"])
def test_generator_shapes(spatial_dims, image_size, upsample):
    g = DCGANGenerator(
        spatial_dims,
        latent_dim=6,
        out_channels=2,
        image_size=image_size,
        channels=(8, 4),
        upsample=upsample,
    )
    size = (image_size,) * spatial_dims if isinstance(image_size, int) else image_size
    assert g.image_size == size and g.latent_dim == 6 and g.out_channels == 2
    z = g.sample_latent(3, torch.Generator().manual_seed(0))
    y = g(z)
    assert y.shape == (3, 2, *size)
    assert y.abs().max() <= 1.0  # tanh
    # The DCGAN-style (B, latent_dim, 1, ..., 1) latent gives the same images.
    torch.testing.assert_close(g(z.reshape(3, 6, *(1,) * spatial_dims)), y, rtol=0, atol=0)
    y.square().mean().backward()
    assert all(p.grad is not None for p in g.parameters())


def test_generator_upsample_variants_differ_in_layer_types():
    kwargs = {"latent_dim": 6, "image_size": 16, "channels": (8, 8, 4)}
    transpose = DCGANGenerator(2, upsample="transpose", **kwargs)
    resize = DCGANGenerator(2, upsample="nearest_conv", **kwargs)
    # One upsampling per entry of channels; the projection is linear in both.
    assert len(_layers(transpose, CONV_TRANSPOSE)) == 3
    assert not _layers(transpose, (nn.Upsample,)) and not _layers(transpose, CONV)
    ups = _layers(resize, (nn.Upsample,))
    assert len(ups) == 3 and all(u.mode == "nearest" and u.scale_factor == 2 for u in ups)
    convs = _layers(resize, CONV)
    assert len(convs) == 3 and not _layers(resize, CONV_TRANSPOSE)
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in _layers(transpose, CONV))
    assert _layers(transpose, (nn.Linear,)) and _layers(resize, (nn.Linear,))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("upsample, kernel", [("transpose", 4), ("nearest_conv", 3)])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_generator_parameter_count(spatial_dims, upsample, kernel, norm):
    latent, (c0, c1), out, size = 5, (8, 4), 3, 16
    g = DCGANGenerator(spatial_dims, latent, out, size, (c0, c1), upsample=upsample, norm=norm)
    k = kernel**spatial_dims
    initial = (size // 4) ** spatial_dims
    if norm == "batch":  # no bias before batch norm; BN has a scale and a shift per channel
        expected = latent * c0 * initial + 2 * c0 + c0 * c1 * k + 2 * c1
    else:  # biases instead of norms
        expected = (latent + 1) * c0 * initial + c0 * c1 * k + c1
    expected += c1 * out * k + out  # last stage: bias, no norm
    assert _num_params(g) == expected


def test_generator_dcgan_init():
    g = DCGANGenerator(2, latent_dim=64, image_size=16, channels=(64, 32))
    weights = torch.cat([m.weight.flatten() for m in _layers(g, (nn.Linear, *CONV_TRANSPOSE))])
    assert abs(weights.std().item() - 0.02) < 0.001
    assert abs(weights.mean().item()) < 0.001
    scales = torch.cat([m.weight for m in _layers(g, (BATCH_NORMS,))])
    assert abs(scales.mean().item() - 1.0) < 0.01 and scales.std().item() < 0.04
    assert all(not m.bias.detach().any() for m in _layers(g, (BATCH_NORMS,)))


def test_generator_sample_latent_is_seeded():
    g = DCGANGenerator(2, latent_dim=7, image_size=8, channels=(4, 4))
    a = g.sample_latent(5, torch.Generator().manual_seed(3))
    b = g.sample_latent(5, torch.Generator().manual_seed(3))
    assert a.shape == (5, 7) and a.device.type == "cpu" and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, g.sample_latent(5, torch.Generator().manual_seed(4)))


def test_generator_out_activation_none_and_bad_latent():
    g = DCGANGenerator(2, latent_dim=4, image_size=8, channels=(4, 4), out_activation=None)
    assert not _layers(g, (nn.Tanh,))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        g(torch.randn(2, 5))
    with pytest.raises(ValueError, match="upsample"):
        DCGANGenerator(2, upsample="bilinear")


# ------------------------------------------------------------------------------------------------
# image_size validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DCGANGenerator, DCGANDiscriminator, WGANCritic])
@pytest.mark.parametrize("image_size", [6, (8, 6), 2])  # not a multiple of 4, or too small
def test_bad_image_size_raises_naming_it(cls, image_size):
    h, w = (image_size,) * 2 if isinstance(image_size, int) else image_size
    with pytest.raises(ValueError, match=rf"image_size \({h}, {w}\).*2\*\*2 = 4.* 2 stages"):
        cls(2, image_size=image_size, channels=(4, 4))


def test_bad_image_size_names_the_number_of_stages():
    with pytest.raises(ValueError, match=r"image_size \(48, 48\).* 5 stages"):
        DCGANGenerator(2, image_size=48, channels=(4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="3 axes, expected 2"):
        DCGANDiscriminator(2, image_size=(8, 8, 8), channels=(4,))
    d = DCGANDiscriminator(2, image_size=8, channels=(4,))
    with pytest.raises(ValueError, match=r"image_size \(8, 8\)"):
        d(torch.randn(1, 1, 16, 16))


# ------------------------------------------------------------------------------------------------
# discriminator and critic
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls", [DCGANDiscriminator, WGANCritic])
def test_discriminator_output_is_one_score_per_sample(cls, spatial_dims):
    net = cls(spatial_dims, in_channels=2, image_size=8, channels=(4, 8))
    x = _images(spatial_dims, channels=2)
    out = net(x)
    assert out.shape == (3, 1)
    # Anisotropic sizes: the last conv covers the remaining map.
    net = cls(spatial_dims, image_size=(16, *(8,) * (spatial_dims - 1)), channels=(4, 8))
    assert net(torch.randn(2, 1, 16, *(8,) * (spatial_dims - 1))).shape == (2, 1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_discriminator_parameter_count(spatial_dims, norm):
    in_ch, (c0, c1), size = 2, (4, 8), 16
    d = DCGANDiscriminator(spatial_dims, in_ch, size, (c0, c1), norm=norm)
    k = 4**spatial_dims
    expected = in_ch * c0 * k + c0  # first stage: bias, no norm
    expected += c0 * c1 * k + (2 * c1 if norm == "batch" else c1)  # BN scale+shift, or a bias
    expected += c1 * (size // 4) ** spatial_dims + 1  # one score from the 4^d map
    assert _num_params(d) == expected
    assert len(_layers(d, (BATCH_NORMS,))) == (1 if norm == "batch" else 0)


def test_critic_rejects_batch_norm():
    for norm in ("batch", "BatchNorm", ("batch", {"momentum": 0.1})):
        with pytest.raises(ValueError, match="couples the samples.*gradient penalty"):
            WGANCritic(2, norm=norm)
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        WGANCritic(2, norm="group")


@pytest.mark.parametrize("norm", ["none", "layer", "instance"])
def test_critic_has_no_batch_norm_and_is_per_sample(norm):
    critic = WGANCritic(2, image_size=8, channels=(4, 8), norm=norm)
    assert not _layers(critic, (BATCH_NORMS,))
    if norm == "layer":
        (gn,) = _layers(critic, (nn.GroupNorm,))
        assert gn.num_groups == 1 and gn.affine
    if norm == "instance":
        (inorm,) = _layers(critic, (nn.InstanceNorm2d,))
        assert inorm.affine
    x = _images(2)
    changed = x.clone()
    changed[1] = torch.randn_like(changed[1])
    for mode in (False, True):  # eval and train: no batch statistics either way
        critic.train(mode)
        out, out_changed = critic(x), critic(changed)
        torch.testing.assert_close(out_changed[0], out[0], rtol=0, atol=0)
        torch.testing.assert_close(out_changed[2], out[2], rtol=0, atol=0)
        assert not torch.equal(out_changed[1], out[1])
    # The gradient penalty's input gradient of sample 0 does not see the other samples.
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x)[0].sum(), x)
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


@pytest.mark.parametrize("cls", [DCGANDiscriminator, WGANCritic])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_spectral_norm_wraps_every_conv(cls, spatial_dims):
    plain = cls(spatial_dims, image_size=8, channels=(4, 8))
    sn = cls(spatial_dims, image_size=8, channels=(4, 8), spectral_norm=True)
    convs = _layers(sn, CONV)
    assert len(convs) == 3 == len(_layers(plain, CONV))
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert not any(parametrize.is_parametrized(c) for c in _layers(plain, CONV))
    x = _images(spatial_dims)
    assert sn(x).shape == plain(x).shape == (3, 1)
    # Each weight is divided by its largest singular value (after a few power iterations).
    for _ in range(20):
        sn(x)
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1.0) < 0.05


@pytest.mark.parametrize("cls", [DCGANDiscriminator, WGANCritic])
def test_checkpointing_replays_spectral_norm_exactly(cls):
    # Spectral norm advances its power iteration on every training forward; the recomputation of a
    # checkpointed stage must use the vectors of the original forward, and leave them as after it.
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = cls(2, image_size=8, channels=(4, 8), spectral_norm=True)
        net.gradient_checkpointing = ckpt
        x = _images(2).requires_grad_(True)
        out = net(x)
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)  # WGAN-GP double backward
        (out.mean() + grad.flatten(1).norm(dim=1).sub(1).square().mean()).backward()
        results.append([out, *(p.grad for p in net.parameters() if p.grad is not None)])
        results[-1] += [b.clone() for b in net.buffers()]
    plain, ckpt = results
    assert len(plain) == len(ckpt)
    for a, b in zip(ckpt, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dcgan_defaults_match_the_paper_layout():
    # 64 px, four stages: latent -> 4x4x256 -> 8 -> 16 -> 32 -> 64, and back down to a 4x4 map.
    g = DCGANGenerator(2)
    assert g.initial_size == (4, 4) and g.image_size == (64, 64)
    assert math.prod(g.model[1].unflattened_size) == 256 * 16
    d = DCGANDiscriminator(2)
    assert d.final_size == (4, 4)
    assert d(g(g.sample_latent(2))).shape == (2, 1)


def test_checkpointed_spectral_norm_compiles_fullgraph():
    # Dynamo cannot checkpoint the power iteration's buffer update, so those stages run plainly
    # under torch.compile: the same outputs, gradients and vectors as eager, without graph breaks.
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = WGANCritic(2, image_size=8, channels=(4, 8), spectral_norm=True)
        net.gradient_checkpointing = compiled
        fn = torch.compile(net, backend="eager", fullgraph=True) if compiled else net
        out = fn(_images(2))
        out.square().mean().backward()
        results.append([out, *(p.grad for p in net.parameters()), *net.buffers()])
    torch._dynamo.reset()
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
