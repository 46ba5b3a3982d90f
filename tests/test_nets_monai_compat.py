"""MONAI compatibility of :class:`medgen.nets.DiffusionUNet` and :class:`medgen.nets.AutoencoderKLNet`.

Every configuration below is built by MONAI 1.6's ``DiffusionModelUNet`` / ``AutoencoderKL`` and
by medgen with the same keyword arguments: same parameter count, and MONAI's random weights
mapped by :mod:`medgen.convert.monai` give MONAI's outputs to 1e-5 relative, in 2D and 3D.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from medgen.convert import map_state
from medgen.convert.monai import (
    _split_combined,
    autoencoderkl_key_map,
    diffusion_unet_key_map,
)
from medgen.nets import AutoencoderKLNet, DiffusionUNet

monai_nets = pytest.importorskip("monai.networks.nets")

SHAPES = {2: (16, 16), 3: (8, 8, 8)}
UNET = dict(
    in_channels=1,
    out_channels=1,
    num_res_blocks=1,
    channels=(8, 16),
    attention_levels=(False, True),
    norm_num_groups=8,
    num_head_channels=8,
)
UNET_CASES = {
    "plain": {},
    "resblock_updown": dict(resblock_updown=True),
    "cross_attention_2_layers": dict(
        with_conditioning=True, cross_attention_dim=5, transformer_num_layers=2
    ),
    "classes_no_fc": dict(num_class_embeds=3, include_fc=False),
    "combined_linear_attn_everywhere": dict(
        use_combined_linear=True, attention_levels=(True, True)
    ),
    "cond_uneven_heads_upcast": dict(
        with_conditioning=True,
        cross_attention_dim=4,
        num_head_channels=(8, 6),
        upcast_attention=True,
        include_fc=False,
        num_res_blocks=(1, 2),
    ),
}
AE = dict(
    in_channels=1,
    out_channels=1,
    num_res_blocks=1,
    channels=(8, 16),
    attention_levels=(False, True),
    latent_channels=3,
    norm_num_groups=8,
)
AE_CASES = {
    "plain": {},
    "convtranspose": dict(use_convtranspose=True),
    "no_middle_blocks": dict(with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
    "no_fc_combined": dict(include_fc=False, use_combined_linear=True),
    "per_level_blocks": dict(num_res_blocks=(1, 2), attention_levels=(True, False)),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (MONAI zero-initialises its output convolutions)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net.eval()


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("case", list(UNET_CASES))
def test_diffusion_unet_matches_monai(case: str, spatial_dims: int) -> None:
    cfg = dict(UNET, spatial_dims=spatial_dims, **UNET_CASES[case])
    theirs = randomised(monai_nets.DiffusionModelUNet(**cfg))
    ours = DiffusionUNet(**cfg).eval()
    assert _count(ours) == _count(theirs)
    state = map_state(_split_combined(theirs.state_dict()), ours, diffusion_unet_key_map(ours), "m")
    ours.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, *SHAPES[spatial_dims], generator=g)
    t = torch.tensor([3, 700])
    kwargs = {}
    if cfg.get("with_conditioning"):
        kwargs["context"] = torch.randn(2, 3, cfg["cross_attention_dim"], generator=g)
    if cfg.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([0, 2])
    with torch.no_grad():
        expected, got = theirs(x, t, **kwargs), ours(x, t, **kwargs)
    assert _rel(expected, got) < 1e-5


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("case", list(AE_CASES))
def test_autoencoderkl_matches_monai(case: str, spatial_dims: int) -> None:
    cfg = dict(AE, spatial_dims=spatial_dims, **AE_CASES[case])
    theirs = randomised(monai_nets.AutoencoderKL(**cfg))
    ours = AutoencoderKLNet(**cfg).eval()
    assert _count(ours) == _count(theirs)
    state = map_state(_split_combined(theirs.state_dict()), ours, autoencoderkl_key_map(ours), "m")
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 1, *SHAPES[spatial_dims], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu, sigma = theirs.encode(x)
        posterior = ours.encode(x)
        assert _rel(mu, posterior.mean) < 1e-5
        assert _rel(sigma, posterior.std) < 1e-5
        assert _rel(theirs.decode(mu), ours.decode(posterior.mean)) < 1e-5
        assert _rel(theirs.reconstruct(x), ours.reconstruct(x)) < 1e-5


@pytest.mark.parametrize(
    "net, cfg",
    [
        # the model zoo's brain latent diffusion UNet and autoencoder (3D)
        (
            "DiffusionModelUNet",
            dict(
                spatial_dims=3,
                in_channels=7,
                out_channels=3,
                num_res_blocks=2,
                channels=(256, 512, 768),
                attention_levels=(False, True, True),
                norm_num_groups=32,
                norm_eps=1e-6,
                resblock_updown=True,
                num_head_channels=(0, 512, 768),
                with_conditioning=True,
                transformer_num_layers=1,
                cross_attention_dim=4,
                upcast_attention=True,
            ),
        ),
        (
            "AutoencoderKL",
            dict(
                spatial_dims=3,
                in_channels=1,
                out_channels=1,
                latent_channels=3,
                channels=(64, 128, 128, 128),
                num_res_blocks=2,
                norm_num_groups=32,
                norm_eps=1e-6,
                attention_levels=(False, False, False, False),
                with_encoder_nonlocal_attn=False,
                with_decoder_nonlocal_attn=False,
            ),
        ),
        # MONAI's defaults, positionally
        ("DiffusionModelUNet", dict(spatial_dims=2, in_channels=1, out_channels=1)),
        ("AutoencoderKL", dict(spatial_dims=3)),
    ],
)
def test_zoo_and_default_configurations_have_monais_parameter_count(net: str, cfg: dict) -> None:
    ours_cls = DiffusionUNet if net == "DiffusionModelUNet" else AutoencoderKLNet
    theirs_cls = getattr(monai_nets, net)
    # The same arguments passed positionally, in MONAI's order (its defaults in the gaps).
    params = inspect.signature(theirs_cls).parameters
    names = list(params)
    last = max(names.index(k) for k in cfg)
    args = [cfg.get(name, params[name].default) for name in names[: last + 1]]
    with torch.device("meta"):
        theirs = theirs_cls(**cfg)
        ours = ours_cls(**cfg)
        positional = ours_cls(*args)
    assert _count(ours) == _count(theirs) == _count(positional)


def test_controlnet_residuals_match_monai() -> None:
    cfg = dict(UNET, spatial_dims=2)
    theirs = randomised(monai_nets.DiffusionModelUNet(**cfg))
    ours = DiffusionUNet(**cfg).eval()
    ours.load_state_dict(map_state(theirs.state_dict(), ours, diffusion_unet_key_map(ours), "m"))
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(1, 1, 16, 16, generator=g), torch.tensor([4])
    # conv_in, level-0 block, down-sampling, level-1 block; then the middle block's output
    shapes = [(8, 16), (8, 16), (8, 8), (16, 8)]
    down = [torch.randn(1, c, s, s, generator=g) for c, s in shapes]
    mid = torch.randn(1, 16, 8, 8, generator=g)
    kwargs = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    with torch.no_grad():
        assert _rel(theirs(x, t, **kwargs), ours(x, t, **kwargs)) < 1e-5
    with pytest.raises(ValueError, match="4 skip connections"):
        ours(x, t, down_block_additional_residuals=down[:3])


def test_monai_unit_test_behaviours() -> None:
    # MONAI refuses (B, 1) timesteps and widths that are not multiples of norm_num_groups.
    net = DiffusionUNet(2, 1, 1, 1, (8, 8, 8), (False, False, False), 8)
    with pytest.raises(ValueError, match="timesteps"):
        net(torch.rand(1, 1, 16, 16), torch.randint(0, 1000, (1, 1)))
    assert net(torch.rand(1, 1, 16, 16), torch.randint(0, 1000, (1,))).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="multiple of norm_num_groups=8"):
        DiffusionUNet(2, 1, 1, 1, (8, 8, 12), (False, False, False), 8)
    with pytest.raises(ValueError, match="multiple of norm_num_groups=8"):
        AutoencoderKLNet(2, 1, 1, 1, (8, 12), (False, False), 3, 8)
    # MONAI's 4-level defaults with another number of levels: say what to give.
    with pytest.raises(ValueError, match="channels has 2 levels.*num_res_blocks=1"):
        DiffusionUNet(2, 1, 1, channels=(8, 16), attention_levels=(False, True))


def test_legacy_layout_keeps_the_old_conditioned_layout() -> None:
    cfg = dict(UNET, spatial_dims=2, with_conditioning=True, cross_attention_dim=4)
    legacy = DiffusionUNet(**cfg, legacy_layout=True)
    keys = set(legacy.state_dict())
    assert "mid_block.cross_attn.0.to_kv.weight" in keys
    assert not any(".blocks.0.ff_in." in k for k in keys)
    current = DiffusionUNet(**cfg)
    assert "mid_block.attn.blocks.0.ff_in.weight" in current.state_dict()
    # Old weights say how to load them; with legacy_layout=True they load as they are.
    with pytest.raises(RuntimeError, match="legacy_layout=True"):
        current.load_state_dict(legacy.state_dict())
    DiffusionUNet(**cfg, legacy_layout=True).load_state_dict(legacy.state_dict())
