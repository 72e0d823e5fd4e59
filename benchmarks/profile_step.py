"""Where a SmolLM2 train step's time goes: per-HLO-op self time from an XLA trace.

Builds the step a library user gets (`make_train_step` on
`LlamaForCausalLM(LlamaConfig.smollm2_135m())`, unrolled layers, float32,
batch 4 x 128, LoRA q_proj,v_proj r=8 / full / QLoRA, AdamW), compiles it
once, runs a few steps under `jax.profiler.trace`, and sums the *self* time
of every XLA thunk (one event per HLO instruction: a fusion, a dot, a
copy, a while loop minus its body) on the XLA threads. Each instruction is
classified from the optimized HLO (`compiled.as_text()`):

* direction: forward, backward (the op's `op_name` is under
  `transpose(jvp(...))`) or other (optimizer, finite check);
* kind: `matmul` (a dot or a fusion holding one), `copy/transpose` (a
  fusion of layout ops only: copy, transpose, slice, concatenate, ...),
  `loop` (a while loop's own overhead), `elementwise/reduce` (the rest);
* part: the innermost source function of the op (`stack_frame_id`):
  RMSNorm, rotary, attention (scores, mask, softmax), projection (Dense),
  LoRA, SwiGLU, head + CE (`fused_ce`), embedding, optimizer, step.

    python benchmarks/profile_step.py [--method lora] [--layers 30] [--steps 3]

Prints the table by (part, direction, kind) and the slowest ops; with
`--json PATH` writes every figure. Random weights (timing does not depend
on their values). The machine is shared: report the load average with the
figures, and compare variants as ratios measured in one process.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)*?) ([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_BODY = re.compile(r"body=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_LAYOUT_OPS = {"copy", "transpose", "bitcast", "slice", "concatenate", "reshape", "parameter",
               "broadcast", "constant", "dynamic-slice", "dynamic-update-slice", "pad", "tuple",
               "get-tuple-element", "iota"}
_PARTS = (("/fused_ce.py", "head+CE"), ("LlamaRMSNorm", "RMSNorm"), ("apply_rotary", "rotary"),
          ("rotary_cos_sin", "rotary"), ("LlamaAttention", "attention"), ("einsum_lora", "LoRA"),
          ("_matrix_lora", "LoRA"),
          ("_Interceptor._adapted", "LoRA"), ("Dense.__call__", "projection"),
          ("peft_jax/quant/", "NF4 matmul"), ("LlamaMLP", "SwiGLU"),
          ("Embed.", "embedding"), ("/optax/", "optimizer"), ("peft_jax/training.py", "step"))


def parse_hlo(text: str) -> dict:
  """``{instruction: {opcode, op_name, frame, ops (inside a fusion), body}}`` and frame names."""
  tables = _frame_tables(text)
  comps, instrs, current = collections.defaultdict(list), {}, None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      current = line.split(" ", 2)[1 if line.startswith("ENTRY ") else 0].lstrip("%")
      continue
    match = _INSTR.match(line)
    if not match or current is None:
      continue
    name, _, opcode, rest = match.groups()
    comps[current].append(opcode)
    op_name = _OPNAME.search(rest)
    frame = _FRAME.search(rest)
    calls = _CALLS.search(rest) if opcode == "fusion" else None
    body = _BODY.search(rest) if opcode == "while" else None
    instrs[name] = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "",
                    "frame": int(frame.group(1)) if frame else None,
                    "calls": calls.group(1) if calls else None,
                    "body": body.group(1) if body else None, "computation": current}
  for info in instrs.values():
    info["ops"] = comps.get(info["calls"], [info["opcode"]]) if info["calls"] else [info["opcode"]]
  return {"instrs": instrs, "frames": tables}


def _frame_tables(text: str) -> dict:
  """``{stack_frame_id: "path:function"}`` of the innermost frame, from the HLO header."""
  sections, section = collections.defaultdict(dict), None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      continue
    if section is None:
      continue
    if not line.strip() or line.startswith(("HloModule", "ENTRY", "%")):
      section = None if not line.strip() else section
      if line.startswith(("ENTRY", "%")):
        break
      continue
    key, _, value = line.partition(" ")
    if key.isdigit():
      sections[section][int(key)] = value
  files, funcs = sections["FileNames"], sections["FunctionNames"]
  locations, frames = {}, {}
  for key, value in sections["FileLocations"].items():
    f = re.search(r"file_name_id=(\d+)", value)
    fn = re.search(r"function_name_id=(\d+)", value)
    locations[key] = (files.get(int(f.group(1)), "").strip('"') if f else "",
                      funcs.get(int(fn.group(1)), "").strip('"') if fn else "")
  for key, value in sections["StackFrames"].items():
    loc = re.search(r"file_location_id=(\d+)", value)
    if loc:
      file, func = locations.get(int(loc.group(1)), ("", ""))
      frames[key] = f"{file}:{func}"
  return frames


def classify(info: dict, frames: dict, parts=_PARTS) -> tuple[str, str, str]:
  """``(part, direction, kind)`` of one HLO instruction (``parts``: (source key, label)
  pairs, first match wins)."""
  op_name = info["op_name"]
  where = frames.get(info["frame"], "") if info["frame"] is not None else ""
  direction = ("backward" if "transpose(" in op_name else
               "forward" if "jvp(" in op_name else "other")
  ops = set(info["ops"])
  if info["opcode"] == "while":
    kind = "loop"
  elif ops & {"dot", "convolution"}:
    kind = "matmul"
  elif ops <= _LAYOUT_OPS:
    kind = "copy/transpose"
  else:
    kind = "elementwise/reduce"
  part = next((label for key, label in parts if key in where or key in op_name), None)
  if part is None:
    part = where.split(":")[-1] or (op_name.split("/")[-1] if op_name else info["opcode"])
  if part == "head+CE":
    direction = "head+CE"  # its custom VJP does the head's gradient inside the forward pass
  return part, direction, kind


def self_times(xplane: str, names: set[str]) -> tuple[dict, dict]:
  """Summed self time (ns) per HLO instruction name, and per thread (its ops' self time)."""
  import jax  # pylint: disable=import-outside-toplevel
  data = jax.profiler.ProfileData.from_file(xplane)
  per_op, per_thread = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      events = sorted(((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ev in line.events),
                      key=lambda e: (e[0], -e[1]))
      stack = []  # [end, name, child time]
      def close(until):
        while stack and stack[-1][0] <= until:
          end, name, child, dur = stack.pop()
          if name in names:
            per_op[name] += dur - child
            per_thread[line.name] += dur - child
          if stack:
            stack[-1][2] += dur
      for start, end, name in events:
        close(start)
        stack.append([end, name, 0, end - start])
      close(float("inf"))
  return per_op, per_thread


def tabulate(per_op: dict, hlo: dict, steps: int, parts=_PARTS) -> tuple[list, list]:
  """``(rows [part, direction, kind, ms per step, ops], ops slowest first)`` of a trace."""
  rows = collections.defaultdict(lambda: [0.0, 0])
  ops = []
  for name, ns in per_op.items():
    info = hlo["instrs"][name]
    part, direction, kind = classify(info, hlo["frames"], parts)
    ms = ns / 1e6 / steps
    rows[(part, direction, kind)][0] += ms
    rows[(part, direction, kind)][1] += 1
    ops.append({"name": name, "ms": ms, "part": part, "direction": direction, "kind": kind,
                "op_name": info["op_name"][-90:]})
  ops.sort(key=lambda r: -r["ms"])
  return sorted(([*k, ms, n] for k, (ms, n) in rows.items()), key=lambda r: -r[3]), ops


def build(method: str, layers: int, batch: int, seq: int,
          compiler_options: dict | None = None):
  """The jitted step, its arguments and the compiled executable (like bench_peer's ours child)."""
  lowered, state, base, inputs, labels = lower(method, layers, batch, seq)
  return lowered.compile(compiler_options), state, base, inputs, labels


def lower(method: str, layers: int, batch: int, seq: int):
  """The lowered step and its arguments (compile it with any ``compiler_options``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax import training  # pylint: disable=import-outside-toplevel
  from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params  # pylint: disable=import-outside-toplevel
  config = LlamaConfig.smollm2_135m(num_hidden_layers=layers)
  module = LlamaForCausalLM(config)
  params = init_params(config, jax.random.key(0))
  layouts = pj.kernel_layouts(module, jnp.zeros((1, 8), jnp.int32))
  kw = dict(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
  if method == "full":
    lora_config, trainable, base = None, params, {}
  elif method == "qlora":
    lora_config = pj.QLoRAConfig(**kw, compute_dtype="float32")
    trainable, base = pj.split(pj.apply_qlora(params, lora_config, key=jax.random.key(1),
                                              layouts=layouts))
  else:
    lora_config = pj.LoRAConfig(**kw)
    trainable, base = pj.split(pj.lora_transform(params, lora_config, key=jax.random.key(1),
                                                 layouts=layouts))
  optimizer = optax.adamw(1e-4, weight_decay=0.0)
  step = training.make_train_step(module, lora_config, optimizer)
  state = training.init_train_state(trainable, optimizer)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1), np.int32)
  inputs, labels = tokens[:, :-1], tokens[:, 1:]
  lowered = step.lower(state, base, inputs, labels, jax.random.key(0))
  return lowered, state, base, inputs, labels


def profile(method: str, layers: int, steps: int, batch: int = 4, seq: int = 128,
            hlo_path: str | None = None) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  compiled, state, base, inputs, labels = build(method, layers, batch, seq)
  compile_s = time.perf_counter() - t0
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w", encoding="utf-8") as f:
      f.write(text)
  hlo = parse_hlo(text)
  key = jax.random.key(0)
  for _ in range(2):
    state, loss = compiled(state, base, inputs, labels, key)
    jax.block_until_ready(loss)
  walls = []
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(steps):
        t = time.perf_counter()
        state, loss = compiled(state, base, inputs, labels, key)
        jax.block_until_ready(loss)
        walls.append(time.perf_counter() - t)
    xplane = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[-1]
    per_op, per_thread = self_times(xplane, set(hlo["instrs"]))
  memory = compiled.memory_analysis()
  table, ops = tabulate(per_op, hlo, steps)
  return {"method": method, "layers": layers, "steps": steps, "compile_s": compile_s,
          "step_wall_ms": 1e3 * statistics.median(walls), "loss": float(loss),
          "temp_mib": memory.temp_size_in_bytes / 2**20,
          "thread_busy_ms": {k: v / 1e6 / steps for k, v in per_thread.items()},
          "op_total_ms": sum(per_op.values()) / 1e6 / steps,
          "table": table, "ops": ops, "load": os.getloadavg()}


def render(result: dict, top: int = 25) -> str:
  lines = [f"{result['method']}, {result['layers']} layers: step {result['step_wall_ms']:,.0f} ms "
           f"(median of {result['steps']} traced), op self time {result['op_total_ms']:,.0f} ms, "
           f"temp {result['temp_mib']:,.0f} MiB, load {result['load'][0]:.2f}",
           "thread busy: " + ", ".join(f"{k[-18:]} {v:,.0f} ms"
                                       for k, v in result["thread_busy_ms"].items()), "",
           "| part | direction | kind | ms / step | ops |", "|---|---|---|---:|---:|"]
  lines += [f"| {p} | {d} | {k} | {ms:,.1f} | {n} |" for p, d, k, ms, n in result["table"]]
  lines += ["", "| op | ms / step | part | direction | kind | op_name |", "|---|---:|---|---|---|---|"]
  lines += [f"| {o['name']} | {o['ms']:.2f} | {o['part']} | {o['direction']} | {o['kind']} | "
            f"{o['op_name']} |" for o in result["ops"][:top]]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="lora", choices=("lora", "full", "qlora"))
  parser.add_argument("--layers", type=int, default=30)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--json", default=None)
  parser.add_argument("--hlo", default=None, help="also write the optimized HLO text here")
  args = parser.parse_args()
  result = profile(args.method, args.layers, args.steps, hlo_path=args.hlo)
  print(render(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
