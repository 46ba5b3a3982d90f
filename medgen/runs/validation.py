"""Check a composed config's value types against its targets' signatures, before building anything.

``trainer.max_epochs=abc`` used to end in a bare ``AssertionError`` deep inside Lightning, and
``data.batch_size=four`` in a ``TypeError`` when the first loader was built. :func:`check_config`
walks every node with a ``_target_``, looks up the target's constructor annotations (Lightning's
``Trainer``, medgen's models and data modules are annotated), and reports every value whose type
cannot match, by its full key, in one error.

Only simple annotations are checked (``int``, ``float``, ``bool``, ``str``, ``None``, their unions,
``Literal`` and sequences); anything else (tensors, callables, mappings of configs) is left to the
constructor.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from medgen.utils.instantiate import to_plain
from medgen.utils.targets import UnsafeTargetError, resolve_target

__all__ = ["ConfigTypeError", "check_config"]

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
