"""Upstream pix2pix/CycleGAN weights -> medgen exports give the upstream nets' outputs.

The upstream nets come from a minimal copy of junyanz/pytorch-CycleGAN-and-pix2pix's
``models/networks.py`` (tests/upstream_junyanz, BSD licence): build, random-init, save the state
dict as upstream does (``latest_net_G.pth`` ...), convert, ``medgen.load`` and compare outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medgen
from medgen.convert import CONVERTERS, ConversionError, convert
from medgen.convert.junyanz import convert_cyclegan, convert_pix2pix, read_train_options
from medgen.nets import NLayerDiscriminator, PixelDiscriminator, ResnetGenerator, UnetGenerator
from tests.upstream_junyanz import networks as up

ATOL = 1e-6


def _randomise(net: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm statistics (so that every tensor matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif tensor.dtype.is_floating_point:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2)
    return net.eval()


def _upstream_g(net_g: str, in_nc: int, out_nc: int, ngf: int, norm, dropout: bool) -> nn.Module:
    norm_layer = up.get_norm_layer(norm) if isinstance(norm, str) else norm
    if net_g.startswith("resnet"):
        n_blocks = int(net_g[len("resnet_") : -len("blocks")])
        return up.ResnetGenerator(in_nc, out_nc, ngf, norm_layer, dropout, n_blocks)
    size = int(net_g[len("unet_") :])
    return up.UnetGenerator(in_nc, out_nc, size.bit_length() - 1, ngf, norm_layer, dropout)


def _upstream_d(net_d: str, in_nc: int, ndf: int, n_layers: int, norm) -> nn.Module:
    norm_layer = up.get_norm_layer(norm) if isinstance(norm, str) else norm
    if net_d == "pixel":
        return up.PixelDiscriminator(in_nc, ndf, norm_layer)
    return up.NLayerDiscriminator(in_nc, ndf, 3 if net_d == "basic" else n_layers, norm_layer)


def _train_opt(options: dict) -> str:
    """A ``train_opt.txt`` as upstream's BaseOptions.print_options writes it."""
    lines = ["----------------- Options ---------------"]
    for key, value in sorted(options.items()):
        lines.append(f"{key:>25}: {str(value):<30}\t[default: something]")
    lines.append("----------------- End -------------------")
    return "\n".join(lines) + "\n"


def _conv_biases(net: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) and m.bias is not None for m in net.modules())


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=ATOL, rtol=0), (a - b).abs().max()


# --------------------------------------------------------------------------------------------------
# pix2pix: generators x norms, discriminators x norms, outputs equal after medgen.load
# --------------------------------------------------------------------------------------------------
PIX2PIX_CASES = [
    # netG, norm, dropout, netD, n_layers_D, size
    ("unet_32", "batch", True, "basic", 3, 32),
    ("unet_64", "instance", True, "n_layers", 2, 64),
    ("unet_32", "none", False, "pixel", 3, 32),
    ("resnet_9blocks", "instance", False, "n_layers", 1, 16),
    ("resnet_6blocks", "batch", True, "pixel", 3, 16),
    ("resnet_6blocks", "none", False, "basic", 3, 32),
    ("unet_64", "batch", False, "pixel", 3, 64),
    ("unet_32", "instance", False, "basic", 3, 32),
]


