"""The course notebook (examples/course.ipynb) runs top to bottom on a real Jupyter kernel, with
its small settings (SAELAB_NOTEBOOK_SMALL=1): no cell fails, every figure cell shows an image,
and the progress display is a cell output updated in place."""

from __future__ import annotations

import pytest
from helpers import REPO

NOTEBOOK = REPO / "examples" / "course.ipynb"


def outputs(cell) -> list:
    return cell.get("outputs", [])


@pytest.mark.slow
def test_the_course_notebook_runs_top_to_bottom_and_shows_its_figures(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert not any(outputs(c) for c in code), "commit the notebook without outputs"
    monkeypatch.setenv("SAELAB_NOTEBOOK_SMALL", "1")
    client = nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in code for o in outputs(c) if o.output_type == "error"]
    assert not errors, errors[0]["evalue"] if errors else ""
    figure_cells = [c for c in code if c.source.strip().endswith("]")
                    and "figures[" in c.source.strip().splitlines()[-1]]
    assert len(figure_cells) >= 7  # each layer, the stack, the units, ten digits' figures
    for cell in figure_cells:
        assert any("image/png" in o.get("data", {}) for o in outputs(cell)), cell.source
    runs = [c for c in code if "saelab.run(" in c.source]
    for cell in runs:  # the live line: one display, updated in place, with the time left
        live = [o for o in outputs(cell) if o.output_type == "display_data"
                and "left (run ~" in o.get("data", {}).get("text/plain", "")]
        assert live, cell.source
    assert (tmp_path / "outputs" / "course" / "binary" / "report.md").is_file()
