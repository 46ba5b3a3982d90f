"""The package is complete: a built wheel carries the configs and works without the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def test_wheel_ships_configs_and_runs_without_source(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(tmp_path.glob("medgen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "medgen" / "configs").rglob("*.yaml")
    }
    assert configs and configs <= names, sorted(configs - names)
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    code = (
        "import medgen, pathlib; assert 'site' in pathlib.Path(medgen.__file__).parts; "
        "cfg = medgen.compose('train', ['experiment=vae_3d']); print(cfg.model.spatial_dims)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("3")


def test_citation_file_has_the_cff_required_fields():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert {"message", "title", "authors"} <= set(cff)
    assert all("name" in a or "family-names" in a for a in cff["authors"])
    assert cff["license"] == "Apache-2.0"


def test_readme_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e . && medgen-train" in readme
    test_command = 'pip install -e ".[test]" && python -m pytest -m "not slow" -q'
    assert test_command in readme
    assert 'pip install -e ".[test]"' in (ROOT / ".ci" / "run").read_text()
