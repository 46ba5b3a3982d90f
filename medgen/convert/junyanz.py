"""Convert pix2pix / CycleGAN weights of junyanz/pytorch-CycleGAN-and-pix2pix into medgen exports.

The reference implementation of pix2pix (Isola et al., "Image-to-Image Translation with
Conditional Adversarial Networks", CVPR 2017) and CycleGAN (Zhu et al., "Unpaired Image-to-Image
Translation using Cycle-Consistent Adversarial Networks", ICCV 2017) saves one plain state dict
per net in its checkpoint folder: ``<epoch>_net_G.pth`` and ``<epoch>_net_D.pth`` (pix2pix),
``<epoch>_net_G_A.pth``, ``..._G_B``, ``..._D_A``, ``..._D_B`` (CycleGAN), next to
``train_opt.txt``, the options of the run. Its nets are medgen's :mod:`medgen.nets.translation`
nets at ``spatial_dims=2`` with other key names (and, for ``norm=none``, convolutions without
bias: ``conv_bias=False``), so a converter only renames keys; outputs are then the same to float
rounding (tested against a copy of the upstream definitions).

:func:`convert_pix2pix` writes a :class:`medgen.models.Pix2Pix` export, :func:`convert_cyclegan`
a :class:`medgen.models.CycleGAN` export (with the discriminators when their files are there, so
that fine-tuning starts from them too); ``medgen.load(DST)`` then translates, and
``model.init_from=DST`` fine-tunes. The options are read from ``train_opt.txt`` when the source
folder has one; keyword arguments (upstream's option names: ``netG``, ``norm``, ``ngf``...) win.
The nets see images in [-1, 1] as upstream's (which loads images to [0, 1] and normalises them
with mean and std 0.5); the models map their ``value_range`` (default ``(0, 1)``) to it.

Files are read with ``torch.load(weights_only=True)`` only. Old files are handled as the upstream
loader does: a ``module.`` prefix (DataParallel) is stripped, the running statistics that
PyTorch < 0.4 stored for instance norm are dropped, and a batch norm without
``num_batches_tracked`` gets 0.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgen.convert import ConversionError, check_destination, load_foreign_state, map_state
from medgen.pretrained import save_pretrained

__all__ = [
    "UPSTREAM_GAN_MODES",
    "convert_cyclegan",
    "convert_pix2pix",
    "discriminator_config",
    "discriminator_key_map",
    "generator_config",
    "generator_key_map",
    "read_train_options",
    "upstream_state",
]

#: upstream ``gan_mode`` -> medgen ``adv_loss``
UPSTREAM_GAN_MODES = {"vanilla": "non_saturating", "lsgan": "lsgan", "wgangp": "wgan"}

#: Options shared by both models, with upstream's defaults (options/base_options.py).
_COMMON = {
    "input_nc": 3,
    "output_nc": 3,
    "ngf": 64,
    "ndf": 64,
    "netD": "basic",
    "n_layers_D": 3,
    "init_type": "normal",
    "init_gain": 0.02,
    "lr": 0.0002,
    "beta1": 0.5,
    "direction": "AtoB",
    "epoch": "latest",
    "discriminators": True,
    "model": {},
}
#: pix2pix's own defaults (models/pix2pix_model.py sets norm, netG, gan_mode, pool_size).
_PIX2PIX = {
    **_COMMON,
    "netG": "unet_256",
    "norm": "batch",
    "no_dropout": False,
    "gan_mode": "vanilla",
    "lambda_L1": 100.0,
}
#: CycleGAN's (models/cycle_gan_model.py: no dropout; base options: instance norm, lsgan).
_CYCLEGAN = {
    **_COMMON,
    "netG": "resnet_9blocks",
    "norm": "instance",
    "no_dropout": True,
    "gan_mode": "lsgan",
    "pool_size": 50,
    "lambda_A": 10.0,
    "lambda_B": 10.0,
    "lambda_identity": 0.5,
}
#: names older upstream versions wrote in train_opt.txt
_OLD_NAMES = {
    "which_model_netG": "netG",
    "which_model_netD": "netD",
    "which_direction": "direction",
    "which_epoch": "epoch",
}
_NORMS = ("batch", "instance", "none")
_EXPORT_ORDER = ["generator_ab", "generator_ba", "discriminator_a", "discriminator_b"]


# --------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------
def read_train_options(path: str | os.PathLike) -> dict[str, str]:
    """The options upstream wrote to ``train_opt.txt`` (``name: value [default: ...]`` lines).

    Values stay strings (typed later against the defaults); names of older upstream versions
    (``which_model_netG``...) are renamed to today's, and ``no_lsgan: True`` becomes
    ``gan_mode: vanilla``.
    """
    options: dict[str, str] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        name, sep, rest = line.strip().partition(":")
        if not sep or not name or name.startswith("-") or " " in name:
            continue
        value = rest.split("\t", 1)[0].strip()
        options[_OLD_NAMES.get(name, name)] = value
    if options.get("no_lsgan") == "True" and "gan_mode" not in options:
        options["gan_mode"] = "vanilla"
    return options


def _typed(name: str, value: Any, default: Any, source: str) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            if value not in ("True", "False"):
                raise ValueError(value)
            return value == "True"
        return type(default)(value)
    except ValueError:
        raise ConversionError(
            f"{source}: option {name}={value!r} is not a {type(default).__name__}"
        ) from None


def _options(defaults: Mapping[str, Any], folder: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream defaults, then ``train_opt.txt`` of ``folder``, then ``given`` (checked names)."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConversionError(
            f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}"
        )
    options = dict(defaults)
    if (folder / "train_opt.txt").is_file():
        source = str(folder / "train_opt.txt")
        for name, value in read_train_options(folder / "train_opt.txt").items():
            if name in defaults and name not in ("epoch", "discriminators", "model"):
                options[name] = _typed(name, value, defaults[name], source)
    for name, value in given.items():
        options[name] = _typed(name, value, defaults[name], "options")
    if not isinstance(options["model"], Mapping):
        raise ConversionError(
            f"model must be a mapping of model arguments, got {options['model']!r}"
        )
    if options["norm"] not in _NORMS:
        raise ConversionError(f"norm must be one of {', '.join(_NORMS)}, got {options['norm']!r}")
    if options["gan_mode"] not in UPSTREAM_GAN_MODES:
        raise ConversionError(
            f"gan_mode must be one of {', '.join(UPSTREAM_GAN_MODES)}, got {options['gan_mode']!r}"
        )
    if options["direction"] not in ("AtoB", "BtoA"):
        raise ConversionError(f"direction must be AtoB or BtoA, got {options['direction']!r}")
    return options


# --------------------------------------------------------------------------------------------------
# net configurations and key maps
# --------------------------------------------------------------------------------------------------
def _parse_netg(net_g: str) -> tuple[str, int]:
    """``("resnet", n_blocks)`` or ``("unet", num_downs)`` of an upstream ``netG`` name.

    Upstream defines resnet_9blocks, resnet_6blocks, unet_128 and unet_256; forks' ``resnet_<n>blocks``
    and ``unet_<2^k>`` (k >= 5, upstream's smallest UNet) follow the same pattern.
    """
    match = re.fullmatch(r"resnet_(\d+)blocks", net_g)
    if match:
        return "resnet", int(match.group(1))
    match = re.fullmatch(r"unet_(\d+)", net_g)
    if match:
        size = int(match.group(1))
        num_downs = round(math.log2(size)) if size > 0 else 0
        if 2**num_downs == size and num_downs >= 5:
            return "unet", num_downs
    raise ConversionError(
        f"unknown netG {net_g!r}; expected resnet_<n>blocks (resnet_9blocks, resnet_6blocks) or "
        "unet_<size> with a power-of-two size >= 32 (unet_256, unet_128)"
    )


def generator_config(
    net_g: str, input_nc: int, output_nc: int, ngf: int, norm: str, use_dropout: bool
) -> dict[str, Any]:
    """The medgen net config (``_target_`` + kwargs) of an upstream generator.

    Upstream's convolutions have a bias only before instance norm (``conv_bias``).
    """
    kind, depth = _parse_netg(net_g)
    config: dict[str, Any] = {
        "in_channels": int(input_nc),
        "out_channels": int(output_nc),
        "ngf": int(ngf),
        "norm": norm,
        "use_dropout": bool(use_dropout),
        "conv_bias": norm == "instance",
    }
    if kind == "resnet":
        return {"_target_": "medgen.nets.ResnetGenerator", "n_blocks": depth, **config}
    return {"_target_": "medgen.nets.UnetGenerator", "num_downs": depth, **config}


def discriminator_config(net_d: str, ndf: int, n_layers_d: int, norm: str) -> dict[str, Any]:
    """The medgen net config of an upstream discriminator (``basic``, ``n_layers``, ``pixel``)."""
    common = {"ndf": int(ndf), "norm": norm, "conv_bias": norm == "instance"}
    if net_d == "basic":
        return {"_target_": "medgen.nets.NLayerDiscriminator", "n_layers": 3, **common}
    if net_d == "n_layers":
        return {
            "_target_": "medgen.nets.NLayerDiscriminator",
            "n_layers": int(n_layers_d),
            **common,
        }
    if net_d == "pixel":
        return {"_target_": "medgen.nets.PixelDiscriminator", **common}
    raise ConversionError(f"unknown netD {net_d!r}; expected basic, n_layers or pixel")


def _resnet_modules(n_blocks: int, use_dropout: bool) -> dict[str, str]:
    """medgen module -> upstream module of ``ResnetGenerator``.

    Upstream: ``model = [pad, conv, norm, relu, (conv, norm, relu) x 2, blocks..., (convT, norm,
    relu) x 2, pad, conv, tanh]``, each block ``conv_block = [pad, conv, norm, relu, (dropout),
    pad, conv, norm]``; medgen has no padding layers (the convolutions pad) and a separate head.
    """
    d = int(use_dropout)
    pairs = {"body.0": "model.1", "body.1": "model.2"}
    for k in range(2):
        pairs[f"body.{3 + 3 * k}"] = f"model.{4 + 3 * k}"
        pairs[f"body.{4 + 3 * k}"] = f"model.{5 + 3 * k}"
    for j in range(n_blocks):
        ours, theirs = f"body.{9 + j}.block", f"model.{10 + j}.conv_block"
        for a, b in ((0, 1), (1, 2), (3 + d, 5 + d), (4 + d, 6 + d)):
            pairs[f"{ours}.{a}"] = f"{theirs}.{b}"
    for k in range(2):
        pairs[f"body.{9 + n_blocks + 3 * k}"] = f"model.{10 + n_blocks + 3 * k}"
        pairs[f"body.{10 + n_blocks + 3 * k}"] = f"model.{11 + n_blocks + 3 * k}"
    pairs["head"] = f"model.{17 + n_blocks}"
    return pairs


def _unet_modules(num_downs: int) -> dict[str, str]:
    """medgen module -> upstream module of ``UnetGenerator`` (nested skip blocks).

    Upstream levels are ``[downconv, sub, uprelu, upconv, tanh]`` (outermost), ``[downrelu,
    downconv, downnorm, sub, uprelu, upconv, upnorm, (dropout)]`` and ``[downrelu, downconv,
    uprelu, upconv, upnorm]`` (innermost); medgen applies the down LeakyReLU outside the
    Sequential, so the inner levels' indices are shifted by one.
    """
    ours = theirs = "model.model"
    pairs = {f"{ours}.0": f"{theirs}.0", f"{ours}.3": f"{theirs}.3"}
    ours, theirs = f"{ours}.1.model", f"{theirs}.1.model"
    for _ in range(num_downs - 2):
        for a, b in ((0, 1), (1, 2), (4, 5), (5, 6)):
            pairs[f"{ours}.{a}"] = f"{theirs}.{b}"
        ours, theirs = f"{ours}.2.model", f"{theirs}.3.model"
    for a, b in ((0, 1), (2, 3), (3, 4)):
        pairs[f"{ours}.{a}"] = f"{theirs}.{b}"
    return pairs


def _key_map(net: nn.Module, modules: Mapping[str, str]) -> dict[str, str]:
    key_map = {}
    for key in net.state_dict():
        module, _, leaf = key.rpartition(".")
        key_map[key] = f"{modules.get(module, module)}.{leaf}"
    return key_map


def generator_key_map(net: nn.Module, config: Mapping[str, Any]) -> dict[str, str]:
    """medgen key -> upstream key for a generator built from :func:`generator_config`."""
    if config["_target_"].endswith("ResnetGenerator"):
        modules = _resnet_modules(int(config["n_blocks"]), bool(config["use_dropout"]))
    else:
        modules = _unet_modules(int(config["num_downs"]))
    return _key_map(net, modules)


def discriminator_key_map(net: nn.Module, config: Mapping[str, Any]) -> dict[str, str]:
    """medgen key -> upstream key for a discriminator built from :func:`discriminator_config`.

    ``NLayerDiscriminator`` keys are the same (``model.<i>``); ``PixelDiscriminator``'s Sequential
    is ``net`` upstream.
    """
    if config["_target_"].endswith("PixelDiscriminator"):
        return {key: "net" + key[len("model") :] for key in net.state_dict()}
    return {key: key for key in net.state_dict()}


# --------------------------------------------------------------------------------------------------
# reading upstream files
# --------------------------------------------------------------------------------------------------
_STAT_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def upstream_state(path: str | os.PathLike, norm: str) -> dict[str, torch.Tensor]:
    """An upstream ``.pth`` state dict, cleaned as upstream's loader cleans it.

    Strips ``module.`` (DataParallel); with ``norm="instance"`` drops the running statistics old
    PyTorch versions saved for instance norm (upstream's ``__patch_instance_norm_state_dict``);
    with ``norm="batch"`` adds ``num_batches_tracked = 0`` where files of PyTorch < 0.4.1 lack it
    (as PyTorch's own loader does).
    """
    state = load_foreign_state(path, prefixes=("module.",))
    if norm == "instance":
        return {k: v for k, v in state.items() if k.rpartition(".")[2] not in _STAT_LEAVES}
    if norm == "batch":
        for key in [k for k in state if k.endswith(".running_var")]:
            tracked = key[: -len("running_var")] + "num_batches_tracked"
            state.setdefault(tracked, torch.zeros((), dtype=torch.long))
    return state


def _load_into(
    net: nn.Module, path: Path, config: Mapping[str, Any], key_map: Mapping[str, str]
) -> None:
    state = upstream_state(path, str(config["norm"]))
    net.load_state_dict(map_state(state, net, key_map, path), strict=True)


def _use_dropout(path: Path, net_g: str, options: Mapping[str, Any], given: Mapping) -> bool:
    """Dropout of the generator: ``not no_dropout``, except that a ResNet generator's file shows
    it (the dropout layer shifts the second convolution of each block from index 5 to 6), which
    then wins over ``train_opt.txt`` and the defaults (not over an explicit ``no_dropout``)."""
    use_dropout = not options["no_dropout"]
    if "no_dropout" in given or not net_g.startswith("resnet"):
        return use_dropout
    keys = set(load_foreign_state(path, prefixes=("module.",)))
    if "model.10.conv_block.5.weight" in keys:
        return False
    if "model.10.conv_block.6.weight" in keys:
        return True
    return use_dropout


def _folder_and_file(source: Path, suffix: str, epoch: str) -> tuple[Path, Path]:
    """The checkpoint folder and the generator file of ``source`` (a folder or the file)."""
    if source.is_dir():
        path = source / f"{epoch}_net_{suffix}.pth"
        if not path.is_file():
            found = sorted(p.name for p in source.glob("*_net_*.pth"))
            raise ConversionError(
                f"'{source}' has no '{path.name}' (upstream checkpoint files there: "
                f"{', '.join(found) or 'none'}); pass epoch=... or the file itself"
            )
        return source, path
    if not source.is_file():
        raise ConversionError(f"upstream weights '{source}' do not exist")
    return source.parent, source


def _model_args(options: Mapping[str, Any]) -> dict[str, Any]:
    """The model arguments both families take from upstream's options, then ``model``'s.

    Channels, GAN loss, initialisation, Adam(lr, (beta1, 0.999)) for both sides, and the batch
    keys: with ``direction=BtoA`` upstream's A images are the data's ``b``.
    """
    b_to_a = options["direction"] == "BtoA"
    return {
        "in_channels": options["input_nc"],
        "out_channels": options["output_nc"],
        "adv_loss": UPSTREAM_GAN_MODES[options["gan_mode"]],
        "init_type": options["init_type"],
        "init_gain": options["init_gain"],
        "optimizer_g": {
            "_target_": "torch.optim.Adam",
            "lr": float(options["lr"]),
            "betas": [float(options["beta1"]), 0.999],
        },
        "source_key": "b" if b_to_a else "a",
        "target_key": "a" if b_to_a else "b",
        **dict(options["model"]),
    }


def _write(model: nn.Module, destination: Path, modules: tuple[str, ...]) -> Path:
    return save_pretrained(
        model, destination, model.export_init_args(), modules, getattr(model, "data_info", {})
    )


# --------------------------------------------------------------------------------------------------
# converters
# --------------------------------------------------------------------------------------------------
def convert_pix2pix(
    source: str | os.PathLike, destination: str | os.PathLike, **net_options: Any
) -> Path:
    """Convert an upstream pix2pix checkpoint into a :class:`medgen.models.Pix2Pix` export.

    Args:
        source: The checkpoint folder (``<epoch>_net_G.pth``, optional ``<epoch>_net_D.pth`` and
            ``train_opt.txt``) or the generator's ``.pth`` file (the ``net_D`` file and
            ``train_opt.txt`` beside it are used when there).
        destination: The export folder to write (must not hold an export yet).
        **net_options: Upstream option names overriding ``train_opt.txt`` and pix2pix's
            defaults: ``netG`` (``unet_256``), ``netD`` (``basic``), ``norm`` (``batch``), ``ngf``,
            ``ndf``, ``n_layers_D``, ``input_nc``, ``output_nc`` (3), ``no_dropout`` (False; a
            ResNet generator's file shows whether it had dropout, which then wins),
            ``gan_mode`` (``vanilla``), ``lambda_L1`` (100), ``lr``, ``beta1``, ``init_type``,
            ``init_gain``, ``direction`` (``AtoB``; ``BtoA`` translates the data's ``b`` to
            ``a``), ``epoch`` (``latest``), ``discriminators`` (True: include ``net_D`` when the
            folder has it), ``model`` (further :class:`~medgen.models.Pix2Pix` arguments, e.g.
            ``{"value_range": [0, 65535]}``; ``medgen-convert --model key=value``).

    Returns:
        The export folder; ``medgen.load`` gives a Pix2Pix whose generator (and discriminator)
        hold the upstream weights.

    Raises:
        ConversionError: for an unknown option, a missing file, or weights that do not fit the
            configuration (naming the first mismatching key and both shapes).
    """
    from medgen.models import Pix2Pix

    destination = check_destination(destination)
    given = dict(net_options)
    folder, g_path = _folder_and_file(Path(source), "G", str(given.get("epoch", "latest")))
    opt = _options(_PIX2PIX, folder, given)
    norm = opt["norm"]
    use_dropout = _use_dropout(g_path, opt["netG"], opt, given)
    g_config = generator_config(
        opt["netG"], opt["input_nc"], opt["output_nc"], opt["ngf"], norm, use_dropout
    )
    d_config = discriminator_config(opt["netD"], opt["ndf"], opt["n_layers_D"], norm)
    model = Pix2Pix(
        **{
            "generator": g_config,
            "discriminator": d_config,
            "lambda_l1": opt["lambda_L1"],
            **_model_args(opt),
        }
    )
    _load_into(model.generator, g_path, g_config, generator_key_map(model.generator, g_config))
    modules: tuple[str, ...] = ("generator",)
    d_path = g_path.with_name(g_path.name.replace("_net_G.pth", "_net_D.pth"))
    if opt["discriminators"] and d_path.is_file():
        d_map = discriminator_key_map(model.discriminator, d_config)
        _load_into(model.discriminator, d_path, d_config, d_map)
        modules += ("discriminator",)
    return _write(model, destination, modules)


def convert_cyclegan(
    source: str | os.PathLike, destination: str | os.PathLike, **net_options: Any
) -> Path:
    """Convert an upstream CycleGAN checkpoint folder into a :class:`medgen.models.CycleGAN` export.

    Upstream's ``G_A`` (A -> B) becomes ``generator_ab``, ``G_B`` ``generator_ba``; its ``D_A``
    judges domain B images (``fake_B = G_A(A)``), so it becomes medgen's ``discriminator_b``, and
    ``D_B`` ``discriminator_a``.

    Args:
        source: The checkpoint folder (``<epoch>_net_G_A.pth`` and ``..._G_B.pth``; ``D_A`` /
            ``D_B`` and ``train_opt.txt`` when there) or the ``G_A`` file (the others are then
            the files beside it with ``G_B``, ``D_A``, ``D_B`` in the name).
        destination: The export folder to write (must not hold an export yet).
        **net_options: Upstream option names overriding ``train_opt.txt`` and CycleGAN's
            defaults: ``netG`` (``resnet_9blocks``), ``netD`` (``basic``), ``norm``
            (``instance``), ``ngf``, ``ndf``, ``n_layers_D``, ``input_nc``, ``output_nc`` (3),
            ``no_dropout`` (True), ``gan_mode`` (``lsgan``), ``lambda_A``, ``lambda_B`` (10),
            ``lambda_identity`` (0.5; set to 0 when the domains' channels differ), ``pool_size``
            (50), ``lr``, ``beta1``, ``init_type``, ``init_gain``, ``direction``, ``epoch``,
            ``discriminators``, ``model`` (further :class:`~medgen.models.CycleGAN` arguments).

    Returns:
        The export folder.

    Raises:
        ConversionError: as :func:`convert_pix2pix`.
    """
    from medgen.models import CycleGAN

    destination = check_destination(destination)
    given = dict(net_options)
    folder, ga_path = _folder_and_file(Path(source), "G_A", str(given.get("epoch", "latest")))
    opt = _options(_CYCLEGAN, folder, given)
    norm = opt["norm"]
    paths = {
        name: ga_path.with_name(ga_path.name.replace("_net_G_A.pth", f"_net_{name}.pth"))
        for name in ("G_B", "D_A", "D_B")
    }
    if not paths["G_B"].is_file() or paths["G_B"] == ga_path:
        raise ConversionError(f"no G_B next to '{ga_path}' (expected '{paths['G_B']}')")
    use_dropout = _use_dropout(ga_path, opt["netG"], opt, given)
    g_ab = generator_config(
        opt["netG"], opt["input_nc"], opt["output_nc"], opt["ngf"], norm, use_dropout
    )
    g_ba = generator_config(
        opt["netG"], opt["output_nc"], opt["input_nc"], opt["ngf"], norm, use_dropout
    )
    d_config = discriminator_config(opt["netD"], opt["ndf"], opt["n_layers_D"], norm)
    identity = opt["lambda_identity"] if opt["input_nc"] == opt["output_nc"] else 0.0
    model = CycleGAN(
        **{
            "generator": g_ab,
            "generator_ba": g_ba,
            "discriminator": d_config,
            "lambda_a": opt["lambda_A"],
            "lambda_b": opt["lambda_B"],
            "lambda_identity": identity,
            "pool_size": opt["pool_size"],
            **_model_args(opt),
        }
    )
    parts = [
        ("generator_ab", ga_path, g_ab, generator_key_map),
        ("generator_ba", paths["G_B"], g_ba, generator_key_map),
    ]
    if opt["discriminators"] and paths["D_A"].is_file() and paths["D_B"].is_file():
        parts += [
            ("discriminator_b", paths["D_A"], d_config, discriminator_key_map),
            ("discriminator_a", paths["D_B"], d_config, discriminator_key_map),
        ]
    for name, path, config, key_map in parts:
        net = model.get_submodule(name)
        _load_into(net, path, config, key_map(net, config))
    modules = tuple(sorted((name for name, *_ in parts), key=_EXPORT_ORDER.index))
    return _write(model, destination, modules)
