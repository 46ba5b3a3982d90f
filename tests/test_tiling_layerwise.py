"""Exact tiled inference layer by layer (medgen.tiling.layerwise_apply, Encoder/Decoder.stages)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import medgen
from medgen.api import encode
from medgen.data import read, write
from medgen.inference import translate_files
from medgen.models import VQGAN, AutoencoderKL, CycleGAN, Pix2Pix
from medgen.nets import Decoder, Encoder, ResnetGenerator
from medgen.nn import ResBlock
from medgen.nn.layerwise import Stage, check_norm, module_stages
from medgen.tiling import layerwise_apply


def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (zero-initialised last convs would hide the residual path),
    and GroupNorm affines away from (1, 0) so the statistics matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return net.eval()


def _shape(spatial_dims: int, size2d: tuple[int, int], size3d: int) -> tuple[int, ...]:
    return size2d if spatial_dims == 2 else (size3d,) * 3


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.mark.parametrize(
    ("spatial_dims", "upsample"),
    [(2, "nearest_conv"), (2, "transpose"), (2, "fir"), (3, "nearest_conv"), (3, "transpose")],
)
def test_decoder_layerwise_equals_whole(spatial_dims, upsample):
    # Two upsamplings, a level with two blocks, attention in the middle block (a global stage),
    # and a tile that divides no size: every tile edge is an interior seam.
    decoder = _randomise(
        Decoder(
            spatial_dims,
            3,
            2,
            channels=(8, 16, 16),
            num_res_blocks=(1, 2, 1),
            attention_levels=(False, False, True),
            norm_num_groups=4,
            upsample_mode=upsample,
        )
    )
    z = torch.randn(
        2, 3, *_shape(spatial_dims, (11, 9), 7), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        whole = decoder(z)
    tiled = layerwise_apply(decoder.stages(), z, 3)
    assert tiled.shape == whole.shape == (2, 2, *(4 * n for n in z.shape[2:]))
    assert _rel_err(tiled, whole) < 1e-5


@pytest.mark.parametrize(
    ("spatial_dims", "downsample"), [(2, "conv"), (2, "fir"), (2, "avgpool"), (3, "conv")]
)
def test_encoder_layerwise_equals_whole(spatial_dims, downsample):
    encoder = _randomise(
        Encoder(
            spatial_dims,
            2,
            4,
            channels=(8, 16, 16),
            num_res_blocks=1,
            attention_levels=(False, True, True),
            norm_num_groups=4,
            downsample_mode=downsample,
        )
    )
    x = torch.randn(
        1, 2, *_shape(spatial_dims, (36, 28), 20), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        whole = encoder(x)
    # tile 10 image voxels: not a multiple of the stride-2 grid; the runner rounds it up there
    tiled = layerwise_apply(encoder.stages(), x, 10)
    assert tiled.shape == whole.shape == (1, 4, *(n // 4 for n in x.shape[2:]))
    assert _rel_err(tiled, whole) < 1e-5


def test_halos_are_what_makes_it_exact():
    # The same stages without context at tile edges: a seam error far above float rounding,
    # so the equality tests above would catch a halo that is too small.
    decoder = _randomise(Decoder(2, 3, 1, channels=(8, 8), norm_num_groups=4))
    z = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    whole = decoder(z)
    blind = [dataclasses.replace(s, halo=0) if s.halo else s for s in decoder.stages()]
    assert _rel_err(layerwise_apply(blind, z, 4), whole) > 1e-2
    assert _rel_err(layerwise_apply(decoder.stages(), z, 4), whole) < 1e-5


def test_one_tile_and_one_voxel_tiles():
    decoder = _randomise(Decoder(2, 2, 1, channels=(8, 8), norm_num_groups=2))
    z = torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = decoder(z)
    # one tile covering everything, and tiles of one latent voxel
    assert _rel_err(layerwise_apply(decoder.stages(), z, 6), whole) < 1e-5
    assert _rel_err(layerwise_apply(decoder.stages(), z, 1), whole) < 1e-5


def test_out_offload_dir_and_devices(tmp_path):
    decoder = _randomise(Decoder(3, 2, 1, channels=(8, 8), norm_num_groups=4))
    z = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    whole = decoder(z)
    # the output straight into a .npy memmap; the intermediates in memory-mapped files
    path = tmp_path / "image.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(whole.shape))
    out = torch.from_numpy(array)
    offload = tmp_path / "offload"
    result = layerwise_apply(decoder.stages(), z, 4, offload_dir=offload, out=out)
    assert result is out
    array.flush()
    assert _rel_err(torch.from_numpy(np.load(path)), whole) < 1e-5
    assert list(offload.iterdir()) == []  # the intermediate files are gone
    with pytest.raises(ValueError, match="out has spatial size"):
        layerwise_apply(decoder.stages(), z, 4, out=torch.empty(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="batch and channels"):
        layerwise_apply(decoder.stages(), z, 4, out=torch.empty(1, 3, 16, 16, 16))


def test_bad_inputs_are_clear_errors():
    encoder = _randomise(Encoder(2, 1, 2, channels=(4, 4), norm_num_groups=2))
    with pytest.raises(ValueError, match=r"downsamples\.0.*does not divide by 2"):
        layerwise_apply(encoder.stages(), torch.randn(1, 1, 10, 9), 4)
    with pytest.raises(ValueError, match="at least one stage"):
        layerwise_apply([], torch.randn(1, 1, 4, 4), 4)
    with pytest.raises(ValueError, match="tile must be positive"):
        layerwise_apply(encoder.stages(), torch.randn(1, 1, 8, 8), 0)
    wrong = [Stage(nn.Conv2d(1, 1, 3, padding=1, stride=2), 1, name="liar")]
    with pytest.raises(ValueError, match="stage 'liar' gave size"):
        layerwise_apply(wrong, torch.randn(1, 1, 8, 8), 4)
    with pytest.raises(ValueError, match="embedding"):
        module_stages(ResBlock(2, 4, 4, emb_channels=8, norm_num_groups=2), "block")
    with pytest.raises(ValueError, match="supports group, instance and batch norm"):
        check_norm(nn.LayerNorm(4), "block")
    norm_training = ResBlock(2, 4, 4, norm="batch").train()
    with pytest.raises(ValueError, match="batch norm with batch statistics"):
        layerwise_apply(module_stages(norm_training, "block"), torch.randn(1, 4, 4, 4), 2)
    with pytest.raises(ValueError, match="no layer-by-layer form"):
        module_stages(nn.LSTM(2, 2), "lstm")


NET = {"channels": [8, 16], "norm_num_groups": 4}


def test_autoencoder_kl_layerwise_encode_decode_equal_whole(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL(net={**NET, "latent_channels": 3}, spatial_dims=3, discriminator=None)
    _randomise(model.net)
    x = torch.randn(1, 1, 24, 16, 20, generator=torch.Generator().manual_seed(6))
    z = model.encode(x)
    z_tiled = model.encode(x, tile=8, layerwise=True)
    assert z_tiled.shape == z.shape == (1, 3, 12, 8, 10)
    assert _rel_err(z_tiled, z) < 1e-5
    image = model.decode(z)
    out = torch.empty_like(image)
    result = model.decode(z, tile=3, layerwise=True, offload_dir=tmp_path, out=out)
    assert result is out and _rel_err(out, image) < 1e-5
    # without a tile, layerwise is the plain whole decoding
    torch.testing.assert_close(model.decode(z, layerwise=True), image)


def test_vqgan_layerwise_gives_the_same_codes():
    torch.manual_seed(0)
    model = VQGAN(
        net={**NET, "embedding_dim": 4, "num_embeddings": 64},
        spatial_dims=3,
        discriminator=None,
        slice_discriminator=None,
    )
    _randomise(model.net)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    codes = model.encode(x)
    tiled = model.encode(x, tile=8, layerwise=True)
    torch.testing.assert_close(tiled, codes)  # the same nearest codes, so equal exactly
    assert _rel_err(model.decode(codes, tile=4, layerwise=True), model.decode(codes)) < 1e-5


def test_medgen_encode_layerwise_matches_whole(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL(net={**NET, "latent_channels": 2}, spatial_dims=3, discriminator=None)
    _randomise(model.net)
    folder = model.save_pretrained(tmp_path / "model")
    common = [f"checkpoint={folder}", "data=phantom3d", "data.train.size=16", "data.train.length=2"]
    common += ["splits=[train]"]
    encode(medgen.compose("encode", [*common, f"output_dir={tmp_path / 'whole'}"]))
    tiled = [f"output_dir={tmp_path / 'tiled'}", "tile=8", "layerwise=true"]
    encode(medgen.compose("encode", [*common, *tiled, f"offload_dir={tmp_path / 'off'}"]))
    factors = [
        json.loads((tmp_path / name / "latents.json").read_text())["scale_factor"]
        for name in ("whole", "tiled")
    ]
    assert factors[1] == pytest.approx(factors[0], rel=1e-5)
    whole = sorted((tmp_path / "whole" / "train").glob("*.npy"))
    tiled_files = sorted((tmp_path / "tiled" / "train").glob("*.npy"))
    assert len(whole) == len(tiled_files) == 2
    for a, b in zip(whole, tiled_files, strict=True):
        np.testing.assert_allclose(
            np.load(b), np.load(a), rtol=0, atol=1e-5 * np.abs(np.load(a)).max()
        )


# ----------------------------------------------------------------------- translation generators
@pytest.mark.parametrize(
    ("spatial_dims", "norm", "upsample", "padding", "residual", "dropout", "final_act"),
    [
        (2, "instance", "transpose", "reflect", False, False, None),
        (2, "batch", "resize_conv", "zero", True, True, "tanh"),
        (2, "none", "transpose", "replicate", True, False, None),
        (3, "instance", "resize_conv", "reflect", True, False, None),
    ],
)
def test_resnet_generator_layerwise_equals_whole(
    spatial_dims, norm, upsample, padding, residual, dropout, final_act
):
    generator = ResnetGenerator(
        spatial_dims,
        2,
        2,
        ngf=8,
        n_blocks=2,
        norm=norm,
        use_dropout=dropout,
        padding_type=padding,
        upsample=upsample,
        global_residual=residual,
        final_act=final_act,
    )
    _randomise(generator)
    with torch.no_grad():
        generator.apply(lambda m: m.weight.mul_(0.5) if isinstance(m, nn.Conv2d) else None)
        for m in generator.modules():  # batch norm with non-trivial running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(generator=torch.Generator().manual_seed(8))
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(
        2, 2, *_shape(spatial_dims, (36, 28), 12), generator=torch.Generator().manual_seed(9)
    )
    with torch.no_grad():
        whole = generator(x)
    tiled = layerwise_apply(generator.stages(), x, 12)
    assert tiled.shape == whole.shape
    assert _rel_err(tiled, whole) < 1e-5


def test_cyclegan_translate_layerwise_is_the_whole_image_pass(tmp_path):
    # Instance norm: blended tiles normalise with each tile's statistics, so they differ from
    # the whole image everywhere; layer by layer they do not.
    torch.manual_seed(0)
    model = CycleGAN(
        spatial_dims=2,
        generator={"_target_": "medgen.nets.ResnetGenerator", "ngf": 8, "n_blocks": 2},
    )
    _randomise(model, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.2)
    x = torch.rand(1, 1, 70, 53, generator=torch.Generator().manual_seed(10))  # odd: padded to 4
    whole = model.translate(x, tile=None)
    exact = model.translate(x, tile=32, layerwise=True)
    blended = model.translate(x, tile=32, overlap=0.5)
    scale = float(whole.max() - whole.min())
    assert exact.shape == whole.shape == x.shape
    assert float((exact - whole).abs().max()) / scale < 1e-5
    assert float((blended - whole).abs().mean()) / scale > 1e-2
    # files: the same through translate_files (what medgen-sample layerwise=true calls)
    write(
        (x[0] * 65535).round().to(torch.int32).numpy().astype("uint16"), tmp_path / "in" / "a.png"
    )
    out = translate_files(
        model, tmp_path / "in", tmp_path / "out", tile=32, layerwise=True, offload_dir=tmp_path
    )
    reference = translate_files(model, tmp_path / "in", tmp_path / "ref", tile=None)
    np.testing.assert_allclose(
        read(out[0]).numpy().astype(np.float64),
        read(reference[0]).numpy().astype(np.float64),
        atol=1,
    )
    with pytest.raises(ValueError, match="evaluation mode"):
        model.translate(x, tile=32, layerwise=True, deterministic=False)


def test_layerwise_translation_refuses_a_unet():
    model = Pix2Pix(
        spatial_dims=2,
        generator={"_target_": "medgen.nets.UnetGenerator", "num_downs": 3, "ngf": 4},
    )
    with pytest.raises(ValueError, match="needs a ResNet generator; UnetGenerator"):
        model.translate(torch.rand(1, 1, 40, 40), tile=16, layerwise=True)


def test_group_statistics_merged_over_pieces_match_the_whole():
    # Strided pieces of different sizes, merged, give the whole tensor's moments, also with a
    # large mean against a small spread (CT in HU, say), where E[x^2] - E[x]^2 cancels.
    from medgen.inference.global_stats import GroupMoments

    generator = torch.Generator().manual_seed(11)
    x = 1000.0 + 0.5 * torch.randn(2, 6, 10, 9, 8, generator=generator)
    sums = GroupMoments(3)
    for piece in (x[..., :3, :, :], x[..., 3:7, :, :4], x[..., 3:7, :, 4:], x[..., 7:, :, :]):
        sums.add(piece)  # strided views, different sizes
    mean, var = sums.moments()
    whole = x.double().reshape(2, 3, -1)
    torch.testing.assert_close(mean, whole.mean(-1), rtol=1e-7, atol=0)
    torch.testing.assert_close(var, whole.var(-1, correction=0), rtol=1e-4, atol=0)
    assert GroupMoments(3).moments() is None
