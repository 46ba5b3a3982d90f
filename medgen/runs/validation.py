"""Check a composed config's value types against its targets' signatures, before building anything.

``trainer.max_epochs=abc`` used to end in a bare ``AssertionError`` deep inside Lightning, and
``data.batch_size=four`` in a ``TypeError`` when the first loader was built. :func:`check_config`
walks every node with a ``_target_``, looks up the target's constructor annotations (Lightning's
``Trainer``, medgen's models and data modules are annotated), and reports every value whose type
cannot match, by its full key, in one error.

Only simple annotations are checked (``int``, ``float``, ``bool``, ``str``, ``None``, their unions,
``Literal`` and sequences); anything else (tensors, callables, mappings of configs) is left to the
constructor.

:func:`preflight_data` then reads the first training items before the model is built and compares
their channels, dimensionality and value range with the data config (``data.channels``,
``data.spatial_dims``, ``data.value_range``) and with the model's channel settings: RGB folders
used to fail at the first training step with a message about the model's channels.
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from medgen.utils.instantiate import to_plain
from medgen.utils.targets import UnsafeTargetError, resolve_target

__all__ = ["ConfigTypeError", "DataMismatchError", "check_config", "preflight_data"]

log = logging.getLogger("medgen")

_UNCHECKED = object()


class ConfigTypeError(TypeError):
    """Config values whose types do not fit their target's parameters; the message names keys."""


def _describe(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {
            "int": "an integer",
            "float": "a number",
            "bool": "true/false",
            "str": "a string",
        }.get(annotation.__name__, annotation.__name__)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, Sequence, typing.Sequence):
        return "a list"
    return str(annotation)


