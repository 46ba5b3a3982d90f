"""A CSV logger that keeps the curves of the run it resumes.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so ``resume=last``
loses every row logged before the interruption. :class:`CSVLogger` keeps the file and appends;
``medgen-train`` first drops the rows logged after the checkpoint it resumes from (they are
logged again), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["CSVLogger", "trim_metrics_csv"]


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Keep an existing metrics.csv and its columns (Lightning's writer deletes it).
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_metrics_csv(path: str | os.PathLike, from_step: int) -> int:
    """Drop the rows of ``path`` with ``step >= from_step`` (logged after a checkpoint).

    Returns:
        The number of rows removed (0 when the file does not exist).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        rows = list(reader)

    def keep(row: dict[str, str]) -> bool:
        try:
            return int(float(row.get("step") or 0)) < from_step
        except ValueError:
            return True

    kept = [row for row in rows if keep(row)]
    if len(kept) != len(rows):
        from medgen.utils.files import atomic_path

        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
    return len(rows) - len(kept)
