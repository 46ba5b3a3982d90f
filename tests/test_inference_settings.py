"""The one tiling settings object: validation, construction from anything, and every entry point."""

from __future__ import annotations

import pytest
import torch

import medgen
from medgen.api import tiling_from_config
from medgen.inference import Tiling, tiled_apply


def test_settings_validate_and_normalise():
    assert (
        Tiling().tile is None and Tiling(tile="none").tile is None and Tiling(tile=0).tile is None
    )
    assert Tiling(tile=[4, 8]).tile == (4, 8) and Tiling(tile="AUTO").tile == "auto"
    for bad, match in [
        ({"tile": -1}, "positive"),
        ({"tile": True}, "tile must be"),
        ({"tile": "big"}, "tile must be"),
        ({"overlap": 1.0}, "overlap"),
        ({"margin": "half"}, "margin"),
        ({"margin": -1}, "margin"),
        ({"norm_stats": "batch"}, "norm_stats"),
        ({"batch_tiles": 0}, "batch_tiles"),
    ]:
        with pytest.raises(ValueError, match=match):
            Tiling(**bad)
    with pytest.raises(TypeError, match=r"unknown tiling setting\(s\) \['tiles'\]; valid: tile"):
        Tiling.from_any({"tiles": 4})


def test_from_any_merges_objects_dicts_sizes_and_keywords():
    base = Tiling(tile=16, layerwise=True)
    assert Tiling.from_any(base, overlap=0.5) == Tiling(tile=16, layerwise=True, overlap=0.5)
    assert Tiling.from_any({"tile": [2, 3], "overlap": None}) == Tiling(tile=(2, 3))
    assert Tiling.from_any(32) == Tiling(tile=32) and Tiling.from_any([4, 4]).tile == (4, 4)
    assert Tiling.from_any({"tile": 8}, tile=None).tile is None  # an explicit keyword wins
    assert Tiling(overlap=0.1).with_defaults(overlap=0.5, margin="auto") == Tiling(
        overlap=0.1, margin="auto"
    )
    assert Tiling(tile=(4, 4), margin=(1, 2)).to_dict()["margin"] == [1, 2]


def test_tile_size_and_margins():
    t = Tiling(tile="auto")
    assert t.tile_size((100, 100)) is None  # one tile covers it: whole, exactly fn(x)
    assert t.tile_size((1000, 300), multiple=4) == (512, 300)
    assert Tiling(tile=50).tile_size((1000, 300), multiple=8) == (48, 48)
    assert Tiling(tile=64, overlap=0.25, margin="auto").margins((64, 32)) == (8, 4)
    assert Tiling(tile=64).margins((64, 64)) == (0, 0)


def test_apply_chooses_the_method_and_matches_tiled_apply():
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(1, 1, 40, 36)
    with torch.no_grad():
        whole = Tiling().apply(net, x)
        torch.testing.assert_close(whole, net(x))
        blended = Tiling(tile=16, overlap=0.5, margin=2).apply(net, x)
        reference = tiled_apply(
            net, x, (16, 16), 0.5, margin=(2, 2), accumulate_dtype=torch.float32
        )
        torch.testing.assert_close(blended, reference, rtol=0, atol=0)
        torch.testing.assert_close(blended, net(x), atol=1e-5, rtol=0)  # margin >= halo
    with pytest.raises(ValueError, match="layer-by-layer form"):
        Tiling(tile=16, layerwise=True).apply(net, x)


def test_every_entry_point_takes_the_same_settings(tmp_path):
    from medgen.models import AutoencoderKL, CycleGAN

    ae = AutoencoderKL(
        net={"channels": [4, 8], "norm_num_groups": 4, "latent_channels": 2},
        discriminator=None,
    ).eval()
    x = torch.rand(1, 1, 32, 32)
    exact = Tiling(tile=8, layerwise=True)
    whole = ae.encode(x)
    torch.testing.assert_close(ae.encode(x, exact), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(ae.encode(x, tile=8, layerwise=True), ae.encode(x, exact))
    torch.testing.assert_close(ae.encode(x, {"tile": 8, "layerwise": True}), ae.encode(x, exact))
    z = whole
    torch.testing.assert_close(ae.decode(z, exact.replace(tile=4)), ae.decode(z), atol=1e-5, rtol=0)
    gan = CycleGAN(
        generator={"_target_": "medgen.nets.ResnetGenerator", "ngf": 4, "n_blocks": 1},
        discriminator={"_target_": "medgen.nets.NLayerDiscriminator", "ndf": 4},
        lambda_identity=0.0,
    ).eval()
    y = torch.rand(1, 1, 40, 40)
    torch.testing.assert_close(
        gan.translate(y, tiling=Tiling(tile=16, layerwise=True)),
        gan.translate(y, tile=None),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(TypeError, match="unknown tiling setting"):
        gan.translate(y, tile_size=16)


def test_cli_keys_new_and_deprecated_give_the_same_settings():
    new = medgen.compose(
        "sample", ["checkpoint=x", "output_dir=y", "tiling=exact", "tiling.tile=64"]
    )
    assert tiling_from_config(new) == Tiling(tile=64, layerwise=True)
    auto = medgen.compose("sample", ["checkpoint=x", "output_dir=y"])
    assert tiling_from_config(auto) == Tiling(tile="auto")
    old = medgen.compose(
        "sample", ["checkpoint=x", "output_dir=y", "tile=64", "layerwise=true", "overlap=0.5"]
    )
    with pytest.deprecated_call():
        assert tiling_from_config(old) == Tiling(tile=64, layerwise=True, overlap=0.5)
    enc = medgen.compose("encode", ["checkpoint=x", "output_dir=y", "data=phantom3d"])
    assert tiling_from_config(enc) == Tiling()


def test_latent_diffusion_sample_decodes_with_the_given_tiling(tmp_path):
    from medgen.models import AutoencoderKL, Diffusion

    torch.manual_seed(0)
    ae = AutoencoderKL(
        net={"channels": [4, 8], "norm_num_groups": 4, "latent_channels": 2},
        discriminator=None,
    )
    folder = ae.save_pretrained(tmp_path / "ae")
    net = {
        "channels": [8, 8],
        "num_res_blocks": 1,
        "attention_levels": [False, False],
        "norm_num_groups": 4,
    }
    model = Diffusion(net=net, autoencoder=str(folder), latent_scale=1.0).eval()
    kwargs = dict(steps=2, seed=0, sample_size=8)
    whole = model.sample(1, **kwargs)
    exact = model.sample(1, tiling=Tiling(tile=4, layerwise=True), **kwargs)
    assert whole.shape == (1, 1, 16, 16)
    torch.testing.assert_close(exact, whole, atol=1e-5, rtol=0)
    blended = model.sample(1, tiling={"tile": 4, "norm_stats": "tile"}, **kwargs)
    assert not torch.allclose(blended, whole, atol=1e-5)  # per-tile statistics differ
