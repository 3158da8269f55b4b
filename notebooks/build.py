"""Write the research notebooks `notebooks/*.ipynb` from the cell sources in `notebooks/cells/`.

    python notebooks/build.py           # regenerate every notebook (outputs cleared)
    python notebooks/build.py --check   # exit 1 when a committed notebook differs from its source

The sources live in `notebooks/cells/` (one module per notebook), as plain Python strings, so that a change to a notebook is an ordinary diff to
review; the .ipynb files are generated, committed without outputs, and executed top to bottom by
`tests/test_notebooks.py`. Each notebook's first code cell reads its inputs from `FE_*` environment
variables whose defaults are for real use; the tests point them at a tiny run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the cell sources live in notebooks/cells/

from cells import (  # noqa: E402,E501
    feature_timelines,
    interventions,
    numbers,
    phase_map,
    pythia_gpu,
    quickstart,
    real_checkpoints,
    scaling,
)
from cells.common import Cell  # noqa: E402

NOTEBOOKS: dict[str, list[Cell]] = {
    "01_quickstart.ipynb": quickstart.CELLS,
    "02_feature_timelines.ipynb": feature_timelines.CELLS,
    "03_phase_map.ipynb": phase_map.CELLS,
    "04_pythia_gpu.ipynb": pythia_gpu.CELLS,
    "05_real_checkpoints.ipynb": real_checkpoints.CELLS,
    "06_numbers.ipynb": numbers.CELLS,
    "07_interventions.ipynb": interventions.CELLS,
    "08_scaling.ipynb": scaling.CELLS,
}


def build(cells: list[Cell]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, src) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives byte-identical files
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(cells: list[Cell]) -> str:
    return nbformat.writes(build(cells)) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        text = render(cells)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date with notebooks/build.py: {', '.join(stale)}; run `python notebooks/build.py`")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
