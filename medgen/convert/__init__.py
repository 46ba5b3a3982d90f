"""Convert foreign weights (MONAI generative nets, upstream pix2pix/CycleGAN) into medgen exports.

A converter reads a foreign state dict (``.pt``/``.pth``/``.ckpt`` through
:func:`medgen.pretrained.safe_torch_load`, or ``.safetensors``; nothing is ever unpickled beyond
tensors and plain containers), maps it key by key onto the medgen net built at the matching
configuration, and writes a standard medgen export folder (``config.json`` +
``model.safetensors``, :func:`medgen.pretrained.save_pretrained`) holding a medgen model family,
so that ``medgen.load(DST)`` and ``model.init_from=DST`` read it.

Converter signature (every entry of :data:`CONVERTERS` resolves to such a function)::

    def convert_xxx(source: str | os.PathLike, destination: str | os.PathLike,
                    **net_options: Any) -> pathlib.Path

- ``source``: the foreign weights file;
- ``destination``: the export folder to write (refused when it already holds an export, so
  nothing is overwritten);
- ``net_options``: the foreign net's constructor keyword arguments (e.g. MONAI's
  ``spatial_dims``, ``channels``, ``attention_levels``...), plain JSON values;
- returns the export folder. A source that does not fit the configuration raises
  :class:`ConversionError` naming the first mismatching key and both shapes.

A converter module registers itself by one line in :data:`CONVERTERS` (name ->
``"module:function"``); names are looked up exactly, never imported from user input.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from medgen.pretrained import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, safe_torch_load

__all__ = [
    "CONVERTERS",
    "ConversionError",
    "Converter",
    "check_destination",
    "convert",
    "get_converter",
    "load_foreign_state",
    "main",
    "map_state",
    "parse_options",
]


class ConversionError(CheckpointError):
    """Foreign weights do not fit the configuration asked for, or cannot be read."""


class Converter(Protocol):
    """The signature every registered converter has (see the module docstring)."""

    def __call__(
        self, source: str | os.PathLike, destination: str | os.PathLike, **net_options: Any
    ) -> Path: ...


#: converter name -> "module:function"; resolved by exact lookup only.
CONVERTERS: dict[str, str] = {
    "monai-diffusion-unet": "medgen.convert.monai:convert_diffusion_unet",
    "monai-autoencoderkl": "medgen.convert.monai:convert_autoencoderkl",
    "junyanz-pix2pix": "medgen.convert.junyanz:convert_pix2pix",
    "junyanz-cyclegan": "medgen.convert.junyanz:convert_cyclegan",
}


def get_converter(name: str) -> Converter:
    """The converter function registered under ``name``.

    Raises:
        ConversionError: when ``name`` is not in :data:`CONVERTERS` (the known names listed).
    """
    if name not in CONVERTERS:
        raise ConversionError(
            f"unknown converter {name!r}; known converters: {', '.join(sorted(CONVERTERS))}"
        )
    module_name, _, func_name = CONVERTERS[name].partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def convert(
    name: str, source: str | os.PathLike, destination: str | os.PathLike, **net_options: Any
) -> Path:
    """Convert ``source`` with the converter ``name`` into the export folder ``destination``.

    Example:
        ``medgen.convert.convert("monai-diffusion-unet", "unet.pt", "out/unet",
        spatial_dims=2, in_channels=1, out_channels=1)``
    """
    return get_converter(name)(source, destination, **net_options)


def load_foreign_state(
    source: str | os.PathLike, prefixes: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Read a foreign state dict safely (safetensors, or ``torch.load(weights_only=True)``).

    A Lightning/trainer wrapper (``{"state_dict": ...}``, ``{"model": ...}``...) is unwrapped;
    ``prefixes`` (e.g. ``("module.",)`` from DataParallel) are stripped from every key that has
    them.

    Raises:
        ConversionError: naming ``source`` when it is missing, corrupt or holds no tensors.
    """
    path = Path(source)
    if not path.is_file():
        raise ConversionError(f"foreign weights '{path}' do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as err:
            raise ConversionError(f"'{path}' is corrupt or not a safetensors file: {err}") from err
    else:
        try:
            state = safe_torch_load(path)
        except CheckpointError as err:
            raise ConversionError(str(err)) from err
    for wrapper in ("state_dict", "model", "model_state_dict", "net", "network"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping) or not state:
        raise ConversionError(f"'{path}' does not hold a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"'{path}': entry {key!r} is not a tensor ({type(value)})")
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[str(key)] = value
    return out


#: where a target tensor comes from: one foreign key, or several concatenated along dim 0
Source = str | tuple[str, ...]


def _fits(value: torch.Tensor, shape: tuple[int, ...]) -> bool:
    # Equal, or a linear weight (O, I) for a 1x1 convolution (O, I, 1, ...).
    return tuple(value.shape) == shape or (
        tuple(value.shape) == shape[: value.dim()] and all(s == 1 for s in shape[value.dim() :])
    )


def map_state(
    source_state: Mapping[str, torch.Tensor],
    target: torch.nn.Module,
    key_map: Mapping[str, Source],
    source: str | os.PathLike,
) -> dict[str, torch.Tensor]:
    """Gather the state dict of ``target`` from ``source_state`` through ``key_map``.

    Args:
        source_state: The foreign state dict.
        target: The medgen net the weights are for.
        key_map: For every key of ``target.state_dict()``, the foreign key holding its tensor
            (keys absent from the map are looked up under the same name), or a tuple of foreign
            keys concatenated along dim 0 (e.g. separate q, k, v projections into one ``qkv``).
            A linear weight ``(O, I)`` fills a 1x1 convolution weight ``(O, I, 1, ...)``.
        source: The foreign file (named in errors).

    Returns:
        A state dict for ``target`` (loadable with ``strict=True``).

    Raises:
        ConversionError: naming the first foreign key that is missing, unused or whose shape
            differs from the configured net's (both shapes given).
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, ref in target.state_dict().items():
        spec = key_map.get(key, key)
        keys = (spec,) if isinstance(spec, str) else tuple(spec)
        for src_key in keys:
            if src_key not in source_state:
                raise ConversionError(
                    f"'{source}' does not match the configuration: it has no {src_key!r} "
                    f"(needed for medgen's {key!r} of shape {tuple(ref.shape)})"
                )
        parts = [source_state[k] for k in keys]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if not _fits(value, tuple(ref.shape)):
            shapes = " + ".join(str(tuple(p.shape)) for p in parts)
            raise ConversionError(
                f"'{source}' does not match the configuration: {' + '.join(keys)!r} has shape "
                f"{shapes} in the file but the configured net needs {tuple(ref.shape)} "
                f"(medgen's {key!r})"
            )
        out[key] = value.detach().reshape(ref.shape).to(ref.dtype).clone()
        used.update(keys)
    unused = [k for k in source_state if k not in used]
    if unused:
        raise ConversionError(
            f"'{source}' does not match the configuration: {len(unused)} of its tensors have no "
            f"place in the configured net, the first {unused[0]!r} with shape "
            f"{tuple(source_state[unused[0]].shape)}"
        )
    return out


def check_destination(destination: str | os.PathLike) -> Path:
    """Refuse a destination that already holds an export (nothing is overwritten)."""
    path = Path(destination)
    if path.exists() and not path.is_dir():
        raise ConversionError(f"destination '{path}' exists and is not a folder")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if (path / name).exists():
            raise ConversionError(
                f"destination '{path}' already holds an export ('{name}'); "
                "choose a new folder (nothing was written)"
            )
    return path


def parse_options(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["channels=[8, 16]", "with_conditioning=true"]`` -> a dict of YAML-parsed values.

    Raises:
        ConversionError: naming an item that is not ``key=value``.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConversionError(f"net option {item!r} is not key=value (e.g. channels=[8,16])")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConversionError(f"net option {item!r}: value is not valid YAML: {err}") from err
    return out


def main(argv: list[str] | None = None) -> int:
    """``medgen-convert SRC DST --from NAME [key=value ...]``: see :func:`convert`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="medgen-convert",
        description="Convert foreign weights (MONAI, pix2pix/CycleGAN) into a medgen export "
        "folder (config.json + model.safetensors) that medgen.load and model.init_from read.",
    )
    parser.add_argument("source", help="foreign weights (.pt, .pth, .ckpt or .safetensors)")
    parser.add_argument("destination", help="new export folder")
    parser.add_argument("--from", dest="name", required=True, choices=sorted(CONVERTERS))
    parser.add_argument(
        "options",
        nargs="*",
        metavar="key=value",
        help="the foreign net's constructor arguments, e.g. spatial_dims=2 channels=[32,64]",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="key=value",
        help="an argument of the medgen model family (repeatable), e.g. --model prediction=v",
    )
    args = parser.parse_intermixed_args(argv)
    try:
        options = parse_options(args.options)
        model = parse_options(args.model)
        if model:
            options["model"] = model
        folder = convert(args.name, args.source, args.destination, **options)
    except ConversionError as err:
        parser.exit(2, f"medgen-convert: error: {err}\n")
    print(f"wrote {folder}")
    return 0