@pytest.mark.parametrize("net_g,norm,dropout,net_d,n_layers,size", PIX2PIX_CASES)
def test_pix2pix_outputs_equal_upstream(tmp_path, net_g, norm, dropout, net_d, n_layers, size):
    in_nc, out_nc, ngf, ndf = 2, 3, 4, 4
    g = _randomise(_upstream_g(net_g, in_nc, out_nc, ngf, norm, dropout), 0)
    d = _randomise(_upstream_d(net_d, in_nc + out_nc, ndf, n_layers, norm), 1)
    ckpt = tmp_path / "checkpoints" / "facades"
    ckpt.mkdir(parents=True)
    torch.save(g.state_dict(), ckpt / "latest_net_G.pth")
    torch.save(d.state_dict(), ckpt / "latest_net_D.pth")
    opt = {
        "netG": net_g,
        "netD": net_d,
        "n_layers_D": n_layers,
        "norm": norm,
        "ngf": ngf,
        "ndf": ndf,
        "input_nc": in_nc,
        "output_nc": out_nc,
        "no_dropout": not dropout,
        "gan_mode": "lsgan",
        "lambda_L1": 50.0,
        "gpu_ids": "0",
        "name": "facades_pix2pix",
    }
    (ckpt / "train_opt.txt").write_text(_train_opt(opt))

    out = convert("junyanz-pix2pix", ckpt, tmp_path / "export")
    model = medgen.load(out)
    assert isinstance(model, medgen.models.Pix2Pix)
    assert model.hparams["adv_loss"] == "lsgan" and model.lambda_l1 == 50.0
    x = torch.randn(2, in_nc, size, size, generator=torch.Generator().manual_seed(2))
    y = torch.randn(2, out_nc, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _close(model.generator(x), g(x.clone()))  # upstream's in-place activations: clone
        pair = torch.cat([x, y], 1)
        _close(model.discriminator(pair), d(pair.clone()))
    if norm == "none":  # upstream: a bias only before instance norm, and on the output conv
        assert _conv_biases(model.generator) == 1


def test_cyclegan_four_nets_and_discriminator_domains(tmp_path):
    """G_A -> generator_ab, G_B -> generator_ba, D_A (judges B) -> discriminator_b, D_B -> _a."""
    in_nc, out_nc, ngf, ndf = 1, 3, 4, 4  # different channels: a swapped D cannot load
    nets = {
        "G_A": _randomise(
            up.ResnetGenerator(in_nc, out_nc, ngf, up.get_norm_layer(), n_blocks=2), 0
        ),
        "G_B": _randomise(
            up.ResnetGenerator(out_nc, in_nc, ngf, up.get_norm_layer(), n_blocks=2), 1
        ),
        "D_A": _randomise(up.NLayerDiscriminator(out_nc, ndf, 3, up.get_norm_layer()), 2),
        "D_B": _randomise(up.NLayerDiscriminator(in_nc, ndf, 3, up.get_norm_layer()), 3),
    }
    for name, net in nets.items():
        torch.save(net.state_dict(), tmp_path / f"latest_net_{name}.pth")
    model = medgen.load(
        convert_cyclegan(
            tmp_path / "latest_net_G_A.pth",  # the G_A file: the others are found beside it
            tmp_path / "export",
            netG="resnet_2blocks",
            ngf=ngf,
            ndf=ndf,
            input_nc=in_nc,
            output_nc=out_nc,
        )
    )
    assert isinstance(model, medgen.models.CycleGAN)
    assert model.lambda_identity == 0.0  # channels differ: upstream's identity term cannot run
    a = torch.randn(2, in_nc, 32, 32, generator=torch.Generator().manual_seed(4))
    b = torch.randn(2, out_nc, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _close(model.generator_ab(a), nets["G_A"](a.clone()))
        _close(model.generator_ba(b), nets["G_B"](b.clone()))
        _close(model.discriminator_b(b), nets["D_A"](b.clone()))
        _close(model.discriminator_a(a), nets["D_B"](a.clone()))
        # the model's API maps data in value_range (0, 1) to [-1, 1] and back (float rounding)
        out = model.translate(a * 0.5 + 0.5)
        assert torch.allclose(out, nets["G_A"](a.clone()) * 0.5 + 0.5, atol=1e-5, rtol=0)


def test_old_files_dataparallel_prefix_and_instance_norm_statistics(tmp_path):
    """PyTorch < 0.4 files: ``module.`` keys, instance-norm running stats, no num_batches_tracked."""
    g = _randomise(up.UnetGenerator(1, 1, 5, 4, up.norm_layer_old), 0)
    old_state = g.state_dict()
    assert any(k.endswith("running_mean") for k in old_state)  # what upstream's loader drops
    torch.save({f"module.{k}": v for k, v in old_state.items()}, tmp_path / "latest_net_G_A.pth")
    torch.save({f"module.{k}": v for k, v in old_state.items()}, tmp_path / "latest_net_G_B.pth")
    model = medgen.load(
        convert_cyclegan(
            tmp_path,
            tmp_path / "export",
            netG="unet_32",
            ngf=4,
            input_nc=1,
            output_nc=1,
            model={"value_range": [0.0, 255.0]},
        )
    )
    # today's upstream net (no running statistics) with the same weights
    new = up.UnetGenerator(1, 1, 5, 4, up.get_norm_layer("instance")).eval()
    new.load_state_dict(
        {k: v for k, v in old_state.items() if "running" not in k and "num_batches" not in k}
    )
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        _close(model.generator_ab(x), new(x.clone()))
    assert model.lambda_identity == 0.5
    assert list(model.hparams["value_range"]) == [0.0, 255.0]  # the model option reached it

    g = _randomise(up.UnetGenerator(1, 1, 5, 4, up.get_norm_layer("batch")), 2)
    torch.save(
        {k: v for k, v in g.state_dict().items() if "num_batches" not in k},
        tmp_path / "old_net_G.pth",
    )
    model = medgen.load(
        convert_pix2pix(
            tmp_path / "old_net_G.pth",
            tmp_path / "p2p",
            netG="unet_32",
            ngf=4,
            input_nc=1,
            output_nc=1,
            n_layers_D=2,
        )
    )
    assert set(model.export_modules) == {"generator"}  # no old_net_D.pth beside it
    with torch.no_grad():
        _close(model.generator(x), g(x.clone()))


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_mismatch_names_first_key_and_both_shapes(tmp_path):
    g = up.ResnetGenerator(3, 3, 8, up.get_norm_layer("instance"), n_blocks=6)
    torch.save(g.state_dict(), tmp_path / "latest_net_G.pth")
    with pytest.raises(ConversionError, match=r"model\.1\.weight.*\(8, 3, 7, 7\).*\(4, 3, 7, 7\)"):
        convert_pix2pix(tmp_path, tmp_path / "x", netG="resnet_6blocks", ngf=4, norm="instance")
    with pytest.raises(ConversionError, match="no place.*'model.1.bias'"):  # none: no conv bias
        convert_pix2pix(tmp_path, tmp_path / "x", netG="resnet_6blocks", ngf=8, norm="none")
    with pytest.raises(ConversionError, match="no 'model.10.conv_block.6.weight'"):
        convert_pix2pix(  # the file has no dropout: an explicit no_dropout=False cannot fit
            tmp_path,
            tmp_path / "x",
            netG="resnet_6blocks",
            ngf=8,
            norm="instance",
            no_dropout=False,
        )
    assert not (tmp_path / "x" / "config.json").exists()
    with pytest.raises(ConversionError, match="unknown option.*ngff"):
        convert_pix2pix(tmp_path, tmp_path / "x", ngff=8)
    with pytest.raises(ConversionError, match="unknown netG 'unet_48'"):
        convert_pix2pix(tmp_path, tmp_path / "x", netG="unet_48")
    with pytest.raises(ConversionError, match="no 'best_net_G.pth'.*latest_net_G.pth"):
        convert_pix2pix(tmp_path, tmp_path / "x", epoch="best")
    with pytest.raises(ConversionError, match="no G_B"):
        convert_cyclegan(tmp_path / "latest_net_G.pth", tmp_path / "x")


def test_existing_export_is_not_overwritten(tmp_path):
    g = _randomise(up.UnetGenerator(1, 1, 5, 2, up.get_norm_layer("batch")), 0)
    torch.save(g.state_dict(), tmp_path / "latest_net_G.pth")
    kwargs = {"netG": "unet_32", "ngf": 2, "input_nc": 1, "output_nc": 1}
    dst = convert_pix2pix(tmp_path, tmp_path / "export", **kwargs)
    before = (dst / "model.safetensors").read_bytes()
    with pytest.raises(ConversionError, match="already holds an export"):
        convert_pix2pix(tmp_path, dst, **kwargs, lambda_L1=1.0)
    assert (dst / "model.safetensors").read_bytes() == before


def test_train_options_and_registry(tmp_path):
    (tmp_path / "train_opt.txt").write_text(
        _train_opt({"which_model_netG": "unet_128", "no_lsgan": True, "ngf": 32, "name": "x y"})
    )
    opts = read_train_options(tmp_path / "train_opt.txt")
    assert opts["netG"] == "unet_128" and opts["gan_mode"] == "vanilla" and opts["ngf"] == "32"
    assert CONVERTERS["junyanz-pix2pix"].endswith(":convert_pix2pix")
    assert CONVERTERS["junyanz-cyclegan"].endswith(":convert_cyclegan")


@pytest.mark.parametrize(
    "cls", [ResnetGenerator, UnetGenerator, NLayerDiscriminator, PixelDiscriminator]
)
def test_conv_bias_option(cls):
    """``conv_bias=None`` keeps the norm rule; ``False``/``True`` force it (2D and 3D)."""
    # always biased: resnet head, UNet outermost up conv, PatchGAN first + last, pixel first
    fixed = {ResnetGenerator: 1, UnetGenerator: 1, NLayerDiscriminator: 2, PixelDiscriminator: 1}
    for dims in (2, 3):
        args = (dims, 2, 2) if cls in (ResnetGenerator, UnetGenerator) else (dims, 2)
        extra = {"num_downs": 2} if cls is UnetGenerator else {}
        n_all = _conv_biases(cls(*args, norm="none", **extra))
        assert n_all == sum(
            isinstance(m, nn.modules.conv._ConvNd) for m in cls(*args, **extra).modules()
        )
        assert _conv_biases(cls(*args, norm="none", conv_bias=False, **extra)) == fixed[cls]
        assert _conv_biases(cls(*args, norm="batch", **extra)) == fixed[cls]
        assert _conv_biases(cls(*args, norm="batch", conv_bias=True, **extra)) == n_all
