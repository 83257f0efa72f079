"""The notebooks run top to bottom, and the collapse study shows the paper's Figure 7 signatures.

Each notebook is executed with nbclient in its fast mode (DINO_FAST=1: fewer images and steps),
the way a reader would run it. The collapse notebook stores its end values (mean over the last 10
steps) in DINO_NOTEBOOK_RESULTS; the signature test checks them. Thresholds hold for seeds 0, 1, 2
(DINO_SEED) in fast mode; the committed full run meets the issue's stricter ones.
"""

import json
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_dino_step_by_step.ipynb", "02_collapse.ipynb", "03_teacher.ipynb"]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run each notebook once in fast mode; return (executed notebook, its results folder)."""
    done = {}

    def run(name):
        if name not in done:
            results = tmp_path_factory.mktemp(name.split("_")[0])
            nb = nbformat.read(NOTEBOOKS / name, as_version=4)
            with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this environment
                mp.setenv("DINO_FAST", "1")
                mp.setenv("DINO_NOTEBOOK_RESULTS", str(results))
                mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
                nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                        resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
            done[name] = nb, results
        return done[name]

    return run


DRAWS = ("plt.subplots", "plot_runs(", "_figure(")  # the notebooks' ways of making a figure


def drawing_cells(nb) -> list:
    """(index, number of figures shown) of every code cell that makes a figure."""
    return [(i, sum("image/png" in out.get("data", {}) for out in cell.get("outputs", [])))
            for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and any(d in cell.source for d in DRAWS)]


def every_figure_shows(nb):
    cells = drawing_cells(nb)
    assert len(cells) >= 3, cells
    assert [i for i, shown in cells if shown == 0] == [], "a cell that draws shows no figure"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, executed):
    nb, _ = executed(name)  # nbclient raises CellExecutionError on the first failing cell
    every_figure_shows(nb)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_shows_its_outputs(name):
    """Notebooks are committed executed, so their figures show on a code-hosting page."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "commit the notebook executed top to bottom"
    assert not any(out.get("output_type") == "error" for c in code for out in c.get("outputs", []))
    every_figure_shows(nb)


def test_collapse_signatures(executed):
    """Paper Figure 7: sharpening alone → h(P_t) ≈ 0, centering alone → h(P_t) ≈ log K, each with
    KL ≈ 0; centering + sharpening keeps h(P_t) between and KL clearly above 0.

    Fast-mode values for seeds 0, 1, 2 (DINO_SEED), 120 steps on the colour shapes: h(P_t)/log K =
    0.000, 0.031, 0.009 without centering (loss 0.007, 0.417, 0.070 nats: in fast mode the one-hot
    target is not always matched yet, so the loss, not the KL, is checked), 0.998, 0.997, 0.998
    without sharpening (KL 0.010, 0.017, 0.007); with both 0.939, 0.930, 0.962 and KL 0.227, 0.276,
    0.155.
    """
    _, results = executed("02_collapse.ipynb")
    s = json.loads((results / "02_collapse.json").read_text())
    both, no_center, no_sharp = (s["(a) centering + sharpening"], s["(b) no centering"],
                                 s["(c) no sharpening"])
    log_K = both["log_K"]
    # one-dimension collapse: entropy near 0, and the loss h + KL with it
    assert no_center["entropy_share"] < 0.10
    assert no_center["loss"] < 0.15 * log_K
    # uniform collapse: entropy near log K, KL near 0, the loss at exactly log K
    assert no_sharp["entropy_share"] > 0.90
    assert no_sharp["kl"] < 0.05
    assert no_sharp["loss"] == pytest.approx(log_K, abs=0.05)
    # both: entropy in between, KL clearly above 0
    assert 0.2 < both["entropy_share"] < 0.975
    assert both["entropy"] < no_sharp["entropy"] - 0.15
    assert both["kl"] > 0.1 and both["kl"] > 3 * no_sharp["kl"]
