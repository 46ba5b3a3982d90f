"""Shared fixtures: tiny run overrides so every training test finishes in seconds on a CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HYDRA_FULL_ERROR", "1")

EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "medgen" / "configs" / "experiment").glob("*.yaml")
)


def tiny_overrides(output_dir: Path, experiment: str = "quickstart") -> list[str]:
    """Overrides that shrink any experiment to a few tiny steps (same keys for every family)."""
    return [
        f"experiment={experiment}",
        f"paths.output_dir={output_dir}",
        "data.train.length=8",
        "data.val.length=4",
        "data.batch_size=4",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "~callbacks.progress_bar",
        "num_samples=2",
    ]


@pytest.fixture
def tiny(tmp_path):
    """A function giving tiny-run overrides for an experiment, writing under ``tmp_path``."""

    def make(experiment: str = "quickstart", name: str = "run") -> list[str]:
        return tiny_overrides(tmp_path / name, experiment)

    return make


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("single_thread")``):
    tiny ops are faster without thread hand-offs on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
