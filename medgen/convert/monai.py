"""Converters for MONAI's generative nets: ``DiffusionModelUNet`` and ``AutoencoderKL``.

MONAI (>= 1.4, the former MONAI Generative Models; Pinaya et al., 2023, "Generative AI for
Medical Imaging: extending the MONAI Framework") state dicts are mapped key by key onto
:class:`medgen.nets.DiffusionUNet` and :class:`medgen.nets.AutoencoderKLNet`, which take MONAI's
constructor arguments and build the same layout with the same parameter count; converted weights
give MONAI's outputs to float rounding. Both the separate (``to_q``/``to_k``/``to_v``) and the
combined (``qkv``, ``use_combined_linear=True``) attention layouts are read.

The result is a standard medgen export folder: a :class:`medgen.models.Diffusion` wrapping the
UNet, or a :class:`medgen.models.AutoencoderKL` wrapping the autoencoder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgen.convert import (
    ConversionError,
    Source,
    check_destination,
    load_foreign_state,
    map_state,
)
from medgen.nets.autoencoder import AutoencoderKLNet, Decoder, Encoder
from medgen.nets.diffusion_unet import DiffusionUNet
from medgen.nn.attention import SelfAttention
from medgen.nn.blocks import ResBlock
from medgen.nn.cross_attention import SpatialTransformer
from medgen.nn.sampling import Upsample

__all__ = [
    "convert_autoencoderkl",
    "convert_diffusion_unet",
    "diffusion_unet_key_map",
    "autoencoderkl_key_map",
]

# medgen ResBlock / attention leaf names -> MONAI's
_RES = (
    ("norm1.", "norm1."),
    ("conv1.", "conv1.conv."),
    ("emb_proj.1.", "time_emb_proj."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2.conv."),
    ("skip.", "skip_connection.conv."),
)
_AE_RES = _RES[:2] + _RES[3:5] + (("skip.", "nin_shortcut.conv."),)
_TRANSFORMER = (
    ("proj_in.", "proj_in.conv."),
    ("proj_out.", "proj_out.conv."),
    ("blocks.", "transformer_blocks."),
    (".ff_in.", ".ff.linear1."),
    (".ff_out.", ".ff.linear2."),
)


def _rename(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    """Rename a medgen key tail: table entries starting with ``.`` anywhere, others as prefix."""
    for ours, theirs in table:
        if ours.startswith("."):
            rest = rest.replace(ours, theirs, 1)
        elif rest.startswith(ours):
            rest = theirs + rest[len(ours) :]
    return rest


def _attention_source(module: nn.Module, rest: str, prefix: str) -> Source:
    """MONAI key(s) of ``rest`` inside an attention site whose MONAI prefix is ``prefix``."""
    if isinstance(module, SpatialTransformer):
        return prefix + _rename(rest, _TRANSFORMER)
    if isinstance(module, SelfAttention):
        leaf = rest.rpartition(".")[2]
        if rest.startswith("qkv."):
            return tuple(f"{prefix}attn.to_{x}.{leaf}" for x in "qkv")
        if rest.startswith("proj_out."):
            return f"{prefix}attn.out_proj.{leaf}"
        return prefix + rest
    raise ConversionError(f"no MONAI layout for a {type(module).__name__}")


def diffusion_unet_key_map(net: DiffusionUNet) -> dict[str, Source]:
    """For every key of ``net.state_dict()``, the ``DiffusionModelUNet`` key(s) holding it."""
    out: dict[str, Source] = {}
    patterns: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"(down|up)_levels\.(\d+)\.(\d+)\.(res|attn)\.(.*)", _level_prefix),
        (
            r"downsamples\.(\d+)\.(resample\.op|res)\.(.*)",
            lambda m: f"down_blocks.{m[1]}.downsampler.",
        ),
        (r"upsamples\.(\d+)\.(resample\.conv|res)\.(.*)", lambda m: f"up_blocks.{m[1]}.upsampler."),
    ]
    for key in net.state_dict():
        if key.startswith(("conv_in.",)):
            out[key] = "conv_in.conv." + key.split(".", 1)[1]
        elif key.startswith("norm_out."):
            out[key] = "out.0." + key.split(".", 1)[1]
        elif key.startswith("conv_out."):
            out[key] = "out.2.conv." + key.split(".", 1)[1]
        elif key.startswith("mid_block.res."):
            out[key] = "middle_block.resnet_1." + _rename(key[len("mid_block.res.") :], _RES)
        elif key.startswith("mid_res."):
            out[key] = "middle_block.resnet_2." + _rename(key[len("mid_res.") :], _RES)
        elif key.startswith("mid_block.attn."):
            rest = key[len("mid_block.attn.") :]
            out[key] = _attention_source(net.mid_block.attn, rest, "middle_block.attention.")
        else:
            for pattern, prefix in patterns:
                m = re.fullmatch(pattern, key)
                if m is None:
                    continue
                if pattern.startswith("(down|up)"):
                    level = (net.down_levels if m[1] == "down" else net.up_levels)[int(m[2])]
                    site = level[int(m[3])]
                    if m[4] == "res":
                        out[key] = prefix(m) + _rename(m[5], _RES)
                    else:
                        out[key] = _attention_source(site.attn, m[5], prefix(m))
                elif m[2] == "resample.op":
                    out[key] = prefix(m) + "op.conv." + m[3]
                elif m[2] == "resample.conv":
                    out[key] = prefix(m) + "postconv.conv." + m[3]
                else:
                    out[key] = prefix(m) + _rename(m[3], _RES)
                break
    return out


def _level_prefix(m: re.Match[str]) -> str:
    kind = "resnets" if m[4] == "res" else "attentions"
    return f"{m[1]}_blocks.{m[2]}.{kind}.{m[3]}."


def _split_combined(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI's ``use_combined_linear`` layout (one ``qkv``) as separate ``to_q/to_k/to_v``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        if stem.endswith(".qkv") and leaf in ("weight", "bias") and value.shape[0] % 3 == 0:
            base = stem[: -len("qkv")]
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[f"{base}{name}.{leaf}"] = part
        else:
            out[key] = value
    return out


def _build(cls: type, options: Mapping[str, Any], what: str) -> nn.Module:
    try:
        return cls(**dict(options))
    except (TypeError, ValueError) as err:
        raise ConversionError(f"the {what} options {dict(options)} do not build: {err}") from err


def _convert(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    net: nn.Module,
    key_map: Mapping[str, Source],
    make_model: Callable[[], nn.Module],
) -> Path:
    dst = check_destination(destination)
    state = _split_combined(load_foreign_state(source, prefixes=("module.", "_orig_mod.")))
    converted = map_state(state, net, key_map, source)
    model = make_model()
    model.net.load_state_dict(converted, strict=True)
    model.eval()
    return model.save_pretrained(dst)


def convert_diffusion_unet(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    model: Mapping[str, Any] | None = None,
    **net_options: Any,
) -> Path:
    """Convert a MONAI ``DiffusionModelUNet`` state dict into a :class:`medgen.models.Diffusion`.

    Args:
        source: The ``.pt``/``.pth``/``.safetensors`` state dict (a ``{"state_dict": ...}``
            wrapper and a ``module.`` prefix are accepted).
        destination: New export folder.
        model: Extra :class:`~medgen.models.Diffusion` arguments (e.g. ``schedule``,
            ``prediction``, ``latent_channels``, ``autoencoder``).
        **net_options: The ``DiffusionModelUNet`` arguments the weights were trained with
            (``spatial_dims``, ``in_channels``, ``out_channels``, ``channels``, ...).

    The image channels are ``out_channels``; extra input channels (``in_channels >
    out_channels``) become an image condition (``condition_key="condition"``), and
    ``num_class_embeds = K`` becomes ``K - 1`` classes plus the null class of classifier-free
    guidance (``class_key="class"``), which is how :class:`~medgen.models.Diffusion` uses the
    net's class embedding. A net built ``with_conditioning`` keeps its cross-attention; call
    ``model.net(x, t, context=...)`` with your context tokens.

    Returns:
        The export folder; ``medgen.load(destination)`` reads it.
    """
    net = _build(DiffusionUNet, net_options, "DiffusionModelUNet")
    init: dict[str, Any] = {"spatial_dims": net.spatial_dims, "channels": net.out_channels}
    extra = net.in_channels - net.out_channels
    if extra < 0:
        raise ConversionError(
            f"in_channels={net.in_channels} < out_channels={net.out_channels}: not a denoiser "
            "that medgen.models.Diffusion can wrap"
        )
    if extra:
        init.update(condition_key="condition", condition_channels=extra)
    if net.num_class_embeds is not None:
        if net.num_class_embeds < 2:
            raise ConversionError("num_class_embeds must be >= 2 (classes plus the null class)")
        init.update(class_key="class", num_classes=net.num_class_embeds - 1)
    net_config = {
        k: v
        for k, v in net_options.items()
        if k not in ("spatial_dims", "in_channels", "out_channels", "num_class_embeds")
    }
    init.update(dict(model or {}))
    init["net"] = {"_target_": "medgen.nets.DiffusionUNet", **_plain(net_config)}

    def make_model() -> nn.Module:
        from medgen.models import Diffusion

        return Diffusion(**init)

    return _convert(source, destination, net, diffusion_unet_key_map(net), make_model)


def _plain(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _coder_blocks(coder: Encoder | Decoder) -> list[tuple[str, nn.Module]]:
    """The (name, module) of an encoder or decoder in the order of MONAI's ``blocks`` list."""
    order: list[tuple[str, nn.Module]] = [("conv_in", coder.conv_in)]
    mid = [(f"mid.{j}", m) for j, m in enumerate(coder.mid)]
    resamples = coder.downsamples if isinstance(coder, Encoder) else coder.upsamples
    name = "downsamples" if isinstance(coder, Encoder) else "upsamples"
    if isinstance(coder, Decoder):
        order += mid
    for i, level in enumerate(coder.levels):
        order += [(f"levels.{i}.{j}", m) for j, m in enumerate(level)]
        if i < len(resamples):
            order.append((f"{name}.{i}", resamples[i]))
    if isinstance(coder, Encoder):
        order += mid
    return order + [("norm_out", coder.norm_out), ("conv_out", coder.conv_out)]


