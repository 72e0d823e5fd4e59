"""GPU benchmark of the NF4 Pallas kernel against bf16 dense and the XLA path.

    python benchmarks/gpu_nf4.py [--dim 4096] [--sizes 1,16,128,2048] [--reps 20]

On a GPU (or TPU) it times, interleaved, ``x @ W`` in bfloat16 (dense
weight), ``nf4_matmul(impl="pallas")`` and ``nf4_matmul(impl="xla")`` with
bfloat16 compute, checks the kernel against the XLA path, and writes
benchmarks/results/nf4_gpu.json and nf4_gpu.md. Goal: Pallas >= 2.5x faster
than bf16 dense at M <= 16 (the weight is 3.9x fewer bytes).

Without an accelerator it does a dry run: the forward and backward kernels are
lowered for ``cuda`` and ``tpu`` and checked in the Pallas interpreter on a
small shape, then it exits.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from peft_jax.quant import NF4, nf4_matmul, quantize_array, select_impl  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def dry_run(dim: int) -> None:
  w = quantize_array(jax.random.normal(jax.random.key(0), (dim, dim)) * 0.02, NF4())
  x = jax.random.normal(jax.random.key(1), (16, dim), jnp.bfloat16)
  for platform, lowering in (("gpu", "cuda"), ("tpu", "tpu")):
    def step(x, w, platform=platform):
      y, vjp = jax.vjp(lambda x: nf4_matmul(x, w, impl="pallas", platform=platform), x)
      return y, vjp(y)[0]
    jax.jit(step).trace(x, w).lower(lowering_platforms=(lowering,))
    print(f"lowered forward + backward kernels for {lowering} at K=N={dim}")
  small = quantize_array(jax.random.normal(jax.random.key(2), (512, 256)), NF4(compute_dtype=None))
  xs = jax.random.normal(jax.random.key(3), (5, 512))
  a = nf4_matmul(xs, small, impl="pallas_interpret")
  b = nf4_matmul(xs, small, impl="xla")
  print(f"interpreted kernel vs XLA path: max rel err "
        f"{float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))):.2e}")
  print("No GPU/TPU: dry run only.")


def bench(dim: int, sizes: list[int], reps: int) -> dict:
  key = jax.random.key(0)
  dense_w = (jax.random.normal(key, (dim, dim)) * 0.02).astype(jnp.bfloat16)
  w = quantize_array(dense_w, NF4(compute_dtype=jnp.bfloat16))
  dense = jax.jit(lambda x, w: x @ w)
  pallas = jax.jit(lambda x, w: nf4_matmul(x, w, impl="pallas"))
  xla = jax.jit(lambda x, w: nf4_matmul(x, w, impl="xla"))
  out = {"device": str(jax.devices()[0]), "dim": dim, "results": {}}
  for m in sizes:
    x = jax.random.normal(jax.random.fold_in(key, m), (m, dim), jnp.bfloat16)
    impl = select_impl(w, m, "pallas")
    methods = {"dense_bf16": lambda: dense(x, dense_w), "nf4_pallas": lambda: pallas(x, w),
               "nf4_xla": lambda: xla(x, w)}
    for fn in methods.values():
      for _ in range(3):
        fn().block_until_ready()
    err = float(jnp.max(jnp.abs(pallas(x, w).astype(jnp.float32) - xla(x, w).astype(jnp.float32)))
                / jnp.max(jnp.abs(xla(x, w).astype(jnp.float32))))
    times = {name: [] for name in methods}
    for _ in range(reps):
      for name, fn in methods.items():
        start = time.perf_counter()
        fn().block_until_ready()
        times[name].append(time.perf_counter() - start)
    base = statistics.median(times["dense_bf16"])
    out["results"][m] = {
        "impl": impl, "rel_err_pallas_vs_xla": err,
        **{name: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3,
                  "max_ms": max(t) * 1e3, "speedup_vs_dense": base / statistics.median(t)}
           for name, t in times.items()}}
    r = out["results"][m]
    print(f"M={m}: dense {r['dense_bf16']['median_ms']:.3f} ms, pallas "
          f"{r['nf4_pallas']['median_ms']:.3f} ms ({r['nf4_pallas']['speedup_vs_dense']:.2f}x), "
          f"xla {r['nf4_xla']['median_ms']:.3f} ms, err {err:.1e}", flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--sizes", default="1,16,128,2048")
  parser.add_argument("--reps", type=int, default=20)
  args = parser.parse_args()
  if jax.default_backend() not in ("gpu", "tpu"):
    dry_run(args.dim)
    return
  result = bench(args.dim, [int(s) for s in args.sizes.split(",")], args.reps)
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "nf4_gpu.json").write_text(json.dumps(result, indent=1))
  lines = [f"### NF4 Pallas kernel ({result['device']}, K = N = {args.dim}, bf16)", "",
           "| M | dense bf16 ms | Pallas ms | speedup | XLA path ms | rel err |",
           "|---|---|---|---|---|---|"]
  for m, r in result["results"].items():
    lines.append(f"| {m} | {r['dense_bf16']['median_ms']:.3f} | {r['nf4_pallas']['median_ms']:.3f}"
                 f" | {r['nf4_pallas']['speedup_vs_dense']:.2f}x | {r['nf4_xla']['median_ms']:.3f}"
                 f" | {r['rel_err_pallas_vs_xla']:.1e} |")
  (RESULTS / "nf4_gpu.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
