"""Gemma 3 270M's decoder body against transformers + peft: forward and forward + backward.

The 18 decoder layers (embedding, layers, final norm; no tied head, no
cross-entropy) with LoRA q_proj,v_proj r=8 (alpha 16, no dropout), float32,
batch 4 x 128, on both sides reduced to the same cheap scalar,
`mean(hidden ** 2)`, and differentiated to the LoRA params only:

* ours: the NNX model (`load_gemma3_hf` of the directory below,
  `pj.nnx.lora_transform`), `jax.jit` over `nnx.split` state;
* theirs: `Gemma3ForCausalLM.from_pretrained` + `peft.get_peft_model`, its
  `model.model` body (transformers' default attention), autograd on.

Both read the same weights: the Hugging Face directory `bench_peer.py`
writes from our GGUF-dequantized params (made once under `--workdir`), and
the same token windows. Each side is one long-lived worker process (2
threads); the parent asks them in turn (order alternating per rep) for one
forward and one forward + backward and records each call's process CPU time
and wall time, with `/proc/loadavg`. Figures are the median over reps of the
per-rep ratio ours / theirs (CPU time: robust to the shared machine).

With `--profile`, each side also profiles forward + backward: ours per HLO
instruction (self time from a `jax.profiler` trace, classified by the source
function as `profile_step.py` does), theirs with `torch.profiler` (self CPU
time per aten op). The NNX overhead check times `nnx.jit` against `jax.jit`
over split state for the same program.

    python benchmarks/bench_gemma_body.py [--reps 8] [--profile]

Results: benchmarks/results/gemma_body.{json,md}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

REF_PYTHON = "/work/refvenv/bin/python"
NAME = "gemma_body"
# Source functions of the model -> the part they belong to (first match wins).
PARTS = (("Gemma3RMSNorm", "RMSNorm"), ("apply_rotary", "rotary"),
         ("_rotary_cos_sin", "rotary"), ("Gemma3Attention", "attention"),
         ("einsum_lora", "LoRA"), ("_matrix_lora", "LoRA"), ("_adapted_single", "LoRA"),
         ("Linear.__call__", "projection"),
         ("Gemma3MLP", "GeGLU"), ("Embed.", "embedding"), ("Gemma3Model", "body"),
         ("_body_loss", "scalar"))


def _load() -> float:
  return float(pathlib.Path("/proc/loadavg").read_text().split()[0])


def _cpu() -> float:
  return time.process_time()


# ----------------------------------------------------------------------------- ours


def adapter_values(layer: int, name: str, features_in: int, features_out: int, rank: int = 8):
  """The same nonzero LoRA (A (in, r), B (r, out)) on both sides, so the values and the
  gradients of A and B can be compared."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng([layer, ("q_proj", "v_proj").index(name)])
  return (0.02 * rng.standard_normal((features_in, rank)).astype(np.float32),
          0.02 * rng.standard_normal((rank, features_out)).astype(np.float32))


def _body_loss(model, input_ids):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  hidden = model.model(input_ids)
  return jnp.mean(jnp.square(hidden))