def autoencoderkl_key_map(net: AutoencoderKLNet) -> dict[str, Source]:
    """For every key of ``net.state_dict()``, the MONAI ``AutoencoderKL`` key(s) holding it."""
    out: dict[str, Source] = {}
    for part in ("encoder", "decoder"):
        coder = getattr(net, part)
        for index, (name, module) in enumerate(_coder_blocks(coder)):
            prefix = f"{part}.blocks.{index}."
            for leaf in module.state_dict():
                key = f"{part}.{name}.{leaf}"
                if isinstance(module, SelfAttention):
                    out[key] = _attention_source(module, leaf, prefix)
                elif isinstance(module, ResBlock):
                    out[key] = prefix + _rename(leaf, _AE_RES)
                elif isinstance(module, Upsample):  # nearest + conv
                    out[key] = prefix + "postconv.conv." + leaf.split(".", 1)[1]
                elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
                    out[key] = prefix + "conv." + leaf
                elif isinstance(module, nn.GroupNorm):
                    out[key] = prefix + leaf
                else:  # asymmetric down-sampling (conv.*) or transposed conv (deconv.*)
                    sub, rest = leaf.split(".", 1)
                    out[key] = prefix + ("conv.conv." if sub == "conv" else "deconv.") + rest
    for leaf in ("weight", "bias"):
        out[f"encoder.quant_conv.{leaf}"] = (
            f"quant_conv_mu.conv.{leaf}",
            f"quant_conv_log_sigma.conv.{leaf}",
        )
        out[f"decoder.post_quant_conv.{leaf}"] = f"post_quant_conv.conv.{leaf}"
    return out


def convert_autoencoderkl(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    model: Mapping[str, Any] | None = None,
    **net_options: Any,
) -> Path:
    """Convert a MONAI ``AutoencoderKL`` state dict into a :class:`medgen.models.AutoencoderKL`.

    Args:
        source: The ``.pt``/``.pth``/``.safetensors`` state dict.
        destination: New export folder.
        model: Extra :class:`~medgen.models.AutoencoderKL` arguments (e.g. ``value_range``).
        **net_options: The ``AutoencoderKL`` arguments the weights were trained with.

    Returns:
        The export folder; ``medgen.load(destination)`` reads it.
    """
    net = _build(AutoencoderKLNet, net_options, "AutoencoderKL")
    init: dict[str, Any] = {"spatial_dims": net.spatial_dims, **dict(model or {})}
    options = {k: v for k, v in net_options.items() if k != "spatial_dims"}
    init["net"] = {"_target_": "medgen.nets.AutoencoderKLNet", **_plain(options)}

    def make_model() -> nn.Module:
        from medgen.models import AutoencoderKL

        return AutoencoderKL(**init)

    return _convert(source, destination, net, autoencoderkl_key_map(net), make_model)
