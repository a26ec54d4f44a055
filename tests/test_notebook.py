"""notebooks/inspect_checkpoint.ipynb runs top to bottom on a real checkpoint (and on an export of it)."""

import json
import os
import sys

import pytest

from helpers import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "inspect_checkpoint.ipynb")
KERNEL = "flowlm-test-python"


def test_notebook_is_valid_and_saved_without_outputs():
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  source = "\n".join(c.source for c in code)
  for needle in ("FLOWLM_WORKDIR", "flowlm_jax.load", 'mode=mode', '"llada", "flowlm"', "plot.run_figures"):
    assert needle in source, needle


@pytest.fixture
def kernel_for_this_python(tmp_path, monkeypatch):
  """A kernel spec running this interpreter (the venv's), whatever `python` is on PATH."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "flowlm test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  return KERNEL


def execute(workdir: str, kernel: str, monkeypatch):
  import nbformat
  from nbclient import NotebookClient

  monkeypatch.setenv("FLOWLM_WORKDIR", workdir)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError naming the cell if any cell fails
  text, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.output_type != "error", out
      if out.output_type == "stream":
        text.append(out.text)
      elif "image/png" in out.get("data", {}):
        images += 1
  return "".join(text), images


@pytest.mark.integration
def test_notebook_runs_on_the_reference_checkpoint(reference_run, kernel_for_this_python, monkeypatch, tmp_path):
  text, images = execute(reference_run, kernel_for_this_python, monkeypatch)
  assert "checkpoint step 6" in text
  assert "total parameters: " in text and "wq " in text and "norm" in text
  assert "[llada " in text and "[flowlm" in text
  assert "position " in text and "truth" in text
  assert images == 3, text
  assert "samples.jsonl is empty" in text  # the reference run samples nothing (inference.every_steps = 0)

  from flowlm_jax import export
  out = str(tmp_path / "exported")
  export.export(reference_run, out)
  # A relative FLOWLM_WORKDIR is read from the repository root, not from notebooks/ where the kernel runs.
  text, images = execute(os.path.relpath(out, REPO), kernel_for_this_python, monkeypatch)
  assert "checkpoint step 6" in text and "[flowlm" in text and "no metrics.jsonl" in text and images == 0
