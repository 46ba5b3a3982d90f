"""Small file-system helpers: atomic writes and output-folder checks."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    Nothing half-written is ever left under the final name: on an exception the temporary file is
    removed and ``path`` keeps its previous content (or stays absent).

    Args:
        path: The final destination.
        suffix: Suffix of the temporary file (default: the suffixes of ``path``, so writers that
            dispatch on the file ending behave the same).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return Path(path)


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` if needed and check that files can be written in it.

    Raises:
        PermissionError: naming the folder, if it cannot be created or written.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medgen-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"cannot write to the {what} '{path}': {err.strerror or err}"
        ) from err
    return path
