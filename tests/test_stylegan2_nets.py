"""StyleGAN2 generator and discriminator: parameter counts, 2D/3D shapes, mapping, truncation,
style layers, conditioning, checkpointing, FreezeD."""

from __future__ import annotations

import math

import pytest
import torch

from medgen.nets import StyleGAN2Discriminator, StyleGAN2Generator
from medgen.nets.stylegan2 import MappingNetwork, normalize_2nd_moment, stylegan2_channels
from medgen.nn.stylegan import MinibatchStdDev

TINY = {"latent_dim": 16, "channel_base": 128, "channel_max": 16, "mapping_layers": 2}
TINY_D = {"channel_base": 128, "channel_max": 16}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_official_256_configuration():
    """256² RGB, z = w = 512, channel_base 32768, channel_max 512, 8 mapping layers.

    Reference: the per-layer parameter table printed by the official StyleGAN2-ADA implementation
    for this configuration (quoted in NVlabs/stylegan2-ada-pytorch issues #181 and #182), summed:
    G = 8 x 262,656 (mapping) + 8,192 (const) + 2,622,465 + 264,195 (b4)
    + 4 x (2 x 2,622,465 + 264,195) (b8-b64) + 1,442,561 + 721,409 + 132,099 (b128)
    + 426,369 + 213,249 + 66,051 (b256) = 30,034,338;
    D = 512 + 32,768 + 147,584 + 295,168 (b256) + 131,072 + 590,080 + 1,180,160 (b128)
    + 4 x (262,144 + 2 x 2,359,808) (b64-b8) + 2,364,416 + 4,194,816 + 513 (b4) = 28,864,129.
    """
    generator = StyleGAN2Generator(2, 256, 3, latent_dim=512)
    discriminator = StyleGAN2Discriminator(2, 256, 3)
    assert _count(generator) == pytest.approx(30_034_338, rel=0.01)
    assert _count(discriminator) == pytest.approx(28_864_129, rel=0.01)
    assert _count(generator.mapping) == 8 * 262_656  # exact, layer by layer
    conv0 = generator.synthesis.blocks[1].conv0
    assert _count(conv0) == 2_622_465
    assert _count(generator.synthesis.blocks[-1].to_image) == 66_051
    assert _count(discriminator.blocks[0].conv1) == 295_168
    assert generator.num_ws == 14  # 2 * log2(256) - 2, as in the paper


def test_channel_rule():
    assert [stylegan2_channels(r, 32768, 512) for r in (4, 64, 128, 256, 1024)] == [
        512,
        512,
        256,
        128,
        32,
    ]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_2d_3d(spatial_dims):
    size = 16 if spatial_dims == 2 else 8
    generator = StyleGAN2Generator(spatial_dims, size, 2, **TINY)
    discriminator = StyleGAN2Discriminator(spatial_dims, size, 2, **TINY_D)
    z = torch.randn(3, 16)
    images = generator(z)
    assert images.shape == (3, 2, *(size,) * spatial_dims)
    assert discriminator(images).shape == (3, 1)
    ws = generator.map(z)
    assert ws.shape == (3, generator.num_ws, 16)
    assert generator.num_ws == 2 * int(math.log2(size)) - 2
    # The last w feeds the last toRGB: changing it changes the image.
    other = ws.clone()
    other[:, -1] = torch.randn(3, 16)
    rng = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    a = generator.synthesis(ws, rng[0])
    b = generator.synthesis(other, rng[1])
    assert not torch.allclose(a, b)


def test_non_square_images_and_bad_sizes():
    generator = StyleGAN2Generator(2, (8, 16), 1, **TINY)
    discriminator = StyleGAN2Discriminator(2, (8, 16), 1, **TINY_D)
    images = generator(torch.randn(2, 16))
    assert images.shape == (2, 1, 8, 16)
    assert discriminator(images).shape == (2, 1)
    with pytest.raises(ValueError, match="power of 2"):
        StyleGAN2Generator(2, 12, 1, **TINY)
    with pytest.raises(ValueError, match=r"expects \(B, 1, \*\(8, 16\)\)"):
        discriminator(torch.randn(2, 1, 16, 16))


def test_mapping_normalises_z_and_truncates_toward_w_avg():
    torch.manual_seed(0)
    mapping = MappingNetwork(8, 0, 8, num_layers=2, w_avg_beta=0.5)
    z = torch.randn(4, 8)
    # Second-moment normalisation: scaling z changes nothing.
    torch.testing.assert_close(mapping(z), mapping(3.0 * z))
    x = normalize_2nd_moment(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(x, torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5))
    # w_avg moves toward the batch mean with decay beta.
    w = mapping(z, update_w_avg=True)
    torch.testing.assert_close(mapping.w_avg, 0.5 * w.mean(0), atol=1e-6, rtol=1e-6)
    # Truncation: w' = w_avg + psi (w - w_avg) (StyleGAN eq. 3); psi = 0 gives w_avg.
    w_avg = mapping.w_avg.clone()
    torch.testing.assert_close(mapping(z, truncation_psi=0.7), w_avg + 0.7 * (w - w_avg))
    torch.testing.assert_close(mapping(z, truncation_psi=0.0), w_avg.expand(4, 8))


