"""The notebooks run top to bottom in a Jupyter kernel (at the tiny size MEDGEN_SMOKE_TEST=1
selects) and are stored with their outputs stripped."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_present() -> None:
    names = {p.stem for p in NOTEBOOKS}
    expected = {"quickstart", "bring_your_own_3d", "latent_diffusion_3d", "translation_16bit"}
    assert expected | {"finetune_and_audit"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stored_without_outputs(path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs"
    params = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    assert params and "MEDGEN_SMOKE_TEST" in params[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGEN_SMOKE_TEST", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    book = nbformat.read(path, as_version=4)
    client = NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    figures = [
        output
        for cell in book.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert figures, f"{path.name} drew no figure inline"
    errors = [
        o
        for c in book.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]
    assert not errors
    assert os.listdir(tmp_path), "the notebook wrote nothing in its folder"
