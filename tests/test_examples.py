"""Examples that run in seconds are executed, so the documentation cannot drift from the code."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_nets_speed_memory_example(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "nets_speed_memory.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "parameters:" in out and "perplexity" in out
    diff = float(out.split("channels-last-3d max difference:")[1].split()[0])
    assert diff < 1e-4
    full = float(out.split("saved for backward:")[1].split()[0])
    ckpt = float(out.split("saved with checkpointing (outside blocks):")[1].split()[0])
    assert ckpt < full
