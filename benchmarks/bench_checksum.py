"""Restore-time cost of checkpoint checksums (CRC-32 per array) for a 100 MiB adapter set.

Times, interleaved (see ../shared/BENCHMARKS.md):

* ``restore``: ``peft_jax.checkpoint.restore`` as shipped (arrays checked
  against the manifest's shapes, dtypes and CRC-32);
* ``restore_without_crc``: the same restore with the CRC comparison switched
  off (monkeypatched here only; the library has no such switch);
* ``crc_only``: ``leaves.checksums`` of the restored arrays alone.

Reports ``restore / restore_without_crc - 1`` (goal: <= 5%). Writes
``benchmarks/results/checksum.json`` and ``.md``.

    python benchmarks/bench_checksum.py [--quick]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402  pylint: disable=wrong-import-position

import peft_jax as pj  # noqa: E402
from peft_jax import checkpoint, targeting  # noqa: E402
from peft_jax.checkpoint import leaves as leaves_lib  # noqa: E402


def adapter_set(total_mib: int, dim: int = 4096, rank: int = 64) -> dict:
  """Random float32 LoRA leaves of ``total_mib`` MiB (2 MiB per module at the defaults)."""
  rng = np.random.default_rng(0)
  per_module = 2 * dim * rank * 4
  modules = max(1, total_mib * 2**20 // per_module)
  return {f"layers_{i}": {"proj": {
      "lora_a": rng.standard_normal((dim, rank), np.float32),
      "lora_b": rng.standard_normal((rank, dim), np.float32)}} for i in range(modules)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="10 MiB, 3 reps")
  parser.add_argument("--mib", type=int, default=100)
  parser.add_argument("--reps", type=int, default=25)
  args = parser.parse_args()
  mib, reps = (10, 3) if args.quick else (args.mib, args.reps)
  adapters = adapter_set(mib)
  nbytes = _common.tree_bytes(adapters)
  config = pj.LoRAConfig(rank=64, target_modules=("proj",))
  with tempfile.TemporaryDirectory() as tmp:
    path = checkpoint.save(pathlib.Path(tmp) / "ckpt", adapters, config)
    verify = leaves_lib.verify
    restored = targeting.flatten(checkpoint.restore(path)[0])

    def without_crc():
      leaves_lib.verify = lambda *a: None
      try:
        return checkpoint.restore(path)
      finally:
        leaves_lib.verify = verify

    timings = _common.time_interleaved({
        "restore": lambda: checkpoint.restore(path),
        "restore_without_crc": without_crc,
        "crc_only": lambda: leaves_lib.checksums(restored),
    }, reps=reps)
  overhead = _common.ratio(timings, "restore", "restore_without_crc")
  crc_share = _common.ratio(timings, "crc_only", "restore_without_crc")
  machine = _common.machine_info()
  result = {"benchmark": "checksum", "adapter_bytes": nbytes, "reps": reps,
            "timings": timings, "restore_over_restore_without_crc": overhead,
            "crc_over_restore_without_crc": crc_share, "machine": machine}
  _common.write_json(_common.RESULTS / "checksum.json", result)
  rows = [[name, f"{t['median_s'] * 1e3:.1f} ms", f"{t['min_s'] * 1e3:.1f} ms",
           f"{t['max_s'] * 1e3:.1f} ms"] for name, t in timings.items()]
  md = "\n".join([
      "# Checkpoint checksums: restore-time cost", "",
      f"Adapter set: {_common.mib(nbytes)} of float32 LoRA leaves "
      f"({len(restored)} arrays), {reps} interleaved reps.", "",
      _common.markdown_table(["what", "median", "min", "max"], rows), "",
      f"restore / restore_without_crc = {overhead['ratio']:.3f} (paired median "
      f"{overhead['paired_median']:.3f}); CRC alone / restore_without_crc = "
      f"{crc_share['ratio']:.3f}.", "",
      _common.machine_line(machine), ""])
  (_common.RESULTS / "checksum.md").write_text(md)
  print(md)
  jax.clear_caches()


if __name__ == "__main__":
  main()
