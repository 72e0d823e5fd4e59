"""XLA:CPU back-end options for the whole SmolLM2 train step, A/B in one process.

Lowers the step a library user gets (`make_train_step` on
`LlamaForCausalLM(LlamaConfig.smollm2_135m(num_hidden_layers=L))`, unrolled,
float32, batch 4 x 128, AdamW; LoRA q_proj,v_proj r=8 / full fine-tuning /
QLoRA NF4) once per method and compiles it once per variant of XLA:CPU debug
options (`lowered.compile(compiler_options)`: per program, no XLA_FLAGS).
Each variant first runs one step from the same state; its loss and its
gradients (AdamW's first moment after one step is 0.1 x the gradient) are
compared with the baseline's. Then the variants run interleaved, the order
rotating every rep, passing the donated state along; the figure per variant
is the median over reps of (variant step time / baseline step time of the
same rep).

    python benchmarks/bench_xla_cpu.py [--methods lora,full,qlora] [--layers 30]
        [--reps 5] [--variants default,onednn_dot,...] [--out NAME]

Writes `benchmarks/results/<out>.{json,md}` (default `xla_cpu`). The machine
is shared: the load average is recorded at each rep.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

_DOT = "LIBRARY_FUSION_TYPE_DOT"
_ELTWISE = "LIBRARY_FUSION_TYPE_ELTWISE"
_REDUCE = "LIBRARY_FUSION_TYPE_REDUCE"
_YNN = "xla_cpu_experimental_ynn_fusion_type"

# The baseline is jaxlib 0.10.2's default: YNNPACK fusions for dots,
# elementwise ops, reductions and transposes. Not listed: oneDNN fusions
# (xla_cpu_use_onednn=True, xla_cpu_experimental_onednn_fusion_type=
# LIBRARY_FUSION_TYPE_DOT) kill the process on this step (oneDNN prints
# "partition compile failed", then SIGILL) as soon as two batched dots chain
# (attention's scores and values).
VARIANTS = {
    "default": {},
    "no_ynn": {_YNN: ""},  # Eigen dots, XLA's own loop fusions
    "ynn_dot": {_YNN: _DOT},  # YNNPACK dots only
    "ynn_dot_eltwise": {_YNN: f"{_DOT},{_ELTWISE}"},
    "ynn_dot_reduce": {_YNN: f"{_DOT},{_REDUCE}"},
    "ynn_dot_eltwise_reduce": {_YNN: f"{_DOT},{_ELTWISE},{_REDUCE}"},
    "concurrency_scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
    "xnn_graph_greedy": {"xla_cpu_experimental_xnn_graph_fusion_mode":
                         "XNN_GRAPH_FUSION_MODE_GREEDY"},
}


NOTES = """\
Read with: `xnn_graph_greedy` compiles to the same optimized HLO as `default`
(checked with `compiled.as_text()`), so its ratio is the noise of the run.
Not in the table: oneDNN fusions (`xla_cpu_use_onednn=True`,
`xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT`, with or
without YNNPACK) kill the process on this step: oneDNN prints "partition
compile failed" and the process dies of SIGILL once two batched dots chain
(attention's scores then values), on this AMD EPYC (AVX2, no AVX-512).
`xla_cpu_use_onednn` / `xla_cpu_use_xnnpack` alone,
`xla_cpu_experimental_xnn_fusion_type`, `xla_cpu_experimental_onednn_custom_call`
and `xla_cpu_enable_concurrency_optimized_scheduler` leave the optimized HLO
unchanged (the dots are already in YNNPACK fusions)."""


def _grads(state):
  """The gradients after one AdamW step from zero moments (mu = 0.1 g)."""
  import jax  # pylint: disable=import-outside-toplevel
  mu = state.opt_state[0].mu
  return [x / 0.1 for x in jax.tree.leaves(mu)]


def compare(method: str, layers: int, variants: list[str], reps: int,
            compile_only: bool = False) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import profile_step  # pylint: disable=import-outside-toplevel
  lowered, state, base, inputs, labels = profile_step.lower(method, layers, 4, 128)
  compiled, compile_s = {}, {}
  for name in variants:
    t0 = time.process_time()
    compiled[name] = lowered.compile(VARIANTS[name])
    compile_s[name] = time.process_time() - t0
  out = {"method": method, "layers": layers, "compile_cpu_s": compile_s, "numerics": {}}
  if compile_only:
    return out
  key = jax.random.key(0)
  ref = None
  for name in variants:  # one step from the same state: loss and gradients
    fresh = jax.tree.map(jnp.copy, state)
    new, loss = compiled[name](fresh, base, inputs, labels, key)
    grads = _grads(new)
    if ref is None:
      ref = (float(loss), grads)
      scale = max(float(jnp.max(jnp.abs(r))) for r in ref[1])
    rel = max(float(jnp.max(jnp.abs(g - r))) for g, r in zip(grads, ref[1])) / scale
    out["numerics"][name] = {"loss": float(loss), "loss_diff": abs(float(loss) - ref[0]),
                             "grad_max_rel_diff": rel}
    del new, grads
  times = {name: [] for name in variants}
  cpu = {name: [] for name in variants}
  loads = []
  for _ in range(1):  # warm-up of every variant
    for name in variants:
      state, loss = compiled[name](state, base, inputs, labels, key)
      jax.block_until_ready(loss)
  for rep in range(reps):
    order = variants[rep % len(variants):] + variants[:rep % len(variants)]
    for name in order:
      t0, c0 = time.perf_counter(), time.process_time()
      state, loss = compiled[name](state, base, inputs, labels, key)
      jax.block_until_ready(loss)
      times[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
    loads.append(os.getloadavg()[0])
    print(f"{method} rep {rep}: " + " ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items())
          + f" load {loads[-1]:.1f}", flush=True)
  out.update(times_s=times, cpu_s=cpu, loads=loads, ratios={}, cpu_ratios={},
             baseline_median_s=statistics.median(times[variants[0]]),
             baseline_cpu_s=statistics.median(cpu[variants[0]]))
  for name in variants:
    out["ratios"][name] = _paired(times[name], times[variants[0]])
    out["cpu_ratios"][name] = _paired(cpu[name], cpu[variants[0]])
  del np
  return out


def _paired(values, baseline) -> dict:
  paired = [a / b for a, b in zip(values, baseline)]
  return {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}


def render(results: list[dict], variants: list[str], machine: dict) -> str:
  import _common  # pylint: disable=import-outside-toplevel
  lines = ["# XLA:CPU back-end options for the whole train step", "",
           "Step time of each variant over the baseline (jaxlib's default options) in the "
           "same rep, median [min, max] over reps; variants interleaved in one process, order "
           "rotating. Lower is faster. Per cell: the process CPU time ratio (the work, "
           "robust to a loaded machine), then the wall-time ratio. "
           "`python benchmarks/bench_xla_cpu.py`.", ""]
  header = ["variant", "options"] + [f"{r['method']} ({r['layers']} layers)" for r in results]
  rows = []
  for name in variants:
    cells = [f"`{name}`", ", ".join(f"{k.replace('xla_cpu_', '')}={v!r}"
                                    for k, v in VARIANTS[name].items()) or "(none)"]
    for r in results:
      q, c = r.get("ratios", {}).get(name), r.get("cpu_ratios", {}).get(name)
      n = r["numerics"].get(name, {})
      cell = "n/a" if q is None else (f"CPU {c['median']:.3f} [{c['min']:.2f}, {c['max']:.2f}], "
                                      f"wall {q['median']:.3f} [{q['min']:.2f}, {q['max']:.2f}]")
      if n:
        cell += f"; grads {n['grad_max_rel_diff']:.1e}"
      cells.append(cell)
    rows.append(cells)
  lines.append(_common.markdown_table(header, rows))
  lines.append("")
  for r in results:
    if "loads" in r:
      lines.append(f"{r['method']}: baseline step {r['baseline_median_s']:.2f} s wall, "
                   f"{r['baseline_cpu_s']:.2f} s CPU (medians), "
                   f"{len(r['loads'])} reps, load average {min(r['loads']):.1f}-"
                   f"{max(r['loads']):.1f}; compile CPU s: "
                   + ", ".join(f"{k} {v:.0f}" for k, v in r["compile_cpu_s"].items()) + ".")
  lines += ["", "grads: max |g - g_default| / max |g_default| over all trained arrays after "
            "one step from the same state.", "", NOTES, "", _common.machine_line(machine)]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", default="lora,full,qlora")
  parser.add_argument("--layers", type=int, default=30)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--out", default="xla_cpu")
  args = parser.parse_args()
  import _common  # pylint: disable=import-outside-toplevel
  variants = args.variants.split(",")
  results = []
  for method in args.methods.split(","):
    results.append(compare(method, args.layers, variants, args.reps))
    print(render(results, variants, _common.machine_info()), flush=True)
  machine = _common.machine_info()
  _common.write_json(_common.RESULTS / f"{args.out}.json",
                     {"results": results, "variants": {v: VARIANTS[v] for v in variants},
                      "machine": machine})
  (_common.RESULTS / f"{args.out}.md").write_text(render(results, variants, machine))


if __name__ == "__main__":
  sys.exit(main())
