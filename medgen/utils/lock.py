"""One live run per output folder: a lock file naming the process that holds it.

Two runs writing into one folder both exit 0 and leave a mix of their files (checkpoints, samples,
metrics, export). :class:`RunLock` creates ``<folder>/.medgen.lock`` atomically (``O_EXCL``) with
the owner's host, process id and start time; a second run finds it and is refused with a message
naming the other process. A lock left by a process that no longer exists on this host (killed with
``kill -9``, say) is taken over, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("medgen")

__all__ = ["LOCK_NAME", "FolderInUseError", "RunLock"]

LOCK_NAME = ".medgen.lock"


class FolderInUseError(RuntimeError):
    """Another live run writes into the same output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Hold ``<folder>/.medgen.lock`` for the duration of a ``with`` block.

    Args:
        folder: The run's output folder.
        what: Shown in the owner record (e.g. ``"medgen-train"``).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "medgen-train") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": what,
        }
        self._held = False

    def owner(self) -> dict[str, Any] | None:
        """The record of the process holding the lock, or ``None`` if there is none."""
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`FolderInUseError` naming the live owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner() or {}
                same_host = owner.get("host") == socket.gethostname()
                pid = int(owner.get("pid", -1)) if str(owner.get("pid", "")).isdigit() else -1
                if owner and same_host and pid > 0 and not _alive(pid):
                    log.warning(
                        "removing the stale lock %s of process %d (it has ended)", self.path, pid
                    )
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                who = (
                    f"process {owner.get('pid')} on {owner.get('host')} ({owner.get('what')}, "
                    f"started {owner.get('started')})"
                    if owner
                    else "another process"
                )
                raise FolderInUseError(
                    f"the output folder '{self.path.parent}' is in use by {who}; choose another "
                    f"paths.output_dir, or wait for it to finish (if that process is gone, delete "
                    f"'{self.path}')"
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(self.record, handle)
            self._held = True
            return
        raise FolderInUseError(f"could not take the lock '{self.path}'")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self._held:
            with contextlib.suppress(FileNotFoundError):
                if (self.owner() or {}).get("pid") == self.record["pid"]:
                    self.path.unlink()
            self._held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