def test_generator_truncation_cutoff():
    torch.manual_seed(0)
    generator = StyleGAN2Generator(2, 16, 1, **TINY)
    generator.mapping.w_avg.normal_()
    z = torch.randn(2, 16)
    ws = generator.map(z)
    cut = generator.map(z, truncation_psi=0.5, truncation_cutoff=3)
    avg = generator.mapping.w_avg
    torch.testing.assert_close(cut[:, :3], avg + 0.5 * (ws[:, :3] - avg))
    torch.testing.assert_close(cut[:, 3:], ws[:, 3:])


def test_noise_and_seeds():
    torch.manual_seed(0)
    generator = StyleGAN2Generator(2, 16, 1, **TINY)
    for block in generator.synthesis.blocks:  # noise strengths start at 0; make them matter
        for layer in (block.conv0, block.conv1):
            if layer is not None:
                layer.noise.weight.data.fill_(0.5)
    z = torch.randn(2, 16)
    a = generator(z, generator=torch.Generator().manual_seed(1))
    b = generator(z, generator=torch.Generator().manual_seed(1))
    c = generator(z, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_fused_and_unfused_modulation_agree():
    torch.manual_seed(0)
    fused = StyleGAN2Generator(2, 16, 1, **TINY, fused_modconv=True)
    unfused = StyleGAN2Generator(2, 16, 1, **TINY, fused_modconv=False)
    unfused.load_state_dict(fused.state_dict())
    z = torch.randn(3, 16)
    rng = 7
    torch.testing.assert_close(
        fused(z, generator=torch.Generator().manual_seed(rng)),
        unfused(z, generator=torch.Generator().manual_seed(rng)),
        atol=1e-5,
        rtol=1e-4,
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    nets = {}
    for flag in (False, True):
        torch.manual_seed(0)
        g = StyleGAN2Generator(2, 16, 1, **TINY, gradient_checkpointing=flag)
        d = StyleGAN2Discriminator(2, 16, 1, **TINY_D, gradient_checkpointing=flag)
        torch.manual_seed(1)
        loss = d(g(torch.randn(4, 16))).sum()
        loss.backward()
        nets[flag] = (g, d)
    for a, b in zip(nets[False], nets[True], strict=True):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=name, atol=1e-6, rtol=1e-5)


def test_class_conditioning_generator_and_projection_discriminator():
    torch.manual_seed(0)
    generator = StyleGAN2Generator(2, 8, 1, **TINY, num_classes=3)
    discriminator = StyleGAN2Discriminator(2, 8, 1, **TINY_D, num_classes=3)
    z = torch.randn(3, 16)
    c = torch.eye(3)
    images = generator(z, c)
    assert not torch.allclose(images[0], generator(z, c.roll(1, 0))[0])  # the label matters
    logits = discriminator(images, c)
    assert logits.shape == (3, 1)
    with pytest.raises(ValueError, match="class-conditional"):
        generator(z)
    with pytest.raises(ValueError, match="class-conditional"):
        discriminator(images)


def test_minibatch_stddev_by_hand():
    x = torch.randn(4, 2, 3, 3)
    layer = MinibatchStdDev(group_size=2, num_channels=1)
    y = layer(x)
    assert y.shape == (4, 3, 3, 3)
    torch.testing.assert_close(y[:, :2], x)
    # Groups of 2 are samples (0, 2) and (1, 3): std over the group, averaged over C and pixels.
    for a, b in ((0, 2), (1, 3)):
        pair = torch.stack([x[a], x[b]])
        expected = (pair.var(0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(y[a, 2], expected.expand(3, 3))
        torch.testing.assert_close(y[b, 2], expected.expand(3, 3))


def test_freeze_d_freezes_blocks_from_the_input_side():
    discriminator = StyleGAN2Discriminator(2, 16, 1, **TINY_D)
    frozen = discriminator.freeze(1)
    names = {n for n, p in discriminator.named_parameters() if not p.requires_grad}
    assert names == {
        n for n, _ in discriminator.named_parameters() if n.startswith(("from_image", "blocks.0."))
    }
    assert len(frozen) == len(names)
    with pytest.raises(ValueError, match="freeze_d=9"):
        discriminator.freeze(9)
