"""examples/guide_snippet.ipynb runs in a real Jupyter kernel (nbclient + ipykernel)
against the repository and APDB that docs/walkthrough.md made."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "guide_snippet.ipynb"


def _parameters_cell(notebook):
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    assert cells[0] is notebook.cells[1], "the parameters cell comes first (after the title)"
    return cells[0]


def test_notebook_parameters_are_the_walkthroughs():
    """The defaults point at what the walkthrough makes, so the notebook runs from its work directory."""
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    values = {}
    exec(_parameters_cell(notebook).source, {}, values)  # noqa: S102  (the notebook's own parameter literals)
    assert values == {
        "repo": "repo", "collections": "u/me/appipe", "instrument": "LSSTCam-imSim", "skymap": "DC2",
        "apdb_path": "run1.db", "visit": 1547505, "detector": 94, "plot_path": "diaObjects_sky.png",
    }  # fmt: skip
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    # today's APDB names, not the guide's
    assert '"validityEndMjdTai" is NULL' in code and '"g_psfFluxMean"' in code
    assert "decl" not in code and 'validityEnd"' not in code and "gPSFluxMean" not in code
    # no outputs saved in the file: it shows what it computes when it is run
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_on_the_walkthroughs_repository(walkthrough_run, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    plot = tmp_path / "sky.png"
    # absolute paths instead of the work-directory-relative defaults (papermill-style injection)
    _parameters_cell(notebook).source += (
        f"\nrepo = {str(walkthrough_run.repo)!r}"
        f"\napdb_path = {str(walkthrough_run.work / 'run1.db')!r}"
        f"\nplot_path = {str(plot)!r}"
    )
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    displays = [out["data"] for out in outputs if out.output_type == "execute_result"]
    # diaSrcTable_example.head(), then objTable: DataFrames shown as HTML tables
    assert len(displays) == 2 and all("text/html" in d for d in displays)
    assert "diaSourceId" in displays[0]["text/html"] and "g_psfFluxMean" in displays[1]["text/html"]
    assert any("image/png" in out.get("data", {}) for out in outputs if out.output_type == "display_data")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    n_objects = int(printed.split(" current DiaObjects")[0].split()[-1])
    with sqlite3.connect(walkthrough_run.work / "run1.db") as connection:
        expected = connection.execute('SELECT COUNT(*) FROM "DiaObject" WHERE "validityEndMjdTai" IS NULL')
        assert n_objects == expected.fetchone()[0] > 0
