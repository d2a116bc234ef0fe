"""docs/tutorial.ipynb runs from top to bottom (executed with nbclient, as nbmake does), so it cannot
rot: a short pre-training (8 steps, G2D_TUTORIAL_STEPS) stands in for the tutorial's 48."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


@pytest.mark.slow
def test_the_tutorial_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("G2D_TUTORIAL_STEPS", "8")
    monkeypatch.delenv("G2D_TUTORIAL_MODEL", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
    assert "collapse r" in text and "pointing" in text and "opacity" in text
    assert images == 2  # the grounding and attention figures
    assert (tmp_path / "grounding.png").is_file() and (tmp_path / "attention.png").is_file()
