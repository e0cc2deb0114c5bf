"""The analysts' notebooks run top to bottom on a fresh clone: each starts its own local platform
(``sealroom.local_platform``), and is executed here with nbclient in a real IPython kernel running
this interpreter (the project's venv), failing on any error. A few outputs are checked: the
suppressed cells are reported with their rule, the refusal with its details, and the charts drawn."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("cross_bank_risk", "hospital_cohorts")


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def execute(nb: nbformat.NotebookNode, tmp_path: Path) -> nbformat.NotebookNode:
    """Run every cell in a kernel started from this very interpreter, whatever kernels the machine
    has registered elsewhere (a kernelspec written into a private directory, the only one searched)."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    kernels = tmp_path / "kernels"
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    write_kernel_spec(str(kernels / "python3"), overrides={"argv": argv})
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    # One more cell, to prove which interpreter ran the notebook.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable); print(sys.prefix)"))
    client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(cleanup_kc=True)  # shut the kernel down and close its channels, although the km is ours
    assert not km.is_alive()
    assert nb.cells[-1].outputs[0]["text"].split() == [sys.executable, sys.prefix]  # this venv, nothing else
    nb.cells.pop()
    return nb


def outputs(nb: nbformat.NotebookNode) -> str:
    """Every text output of the executed notebook, in order."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o["output_type"] == "stream":
                out.append(o["text"])
            elif o["output_type"] == "error":
                out.append("\n".join(o["traceback"]))
            else:
                out.append(o.get("data", {}).get("text/plain", ""))
                out.append(o.get("data", {}).get("text/html", ""))
    return "\n".join(out)


def images(nb: nbformat.NotebookNode) -> int:
    return sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_are_small_and_without_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert (NOTEBOOKS / f"{name}.ipynb").stat().st_size < 40_000
    # Written for a reader: explanations between the steps, and the platform stopped at the end.
    assert sum(1 for c in nb.cells if c.cell_type == "markdown") >= 8
    assert "sealroom.local_platform(" in code[0].source and code[-1].source.strip() == "platform.stop()"


@pytest.mark.slow
def test_cross_bank_risk_notebook_runs_top_to_bottom(tmp_path):
    nb = execute(read("cross_bank_risk"), tmp_path)
    text = outputs(nb)
    assert "Traceback" not in text
    # The manual approval of bank_c, the released concentration and the suppressed cells with their rules.
    assert "approved by hand by: ['bank_c']" in text
    assert "concentration (HHI)" in text
    # (counted and explained; their keys are not shown: segment and rating declare no public domain)
    assert "corporate" in text and "min_group_size" in text and "dominance" in text
    # The refusal, with the party, dataset, column, rule and suggestion.
    assert "refused:" in text and "party: bank_b" in text and "column: customer_id" in text
    assert "rule: column_role" in text and "suggestion: group by a dimension" in text
    assert "InvalidQueryError" in text
    assert images(nb) == 1
    assert "SIMULATED" in text


@pytest.mark.slow
def test_hospital_cohorts_notebook_runs_top_to_bottom(tmp_path):
    nb = execute(read("hospital_cohorts"), tmp_path)
    text = outputs(nb)
    assert "Traceback" not in text
    # The rare diagnosis is reported as suppressed, by the minimum group size, and never counted.
    suppressed = [
        "".join(o.get("data", {}).get("text/plain", "") for o in c.outputs)
        for c in nb.cells
        if c.cell_type == "code" and "suppressed_frame()" in c.source
    ]
    assert suppressed and all("prion_disease" in s and "min_group_size" in s for s in suppressed)
    for cell in nb.cells:
        if cell.cell_type == "code" and "with_suppressed=True" in cell.source:
            shown = cell.outputs[0]["data"]["text/plain"]
            rare = [line for line in shown.splitlines() if "prion_disease" in line]
            assert rare and all("<NA>" in line for line in rare)
    # The released cohorts and the chart, then the dp cohorts with their intervals in a second chart.
    assert "cardiology" in text and "mean_stay" in text
    assert images(nb) == 2
    # The refused query and its explanation.
    assert "refused:" in text and "cannot be aggregated with SUM" in text
    assert "column_role" in text and "use one of AVG on age" in text
    # dp: explain's cost and error, the intervals, the budget, and the refusal once it is spent.
    assert "expected error" in text and "patients_ci95" in text and "collaboration" in text
    assert "refused - " in text and "epsilon 0 left" in text


def test_notebooks_readme_lists_both_notebooks():
    readme = (NOTEBOOKS / "README.md").read_text()
    for name in NAMES:
        assert f"{name}.ipynb" in readme
