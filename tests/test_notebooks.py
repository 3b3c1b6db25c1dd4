"""Execute each notebook in notebooks/ from cleared outputs in a fresh kernel; any error fails the test.

`python tests/test_notebooks.py [NAME ...]` executes them the same way and writes their outputs back, for committing
(without timing metadata, so that diffs show only what changed).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; each notebook takes well under a minute on 2 cores


def execute(path: Path):
    """The notebook at `path`, executed from cleared outputs in a fresh kernel of this Python that imports this
    checkout's package, in a temporary working folder; raises `nbclient.exceptions.CellExecutionError` on an error."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as workdir:
        client = NotebookClient(
            notebook,
            timeout=CELL_TIMEOUT,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": workdir}},
        )
        client.execute(env=env)
    return notebook


def pictures(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_and_shows_a_picture(path):
    notebook = execute(path)
    assert pictures(notebook) >= 1


def test_every_notebook_is_tested():
    assert [path.name for path in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_pruned_encoder.ipynb",
        "03_finetuning.ipynb",
        "04_checkpoints_and_hub.ipynb",
    ]


if __name__ == "__main__":
    import nbformat

    for path in NOTEBOOKS:
        if sys.argv[1:] and path.name not in sys.argv[1:]:
            continue
        start = time.monotonic()
        notebook = execute(path)
        nbformat.write(notebook, path)
        print(f"{path.name}: {time.monotonic() - start:.1f} s, {pictures(notebook)} picture(s)")
