"""``medgen.convert`` / ``medgen-convert`` for MONAI's DiffusionModelUNet and AutoencoderKL.

MONAI's nets are built with random weights, their state dicts saved, converted into medgen export
folders, reloaded with :func:`medgen.load`, and compared output for output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import medgen
from medgen.convert import CONVERTERS, ConversionError, convert, get_converter, main
from tests.test_nets_monai_compat import randomised

monai_nets = pytest.importorskip("monai.networks.nets")

UNET = dict(
    in_channels=1,
    out_channels=1,
    num_res_blocks=1,
    channels=[8, 16],
    attention_levels=[False, True],
    norm_num_groups=8,
    num_head_channels=8,
)
AE = dict(
    in_channels=1,
    out_channels=1,
    num_res_blocks=1,
    channels=[8, 16],
    attention_levels=[False, True],
    latent_channels=3,
    norm_num_groups=8,
)
SHAPES = {2: (16, 16), 3: (8, 8, 8)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_diffusion_unet_converts_to_a_loadable_export_with_monais_outputs(
    tmp_path: Path, spatial_dims: int
) -> None:
    cfg = dict(UNET, spatial_dims=spatial_dims, num_class_embeds=3, resblock_updown=True)
    theirs = randomised(monai_nets.DiffusionModelUNet(**cfg))
    src = tmp_path / "unet.pt"
    # A trainer-style wrapper with DataParallel prefixes is unwrapped.
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, src)
    folder = convert("monai-diffusion-unet", src, tmp_path / "out", **cfg)
    config = json.loads((folder / "config.json").read_text())
    assert config["_target_"] == "medgen.models.Diffusion"
    assert config["init_args"]["num_classes"] == 2  # the last class embedding is the null class
    model = medgen.load(folder)
    x = torch.randn(2, 1, *SHAPES[spatial_dims], generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([5, 900]), torch.tensor([0, 2])
    with torch.no_grad():
        assert _rel(theirs(x, t, class_labels=labels), model.net(x, t, class_labels=labels)) < 1e-5


def test_conditioned_unet_and_combined_attention_through_the_cli(tmp_path: Path, capsys) -> None:
    cfg = dict(
        UNET,
        spatial_dims=2,
        in_channels=3,
        with_conditioning=True,
        cross_attention_dim=4,
        use_combined_linear=True,
    )
    theirs = randomised(monai_nets.DiffusionModelUNet(**cfg))
    src = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(src))
    args = [str(src), str(tmp_path / "out"), "--from", "monai-diffusion-unet"]
    args += [f"{k}={json.dumps(v)}" for k, v in cfg.items()]
    assert main([*args, "--model", "prediction=v"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = medgen.load(tmp_path / "out")
    assert model.condition_channels == 2 and model.prediction == "v"
    g = torch.Generator().manual_seed(2)
    x, ctx, t = (
        torch.randn(1, 3, 16, 16, generator=g),
        torch.randn(1, 2, 4, generator=g),
        torch.tensor([7]),
    )
    with torch.no_grad():
        assert _rel(theirs(x, t, context=ctx), model.net(x, t, context=ctx)) < 1e-5


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_autoencoderkl_converts_with_monais_latents_and_reconstructions(
    tmp_path: Path, spatial_dims: int
) -> None:
    cfg = dict(AE, spatial_dims=spatial_dims, use_convtranspose=spatial_dims == 3)
    theirs = randomised(monai_nets.AutoencoderKL(**cfg))
    torch.save(theirs.state_dict(), tmp_path / "ae.pth")
    folder = convert("monai-autoencoderkl", tmp_path / "ae.pth", tmp_path / "out", **cfg)
    model = medgen.load(folder)
    assert type(model).__name__ == "AutoencoderKL"
    x = torch.rand(1, 1, *SHAPES[spatial_dims], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mu, _ = theirs.encode(x)
        z = model.encode(x)
        assert _rel(mu, z) < 1e-5
        assert _rel(theirs.decode(mu), model.decode(z)) < 1e-5


def test_a_mismatching_configuration_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    theirs = monai_nets.DiffusionModelUNet(spatial_dims=2, **UNET)
    torch.save(theirs.state_dict(), tmp_path / "unet.pt")
    wrong = dict(UNET, channels=[8, 24])
    with pytest.raises(ConversionError, match=r"unet\.pt.*\(16, 8, 3, 3\).*\(24, 8, 3, 3\)"):
        convert(
            "monai-diffusion-unet", tmp_path / "unet.pt", tmp_path / "out", spatial_dims=2, **wrong
        )
    # A tensor the configured net has no place for.
    torch.save({**theirs.state_dict(), "extra.weight": torch.zeros(2, 3)}, tmp_path / "more.pt")
    with pytest.raises(ConversionError, match=r"the first 'extra.weight' with shape \(2, 3\)"):
        convert(
            "monai-diffusion-unet", tmp_path / "more.pt", tmp_path / "out", spatial_dims=2, **UNET
        )
    assert not (tmp_path / "out" / "config.json").exists()


def test_bad_inputs_are_clear_errors_and_nothing_is_overwritten(tmp_path: Path) -> None:
    with pytest.raises(
        ConversionError, match="unknown converter 'monai-unet'.*monai-diffusion-unet"
    ):
        get_converter("monai-unet")
    assert {"monai-diffusion-unet", "monai-autoencoderkl"} <= set(CONVERTERS)
    with pytest.raises(ConversionError, match="missing.pt' do not exist"):
        convert("monai-autoencoderkl", tmp_path / "missing.pt", tmp_path / "out", spatial_dims=2)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="junk.pt"):
        convert("monai-autoencoderkl", tmp_path / "junk.pt", tmp_path / "out", spatial_dims=2)
    torch.save({"weight": torch.zeros(1), "note": "text"}, tmp_path / "mixed.pt")
    with pytest.raises(ConversionError, match="'note' is not a tensor"):
        convert("monai-autoencoderkl", tmp_path / "mixed.pt", tmp_path / "out", spatial_dims=2)
    with pytest.raises(ConversionError, match="do not build"):
        convert(
            "monai-autoencoderkl",
            tmp_path / "mixed.pt",
            tmp_path / "out",
            spatial_dims=2,
            channels=[8, 12],
            norm_num_groups=8,
        )
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="already holds an export"):
        convert("monai-autoencoderkl", tmp_path / "mixed.pt", existing, spatial_dims=2)
    assert (existing / "config.json").read_text() == "{}"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                str(tmp_path / "mixed.pt"),
                str(tmp_path / "o"),
                "--from",
                "monai-autoencoderkl",
                "oops",
            ]
        )
    assert exit_info.value.code == 2
