"""AdaLoRA step time and checkpoint size against plain LoRA at the same init rank.

Methods, timed interleaved (A B C A B C ...) on the same model and batch:

* `lora`: LoRA at rank `init_r`, AdamW on the adapters.
* `adalora_no_orth`: AdaLoRA's SVD-form adapters and the rank allocator
  wrapped around the same AdamW, pruning at every step (deltaT = 1, the
  costliest setting), no orthogonal regulariser in the loss.
* `adalora`: the same plus `orth_reg_weight * orthogonal_regularization`, as
  the reference trains.

Then the AdaLoRA run continues to its final phase and the adapters are
resized to their kept ranks: the checkpoint is compared with LoRA's at
`init_r` (and at `target_r`, which has the same total rank).

Writes `benchmarks/results/adalora.json` (every raw number, the machine) and
`benchmarks/results/adalora.md`. Usage::

    python benchmarks/bench_adalora.py              # Llama bench config (~32M), ~2-3 min on 2 cores
    python benchmarks/bench_adalora.py --model tiny # seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import optax

import peft_jax as pj
from peft_jax.lora import adalora as la
from peft_jax.models import llama
from peft_jax.optim import adalora as oa

RESULTS = pathlib.Path(__file__).parent / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def machine_info() -> dict:
  cpu = platform.processor()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "backend": jax.default_backend(),
          "load_average_1_5_15min": list(os.getloadavg()),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def tree_bytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def step_memory(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def make_step(model, config, base, tx, inputs, labels, orth_reg: bool):
  def loss_fn(adapters):
    with pj.intercept(config):
      logits = model.apply({"params": pj.combine(base, adapters)}, inputs)
    loss = llama.causal_lm_loss(logits, labels)
    if orth_reg:
      loss = loss + config.orth_reg_weight * la.orthogonal_regularization(adapters)
    return loss

  def step(adapters, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  return step


def time_optimizer_updates(methods, reps, iters=20):
  """The optimizer update alone (`tx.update` + `apply_updates`), fixed gradients.

  Isolates what the allocator adds to a step from the model's forward and
  backward passes, whose noise dominates the full-step ratio on a shared CPU.
  """
  compiled, state = {}, {}
  for name, (tx, adapters) in methods.items():
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), adapters)

    def update(adapters, opt_state, grads, tx=tx):
      updates, opt_state = tx.update(grads, opt_state, adapters)
      return optax.apply_updates(adapters, updates), opt_state

    opt_state = tx.init(adapters)
    compiled[name] = jax.jit(update, donate_argnums=(0, 1)).lower(
        adapters, opt_state, grads).compile()
    adapters, opt_state = compiled[name](jax.tree.map(jnp.copy, adapters), opt_state, grads)
    state[name] = (adapters, opt_state, grads)
  times = {name: [] for name in methods}
  for _ in range(reps):
    for name in methods:
      adapters, opt_state, grads = state[name]
      t0 = time.perf_counter()
      for _ in range(iters):
        adapters, opt_state = compiled[name](adapters, opt_state, grads)
      jax.block_until_ready((adapters, opt_state))
      times[name].append((time.perf_counter() - t0) / iters)
      state[name] = (adapters, opt_state, grads)
  return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "raw_s": t}
          for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=("bench", "tiny"), default="bench")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--init-r", type=int, default=12)
  parser.add_argument("--target-r", type=int, default=4)
  parser.add_argument("--reps", type=int, default=9, help="interleaved repetitions")
  parser.add_argument("--steps-per-rep", type=int, default=2)
  args = parser.parse_args()

  model_config = (llama.LlamaConfig.bench() if args.model == "bench" else llama.LlamaConfig.tiny())
  model = llama.LlamaForCausalLM(model_config)
  params = llama.init_params(model_config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0,
                              model_config.vocab_size)
  inputs, labels = tokens[:, :-1], tokens[:, 1:]

  timed_steps = 1 + args.reps * args.steps_per_rep  # warm-up included
  tinit, tfinal = 1, 2
  total_step = timed_steps + tfinal + 4  # the timed steps all lie in the budgeting phase
  ada_config = la.AdaLoRAConfig(init_r=args.init_r, target_r=args.target_r, alpha=2.0 * args.init_r,
                                tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=1,
                                target_modules=TARGETS)
  lora_config = pj.LoRAConfig(rank=args.init_r, alpha=2.0 * args.init_r, target_modules=TARGETS)
  lora_target_config = lora_config.replace(rank=args.target_r, alpha=2.0 * args.target_r)

  lora_adapters, lora_base = pj.split(pj.lora_transform(params, lora_config, key=jax.random.key(2)))
  ada_adapters, ada_base = pj.split(la.adalora_transform(params, ada_config, key=jax.random.key(2)))
  lora_target_adapters, _ = pj.split(
      pj.lora_transform(params, lora_target_config, key=jax.random.key(2)))
  inner = optax.adamw(1e-3)
  lora_tx = inner
  ada_tx = oa.adalora(inner, ada_config)

  methods = {
      "lora": (make_step(model, lora_config, lora_base, lora_tx, inputs, labels, False),
               lora_adapters, lora_tx),
      "adalora_no_orth": (make_step(model, ada_config, ada_base, ada_tx, inputs, labels, False),
                          ada_adapters, ada_tx),
      "adalora": (make_step(model, ada_config, ada_base, ada_tx, inputs, labels, True),
                  ada_adapters, ada_tx),
  }
  compiled, state, compile_s, memory, state_bytes, flops = {}, {}, {}, {}, {}, {}
  for name, (step, adapters, tx) in methods.items():
    opt_state = tx.init(adapters)
    t0 = time.perf_counter()
    compiled[name] = jax.jit(step, donate_argnums=(0, 1)).lower(adapters, opt_state).compile()
    compile_s[name] = time.perf_counter() - t0
    memory[name] = step_memory(compiled[name])
    state_bytes[name] = {"adapters": tree_bytes(adapters), "optimizer_state": tree_bytes(opt_state)}
    try:
      flops[name] = float(compiled[name].cost_analysis()["flops"])
    except Exception:  # pylint: disable=broad-except
      flops[name] = None
    copy = jax.tree.map(jnp.copy, (adapters, opt_state))
    adapters_out, opt_out, loss = compiled[name](*copy)  # warm-up step
    jax.block_until_ready(loss)
    state[name] = (adapters_out, opt_out)

  times = {name: [] for name in methods}
  for _ in range(args.reps):
    for name in methods:
      adapters, opt_state = state[name]
      t0 = time.perf_counter()
      for _ in range(args.steps_per_rep):
        adapters, opt_state, loss = compiled[name](adapters, opt_state)
      jax.block_until_ready((adapters, opt_state, loss))
      times[name].append((time.perf_counter() - t0) / args.steps_per_rep)
      state[name] = (adapters, opt_state)

  update_times = time_optimizer_updates(
      {"lora": (lora_tx, state["lora"][0]), "adalora": (ada_tx, state["adalora_no_orth"][0])},
      args.reps)

  # Finish the AdaLoRA run (with the regulariser) through its final phase, then resize.
  adapters, opt_state = state["adalora"]
  while int(opt_state.count) <= ada_config.final_phase_start:
    adapters, opt_state, loss = compiled["adalora"](adapters, opt_state)
  kept = la.kept_ranks(opt_state)
  resized, resized_config = la.resize_adapters(adapters, opt_state, ada_config)

  summary = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
             for name, t in times.items()}
  base_median = summary["lora"]["median_s"]
  for name in summary:
    summary[name]["ratio_to_lora"] = summary[name]["median_s"] / base_median
    summary[name]["ratio_min"] = summary[name]["min_s"] / base_median
    summary[name]["ratio_max"] = summary[name]["max_s"] / base_median
  checkpoint = {
      "lora_init_r_bytes": tree_bytes(lora_adapters),
      "lora_target_r_bytes": tree_bytes(lora_target_adapters),
      "adalora_training_bytes": tree_bytes(ada_adapters),
      "adalora_resized_bytes": tree_bytes(resized),
      "kept_ranks": {k: int(v) for k, v in kept.items()},
      "total_kept_rank": int(sum(kept.values())),
      "target_budget": args.target_r * len(kept),
  }
  checkpoint["resized_over_lora_init_r"] = (checkpoint["adalora_resized_bytes"]
                                            / checkpoint["lora_init_r_bytes"])
  checkpoint["resized_over_lora_target_r"] = (checkpoint["adalora_resized_bytes"]
                                              / checkpoint["lora_target_r_bytes"])
  result = {
      "benchmark": "adalora", "machine": machine_info(),
      "setup": {"model": args.model, "params": llama.count_params(params), "batch": args.batch,
                "seq": args.seq, "init_r": args.init_r, "target_r": args.target_r,
                "targets": TARGETS, "adapted_matrices": len(kept), "optimizer": "adamw(1e-3)",
                "reps": args.reps, "steps_per_rep": args.steps_per_rep, "deltaT": 1,
                "total_step": total_step, "resized_config_rank_pattern": dict(
                    resized_config.rank_pattern)},
      "step_time": summary, "raw_step_times_s": times, "compile_s": compile_s,
      "optimizer_update": update_times,
      "step_memory_bytes": memory, "tree_bytes": state_bytes, "flops": flops,
      "checkpoint": checkpoint,
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "adalora.json").write_text(json.dumps(result, indent=1) + "\n")
  (RESULTS / "adalora.md").write_text(markdown(result) + "\n")
  print(markdown(result))


def markdown(result) -> str:
  s, c, m = result["setup"], result["checkpoint"], result["machine"]
  mib = lambda b: f"{b / 2**20:.2f} MiB" if b is not None else "n/a"
  lines = [
      f"AdaLoRA vs LoRA, Llama `{s['model']}` ({s['params'] / 1e6:.1f}M params), batch "
      f"{s['batch']} x {s['seq']}, {s['adapted_matrices']} adapted matrices, init_r "
      f"{s['init_r']} -> target_r {s['target_r']}, AdamW, allocation every step. "
      f"{m['cpu']} ({m['cpu_count']} cores), jax {m['jax']}, {m['date']}.",
      "",
      "| method | median step | min | max | / LoRA (median, min-max) | FLOPs / LoRA "
      "| step memory | optimizer state |",
      "|---|---|---|---|---|---|---|---|",
  ]
  flops = result["flops"]
  for name, t in result["step_time"].items():
    flop_ratio = (f"{flops[name] / flops['lora']:.4f}" if flops[name] and flops["lora"] else "n/a")
    lines.append(
        f"| {name} | {t['median_s'] * 1e3:.1f} ms | {t['min_s'] * 1e3:.1f} ms | "
        f"{t['max_s'] * 1e3:.1f} ms | {t['ratio_to_lora']:.3f} ({t['ratio_min']:.3f}-"
        f"{t['ratio_max']:.3f}) | {flop_ratio} | {mib(result['step_memory_bytes'][name])} | "
        f"{mib(result['tree_bytes'][name]['optimizer_state'])} |")
  upd, lora_step = result["optimizer_update"], result["step_time"]["lora"]["median_s"]
  extra = upd["adalora"]["median_s"] - upd["lora"]["median_s"]
  lines += [
      "",
      "| optimizer update alone | median | min | max |",
      "|---|---|---|---|",
  ] + [f"| {name} | {u['median_s'] * 1e3:.2f} ms | {u['min_s'] * 1e3:.2f} ms | "
       f"{u['max_s'] * 1e3:.2f} ms |" for name, u in (("AdamW (LoRA)", upd["lora"]),
                                                       ("AdamW + allocator", upd["adalora"]))] + [
      "",
      f"The allocator adds {extra * 1e3:.2f} ms per update (median difference), "
      f"{100 * extra / lora_step:.1f}% of the median LoRA step.",
  ]
  lines += [
      "",
      "| checkpoint | bytes | / LoRA at init_r |",
      "|---|---|---|",
      f"| LoRA, rank {s['init_r']} | {c['lora_init_r_bytes']:,} | 1.000 |",
      f"| AdaLoRA while training (rank {s['init_r']} + E) | {c['adalora_training_bytes']:,} | "
      f"{c['adalora_training_bytes'] / c['lora_init_r_bytes']:.3f} |",
      f"| AdaLoRA resized (total rank {c['total_kept_rank']} = {s['target_r']} x "
      f"{s['adapted_matrices']}) | {c['adalora_resized_bytes']:,} | "
      f"{c['resized_over_lora_init_r']:.3f} |",
      f"| LoRA, rank {s['target_r']} (same total rank) | {c['lora_target_r_bytes']:,} | "
      f"{c['lora_target_r_bytes'] / c['lora_init_r_bytes']:.3f} |",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
