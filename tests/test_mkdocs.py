"""The documentation site builds strictly: every page in the nav, no broken link, the API
reference (mkdocstrings) and the notebooks (mkdocs-jupyter) rendered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def _nav_files(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def test_every_page_is_in_the_nav() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.SafeLoader)
    nav = set(_nav_files(config["nav"]))
    docs = ROOT / "docs"
    pages = {
        (Path(folder) / name).relative_to(docs).as_posix()
        for folder, _, names in os.walk(docs, followlinks=True)  # docs/notebooks is a link
        for name in names
        if name.endswith((".md", ".ipynb"))
    }
    assert pages - nav == set(), f"pages missing from mkdocs.yml nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", ROOT / "mkdocs.yml"]
        + ["-d", str(site)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    api = (site / "api" / "runs" / "index.html").read_text()
    assert "medgen.runs.training.train" in api and "Returns" in api  # from the docstring
    notebook = (site / "notebooks" / "quickstart" / "index.html").read_text()
    assert "medgen.list_experiments" in notebook
    assert (site / "jupyter" / "index.html").is_file()
