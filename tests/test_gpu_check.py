"""``benchmarks/gpu_check.sh --dry-run``: every step of the GPU check runs tiny on a CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FILES = {
    "triton": "triton.json",
    "nets": "nets.json",
    "train": "training.json",
    "presets": "presets.json",
    "decode": "decode.json",
}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def test_dry_run_writes_every_json(tmp_path):
    out = tmp_path / "gpu"
    proc = _run("--dry-run", "--output", str(out))
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((out / "logs").glob("*.log"))
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["dry_run"] and summary["device"] == "cpu"
    assert set(summary["steps"]) == set(FILES)
    records = {step: json.loads((out / name).read_text()) for step, name in FILES.items()}
    for step, record in records.items():
        assert record["step"] == step and record["status"] == "ok" and record["dry_run"]
    assert records["triton"]["passed"] and records["triton"]["errors"]
    assert {"bf16", "fp32"} <= {
        c["dtype"].removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
        for c in records["triton"]["cases"]
    }
    assert records["nets"]["eager"]["precision"] == "bf16" and records["nets"]["eager"]["results"]
    assert "skipped" in records["nets"]["compiled"]
    train = records["train"]["results"]["quickstart"]
    assert train["peak_bytes"] > 0 and train["steps_per_s"] > 0 and train["method"]
    assert train["settings"]["precision"] == "bf16-mixed"
    preset = records["presets"]["results"]["ddpm_3d@gpu16"]
    assert preset["peak_bytes"] > 0 and preset["fits"]["fraction"] > 0
    decode = records["decode"]["results"][0]
    assert {"whole", "tiled_layerwise", "tiled_tile"} <= set(decode)


def test_a_failing_step_fails_the_script(tmp_path):
    out = tmp_path / "gpu"
    proc = _run("--dry-run", "--output", str(out), "--steps", "train", "--experiments", "nope")
    assert proc.returncode == 1, proc.stdout[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["passed"] and summary["steps"]["train"]["status"] == "failed"
    record = json.loads((out / "training.json").read_text())
    assert record["status"] == "failed" and "nope" in record["failed"]


def test_bad_option_and_unknown_step_are_refused(tmp_path):
    assert _run("--no-such-option").returncode == 2
    assert _run("--dry-run", "--output", str(tmp_path), "--steps", "bogus").returncode == 2
