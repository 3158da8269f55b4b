"""notebooks/08_scaling.ipynb executes top to bottom on the tiny run (plan, streaming from Python)."""

from __future__ import annotations

from pathlib import Path

from tests.notebooks.test_notebooks import REPO, execute, images, kernel_dirs, offline, text_output  # noqa: F401 (fixtures)


def test_scaling_notebook(tiny_run, kernel_dirs, offline):  # noqa: F811
    offline.setenv("FE_RUN", str(Path(tiny_run[1]).resolve()))
    offline.setenv("FE_RECIPE", str(REPO / "runs" / "pythia-160m-ge2025-stream.toml"))
    offline.setenv("FE_TRAIN_STEPS", "40")
    nb = execute("08_scaling.ipynb", kernel_dirs)
    out = text_output(nb)
    assert images(nb) >= 1 and "held-out FVU per snapshot" in out and "DOES NOT FIT" in out and "'window_seed'" in out
