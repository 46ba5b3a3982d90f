"""Small file-system helpers: atomic writes and output-folder checks."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~_umask()


class DiskWriteError(OSError):
    """Writing a file failed (full disk, quota, read-only file system); the message names it."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    Nothing half-written is ever left under the final name: on an exception the temporary file is
    removed and ``path`` keeps its previous content (or stays absent). The file gets the mode an
    ordinary new file would (``0o666`` less the umask; temporary files are created ``0o600``), so
    colleagues can read what the umask lets them. An ``OSError`` while writing (a full disk, say)
    becomes a :class:`DiskWriteError` naming ``path``.

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
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(err, OSError) and not isinstance(err, DiskWriteError):
            reason = {
                errno.ENOSPC: "no space left on the device",
                errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system",
            }.get(err.errno, err.strerror or str(err))
            raise DiskWriteError(
                err.errno, f"cannot write '{path}': {reason}; the previous file is unchanged"
            ) from err
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` leaves when a process is killed mid-write.

    Returns:
        The removed files.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        if tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def finite_or_none(data: Any) -> tuple[Any, list[str]]:
    """``data`` with NaN/Inf floats replaced by ``None`` (valid JSON), and the keys replaced."""
    bad: list[str] = []

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    return clean(data, ""), bad


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically and return the path.

    NaN and Inf, which JSON cannot hold, are written as ``null`` with a warning naming the keys.
    """
    data, bad = finite_or_none(data)
    if bad:
        logging.getLogger("medgen").warning(
            "%s: non-finite values written as null: %s", path, ", ".join(bad)
        )
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
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
