"""benchmarks/gpu_nf4.py runs end to end in its dry run (tiny sizes, Pallas interpreter)."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_nf4.py"


@pytest.mark.slow  # two model compiles and the Pallas interpreter: ~1 min on a quiet 2-core CPU
def test_dry_run_writes_every_part(tmp_path):
  spec = importlib.util.spec_from_file_location("gpu_nf4", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "nf4.json"
  module.main(["--dry-run", "--out", str(out)])
  result = json.loads(out.read_text())
  assert result["dry_run"]
  shapes = {(r["k"], r["n"], r["m"]) for r in result["matmuls"]}
  assert shapes == {(k, n, m) for k, n in module.DRY["shapes"] for m in module.DRY["sizes"]}
  for row in result["matmuls"]:
    assert row["rel_err_pallas_vs_xla"] < 2e-2  # bf16 compute
    assert row["impl"] == "pallas_interpret"
    assert set(row["times"]) == {f"{name}/{phase}" for name in ("dense_bf16", "nf4_pallas", "nf4_xla")
                                 for phase in ("forward", "backward")}
  for method in ("qlora", "lora"):
    assert result["train_steps"][method]["median_ms"] > 0
  assert "Train step" in out.with_suffix(".md").read_text()
  assert module.FULL["sizes"] == [1, 16, 128, 2048]
  assert module.FULL["shapes"] == [(4096, 4096), (4096, 14336), (14336, 4096)]
