"""The matrix products of a SmolLM2 LoRA step: XLA:CPU against torch, one by one.

The LoRA step's time is almost all matrix products (291 of its GFLOP are
the projections and the tied head; attention's scores are ~3%). This script
times exactly those products, float32, 512 rows (batch 4 x 128), in both
directions a frozen-base LoRA step needs (forward `x @ W`, backward
`dy @ W.T`), through `jax.jit(jnp.dot)` and through `torch.mm` in fresh
processes with the same threads, alternating sides per round. It reports
GFLOP/s per product and the product time of one whole 30-layer step (each
product's time x how often the step runs it), so the side-by-side gap of
`bench_peer.py` can be split into "the products are slower" and "the rest".

    python benchmarks/bench_matmul.py [--rounds 3] [--threads 2]

Writes `benchmarks/results/matmul.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_PEER_PYTHON = "/work/refvenv/bin/python"
ROWS = 512
LAYERS = 30
# name: (K, N, products of this shape per layer); the head once per step.
PRODUCTS = {"q/o (576x576)": (576, 576, 2), "k/v (576x192)": (576, 192, 2),
            "gate/up (576x1536)": (576, 1536, 2), "down (1536x576)": (1536, 576, 1),
            "head (576x49152)": (576, 49152, 1 / LAYERS)}


def _time(fn, reps: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def ours_child(reps: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  forward = jax.jit(lambda x, w: x @ w)
  backward = jax.jit(lambda dy, w: dy @ w.T)
  out = {}
  for name, (k, n, _) in PRODUCTS.items():
    x = jnp.asarray(rng.standard_normal((ROWS, k), np.float32))
    dy = jnp.asarray(rng.standard_normal((ROWS, n), np.float32))
    w = jnp.asarray(rng.standard_normal((k, n), np.float32))
    out[name] = {"forward": _time(lambda: forward(x, w).block_until_ready(), reps),
                 "backward": _time(lambda: backward(dy, w).block_until_ready(), reps)}
  return out


def peer_child(reps: int, threads: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  out = {}
  with torch.no_grad():
    for name, (k, n, _) in PRODUCTS.items():
      x, dy = torch.randn(ROWS, k), torch.randn(ROWS, n)
      w = torch.randn(n, k)  # nn.Linear's (out, in) layout: forward x @ w.T, backward dy @ w
      out[name] = {"forward": _time(lambda: torch.mm(x, w.t()), reps),
                   "backward": _time(lambda: torch.mm(dy, w), reps)}
  return out


def _run(python: str, side: str, args) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
  proc = subprocess.run([python, __file__, "--child", side, "--threads", str(args.threads),
                         "--reps", str(args.reps)], capture_output=True, text=True, env=env,
                        timeout=900, check=False)
  if proc.returncode:
    raise SystemExit(f"{side} child failed: {proc.stderr.strip()[-600:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    result = ours_child(args.reps) if args.child == "ours" else peer_child(args.reps, args.threads)
    print(json.dumps(result))
    return
  rounds = []
  for r in range(args.rounds):
    order = ("peer", "ours") if r % 2 else ("ours", "peer")
    load = os.getloadavg()[0]
    pair = {side: _run(sys.executable if side == "ours" else args.peer_python, side, args)
            for side in order}
    pair["load_start"] = load
    rounds.append(pair)
  rows, step = [], {"ours": 0.0, "peer": 0.0}
  for name, (k, n, per_layer) in PRODUCTS.items():
    for direction in ("forward", "backward"):
      t = {side: statistics.median(p[side][name][direction] for p in rounds)
           for side in ("ours", "peer")}
      gflops = {side: 2 * ROWS * k * n / t[side] / 1e9 for side in t}
      for side in t:
        step[side] += t[side] * per_layer * LAYERS
      rows.append([name, direction, f"{gflops['ours']:.1f}", f"{gflops['peer']:.1f}",
                   f"{t['peer'] / t['ours']:.2f}x"])
  sys.path.insert(0, str(HERE))
  import _common as C  # pylint: disable=import-outside-toplevel
  machine = C.machine_info()
  loads = [p["load_start"] for p in rounds]
  text = "\n".join([
      "# The products of a SmolLM2 LoRA step: XLA:CPU vs torch (float32, 512 rows)", "",
      f"{args.rounds} alternating rounds of fresh processes, {args.threads} threads per side, "
      f"median of {args.reps} timed calls each; load average at each round's start "
      f"{min(loads):.2f}-{max(loads):.2f}.", "",
      C.markdown_table(["product", "direction", "ours GFLOP/s", "torch GFLOP/s",
                        "torch time / ours"], rows), "",
      f"One 30-layer frozen-base step's products (forward + input gradient, head included): "
      f"ours {step['ours'] * 1e3:,.0f} ms, torch {step['peer'] * 1e3:,.0f} ms "
      f"(torch / ours {step['peer'] / step['ours']:.2f}x).", "",
      C.machine_line(machine), ""])
  print(text)
  C.write_json(C.RESULTS / "matmul.json", {"machine": machine, "rounds": rounds,
                                            "step_products_s": step, "args": vars(args)})
  (C.RESULTS / "matmul.md").write_text(text)


if __name__ == "__main__":
  main()
