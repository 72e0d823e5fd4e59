"""NF4 benchmark (CPU): bits per parameter and nf4_matmul vs dense and bitsandbytes.

Writes benchmarks/results/nf4.json (every raw time) and nf4.md (the table).

    python benchmarks/bench_nf4.py [--reps 7] [--sizes 1,16,512] [--dim 4096]

Methods are interleaved (A B C A B C ...) after a warm-up; each is reported as
median (min-max) and as a ratio to the dense float32 product of the same run.
bitsandbytes' CPU ``matmul_4bit`` runs in a torch subprocess (2 threads) when
the reference virtualenv exists (``$BNB_PYTHON``, default
/work/refvenv/bin/python).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from peft_jax.quant import NF4, nf4_matmul, quantize_array  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"

BNB_SCRIPT = r"""
import json, sys, time, statistics, torch
import bitsandbytes as bnb, bitsandbytes.functional as F
torch.set_num_threads(2)
dim, sizes, reps = int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
torch.manual_seed(0)
w = torch.randn(dim, dim) * 0.02
packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
out = {}
for m in sizes:
    x = torch.randn(m, dim)
    for _ in range(2):
        bnb.matmul_4bit(x, packed.t(), quant_state=state)
    times = []
    for _ in range(reps):
        t = time.perf_counter(); bnb.matmul_4bit(x, packed.t(), quant_state=state)
        times.append(time.perf_counter() - t)
    out[m] = times
print(json.dumps({"torch": torch.__version__, "bitsandbytes": bnb.__version__, "times": out}))
"""


def summarize(times: list[float]) -> dict:
  return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
          "max_ms": max(times) * 1e3, "raw_s": times}


def machine() -> dict:
  cpu = platform.processor()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  import flax
  import optax
  return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "backend": jax.default_backend(),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "load_average": os.getloadavg()}


def bits_per_param(dim: int) -> dict:
  x = jax.random.normal(jax.random.key(0), (dim, dim))
  out = {}
  for double_quant in (True, False):
    w = quantize_array(x, NF4(double_quant=double_quant))
    out["double_quant" if double_quant else "plain"] = {
        "bits_per_param": w.bits_per_param, "bytes": w.nbytes,
        "ratio_to_float32": w.nbytes / (x.size * 4)}
  return out


def time_matmuls(dim: int, sizes: list[int], reps: int) -> dict:
  key = jax.random.key(1)
  dense_w = jax.random.normal(key, (dim, dim)) * 0.02
  w = quantize_array(dense_w, NF4(compute_dtype=jnp.float32))
  dense = jax.jit(lambda x, w: x @ w)
  xla = jax.jit(lambda x, w: nf4_matmul(x, w, impl="xla"))
  full = jax.jit(lambda x, w: nf4_matmul(x, w, impl="reference"))
  results = {}
  for m in sizes:
    x = jax.random.normal(jax.random.fold_in(key, m), (m, dim))
    methods = {"dense_f32": lambda: dense(x, dense_w), "nf4_xla": lambda: xla(x, w),
               "nf4_dequantize_then_dot": lambda: full(x, w)}
    for fn in methods.values():
      fn().block_until_ready()
      fn().block_until_ready()
    flops = jax.jit(lambda x, w: x @ w).lower(x, dense_w).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops", 2.0 * m * dim * dim)
    times = {name: [] for name in methods}
    for _ in range(reps):
      for name, fn in methods.items():
        start = time.perf_counter()
        fn().block_until_ready()
        times[name].append(time.perf_counter() - start)
    base = statistics.median(times["dense_f32"])
    results[m] = {name: {**summarize(t), "ratio_to_dense": statistics.median(t) / base,
                         "gflops": flops / statistics.median(t) / 1e9}
                  for name, t in times.items()}
    err = float(jnp.max(jnp.abs(xla(x, w) - x @ w.dequantize())))
    results[m]["nf4_xla"]["max_abs_err_vs_dequantized_dense"] = err
    print(f"M={m}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in results[m].items()),
          flush=True)
  return results


def time_bitsandbytes(dim: int, sizes: list[int], reps: int) -> dict | None:
  python = os.environ.get("BNB_PYTHON", "/work/refvenv/bin/python")
  if not os.path.exists(python):
    return None
  proc = subprocess.run([python, "-c", BNB_SCRIPT, str(dim), ",".join(map(str, sizes)),
                         str(reps)], capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    return {"error": proc.stderr[-2000:]}
  raw = json.loads(proc.stdout.strip().splitlines()[-1])
  return {"torch": raw["torch"], "bitsandbytes": raw["bitsandbytes"],
          "times": {int(m): summarize(t) for m, t in raw["times"].items()}}


def markdown(result: dict) -> str:
  mach = result["machine"]
  lines = [f"### NF4 (CPU: {mach['cpu']}, {mach['cores']} cores, jax {mach['jax']}, "
           f"{mach['date']}, load avg {mach['load_average'][0]:.1f})", "",
           "| quantization | bits/param | bytes vs float32 |", "|---|---|---|"]
  for name, b in result["bits_per_param"].items():
    lines.append(f"| NF4 {name.replace('_', ' ')} | {b['bits_per_param']:.3f} | "
                 f"{b['ratio_to_float32']:.4f}x |")
  dim = result["dim"]
  lines += ["", f"`nf4_matmul` (XLA path, float32 compute), K = N = {dim}; median (min-max) ms "
            "over interleaved repetitions; ratio to the dense float32 matmul of the same run.",
            "", "| M | dense f32 | nf4 XLA path | ratio | dequantize-then-dot | ratio | "
            "bitsandbytes matmul_4bit | nf4 XLA vs bnb |", "|---|---|---|---|---|---|---|---|"]
  bnb = result.get("bitsandbytes") or {}
  for m, r in result["matmul"].items():
    cell = lambda v: f"{v['median_ms']:.2f} ({v['min_ms']:.2f}-{v['max_ms']:.2f})"
    b = (bnb.get("times") or {}).get(m) or (bnb.get("times") or {}).get(int(m))
    bcell = cell(b) if b else "n/a"
    speedup = f"{b['median_ms'] / r['nf4_xla']['median_ms']:.1f}x faster" if b else "n/a"
    lines.append(f"| {m} | {cell(r['dense_f32'])} | {cell(r['nf4_xla'])} | "
                 f"{r['nf4_xla']['ratio_to_dense']:.2f}x | {cell(r['nf4_dequantize_then_dot'])} | "
                 f"{r['nf4_dequantize_then_dot']['ratio_to_dense']:.2f}x | {bcell} | {speedup} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--sizes", default="1,16,512")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--no-bnb", action="store_true")
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  result = {"machine": machine(), "dim": args.dim,
            "bits_per_param": bits_per_param(args.dim),
            "matmul": time_matmuls(args.dim, sizes, args.reps)}
  bnb_sizes = [m for m in sizes if m <= 16]
  result["bitsandbytes"] = (None if args.no_bnb or not bnb_sizes
                            else time_bitsandbytes(args.dim, bnb_sizes, args.reps))
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "nf4.json").write_text(json.dumps(result, indent=1, default=str))
  (RESULTS / "nf4.md").write_text(markdown(json.loads(json.dumps(result, default=str))))
  print(markdown(json.loads(json.dumps(result, default=str))))


if __name__ == "__main__":
  main()