def _fits(value: Any, annotation: Any) -> Any:
    """True/False when ``annotation`` is checkable, else :data:`_UNCHECKED`."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return _UNCHECKED
    if annotation is type(None) or annotation is None:
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        results = [_fits(value, a) for a in typing.get_args(annotation)]
        if any(r is True for r in results):
            return True
        return _UNCHECKED if any(r is _UNCHECKED for r in results) else False
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, (list, tuple))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return _UNCHECKED


def _hints(target: Any) -> tuple[dict[str, Any], set[str]]:
    func = target.__init__ if isinstance(target, type) else target
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable forward references: check nothing of this target
        return {}, set()
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}, set()
    return hints, set(params)


def _check_node(node: Any, path: str, errors: list[str]) -> None:
    if isinstance(node, Mapping):
        target_name = node.get("_target_")
        if isinstance(target_name, str):
            try:
                target = resolve_target(target_name)
            except UnsafeTargetError:
                target = None  # reported by the safe instantiation itself
            if target is not None:
                hints, _ = _hints(target)
                for key, value in node.items():
                    if key.startswith("_") or key not in hints or isinstance(value, Mapping):
                        continue
                    if _fits(value, hints[key]) is False:
                        where = f"{path}.{key}" if path else key
                        errors.append(f"{where}={value!r} must be {_describe_union(hints[key])}")
        for key, value in node.items():
            _check_node(value, f"{path}.{key}" if path else str(key), errors)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_node(value, f"{path}[{i}]", errors)


def _describe_union(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(annotation)]
        return " or ".join(dict.fromkeys(parts))
    return _describe(annotation)


def check_config(cfg: Any, keys: Sequence[str] = ("data", "model", "trainer")) -> None:
    """Raise :class:`ConfigTypeError` naming every mistyped value under ``keys`` of ``cfg``.

    Args:
        cfg: A composed config (``DictConfig`` or mapping).
        keys: The top-level nodes to check.
    """
    errors: list[str] = []
    for key in keys:
        node = cfg.get(key) if hasattr(cfg, "get") else None
        if node is not None:
            _check_node(to_plain(node), key, errors)
    if errors:
        raise ConfigTypeError("invalid config values:\n  " + "\n  ".join(errors))


class DataMismatchError(ValueError):
    """The training files do not match the data or model config; the message names key and file."""


#: Model config keys that hold an image channel count.
CHANNEL_KEYS = ("in_channels", "out_channels", "channels")
#: Number of training items read before the model is built.
PREFLIGHT_ITEMS = 2


def _describe_item(dataset: Any, index: int) -> tuple[str, dict[str, Any]]:
    """Where item ``index`` comes from, and its image tensors by key."""
    import torch

    item = dataset[index]
    if not isinstance(item, Mapping):
        item = {"image": item[0] if isinstance(item, (tuple, list)) else item}
    path = item.get("path")
    if isinstance(path, (tuple, list)):
        path = " / ".join(str(p) for p in path)
    where = f"'{path}'" if path else f"item {index} of {type(dataset).__name__}"
    images = {
        key: value
        for key, value in item.items()
        if isinstance(value, torch.Tensor) and value.ndim >= 3 and value.is_floating_point()
    }
    return where, images


def _channel_settings(node: Any, path: str) -> list[tuple[str, Any]]:
    """``(key, value)`` of every image channel setting of an unresolved model config."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}"
            if (
                key in CHANNEL_KEYS
                and isinstance(value, (int, str))
                and not isinstance(value, bool)
            ):
                found.append((where, value))
            else:
                found += _channel_settings(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _channel_settings(value, f"{path}[{i}]")
    return found


def preflight_data(cfg: Any, datamodule: Any) -> None:
    """Check the first training items against ``cfg.data`` and the model's channels.

    Reads :data:`PREFLIGHT_ITEMS` items of the training set (building the datasets, which
    Lightning would do anyway) before the model is built, and:

    * channels: when the model's channel settings follow the data (``${data.channels}``, the
      default), a differing ``data.channels`` is corrected to the files' count (logged) and the
      model follows; a model channel set to another number is an error naming
      ``data.channels=N``, the model key and the file.
    * dimensionality: 2D items with ``data.spatial_dims=3`` (or the reverse) are an error.
    * value range: items far outside ``data.value_range`` (other units, e.g. counts 0-255 for
      [-1, 1]) are an error naming the file; slightly outside (more than 5% of its width), a
      warning.

    Args:
        cfg: The composed train config (``cfg.data.channels`` may be updated in place).
        datamodule: The instantiated data module of ``cfg.data``.

    Raises:
        DataMismatchError: naming the data key to set and the file.
    """
    from omegaconf import OmegaConf, open_dict

    datamodule.setup("fit")
    dataset = datamodule.datasets.get("train")
    if dataset is None or not len(dataset):
        return
    data = cfg.data
    declared = int(data.get("channels", 1))
    dims = int(data.get("spatial_dims", 2))
    low, high = (float(v) for v in data.get("value_range", (0.0, 1.0)))
    width = max(high - low, 1e-12)
    counts: dict[str, tuple[int, str]] = {}
    for index in range(min(PREFLIGHT_ITEMS, len(dataset))):
        where, images = _describe_item(dataset, index)
        for key, image in images.items():
            if image.ndim - 1 != dims:
                raise DataMismatchError(
                    f"{where} gives {image.ndim - 1}D images (item key '{key}', shape "
                    f"{tuple(image.shape)}) but data.spatial_dims={dims}: choose a "
                    f"{image.ndim - 1}D data preset or set data.spatial_dims={image.ndim - 1}"
                )
            counts.setdefault(key, (int(image.shape[0]), where))
            vmin, vmax = float(image.min()), float(image.max())
            outside = max(low - vmin, vmax - high, 0.0)
            if outside > width:
                raise DataMismatchError(
                    f"{where} has values in [{vmin:g}, {vmax:g}] (item key '{key}'), far outside "
                    f"data.value_range=[{low:g}, {high:g}]: set the intensity preset "
                    "(data.train.transform) so the data is scaled into data.value_range, or set "
                    "data.value_range to the data's range"
                )
            if outside > 0.05 * width:
                log.warning(
                    "%s has values in [%g, %g], outside data.value_range=[%g, %g]",
                    where,
                    vmin,
                    vmax,
                    low,
                    high,
                )
    if len({c for c, _ in counts.values()}) != 1:
        return  # no items, or sides of a pair with different channels: the model decides
    actual, where = next(iter(counts.values()))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=False) if "model" in cfg else {}
    settings = _channel_settings(model_cfg, "model")
    fixed = [
        (key, value)
        for key, value in settings
        if not (isinstance(value, str) and "data.channels" in value)
    ]
    for key, value in fixed:
        if isinstance(value, int) and value != actual and key.endswith("in_channels"):
            raise DataMismatchError(
                f"{where} has {actual} channel(s) but {key}={value}: set data.channels={actual} "
                f"and let the model follow the data ({key}: ${{data.channels}}), or "
                f"{key}={actual}"
            )
    if actual != declared:
        follows = any(isinstance(v, str) and "data.channels" in v for _, v in settings)
        if fixed and not follows:
            raise DataMismatchError(
                f"{where} has {actual} channel(s) but data.channels={declared}: set "
                f"data.channels={actual}"
            )
        log.info(
            "medgen: %s has %d channel(s); data.channels=%d -> %d (the model follows the data)",
            where,
            actual,
            declared,
            actual,
        )
        with open_dict(data):
            data.channels = actual
        datamodule.channels = actual