class Ours:
  """Our NNX Gemma body with LoRA q,v: jitted forward and forward + backward over split state."""

  def __init__(self, workdir: pathlib.Path, inputs):
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    import peft_jax as pj  # pylint: disable=import-outside-toplevel
    from peft_jax.models import load_gemma3_hf  # pylint: disable=import-outside-toplevel
    _, model = load_gemma3_hf(workdir / "hf")
    pj.nnx.lora_transform(model, pj.LoRAConfig(rank=8, alpha=16.0,
                                               target_modules=("q_proj", "v_proj")),
                          key=jax.random.key(0))
    for i, layer in enumerate(model.model.layers):
      for name in ("q_proj", "v_proj"):
        proj = getattr(layer.self_attn, name)
        a, b = adapter_values(i, name, proj.lora_a.shape[0], proj.lora_b.shape[1])
        proj.lora_a.value, proj.lora_b.value = jax.numpy.asarray(a), jax.numpy.asarray(b)
    self.model = model
    self.graphdef, self.adapters, self.rest = nnx.split(model, pj.nnx.Adapter, ...)
    self.inputs = jax.numpy.asarray(inputs)
    graphdef = self.graphdef

    def loss(adapters, rest, input_ids):
      return _body_loss(nnx.merge(graphdef, adapters, rest), input_ids)

    self.forward = jax.jit(loss)
    self.forward_backward = jax.jit(jax.value_and_grad(loss))

  def run(self, what: str):
    import jax  # pylint: disable=import-outside-toplevel
    fn = self.forward if what == "fwd" else self.forward_backward
    return jax.block_until_ready(fn(self.adapters, self.rest, self.inputs))

  def value(self) -> float:
    return float(self.run("fwd"))

  def grad_norm(self) -> float:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    _, grads = self.run("fwdbwd")
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))

  def profile(self, steps: int = 2) -> dict:
    import jax  # pylint: disable=import-outside-toplevel
    import profile_step  # pylint: disable=import-outside-toplevel
    compiled = self.forward_backward.lower(self.adapters, self.rest, self.inputs).compile()
    hlo = profile_step.parse_hlo(compiled.as_text())
    jax.block_until_ready(compiled(self.adapters, self.rest, self.inputs))
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp):
        for _ in range(steps):
          jax.block_until_ready(compiled(self.adapters, self.rest, self.inputs))
      xplane = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[-1]
      per_op, per_thread = profile_step.self_times(xplane, set(hlo["instrs"]))
    table, ops = profile_step.tabulate(per_op, hlo, steps, PARTS)
    return {"op_total_ms": sum(per_op.values()) / 1e6 / steps,
            "thread_busy_ms": {k: v / 1e6 / steps for k, v in per_thread.items()},
            "table": table, "ops": ops[:int(os.environ.get("BODY_TOP_OPS", 40))], "load": _load()}

  def nnx_overhead(self, reps: int = 20) -> dict:
    """Per-call time of the NNX wrappers against `jax.jit` over split state, for a trivial
    program over the whole model: what graph traversal, split and merge cost per step."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    import peft_jax as pj  # pylint: disable=import-outside-toplevel
    trivial = lambda m, x: jnp.sum(x)
    donated = nnx.jit(trivial, donate_argnames=("m",))
    variants = {
        # An undonated nnx.jit returns (copies) every variable of the model.
        "nnx.jit": lambda f=nnx.jit(trivial): f(self.model, self.inputs),
        "nnx.jit donated": lambda: donated(self.model, self.inputs),
        "nnx.cached_partial donated": lambda f=nnx.cached_partial(donated, self.model): f(
            self.inputs),
        "jax.jit split state": lambda f=jax.jit(lambda a, r, x: jnp.sum(x)): f(
            self.adapters, self.rest, self.inputs)}
    out = {}
    for name, fn in variants.items():
      jax.block_until_ready(fn())
      t0, c0 = time.perf_counter(), _cpu()
      for _ in range(reps):
        jax.block_until_ready(fn())
      out[name] = {"wall_ms": 1e3 * (time.perf_counter() - t0) / reps,
                   "cpu_ms": 1e3 * (_cpu() - c0) / reps}
      # The donated calls replaced the model's arrays: split again.
      _, self.adapters, self.rest = nnx.split(self.model, pj.nnx.Adapter, ...)
    return out


# ----------------------------------------------------------------------------- theirs


class Theirs:
  """transformers' Gemma3 body with peft LoRA q,v on the same weights, autograd on."""

  def __init__(self, workdir: pathlib.Path, inputs, threads: int):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    import peft  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf",
                                                              dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        task_type="CAUSAL_LM"))
    model.train()
    self.torch = torch
    self.body = model.base_model.model.model
    with torch.no_grad():
      for i, layer in enumerate(self.body.layers):
        for name in ("q_proj", "v_proj"):
          proj = getattr(layer.self_attn, name)
          a, b = adapter_values(i, name, proj.in_features, proj.out_features)
          proj.lora_A["default"].weight.copy_(torch.from_numpy(a.T))
          proj.lora_B["default"].weight.copy_(torch.from_numpy(b.T))
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.inputs = torch.from_numpy(inputs.astype("int64"))

  def _loss(self):
    hidden = self.body(input_ids=self.inputs).last_hidden_state
    return (hidden * hidden).mean()

  def run(self, what: str):
    loss = self._loss()
    if what == "fwdbwd":
      loss.backward()
      for p in self.params:
        p.grad = None
    return loss

  def value(self) -> float:
    return float(self._loss().detach())

  def grad_norm(self) -> float:
    loss = self._loss()
    loss.backward()
    norm = float(sum((p.grad.double() ** 2).sum() for p in self.params) ** 0.5)
    for p in self.params:
      p.grad = None
    return norm

  def profile(self, steps: int = 2) -> dict:
    torch = self.torch
    self.run("fwdbwd")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      for _ in range(steps):
        self.run("fwdbwd")
    events = prof.key_averages()
    ops = [{"name": e.key, "ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count // steps}
           for e in events]
    ops.sort(key=lambda r: -r["ms"])
    return {"op_total_ms": sum(o["ms"] for o in ops), "ops": ops[:int(os.environ.get("BODY_TOP_OPS", 40))], "load": _load()}


# ----------------------------------------------------------------------------- workers


def worker(args) -> None:
  """A long-lived side: reads commands on stdin, answers one JSON line each."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(args.workdir)
  window = np.load(workdir / "windows.npy")[0]
  inputs = window[:, :-1]
  threads = int(args.threads)
  side = Ours(workdir, inputs) if args.worker == "ours" else Theirs(workdir, inputs, threads)
  for what in ("fwd", "fwdbwd", "fwd", "fwdbwd"):  # compile / warm up
    side.run(what)
  print(json.dumps({"ready": True, "value": side.value(), "grad_norm": side.grad_norm()}),
        flush=True)
  for line in sys.stdin:
    command = line.split()
    if not command or command[0] == "quit":
      break
    if command[0] in ("fwd", "fwdbwd"):
      load, t0, c0 = _load(), time.perf_counter(), _cpu()
      side.run(command[0])
      reply = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0, "load": load}
    elif command[0] == "profile":
      reply = side.profile()
    elif command[0] == "overhead":
      reply = side.nnx_overhead() if isinstance(side, Ours) else {}
    else:
      reply = {"error": f"unknown command {command[0]!r}"}
    print(json.dumps(reply), flush=True)


class Child:
  """A worker process spoken to over pipes."""

  def __init__(self, side: str, workdir: pathlib.Path, threads: int):
    import bench_peer  # pylint: disable=import-outside-toplevel
    python = REF_PYTHON if side == "theirs" else sys.executable
    self.proc = subprocess.Popen(
        [python, __file__, "--worker", side, "--workdir", str(workdir), "--threads",
         str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=bench_peer._child_env(threads))  # pylint: disable=protected-access
    self.hello = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker exited with {self.proc.wait()}")
    return json.loads(line)

  def ask(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    self.proc.stdin.write("quit\n")
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- the parent


def measure(workdir: pathlib.Path, reps: int, threads: int, profile: bool) -> dict:
  import _common  # pylint: disable=import-outside-toplevel
  children = {"ours": Child("ours", workdir, threads), "theirs": Child("theirs", workdir, threads)}
  times = {side: {"fwd": [], "fwdbwd": []} for side in children}
  loads = []
  try:
    for rep in range(reps):
      order = ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours")
      for what in ("fwd", "fwdbwd"):
        for side in order:
          reply = children[side].ask(what)
          times[side][what].append(reply)
          loads.append(reply["load"])
    profiles = ({side: child.ask("profile") for side, child in children.items()}
                if profile else None)
    overhead = children["ours"].ask("overhead")
  finally:
    for child in children.values():
      child.close()
  ratios = {}
  for what in ("fwd", "fwdbwd", "bwd"):
    for clock in ("cpu_s", "wall_s"):
      per_rep = []
      for i in range(reps):
        def get(side, i=i):
          if what == "bwd":
            return times[side]["fwdbwd"][i][clock] - times[side]["fwd"][i][clock]
          return times[side][what][i][clock]
        per_rep.append(get("ours") / get("theirs"))
      ratios[f"{what}_{clock}"] = {"median": statistics.median(per_rep), "min": min(per_rep),
                                   "max": max(per_rep)}
  medians = {side: {what: {clock: statistics.median(r[clock] for r in times[side][what])
                           for clock in ("cpu_s", "wall_s")} for what in ("fwd", "fwdbwd")}
             for side in times}
  return {"machine": _common.machine_info(), "reps": reps, "threads": threads,
          "hello": {side: child.hello for side, child in children.items()},
          "ratios": ratios, "medians": medians, "raw": times, "load": {
              "median": statistics.median(loads), "min": min(loads), "max": max(loads)},
          "profiles": profiles, "nnx_overhead": overhead}


def render(result: dict) -> str:
  import _common  # pylint: disable=import-outside-toplevel
  r, m, load = result["ratios"], result["medians"], result["load"]
  hello = result["hello"]
  lines = [
      f"# Gemma 3 270M decoder body: ours vs transformers + peft, {result['threads']} "
      f"thread(s) per side", "",
      f"Embedding, 18 layers, final norm -> mean(h**2); LoRA q_proj,v_proj r=8, float32, batch "
      f"4 x 127 (the windows' inputs), gradients to the LoRA params; {result['reps']} interleaved "
      f"reps, {result['threads']} threads per side, one worker process per side. Load average "
      f"during the calls: median {load['median']:.2f} [{load['min']:.2f}, {load['max']:.2f}].", "",
      f"Same numbers: value ours {hello['ours']['value']:.6f} / theirs "
      f"{hello['theirs']['value']:.6f}; LoRA gradient norm ours {hello['ours']['grad_norm']:.6g}"
      f" / theirs {hello['theirs']['grad_norm']:.6g}.", "",
      "| phase | ours CPU s | theirs CPU s | ours / theirs (CPU) | ours / theirs (wall) |",
      "|---|---:|---:|---:|---:|"]
  for what, label in (("fwd", "forward"), ("bwd", "backward (fwd+bwd - fwd)"),
                      ("fwdbwd", "forward + backward")):
    if what == "bwd":
      ours = m["ours"]["fwdbwd"]["cpu_s"] - m["ours"]["fwd"]["cpu_s"]
      theirs = m["theirs"]["fwdbwd"]["cpu_s"] - m["theirs"]["fwd"]["cpu_s"]
    else:
      ours, theirs = m["ours"][what]["cpu_s"], m["theirs"][what]["cpu_s"]
    c, w = r[f"{what}_cpu_s"], r[f"{what}_wall_s"]
    lines.append(f"| {label} | {ours:.3f} | {theirs:.3f} | {c['median']:.2f}x "
                 f"[{c['min']:.2f}, {c['max']:.2f}] | {w['median']:.2f}x "
                 f"[{w['min']:.2f}, {w['max']:.2f}] |")
  overhead = result.get("nnx_overhead") or {}
  if overhead:
    lines += ["", "Per-call cost of the NNX wrapper (a trivial program over the whole model): " +
              ", ".join(f"{k} {v['wall_ms']:.2f} ms wall / {v['cpu_ms']:.2f} ms CPU"
                        for k, v in overhead.items()) + "."]
  if result.get("profiles"):
    ours, theirs = result["profiles"]["ours"], result["profiles"]["theirs"]
    lines += ["", f"## Ours: forward + backward per part (op self time {ours['op_total_ms']:,.0f}"
              f" ms per call, load {ours['load']:.2f})", "",
              "| part | direction | kind | ms | ops |", "|---|---|---|---:|---:|"]
    lines += [f"| {p} | {d} | {k} | {ms:,.1f} | {n} |" for p, d, k, ms, n in ours["table"]]
    lines += ["", "Slowest ops:", "", "| op | ms | part | direction | kind | op_name |",
              "|---|---:|---|---|---|---|"]
    lines += [f"| {o['name']} | {o['ms']:.1f} | {o['part']} | {o['direction']} | {o['kind']} | "
              f"{o['op_name']} |" for o in ours["ops"][:20]]
    lines += ["", f"## Theirs: forward + backward, self CPU per aten op "
              f"({theirs['op_total_ms']:,.0f} ms per call, load {theirs['load']:.2f})", "",
              "| op | ms | calls |", "|---|---:|---:|"]
    lines += [f"| {o['name']} | {o['ms']:.1f} | {o['calls']} |" for o in theirs["ops"][:25]]
  lines += ["", _common.machine_line(result["machine"])]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=8)
  parser.add_argument("--threads", default="1,2",
                      help="threads per side; a comma list runs one measurement per count")
  parser.add_argument("--profile", action="store_true")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "peft_jax_gemma_body"))
  parser.add_argument("--no-write", action="store_true", help="print only")
  parser.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  workdir = pathlib.Path(args.workdir)
  if not (workdir / "hf" / "config.json").exists() or not (workdir / "windows.npy").exists():
    import bench_peer  # pylint: disable=import-outside-toplevel
    bench_peer.prepare(workdir, 4, 128, 4, "gemma3-270m")
  counts = [int(t) for t in args.threads.split(",")]
  # The profile goes with the last thread count (the one bench_peer.py uses: 2).
  runs = [measure(workdir, args.reps, t, args.profile and i == len(counts) - 1)
          for i, t in enumerate(counts)]
  text = "\n".join(render(run) for run in runs)
  print(text)
  if not args.no_write:
    import _common  # pylint: disable=import-outside-toplevel
    _common.write_json(_common.RESULTS / f"{NAME}.json", {"runs": runs})
    (_common.RESULTS / f"{NAME}.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
  main()
