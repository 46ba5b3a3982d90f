"""What there is to run: experiments, models, data presets and samplers, each with one line.

The description of a config is the first sentence of its first comment paragraph (after Hydra's
``# @package`` directive), so adding a YAML file with a good first comment is all it takes to be
listed; a sampler's is the first line of its function's docstring. Behind ``medgen list KIND``, ``medgen-train --list`` and
:func:`medgen.list_experiments`.
"""

from __future__ import annotations

import importlib.resources
import inspect
import re
from collections.abc import Iterable
from pathlib import Path

from medgen.runs.composition import CONFIG_MODULE

__all__ = [
    "LISTABLE",
    "listing",
    "describe_config",
    "format_listing",
    "list_configs",
    "list_experiments",
    "list_samplers",
]

#: ``medgen list KIND``: the config group of each kind (samplers come from their registry).
LISTABLE = {
    "experiments": "experiment",
    "models": "model",
    "data": "data",
    "trainers": "trainer",
    "debug": "debug",
    "samplers": None,
}


#: Words ending in a full stop that do not end a sentence.
_ABBREVIATIONS = re.compile(r"(\bal|\be\.g|\bi\.e|\betc|\bvs|\bcf|\bSci|\bRep|\bFig|\bEq|\bNo)$")
#: Longest description; longer first sentences are cut with "...".
MAX_DESCRIPTION = 160


def describe_config(text: str) -> str:
    """The first sentence of a YAML config's first comment paragraph, or ``""``.

    Hydra's ``# @package`` line is skipped; the paragraph ends at an empty comment line or at
    the first line that is not a comment.
    """
    words: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            if words or stripped:
                break
            continue
        comment = stripped.lstrip("#").strip()
        if comment.startswith("@package"):
            continue
        if not comment:
            if words:
                break
            continue
        words.append(comment)
    paragraph = " ".join(words)
    for match in re.finditer(r"\.(\s|$)", paragraph):
        if not _ABBREVIATIONS.search(paragraph[: match.start()]):
            paragraph = paragraph[: match.start() + 1]
            break
    if len(paragraph) > MAX_DESCRIPTION:
        paragraph = paragraph[: MAX_DESCRIPTION - 3].rsplit(" ", 1)[0] + "..."
    return paragraph


def list_configs(group: str, config_dir: str | Path | None = None) -> dict[str, str]:
    """Configs of a group (``"experiment"``, ``"model"``, ``"data"``, ...) -> description.

    Args:
        group: Config group folder of ``medgen.configs``.
        config_dir: Optional folder of your own configs (as ``--config-dir``); its configs of
            the group are listed too and take precedence.

    Raises:
        ValueError: For a group that does not exist.
    """
    found: dict[str, str] = {}
    folder = importlib.resources.files(CONFIG_MODULE) / group
    if not folder.is_dir():
        groups = sorted(p.name for p in importlib.resources.files(CONFIG_MODULE).iterdir())
        raise ValueError(f"no config group {group!r}; groups: {', '.join(groups)}")
    for entry in folder.iterdir():
        if entry.name.endswith(".yaml"):
            found[entry.name[: -len(".yaml")]] = describe_config(entry.read_text("utf-8"))
    if config_dir is not None:
        for path in (Path(config_dir) / group).glob("*.yaml"):
            found[path.stem] = describe_config(path.read_text("utf-8"))
    return dict(sorted(found.items()))


def list_experiments(config_dir: str | Path | None = None) -> dict[str, str]:
    """Every ``experiment=NAME`` with its one-line description.

    Example::

        >>> import medgen
        >>> medgen.list_experiments()["quickstart"]  # doctest: +ELLIPSIS
        'A VAE on 64x64 phantom slices...'
    """
    return list_configs("experiment", config_dir)


def list_samplers() -> dict[str, str]:
    """Every diffusion sampler (``sampler=NAME``) with its family and docstring's first line."""
    from medgen.diffusion.samplers.registry import SAMPLERS

    listing = {}
    for name, spec in SAMPLERS.items():
        doc = (inspect.getdoc(spec.fn) or "").strip().splitlines()
        listing[name] = f"[{spec.family}] {doc[0] if doc else ''}".rstrip()
    return listing


def listing(kind: str, config_dir: str | Path | None = None) -> dict[str, str]:
    """The listing of ``kind`` (a key of :data:`LISTABLE`, singular or plural)."""
    key = kind if kind in LISTABLE else f"{kind}s"
    if key not in LISTABLE:
        raise ValueError(f"cannot list {kind!r}; choose one of {', '.join(LISTABLE)}")
    group = LISTABLE[key]
    return list_samplers() if group is None else list_configs(group, config_dir)


def format_listing(
    items: dict[str, str] | Iterable[tuple[str, str]], width: int | None = None
) -> str:
    """Aligned ``name  description`` lines; with ``width``, lines are cut to that many characters."""
    pairs = list(items.items() if isinstance(items, dict) else items)
    if not pairs:
        return ""
    pad = max(len(name) for name, _ in pairs) + 2
    lines = []
    for name, text in pairs:
        room = None if width is None else max(20, width - pad)
        if room is not None and len(text) > room:
            text = text[: room - 3].rstrip() + "..."
        lines.append(f"{name.ljust(pad)}{text}".rstrip())
    return "\n".join(lines)
