"""Runs every example notebook top to bottom, without Jupyter.

Each ``notebooks/*.ipynb`` is read with the standard ``json`` module; its code
cells are joined and executed in a fresh namespace with matplotlib's
non-interactive Agg backend (``plt.show()`` draws nothing), from the
``notebooks/`` directory as Jupyter would. The test then checks a key number
the notebook computed, so a notebook that runs but no longer shows what its
text says fails too.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

# Long (the five executed notebooks take ~3.5 min together on 2 cores): run with -m slow.
pytestmark = pytest.mark.slow

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
_MAGIC = re.compile(r"^\s*[%!]")


def _code(name: str) -> str:
  nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))
  cells = []
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    source = cell["source"]
    source = "".join(source) if isinstance(source, list) else source
    # The notebooks use no IPython magics; drop any line that looks like one.
    cells.append("\n".join(line for line in source.splitlines() if not _MAGIC.match(line)))
  return "\n\n".join(cells)


def _run(name: str) -> dict:
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  namespace = {"__name__": "__main__"}
  cwd = os.getcwd()
  os.chdir(NOTEBOOKS)
  try:
    exec(compile(_code(name), f"{name}.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  finally:
    os.chdir(cwd)
    plt.close("all")
  return namespace


@pytest.fixture(autouse=True)
def _quiet_show(monkeypatch):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(plt, "show", lambda *a, **k: None)


def test_notebooks_match_their_sources():
  """The committed .ipynb files were regenerated after the last edit of make_notebooks.py."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
  make_notebooks = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_notebooks)  # imports nbformat/nbclient only when building
  names = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
  assert names == sorted(make_notebooks.SOURCES)
  for name in names:
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))
    cells = [(c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"])
             for c in nb["cells"]]
    assert cells == make_notebooks.parse_cells(make_notebooks.SOURCES[name]), (
        f"{name}.ipynb is stale: run python notebooks/make_notebooks.py {name}")
    outputs = sum(len(c.get("outputs", [])) for c in nb["cells"])
    assert outputs, f"{name}.ipynb has no outputs: build it without --no-execute"


def test_quickstart_lora():
  ns = _run("01_quickstart_lora")
  results, base = ns["results"], ns["summary"]["base"]["held_out_tempest"]
  for method in ("lora", "dora", "full"):
    assert results[method]["losses"][-1] < results[method]["losses"][0] - 0.2, method
    assert results[method]["tempest"] < base, method
  assert results["lora"]["trainable"] < results["dora"]["trainable"] < results["full"]["trainable"]


def test_qlora():
  ns = _run("02_qlora")
  results, summary = ns["results"], ns["summary"]
  assert 4.0 < summary["bits_per_weight"] < 4.6
  held = summary["held_out_tempest"]
  assert held["qlora"] < held["nf4_base"] - 0.2
  assert abs(held["qlora"] - held["lora"]) < 0.1
  assert results["qlora"]["frozen_bytes"] < 0.6 * results["lora"]["frozen_bytes"]
  gib = summary["llama_7b_base_GiB"]
  assert gib["NF4 + bf16 rest"] < 0.35 * gib["bfloat16"]


def test_galore_lisa():
  ns = _run("03_galore_lisa")
  results, summary = ns["results"], ns["summary"]
  for method in ("adamw", "galore", "lisa"):
    assert results[method]["losses"][-5:].mean() < results[method]["losses"][:5].mean() - 0.2, method
  assert results["galore"]["opt_bytes"] < results["adamw"]["opt_bytes"]
  assert results["lisa"]["opt_bytes"] < results["adamw"]["opt_bytes"]
  assert len(set(summary["lisa_schedule"])) > 1  # LISA switched layers
  gib = summary["llama_7b_optimizer_GiB"]
  assert gib["galore"] < 0.5 * gib["adamw"] and gib["lisa"] < 0.5 * gib["adamw"]


def test_merging_adapters():
  ns = _run("04_merging_adapters")
  table = ns["table"]
  mean = {name: (row["macbeth"] + row["tempest"]) / 2 for name, row in table.items()}
  assert table["macbeth adapter"]["macbeth"] < table["base"]["macbeth"] - 0.2
  assert table["tempest adapter"]["tempest"] < table["base"]["tempest"] - 0.2
  # Averaging the two task vectors gives one model close to each specialist on its play.
  averaged = table["task arithmetic 0.5+0.5"]
  assert averaged["macbeth"] < table["macbeth adapter"]["macbeth"] + 0.05
  assert averaged["tempest"] < table["tempest adapter"]["tempest"] + 0.05
  assert mean["ties_svd (rank 16)"] < mean["base"] - 0.2
  # cat is exact: the same model as task arithmetic with the same weights.
  assert ns["cat_vs_ta"] < 1e-3
  assert abs(mean["cat 0.5+0.5"] - mean["task arithmetic 0.5+0.5"]) < 1e-3


def test_adalora():
  ns = _run("05_adalora")
  summary, config = ns["summary"], ns["config"]
  assert summary["last_objective"] < summary["first_objective"] - 0.2
  assert summary["held_out_tempest"] < summary["base_held_out_tempest"] - 0.2
  assert summary["budget_start"] == config.init_r * 14
  assert summary["budget_end"] <= config.target_r * 14
  assert len(set(summary["final_ranks"].values())) > 1  # the ranks were allocated unevenly
  assert summary["params_resized"] < summary["params_adalora"]
  assert summary["resize_max_logit_diff"] < 1e-3
