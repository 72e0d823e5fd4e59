"""The tied LM head + cross-entropy alone: ours (`linear_cross_entropy`) vs PyTorch.

Shapes of a 4 x 128 float32 batch through each model's tied head: Gemma 3
270M (vocabulary 262,144, hidden 640; its config has no final softcapping,
`--softcap` adds one) and SmolLM2-135M (49,152 x 576). Per model and side,
three units of work on the same numbers (NumPy seed 0, the same file-free
recipe on both sides):

* `loss`: the mean cross-entropy alone (ours jitted; torch under `no_grad`);
* `dh`: loss and its gradient w.r.t. the hidden states (a LoRA step: the
  head frozen); ours `jax.jit(jax.value_and_grad(...))`, torch
  `F.linear(h, emb)` -> softcap -> `F.cross_entropy` -> `.backward()`;
* `dh_dw`: also the gradient w.r.t. the head (full fine-tuning, or the
  embedding in `modules_to_save`).

Each (side, model) is a fresh process with the same threads (`--threads`:
XLA's pool is the machine's 2 cores; torch `set_num_threads`); each round
runs every side back to back, alternating the order; inside a child the
three units are interleaved, one warm-up each, and both wall time and the
process's CPU time (`time.process_time`) are taken, with the load average
before and after. `--before DIR` adds a side that imports `peft_jax` from
DIR (an older tree) for before/after figures. Ours also reports the
compiled program's scratch (`memory_analysis().temp_size_in_bytes`).
`--step-memory` instead compiles (does not run) the whole Gemma 3 270M LoRA
step (q,v r=8, `gemma3_lm_loss`) for ours and `--before`, and reports its
compiled memory. Writes `benchmarks/results/head.{json,md}` (not with
`--quick`)::

    python benchmarks/bench_head.py [--rounds 2] [--reps 3] [--before DIR] [--quick]
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
MODELS = {"gemma3-270m": (262144, 640), "smollm2-135m": (49152, 576)}
TOKENS = 512
UNITS = ("loss", "dh", "dh_dw")
CHILD_TIMEOUT_S = 1800


def make_inputs(vocab: int, hidden: int):
  """The same hidden states, tied embedding and labels on both sides (NumPy, seed 0)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  h = rng.standard_normal((TOKENS, hidden), dtype=np.float32)
  w = (rng.standard_normal((vocab, hidden), dtype=np.float32) * np.float32(0.05))
  y = rng.integers(0, vocab, (TOKENS,)).astype(np.int32)
  return h, w, y


def _time_units(units: dict, reps: int, block) -> dict:
  """One warm-up each, then ``reps`` interleaved rounds; wall and CPU seconds per unit."""
  first = {name: float(block(fn())) for name, fn in units.items()}
  raw = {name: {"wall_s": [], "cpu_s": []} for name in units}
  for _ in range(reps):
    for name, fn in units.items():
      t0, c0 = time.perf_counter(), time.process_time()
      block(fn())
      raw[name]["wall_s"].append(time.perf_counter() - t0)
      raw[name]["cpu_s"].append(time.process_time() - c0)
  return {name: {"loss": first[name], **raw[name]} for name in units}


def ours_child(args) -> dict:
  if args.tree:
    sys.path.insert(0, args.tree)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from peft_jax.models import fused_ce  # pylint: disable=import-outside-toplevel
  from peft_jax.models import gemma3_loss  # pylint: disable=import-outside-toplevel
  assert fused_ce.__file__.startswith(args.tree or str(HERE.parent)), fused_ce.__file__
  load_before = os.getloadavg()[0]
  vocab, hidden = MODELS[args.model]
  h, w, y = (jnp.asarray(x) for x in make_inputs(vocab, hidden))
  # The chunking our training losses use for this model (gemma3_lm_loss / training.lm_loss).
  chunk = gemma3_loss.GEMMA3_CHUNK_TOKENS if args.model.startswith("gemma") else (
      fused_ce.DEFAULT_CHUNK_TOKENS)

  def loss(h, w):
    return fused_ce.linear_cross_entropy(h, w, y, vocab_axis=0, chunk_tokens=chunk,
                                         softcap=args.softcap)

  fns = {"loss": jax.jit(loss), "dh": jax.jit(jax.value_and_grad(loss)),
         "dh_dw": jax.jit(jax.value_and_grad(loss, (0, 1)))}
  temp = {name: fn.lower(h, w).compile().memory_analysis().temp_size_in_bytes
          for name, fn in fns.items()}
  units = {name: (lambda fn=fn: fn(h, w)) for name, fn in fns.items()}

  def block(out):  # waits for everything; returns the loss
    out = jax.block_until_ready(out)
    return out[0] if isinstance(out, tuple) else out

  result = _time_units(units, args.reps, block)
  for name in result:
    result[name]["temp_bytes"] = int(temp[name])
  return {"units": result, "load_before": load_before, "load_after": os.getloadavg()[0],
          "chunk_tokens": chunk, "chunk_vocab": getattr(fused_ce, "DEFAULT_CHUNK_VOCAB", None),
          "jax": jax.__version__}


