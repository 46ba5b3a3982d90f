"""Safe instantiation of configs: every ``_target_`` is looked up in medgen's explicit list.

Configs travel inside checkpoints and exported model folders, so a config is untrusted input: a
``_target_`` such as ``os.system`` or ``torch.utils.collect_env.run`` must never be called. Every
object medgen builds from a config goes through :func:`instantiate`, which resolves each
``_target_`` only through :func:`medgen.utils.targets.resolve_target` (an exact lookup in a table
of allowed classes).

Why not :func:`hydra.utils.instantiate`: it resolves ``_target_`` strings by importing modules and
walking their attributes (so ``torch.os.system`` is a valid path), and it re-reads the config with
OmegaConf, where an escaped ``\\${oc.create:...}`` string left after resolution turns back into an
interpolation that can make new nodes. This small builder keeps Hydra's config keys (``_target_``,
``_args_``, ``_partial_``, ``_recursive_``; ``_convert_`` is accepted, and everything passed on is
plain Python containers) and never interprets a string.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from medgen.utils.targets import UnsafeTargetError, canonical_name, resolve_target

__all__ = ["InstantiationError", "UnsafeTargetError", "check_targets", "instantiate", "to_plain"]

_SPECIAL = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


class InstantiationError(RuntimeError):
    """A config's ``_target_`` raised while being built; the message names the config key."""


def to_plain(config: Any) -> Any:
    """Return ``config`` as plain Python containers (dicts, lists, scalars), resolved."""
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {k: to_plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(to_plain(v) for v in config)
    return config


def _iter_targets(node: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield path or "<root>", node["_target_"]
        for key, value in node.items():
            yield from _iter_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _iter_targets(value, f"{path}[{i}]")


def check_targets(config: Any) -> None:
    """Raise :class:`UnsafeTargetError` if any ``_target_`` in ``config`` is not on the list.

    Args:
        config: A mapping, list, ``DictConfig`` or ``ListConfig`` (checked recursively).
    """
    for where, target in _iter_targets(config):
        try:
            canonical_name(target)
        except UnsafeTargetError as err:
            raise UnsafeTargetError(f"config key '{where}': {err}") from None


def _build(node: Any, args: tuple[Any, ...], recursive: bool, path: str) -> Any:
    if isinstance(node, Mapping) and "_target_" in node:
        target = resolve_target(node["_target_"])
        recursive = bool(node.get("_recursive_", recursive))

        def child(value: Any, key: str) -> Any:
            return _build(value, (), True, f"{path}.{key}" if path else key) if recursive else value

        positional = list(args) or [
            child(v, f"_args_[{i}]") for i, v in enumerate(node.get("_args_", ()))
        ]
        # Keys a target declares as read by the run, not by its constructor (a model's
        # ``init_from``/``finetune``, :attr:`medgen.models.base.GenerativeModule.config_only_keys`).
        skip = (*_SPECIAL, *getattr(target, "config_only_keys", ()))
        kwargs = {k: child(v, str(k)) for k, v in node.items() if k not in skip}
        if node.get("_partial_", False):
            return functools.partial(target, *positional, **kwargs)
        try:
            return target(*positional, **kwargs)
        except Exception as err:
            where = f"config key '{path}'" if path else "config"
            raise InstantiationError(
                f"{where}: building {node['_target_']} failed: {type(err).__name__}: {err}"
            ) from err
    if isinstance(node, Mapping):
        return {
            k: _build(v, (), recursive, f"{path}.{k}" if path else str(k)) for k, v in node.items()
        }
    if isinstance(node, (list, tuple)):
        return [_build(v, (), recursive, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def instantiate(config: Any, *args: Any, **kwargs: Any) -> Any:
    """Build ``config`` after checking every ``_target_`` (recursively) against the list.

    Args:
        config: A config with a ``_target_`` (mapping or ``DictConfig``), or a container of them.
        *args: Positional arguments for the target (they replace the config's ``_args_``).
        **kwargs: Constructor arguments that override the config's, and Hydra's
            ``_recursive_`` / ``_partial_`` / ``_convert_`` keys.

    Returns:
        The constructed object (nested configs become plain dicts and lists).

    Raises:
        UnsafeTargetError: a ``_target_`` anywhere in ``config`` or ``kwargs`` is not allowed
            (nothing is built then).
        InstantiationError: a target raised; the message names the config key, and the original
            error is its ``__cause__``.
    """
    config = to_plain(config)
    kwargs = to_plain(kwargs)
    check_targets(config)
    check_targets(kwargs)
    kwargs.pop("_convert_", None)  # always plain containers
    recursive = bool(kwargs.pop("_recursive_", True))
    if isinstance(config, Mapping) and "_target_" in config:
        config = {**config, **kwargs}
        config.setdefault("_recursive_", recursive)
    return _build(config, tuple(args), recursive, "")
