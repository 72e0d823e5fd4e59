"""The attention core's score layout on XLA:CPU, A/B in one process.

The core of `LlamaAttention` / `Gemma3Attention` after the projections and
the rotary embedding (grouped-query scores, scale, causal mask, softmax,
value product), forward and forward + backward (gradients of q, k, v),
jitted, float32, batch 4 x 128, at SmolLM2-135M's head shapes (9 query heads,
3 key/value heads, head_dim 64) and Gemma 3 270M's (4 / 1 / 256):

* `bgrqk`: scores as (batch, kv head, group, query, key), the layout before;
* `bgqrk`: scores as (batch, kv head, query, group, key), the order the
  query-key product yields (what the models use now);
* `sdpa`: `jax.nn.dot_product_attention(..., is_causal=True,
  implementation="xla")`.

Variants run interleaved (order rotating), 10 calls per rep; the figure is
the median over reps of the per-rep ratio to `bgrqk`, in process CPU time
(robust to a loaded machine) and in wall time.

    python benchmarks/bench_attention_layout.py [--reps 30]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

SHAPES = {"SmolLM2-135M": (9, 3, 64), "Gemma 3 270M": (4, 1, 256)}
BATCH, SEQ = 4, 128


def variants(heads: int, kv_heads: int, head_dim: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  group = heads // kv_heads
  causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))
  low = jnp.finfo(jnp.float32).min

  def grouped(scores_spec, mask, out_spec):
    def attend(q, k, v):
      q = q.reshape(BATCH, SEQ, kv_heads, group, head_dim)
      s = jnp.einsum(f"bqgrd,bkgd->{scores_spec}", q, k) / math.sqrt(head_dim)
      p = jax.nn.softmax(jnp.where(mask, s, low), axis=-1)
      return jnp.einsum(f"{scores_spec},bkgd->{out_spec}", p, v).reshape(BATCH, SEQ, -1)
    return attend

  def sdpa(q, k, v):
    q = q.reshape(BATCH, SEQ, heads, head_dim)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    return out.reshape(BATCH, SEQ, -1)

  return {"bgrqk": grouped("bgrqk", causal[None, None, None], "bqgrd"),
          "bgqrk": grouped("bgqrk", causal[None, None, :, None], "bqgrd"),
          "sdpa": sdpa}


def measure(heads: int, kv_heads: int, head_dim: int, reps: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((BATCH, SEQ, heads * head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((BATCH, SEQ, kv_heads, head_dim)), jnp.float32)
          for _ in range(2))
  cotangent = jnp.asarray(rng.standard_normal((BATCH, SEQ, heads * head_dim)), jnp.float32)
  fns = {}
  for name, f in variants(heads, kv_heads, head_dim).items():
    fns[name] = {"forward": jax.jit(f),
                 "forward+backward": jax.jit(jax.grad(
                     lambda q, k, v, f=f: jnp.sum(f(q, k, v) * cotangent), argnums=(0, 1, 2)))}
  ref_out, ref_grads = fns["bgrqk"]["forward"](q, k, v), fns["bgrqk"]["forward+backward"](q, k, v)
  out = {"numerics": {}, "cpu": {}, "wall": {}}
  for name, pair in fns.items():
    grads = pair["forward+backward"](q, k, v)
    out["numerics"][name] = {
        "out_max_abs_diff": float(jnp.max(jnp.abs(pair["forward"](q, k, v) - ref_out))),
        "grad_max_rel_diff": max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                                 for a, b in zip(grads, ref_grads))}
  names = list(fns)
  for phase in ("forward", "forward+backward"):
    cpu, wall = {n: [] for n in names}, {n: [] for n in names}
    for rep in range(reps):
      for name in names[rep % len(names):] + names[:rep % len(names)]:
        f = fns[name][phase]
        jax.block_until_ready(f(q, k, v))
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(10):
          result = f(q, k, v)
        jax.block_until_ready(result)
        cpu[name].append((time.process_time() - c0) / 10)
        wall[name].append((time.perf_counter() - t0) / 10)
    for kind, times in (("cpu", cpu), ("wall", wall)):
      out[kind][phase] = {"baseline_ms": 1e3 * statistics.median(times["bgrqk"])}
      for name in names:
        paired = [a / b for a, b in zip(times[name], times["bgrqk"])]
        out[kind][phase][name] = {"median": statistics.median(paired), "min": min(paired),
                                  "max": max(paired)}
  return out


def render(results: dict, machine: dict, loads: list) -> str:
  import _common  # pylint: disable=import-outside-toplevel
  lines = ["# Attention score layout on XLA:CPU", "",
           __doc__.split("\n\n")[1].replace("\n", " "), "",
           "Ratio to `bgrqk` (lower is faster), median [min, max] over reps; CPU time, then "
           "wall time. grads: max relative difference of the q, k, v gradients to `bgrqk`.", ""]
  header = ["shapes", "variant", "forward CPU", "forward + backward CPU", "forward wall",
            "forward + backward wall", "grads"]
  rows = []
  for model, r in results.items():
    for name in r["numerics"]:
      cells = [model, f"`{name}`"]
      for kind in ("cpu", "wall"):
        for phase in ("forward", "forward+backward"):
          q = r[kind][phase][name]
          cells.append(f"{q['median']:.3f} [{q['min']:.2f}, {q['max']:.2f}]")
      cells.append(f"{r['numerics'][name]['grad_max_rel_diff']:.1e}")
      rows.append(cells)
  lines.append(_common.markdown_table(header, rows))
  lines += ["", "`bgrqk` per call (CPU ms, forward / forward + backward): " + "; ".join(
      f"{m} {r['cpu']['forward']['baseline_ms']:.1f} / "
      f"{r['cpu']['forward+backward']['baseline_ms']:.1f}" for m, r in results.items()),
            f"Load average during the run: {min(loads):.1f}-{max(loads):.1f}.", "",
            _common.machine_line(machine)]
  return "\n".join(lines) + "\n"


def main() -> None:
  import os  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--out", default="attention_layout")
  args = parser.parse_args()
  import _common  # pylint: disable=import-outside-toplevel
  results, loads = {}, [os.getloadavg()[0]]
  for model, shape in SHAPES.items():
    results[model] = measure(*shape, args.reps)
    loads.append(os.getloadavg()[0])
  machine = _common.machine_info()
  text = render(results, machine, loads)
  print(text)
  _common.write_json(_common.RESULTS / f"{args.out}.json",
                     {"results": results, "loads": loads, "machine": machine})
  (_common.RESULTS / f"{args.out}.md").write_text(text)


if __name__ == "__main__":
  sys.exit(main())