def torch_child(args) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  load_before = os.getloadavg()[0]
  vocab, hidden = MODELS[args.model]
  h0, w0, y0 = (torch.from_numpy(x) for x in make_inputs(vocab, hidden))
  y0 = y0.long()

  def loss(h, w):
    logits = F.linear(h, w)
    if args.softcap is not None:
      logits = torch.tanh(logits / args.softcap) * args.softcap
    return F.cross_entropy(logits, y0)

  def loss_only():
    with torch.no_grad():
      return loss(h0, w0)

  def grads(wrt_w):
    h = h0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True) if wrt_w else w0
    out = loss(h, w)
    out.backward()
    return out.detach()

  units = {"loss": loss_only, "dh": lambda: grads(False), "dh_dw": lambda: grads(True)}
  result = _time_units(units, args.reps, lambda out: out.item())
  return {"units": result, "load_before": load_before, "load_after": os.getloadavg()[0],
          "torch": torch.__version__, "threads": torch.get_num_threads()}


def step_memory_child(args) -> dict:
  """Compiled memory of the Gemma 3 270M LoRA step (q,v r=8), abstract weights: nothing runs."""
  if args.tree:
    sys.path.insert(0, args.tree)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax.models import gemma3_lm_loss  # pylint: disable=import-outside-toplevel
  from peft_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM  # pylint: disable=import-outside-toplevel

  def build():
    model = Gemma3ForCausalLM(Gemma3Config.gemma3_270m(), rngs=nnx.Rngs(0))
    pj.nnx.lora_transform(model, pj.LoRAConfig(rank=8, alpha=16.0,
                                               target_modules=("q_proj", "v_proj")),
                          key=jax.random.key(0))
    return model

  model = nnx.eval_shape(build)
  graphdef, adapters, rest = nnx.split(model, pj.nnx.Adapter, ...)
  ids = jax.ShapeDtypeStruct((4, 128), jnp.int32)
  diff = nnx.DiffState(0, pj.nnx.Adapter)

  def step(adapters, rest, inputs, labels):
    loss_fn = lambda m: gemma3_lm_loss(m, inputs, labels)
    return nnx.value_and_grad(loss_fn, argnums=diff)(nnx.merge(graphdef, adapters, rest))

  m = jax.jit(step).lower(adapters, rest, ids, ids).compile().memory_analysis()
  return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes)}


def _child_env(threads: int) -> dict:
  return dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
              MKL_NUM_THREADS=str(threads))


def _run(python, side, model, args, tree=None) -> dict:
  cmd = [python, __file__, "--child", side, "--model", model, "--reps", str(args.reps),
         "--threads", str(args.threads)]
  if args.softcap is not None:
    cmd += ["--softcap", str(args.softcap)]
  if tree:
    cmd += ["--tree", tree]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(args.threads),
                          timeout=CHILD_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
  if proc.returncode:
    return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][-400:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict], sides: list[str]) -> dict:
  """Per model, unit and side: medians of wall and CPU time; ratios to torch per round."""
  out = {}
  for model in {m for r in rounds for m in r}:
    per = out.setdefault(model, {})
    for unit in UNITS:
      row = per.setdefault(unit, {})
      for side in sides:
        runs = [r[model][side] for r in rounds if "units" in r[model].get(side, {})]
        if not runs:
          continue
        med = lambda key, runs=runs: statistics.median(
            statistics.median(x["units"][unit][key]) for x in runs)
        row[side] = {"wall_s": med("wall_s"), "cpu_s": med("cpu_s"),
                     "loss": runs[0]["units"][unit]["loss"],
                     "temp_bytes": runs[0]["units"][unit].get("temp_bytes"),
                     "load": [x["load_before"] for x in runs] + [x["load_after"] for x in runs]}
      for side in sides:
        if side == "torch" or side not in row or "torch" not in row:
          continue
        for key in ("wall_s", "cpu_s"):  # torch's time over ours, round by round
          paired = [statistics.median(r[model]["torch"]["units"][unit][key])
                    / statistics.median(r[model][side]["units"][unit][key]) for r in rounds
                    if "units" in r[model].get(side, {}) and "units" in r[model].get("torch", {})]
          row[side][f"speedup_{key}"] = [statistics.median(paired), min(paired), max(paired)]
  return out


