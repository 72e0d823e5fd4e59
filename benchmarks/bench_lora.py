"""LoRA / DoRA against the base model and full fine-tuning (issue 2's performance goals).

On the reference Llama at its benchmark size (`LlamaConfig.bench()`, ~32M
params, float32), batch 4 x 128 by default:

* trainable parameters of LoRA r=8 on q_proj,v_proj and on all-linear (and DoRA);
* forward time: LoRA (r=8, q/v, through the interceptor) and merged over the
  base model (goals <= 1.15x and <= 1.02x), with a plain matmul of the
  model's MLP shape as a FLOP/s reference;
* train step (`peft_jax.training.make_train_step`, AdamW): LoRA over full
  fine-tuning in time (<= 0.8x), in step memory from
  `compiled.memory_analysis()` (<= 0.5x) and in the peak RSS of a fresh
  subprocess per method; DoRA over LoRA in time (<= 1.25x).

Methods are timed interleaved (A B C A B C ...); every figure is a ratio to
its baseline from the same run, with the spread of per-rep ratios. Writes
`benchmarks/results/lora.json` (every raw number and the machine) and
`benchmarks/results/lora.md`. Usage::

    python benchmarks/bench_lora.py            # full settings, ~4-6 min on 2 loaded cores
    python benchmarks/bench_lora.py --quick    # tiny model, seconds; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402  pylint: disable=wrong-import-position

import peft_jax as pj  # noqa: E402
from peft_jax import training  # noqa: E402
from peft_jax.models import llama  # noqa: E402

GOALS = {  # figure -> (goal ratio, what it is over)
    "lora_forward": 1.15,
    "merged_forward": 1.02,
    "lora_step_time": 0.80,
    "lora_step_memory": 0.50,
    "lora_peak_rss": 0.50,
    "dora_step_time": 1.25,
}
STEP_METHODS = ("full", "lora", "dora")
LR = 1e-4


def lora_config(targets=("q_proj", "v_proj"), dora=False) -> pj.LoRAConfig:
  return pj.LoRAConfig(rank=8, alpha=16.0, target_modules=targets, use_dora=dora)


class Setup:
  """Model, params, one batch and the adapted trees, all from fixed keys."""

  def __init__(self, model_name: str, batch: int, seq: int, light_init: bool = False):
    self.model_config = (llama.LlamaConfig.bench() if model_name == "bench"
                         else llama.LlamaConfig.tiny())
    self.model = llama.LlamaForCausalLM(self.model_config)
    if light_init:
      # Leaf by leaf: `init_params` (one jitted `model.init`) peaks at several
      # times the params' size, a peak that would hide the step's own in RSS.
      shapes = jax.eval_shape(functools.partial(llama.init_params, self.model_config),
                              jax.random.key(0))
      leaves, treedef = jax.tree.flatten(shapes)
      keys = jax.random.split(jax.random.key(0), len(leaves))
      self.params = jax.tree.unflatten(treedef, [
          0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])
    else:
      self.params = llama.init_params(self.model_config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0,
                                self.model_config.vocab_size)
    self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]
    self.key = jax.random.key(3)
    self.configs = {"lora": lora_config(), "dora": lora_config(dora=True)}
    self.optimizer = optax.adamw(LR)

  def adapted(self, method: str):
    return pj.lora_transform(self.params, self.configs[method], key=jax.random.key(2))

  def trainable_and_base(self, method: str):
    if method == "full":
      return self.params, {}
    return pj.split(self.adapted(method))

  def compiled_step(self, method: str, model=None):
    """(compiled step, initial state, base) of one training method."""
    trainable, base = self.trainable_and_base(method)
    config = None if method == "full" else self.configs[method]
    step = training.make_train_step(model or self.model, config, self.optimizer)
    state = training.init_train_state(trainable, self.optimizer)
    compiled = step.lower(state, base, self.inputs, self.labels, self.key).compile()
    return compiled, state, base


def rss_child(args) -> None:
  """One method in this fresh process: build, compile, run 3 steps, print peak RSS."""
  setup = Setup(args.model, args.batch, args.seq, light_init=True)
  jax.block_until_ready(setup.params)
  out = {"method": args.rss_child, "rss_after_setup_bytes": C.rss_now()}
  if args.rss_child != "floor":  # floor: the same process without a step (jax, params, batch)
    compiled, state, base = setup.compiled_step(args.rss_child)
    out["rss_after_compile_bytes"] = C.rss_now()
    for _ in range(3):  # the state is donated: no copy of the params is kept
      state, loss = compiled(state, base, setup.inputs, setup.labels, setup.key)
    jax.block_until_ready((state, loss))
    out["step_bytes"] = C.memory_analysis(compiled)["step_bytes"]
    out["rss_after_steps_bytes"] = C.rss_now()
  out["peak_rss_bytes"] = C.peak_rss_self()
  print(json.dumps(out))


def count_trainable(setup: Setup) -> dict:
  base_count = llama.count_params(setup.params)
  counts = {"base_params": base_count}
  for name, config in {"lora_qv": lora_config(), "lora_all_linear": lora_config("all-linear"),
                       "dora_qv": lora_config(dora=True)}.items():
    adapters, _ = pj.split(pj.lora_transform(setup.params, config, key=jax.random.key(2)))
    n = llama.count_params(adapters)
    counts[name] = {"trainable": n, "adapted_matrices": sum(
        1 for p in jax.tree_util.tree_leaves_with_path(adapters) if "lora_a" in str(p[0][-1])),
                    "fraction_of_base": n / base_count, "fraction_of_all": n / (base_count + n)}
  return counts


def bench_forward(setup: Setup, reps: int) -> dict:
  model, cfg = setup.model, setup.configs["lora"]
  adapted = setup.adapted("lora")
  merged = pj.merge(adapted, cfg)
  plain = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def lora_fwd(p, x):
    with pj.intercept(cfg):
      return model.apply({"params": p}, x)

  m = setup.inputs.size
  h, f = setup.model_config.hidden_size, setup.model_config.intermediate_size
  xa = jax.random.normal(jax.random.key(4), (m, h), jnp.float32)
  wb = jax.random.normal(jax.random.key(5), (h, f), jnp.float32)
  cases = {"base": (plain, setup.params), "lora": (jax.jit(lora_fwd), adapted),
           "merged": (plain, merged)}
  compiled, fns, out = {}, {}, {"compile_s": {}, "memory": {}, "flops": {}}
  for name, (fn, p) in cases.items():
    t0 = time.perf_counter()
    compiled[name] = fn.lower(p, setup.inputs).compile()
    out["compile_s"][name] = time.perf_counter() - t0
    out["memory"][name] = C.memory_analysis(compiled[name])
    out["flops"][name] = C.flops(compiled[name])
    fns[name] = (lambda c=compiled[name], p=p: c(p, setup.inputs))
  mm = jax.jit(jnp.matmul).lower(xa, wb).compile()
  out["flops"]["matmul"] = C.flops(mm)
  fns["matmul"] = lambda: mm(xa, wb)
  out["matmul_shape"] = [m, h, f]
  # Merged params run the very same program as the base: check the outputs agree.
  ref = compiled["lora"](adapted, setup.inputs)
  out["merged_same_program_as_base"] = compiled["merged"].as_text() == compiled["base"].as_text()
  out["merged_vs_lora_max_abs_diff"] = float(jnp.max(jnp.abs(
      compiled["merged"](merged, setup.inputs) - ref)))
  out["timing"] = C.time_interleaved(fns, reps=reps, warmup=2)
  out["ratios"] = {"lora": C.ratio(out["timing"], "lora", "base"),
                   "merged": C.ratio(out["timing"], "merged", "base"),
                   "matmul": C.ratio(out["timing"], "matmul", "base")}
  return out


def bench_steps(setup: Setup, reps: int, remat: bool) -> dict:
  out = {"compile_s": {}, "memory": {}, "flops": {}, "tree_bytes": {}}
  fns = {}
  for method in STEP_METHODS:
    t0 = time.perf_counter()
    compiled, state, base = setup.compiled_step(method)
    out["compile_s"][method] = time.perf_counter() - t0
    out["memory"][method] = C.memory_analysis(compiled)
    out["flops"][method] = C.flops(compiled)
    out["tree_bytes"][method] = {"trainable": C.tree_bytes(state.trainable),
                                 "optimizer_state": C.tree_bytes(state.opt_state),
                                 "frozen_base": C.tree_bytes(base)}
    holder = [jax.tree.map(jnp.copy, state)]  # the step donates its state

    def run(c=compiled, holder=holder, base=base):
      holder[0], loss = c(holder[0], base, setup.inputs, setup.labels, setup.key)
      return loss

    fns[method] = run
    del compiled, state
  out["timing"] = C.time_interleaved(fns, reps=reps, warmup=1)
  del fns
  if remat:  # compile only: memory_analysis with gradient checkpointing of each layer
    remat_model = llama.LlamaForCausalLM(dataclasses.replace(setup.model_config, remat=True))
    out["remat_memory"] = {m: C.memory_analysis(setup.compiled_step(m, remat_model)[0])
                           for m in ("full", "lora")}
    rm = {m: v["step_bytes"] for m, v in out["remat_memory"].items()}
    out["remat_memory_ratio_lora_over_full"] = rm["lora"] / rm["full"]
  out["ratios"] = {"lora_over_full": C.ratio(out["timing"], "lora", "full"),
                   "dora_over_lora": C.ratio(out["timing"], "dora", "lora"),
                   "dora_over_full": C.ratio(out["timing"], "dora", "full")}
  mem = {m: out["memory"][m]["step_bytes"] if out["memory"][m] else None for m in STEP_METHODS}
  out["memory_ratios"] = {
      "lora_over_full": mem["lora"] / mem["full"] if mem["full"] else None,
      "dora_over_lora": mem["dora"] / mem["lora"] if mem["lora"] else None}
  return out


def bench_rss(args) -> dict:
  script = str(pathlib.Path(__file__).resolve())
  common = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
  children = {m: C.peak_rss_subprocess([script, "--rss-child", m, *common])
              for m in ("floor", *STEP_METHODS)}
  rss = {m: c["peak_rss_bytes"] for m, c in children.items()}
  floor = rss["floor"]
  return {"children": children,
          "ratios": {"lora_over_full": rss["lora"] / rss["full"],
                     "lora_over_full_above_floor": ((rss["lora"] - floor) / (rss["full"] - floor)
                                         if rss["full"] > floor else None),
                     "dora_over_lora": rss["dora"] / rss["lora"]}}


def _fmt(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def verdict(value: float | None, goal: float, paired_min: float | None = None) -> str:
  """pass / miss of a ratio; a timed miss whose per-rep ratios reach the goal is flagged."""
  if value is None:
    return "n/a"
  if value <= goal:
    return "pass"
  out = f"**miss** (+{(value / goal - 1) * 100:.1f}%)"
  if paired_min is not None and paired_min <= goal:
    out += ", within noise"
  return out


def time_verdict(r: dict, goal: float) -> str:
  return verdict(r["ratio"], goal, r["paired_min"])


def markdown(result: dict) -> str:
  s, m = result["setup"], result["machine"]
  fw, st, rs, tc = result["forward"], result["steps"], result["peak_rss"], result["trainable"]
  spread = lambda r: f"{r['ratio']:.3f} ({r['paired_min']:.3f}-{r['paired_max']:.3f})"
  ft, stt = fw["timing"], st["timing"]
  mem = {k: v["step_bytes"] for k, v in st["memory"].items()}
  rss = {k: v["peak_rss_bytes"] for k, v in rs["children"].items()}
  lines = [
      f"LoRA r=8 (alpha 16) on q_proj,v_proj vs the base model and full fine-tuning. Llama "
      f"`{s['model']}` ({tc['base_params'] / 1e6:.1f}M params, float32), batch {s['batch']} x "
      f"{s['seq']}, AdamW (lr {s['lr']}), {s['reps_forward']} / {s['reps_step']} interleaved "
      f"reps (forward / step). {C.machine_line(m)}",
      "",
      "Ratios: median over median; in brackets the min-max of the per-rep ratios (rep i of "
      "both methods ran back to back).",
      "",
  ]
  rows = [
      ["LoRA forward / base forward", f"{C.ms(ft['lora']['median_s'])} / "
       f"{C.ms(ft['base']['median_s'])}", spread(fw["ratios"]["lora"]), "<= 1.15",
       time_verdict(fw["ratios"]["lora"], GOALS["lora_forward"])],
      ["merged forward / base forward", f"{C.ms(ft['merged']['median_s'])} / "
       f"{C.ms(ft['base']['median_s'])}", spread(fw["ratios"]["merged"]), "<= 1.02",
       time_verdict(fw["ratios"]["merged"], GOALS["merged_forward"])],
      ["LoRA step / full FT step (time)", f"{C.ms(stt['lora']['median_s'])} / "
       f"{C.ms(stt['full']['median_s'])}", spread(st["ratios"]["lora_over_full"]), "<= 0.8",
       time_verdict(st["ratios"]["lora_over_full"], GOALS["lora_step_time"])],
      ["LoRA step / full FT step (memory_analysis)", f"{C.mib(mem['lora'])} / "
       f"{C.mib(mem['full'])}", f"{st['memory_ratios']['lora_over_full']:.3f}", "<= 0.5",
       verdict(st["memory_ratios"]["lora_over_full"], GOALS["lora_step_memory"])],
      ["LoRA / full FT peak RSS (fresh process)", f"{C.mib(rss['lora'])} / {C.mib(rss['full'])}",
       f"{rs['ratios']['lora_over_full']:.3f}", "<= 0.5",
       verdict(rs["ratios"]["lora_over_full"], GOALS["lora_peak_rss"])],
      [f"... above the floor ({C.mib(rss['floor'])}: jax + params + batch, no step)",
       f"{C.mib(rss['lora'] - rss['floor'])} / {C.mib(rss['full'] - rss['floor'])}",
       _fmt(rs["ratios"]["lora_over_full_above_floor"]), "(info)", ""],
      *([["... with remat=True (per-layer gradient checkpointing)",
           f"{C.mib(st['remat_memory']['lora']['step_bytes'])} / "
           f"{C.mib(st['remat_memory']['full']['step_bytes'])}",
           f"{st['remat_memory_ratio_lora_over_full']:.3f}", "(info)",
           verdict(st["remat_memory_ratio_lora_over_full"], GOALS["lora_step_memory"])]]
         if "remat_memory" in st else []),
      ["DoRA step / LoRA step (time)", f"{C.ms(stt['dora']['median_s'])} / "
       f"{C.ms(stt['lora']['median_s'])}", spread(st["ratios"]["dora_over_lora"]), "<= 1.25",
       time_verdict(st["ratios"]["dora_over_lora"], GOALS["dora_step_time"])],
      ["DoRA step / LoRA step (memory_analysis)", f"{C.mib(mem['dora'])} / {C.mib(mem['lora'])}",
       f"{st['memory_ratios']['dora_over_lora']:.3f}", "(info)", ""],
  ]
  lines.append(C.markdown_table(["figure", "value / baseline (median)", "ratio", "goal", "result"],
                                rows))
  lines += ["", C.markdown_table(
      ["adapters (r=8)", "adapted matrices", "trainable params", "% of base", "% of all"],
      [[name.replace("_", " "), c["adapted_matrices"], f"{c['trainable']:,}",
        f"{100 * c['fraction_of_base']:.3f}%", f"{100 * c['fraction_of_all']:.3f}%"]
       for name, c in tc.items() if name != "base_params"])]
  gflops = lambda f, t: "n/a" if f is None else f"{f / 1e9:.2f} GFLOP, {f / t / 1e9:.0f} GFLOP/s"
  detail = [[f"forward {k}", C.ms(ft[k]["median_s"]), C.ms(ft[k]["min_s"]), C.ms(ft[k]["max_s"]),
             gflops(fw["flops"][k], ft[k]["median_s"]),
             C.mib(fw["memory"][k]["step_bytes"]) if fw["memory"].get(k) else "-"]
            for k in ft]
  detail += [[f"step {k}", C.ms(stt[k]["median_s"]), C.ms(stt[k]["min_s"]), C.ms(stt[k]["max_s"]),
              gflops(st["flops"][k], stt[k]["median_s"]), C.mib(mem[k])] for k in stt]
  lines += ["", C.markdown_table(["run", "median", "min", "max", "cost_analysis", "memory_analysis"],
                                 detail)]
  parts = [[f"step {k}", C.mib(v["argument_bytes"]), C.mib(v["temp_bytes"]), C.mib(v["output_bytes"]),
            C.mib(v["alias_bytes"]), C.mib(v["step_bytes"])] for k, v in st["memory"].items()]
  parts += [[f"step {k}, remat", C.mib(v["argument_bytes"]), C.mib(v["temp_bytes"]),
             C.mib(v["output_bytes"]), C.mib(v["alias_bytes"]), C.mib(v["step_bytes"])]
            for k, v in st.get("remat_memory", {}).items()]
  lines += ["", C.markdown_table(["memory_analysis", "arguments", "temporaries", "outputs",
                                  "aliased", "step memory"], parts)]
  mmshape = "x".join(str(d) for d in fw["matmul_shape"])
  lines += ["", f"`matmul` is a plain float32 ({mmshape}) matmul, the model's gate/up shape, "
            "timed in the same interleaved loop as a FLOP/s reference. Merged params run "
            + ("the very same compiled program as the base, so their ratio shows the timing noise."
               if fw.get("merged_same_program_as_base") else "a different program than the base.")]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny model, batch 2 x 32, 3 reps; writes only with --out")
  parser.add_argument("--model", choices=("bench", "tiny"), default=None)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--seq", type=int, default=None)
  parser.add_argument("--reps-forward", type=int, default=None)
  parser.add_argument("--reps-step", type=int, default=None)
  parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
  parser.add_argument("--no-remat", action="store_true",
                      help="skip the memory_analysis of full / LoRA steps with remat=True")
  parser.add_argument("--out", default=None,
                      help="path prefix of the .json/.md (default benchmarks/results/lora)")
  parser.add_argument("--rss-child", choices=("floor", *STEP_METHODS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  defaults = (dict(model="tiny", batch=2, seq=32, reps_forward=3, reps_step=3) if args.quick
              else dict(model="bench", batch=4, seq=128, reps_forward=15, reps_step=9))
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.rss_child:
    rss_child(args)
    return
  out_prefix = (pathlib.Path(args.out) if args.out
                else None if args.quick else C.RESULTS / "lora")

  t_start = time.perf_counter()
  machine = C.machine_info()
  setup = Setup(args.model, args.batch, args.seq)
  result = {"benchmark": "lora", "machine": machine,
            "setup": {"model": args.model, "batch": args.batch, "seq": args.seq,
                      "dtype": "float32", "lora": setup.configs["lora"].to_dict(),
                      "optimizer": f"optax.adamw({LR})", "lr": LR,
                      "reps_forward": args.reps_forward, "reps_step": args.reps_step,
                      "goals": GOALS}}
  result["trainable"] = count_trainable(setup)
  print("timing forward ...", flush=True)
  result["forward"] = bench_forward(setup, args.reps_forward)
  print("timing train steps ...", flush=True)
  result["steps"] = bench_steps(setup, args.reps_step, not args.no_remat)
  del setup
  if not args.no_rss:
    print("peak RSS, one fresh process per method ...", flush=True)
    result["peak_rss"] = bench_rss(args)
  result["parent_peak_rss_bytes"] = C.peak_rss_self()
  result["wall_s"] = time.perf_counter() - t_start
  result["machine"]["load_average_after"] = list(os.getloadavg())
  if args.no_rss:  # the table needs the RSS figures
    print(json.dumps({k: result[k] for k in ("trainable",)}, indent=1))
    print({k: v for k, v in result["forward"]["ratios"].items()},
          result["steps"]["ratios"], result["steps"]["memory_ratios"])
    if out_prefix:
      C.write_json(out_prefix.with_suffix(".json"), result)
    return
  table = markdown(result)
  print(table)
  print(f"\nwall {result['wall_s']:.0f} s")
  if out_prefix:
    C.write_json(out_prefix.with_suffix(".json"), result)
    out_prefix.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out_prefix.with_suffix('.json')} and {out_prefix.with_suffix('.md')}")


if __name__ == "__main__":
  main()
