"""Factories that pick convolution, pooling, normalisation and activation layers.

Every block in :mod:`medgen.nn` takes ``spatial_dims`` (2 or 3) first and builds its layers through
these helpers, so that one class serves 2D images and 3D volumes. Normalisation and activation
layers are given the way timm and MONAI users expect: by name (``"group"``), by name with keyword
arguments (``("group", {"num_groups": 8})``) or by a class / callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "ActSpec",
    "NormSpec",
    "avg_pool_nd",
    "check_spatial_dims",
    "conv_nd",
    "conv_transpose_nd",
    "get_act_layer",
    "get_norm_layer",
    "split_spec",
]

NormSpec = str | tuple | Callable[..., nn.Module] | None
"""A normalisation layer given by name, ``(name, kwargs)``, ``(callable, kwargs)`` or callable."""

ActSpec = str | tuple | Callable[..., nn.Module] | None
"""An activation layer given by name, ``(name, kwargs)``, ``(callable, kwargs)`` or callable."""


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3, else raise.

    Args:
        spatial_dims: Number of spatial dimensions.

    Returns:
        The validated ``spatial_dims``.

    Raises:
        ValueError: If ``spatial_dims`` is not 2 or 3.
    """
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    return int(spatial_dims)


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """Return the convolution class for ``spatial_dims``: ``nn.Conv2d`` or ``nn.Conv3d``."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[check_spatial_dims(spatial_dims)]


def conv_transpose_nd(spatial_dims: int) -> type[nn.Module]:
    """Return the transposed convolution class: ``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[check_spatial_dims(spatial_dims)]


def avg_pool_nd(spatial_dims: int) -> type[nn.Module]:
    """Return the average-pooling class: ``nn.AvgPool2d`` or ``nn.AvgPool3d``."""
    return {2: nn.AvgPool2d, 3: nn.AvgPool3d}[check_spatial_dims(spatial_dims)]


def split_spec(spec: Any, what: str) -> tuple[Any, dict[str, Any]]:
    """Split a layer spec into ``(name_or_callable, kwargs)``.

    Args:
        spec: A name, class or callable (returned with empty kwargs), or a pair
            ``(name_or_callable, kwargs_mapping)`` (the kwargs are copied into a new dict).
        what: What the spec describes (``"norm"``, ``"act"``), for the error message.

    Returns:
        ``(name_or_callable, kwargs)``.

    Raises:
        ValueError: A tuple or list that is not ``(name_or_class, kwargs_dict)``.
    """
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2 or not isinstance(spec[1], Mapping):
            raise ValueError(
                f"A {what} given as a tuple must be (name_or_class, kwargs_dict), got {spec!r}."
            )
        return spec[0], dict(spec[1])
    return spec, {}


_split_spec = split_spec  # the old private name


def _group_norm(channels: int, num_groups: int = 32, **kwargs: Any) -> nn.GroupNorm:
    # Clip the number of groups to a divisor of `channels` so that any width works.
    groups = math.gcd(int(num_groups), int(channels))
    return nn.GroupNorm(groups, channels, **kwargs)


def _layer_norm(channels: int, **kwargs: Any) -> nn.GroupNorm:
    # Layer norm over (C, *spatial) of channels-first tensors: GroupNorm with a single group.
    return nn.GroupNorm(1, channels, **kwargs)


def _instance_norm(spatial_dims: int, channels: int, **kwargs: Any) -> nn.Module:
    kwargs.setdefault("affine", True)
    cls = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims]
    return cls(channels, **kwargs)


def _batch_norm(spatial_dims: int, channels: int, **kwargs: Any) -> nn.Module:
    cls = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
    return cls(channels, **kwargs)


_NORM_NAMES = ("group", "instance", "batch", "layer", "none")