def markdown(summary: dict, sides: list[str], args, step_memory: dict) -> str:
  lines = [f"Head + cross-entropy, {TOKENS} tokens float32, tied head, softcap "
           f"{args.softcap}; {args.rounds} round(s) of fresh alternating processes, {args.reps} "
           f"timed reps per unit, {args.threads} threads. Speedup = torch's time / ours (> 1: ours "
           "faster), median [min, max] over rounds; times are medians.", ""]
  header = ["model", "unit", "side", "wall", "CPU", "speedup (wall)", "speedup (CPU)", "loss",
            "scratch", "load"]
  rows = []
  for model, per in sorted(summary.items()):
    for unit in UNITS:
      for side in sides:
        x = per[unit].get(side)
        if x is None:
          continue
        span = lambda s: "" if s is None else f"{s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}]"
        rows.append([model, unit, side, f"{x['wall_s'] * 1e3:,.0f} ms", f"{x['cpu_s'] * 1e3:,.0f} ms",
                     span(x.get("speedup_wall_s")), span(x.get("speedup_cpu_s")),
                     f"{x['loss']:.6f}",
                     "" if x["temp_bytes"] is None else f"{x['temp_bytes'] / 2**20:,.1f} MiB",
                     f"{min(x['load']):.1f}-{max(x['load']):.1f}"])
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  if step_memory:
    lines += ["", "Gemma 3 270M LoRA step (q,v r=8, 4 x 128, `gemma3_lm_loss`), compiled:", "",
              "| side | scratch | arguments | outputs |", "|---|---|---|---|"]
    for side, m in step_memory.items():
      lines.append(f"| {side} | {m['temp_bytes'] / 2**20:,.1f} MiB | "
                   f"{m['argument_bytes'] / 2**20:,.1f} MiB | {m['output_bytes'] / 2**20:,.1f} MiB |"
                   if "temp_bytes" in m else f"| {side} | {m.get('error')} | | |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--softcap", type=float, default=None)
  parser.add_argument("--before", default=None, help="a tree whose peft_jax is the 'before' side")
  parser.add_argument("--step-memory", action="store_true")
  parser.add_argument("--quick", action="store_true", help="one round, one rep, writes nothing")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--tree", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child = {"ours": ours_child, "torch": torch_child, "step_memory": step_memory_child}
    print(json.dumps(child[args.child](args)))
    return
  if args.quick:
    args.rounds, args.reps = 1, 1
  sides = ["ours"] + (["before"] if args.before else []) + ["torch"]
  runners = {"ours": lambda m: _run(sys.executable, "ours", m, args),
             "before": lambda m: _run(sys.executable, "ours", m, args, tree=args.before),
             "torch": lambda m: _run(args.peer_python, "torch", m, args)}
  rounds = []
  for r in range(args.rounds):
    results = {}
    for model in args.models.split(","):
      order = sides if r % 2 == 0 else sides[::-1]
      results[model] = {side: runners[side](model) for side in order}
      for side in sides:
        x = results[model][side]
        units = x.get("units")
        print(f"round {r} {model} {side}: " + (x.get("error") or ", ".join(
            f"{u} {statistics.median(units[u]['wall_s']):.2f} s wall "
            f"{statistics.median(units[u]['cpu_s']):.2f} s cpu" for u in UNITS)), flush=True)
    rounds.append(results)
  step_memory = {}
  if args.step_memory:
    for side, tree in [("ours", None)] + ([("before", args.before)] if args.before else []):
      step_memory[side] = _run(sys.executable, "step_memory", "gemma3-270m", args, tree=tree)
      print(f"step memory {side}: {step_memory[side]}", flush=True)
  summary = summarize(rounds, sides)
  text = markdown(summary, sides, args, step_memory)
  print(text)
  if not args.quick:
    sys.path.insert(0, str(HERE))
    import _common as C  # pylint: disable=import-outside-toplevel
    C.write_json(C.RESULTS / "head.json", {"machine": C.machine_info(), "args": vars(args),
                                           "summary": summary, "step_memory": step_memory,
                                           "rounds": rounds})
    (C.RESULTS / "head.md").write_text(text + "\n\n" + C.machine_line(C.machine_info()) + "\n")


if __name__ == "__main__":
  main()
