"""Safe Hydra instantiation: every ``_target_`` must live under an allowed prefix.

Configs travel inside checkpoints and exported model folders, so a config is untrusted input: a
``_target_`` such as ``os.system`` must never be called. Every object medgen builds from a config
goes through :func:`instantiate`, which checks each ``_target_`` (recursively) against
:data:`ALLOWED_PREFIXES` before handing the config to :func:`hydra.utils.instantiate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import hydra.utils
from omegaconf import DictConfig, ListConfig, OmegaConf

#: Module prefixes a config may name as ``_target_``.
ALLOWED_PREFIXES: tuple[str, ...] = (
    "medgen.",
    "torch.",
    "torchvision.",
    "monai.",
    "lightning.",
    "pytorch_lightning.",
    "torchmetrics.",
)


class UnsafeTargetError(ValueError):
    """Raised when a config names a ``_target_`` outside the allowlist."""


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


def check_targets(config: Any, allowed: Iterable[str] = ALLOWED_PREFIXES) -> None:
    """Raise :class:`UnsafeTargetError` if any ``_target_`` in ``config`` is not allowed.

    Args:
        config: A mapping, list, ``DictConfig`` or ``ListConfig`` (checked recursively).
        allowed: Allowed module prefixes, e.g. ``("medgen.", "torch.")``.
    """
    allowed = tuple(allowed)
    for where, target in _iter_targets(config):
        if not isinstance(target, str) or not target.startswith(allowed):
            raise UnsafeTargetError(
                f"config key '{where}' has _target_={target!r}, which is not allowed; "
                f"targets must start with one of {', '.join(allowed)}"
            )


def instantiate(config: Any, *args: Any, allowed: Iterable[str] = ALLOWED_PREFIXES, **kwargs: Any):
    """Instantiate ``config`` with Hydra after checking every ``_target_`` against the allowlist.

    Args:
        config: A config with a ``_target_`` (mapping or ``DictConfig``).
        *args: Positional arguments forwarded to the target.
        allowed: Allowed ``_target_`` module prefixes.
        **kwargs: Keyword arguments forwarded to :func:`hydra.utils.instantiate` (``_convert_``,
            ``_recursive_``, ``_partial_`` or extra constructor arguments).

    Returns:
        The constructed object.
    """
    check_targets(config, allowed)
    check_targets(kwargs, allowed)
    return hydra.utils.instantiate(config, *args, **kwargs)


def to_plain(config: Any) -> Any:
    """Return ``config`` as plain Python containers (dicts, lists, scalars), resolved."""
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return config