def get_norm_layer(
    norm: NormSpec, spatial_dims: int, channels: int, *, instance_affine: bool = True
) -> nn.Module:
    """Build a normalisation layer for channels-first tensors ``(B, C, *spatial)``.

    Args:
        norm: One of

            * a name: ``"group"`` (GroupNorm, 32 groups by default), ``"instance"`` (InstanceNorm,
              ``affine=True`` by default), ``"batch"``, ``"layer"`` (GroupNorm with one group, i.e.
              layer norm over ``(C, *spatial)``), ``"none"`` or ``None`` (identity);
            * a tuple ``(name, kwargs)``, e.g. ``("group", {"num_groups": 8, "eps": 1e-6})``;
            * a class or callable taking ``channels`` (optionally as ``(callable, kwargs)``).

            The number of GroupNorm groups is clipped to ``gcd(num_groups, channels)`` so that it
            always divides ``channels``.
        spatial_dims: Number of spatial dimensions, 2 or 3.
        channels: Number of channels ``C`` to normalise.
        instance_affine: Whether instance norm has learned affine parameters when ``norm`` does
            not say (its ``affine`` kwarg wins). ``False`` gives pix2pix/CycleGAN's instance norm.

    Returns:
        The normalisation module.

    Raises:
        ValueError: For an unknown name, a malformed tuple or an invalid ``spatial_dims``.
    """
    spatial_dims = check_spatial_dims(spatial_dims)
    name, kwargs = split_spec(norm, "norm")
    if name is None:
        return nn.Identity()
    if isinstance(name, str):
        key = name.lower().replace("_", "").replace("norm", "")
        if key in ("none", "identity", ""):
            return nn.Identity()
        if key == "group":
            return _group_norm(channels, **kwargs)
        if key == "layer":
            return _layer_norm(channels, **kwargs)
        if key == "instance":
            kwargs.setdefault("affine", instance_affine)
            return _instance_norm(spatial_dims, channels, **kwargs)
        if key == "batch":
            return _batch_norm(spatial_dims, channels, **kwargs)
        raise ValueError(
            f"Unknown norm {name!r}; valid names are {', '.join(map(repr, _NORM_NAMES))}, "
            "or pass a (name, kwargs) tuple or a class taking `channels`."
        )
    if callable(name):
        return name(channels, **kwargs)
    raise ValueError(f"norm must be a name, a (name, kwargs) tuple or a callable, got {norm!r}.")


_ACTS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "silu": (nn.SiLU, {}),
    "swish": (nn.SiLU, {}),
    "relu": (nn.ReLU, {}),
    "leakyrelu": (nn.LeakyReLU, {"negative_slope": 0.2}),
    "gelu": (nn.GELU, {}),
    "tanh": (nn.Tanh, {}),
    "sigmoid": (nn.Sigmoid, {}),
    "elu": (nn.ELU, {}),
    "none": (nn.Identity, {}),
}


def get_act_layer(act: ActSpec) -> nn.Module:
    """Build an activation layer.

    Args:
        act: One of

            * a name: ``"silu"`` / ``"swish"``, ``"relu"``, ``"leakyrelu"`` (negative slope 0.2 by
              default), ``"gelu"``, ``"tanh"``, ``"sigmoid"``, ``"elu"``, ``"none"`` or ``None``;
            * a tuple ``(name, kwargs)``, e.g. ``("leakyrelu", {"negative_slope": 0.1})``;
            * a class or callable taking no positional argument (optionally as
              ``(callable, kwargs)``).

    Returns:
        The activation module.

    Raises:
        ValueError: For an unknown name or a malformed tuple.
    """
    name, kwargs = split_spec(act, "act")
    if name is None:
        return nn.Identity()
    if isinstance(name, str):
        key = name.lower().replace("_", "")
        if key not in _ACTS:
            raise ValueError(
                f"Unknown act {name!r}; valid names are {', '.join(map(repr, _ACTS))}, "
                "or pass a (name, kwargs) tuple or an nn.Module class."
            )
        cls, defaults = _ACTS[key]
        return cls(**{**defaults, **kwargs})
    if callable(name):
        return name(**kwargs)
    raise ValueError(f"act must be a name, a (name, kwargs) tuple or a callable, got {act!r}.")


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The channels-last format ``x`` is laid out in (and not also contiguous), else the default.

    Used to return outputs in the caller's layout after computing on a channels-first copy.
    """
    if x.is_contiguous():
        return torch.contiguous_format
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format
