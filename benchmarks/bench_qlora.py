"""QLoRA (NF4 base) against LoRA on the float32 base (issue 3's performance goals).

On the reference Llama at its benchmark size (`LlamaConfig.bench()`, ~32M
params, float32), batch 4 x 128 by default, AdamW, LoRA r=8 (alpha 16):

* base-parameter bytes: the NF4 base (block 64, double quantization) over the
  float32 base, and the bits per parameter of the quantized kernels
  (goal <= 4.13);
* train step (`peft_jax.training.make_train_step`) of QLoRA over LoRA on the
  float32 base of the same model, with adapters on q_proj,v_proj and on
  all-linear: step time (goal <= 1.3x on CPU, compute_dtype float32; bf16
  compute is timed too, for information), step memory from
  `compiled.memory_analysis()` and peak RSS of a fresh subprocess per method
  (goal <= 0.45x);
* diagnosis, compile only: memory_analysis of ablations (down_proj left in
  float32; per-layer remat) and which projections run `nf4_matmul`'s
  "reference" path (the whole weight dequantized) in the compiled step.

Methods are timed interleaved (A B C A B C ...); every figure is a ratio to
its baseline from the same run, with the spread of per-rep ratios. Writes
`benchmarks/results/qlora.json` (every raw number and the machine) and
`benchmarks/results/qlora.md`. Usage::

    python benchmarks/bench_qlora.py            # full settings, ~5-6 min on 2 loaded cores
    python benchmarks/bench_qlora.py --rss-all-linear  # + 2 RSS processes, ~1.5 min more
    python benchmarks/bench_qlora.py --quick    # tiny model, ~2.5 min (compiles dominate); writes nothing unless --out
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402  pylint: disable=wrong-import-position

import peft_jax as pj  # noqa: E402
from peft_jax import quant, targeting, training  # noqa: E402
from peft_jax.models import llama  # noqa: E402

GOALS = {
    "bits_per_param": 4.13,
    "step_time": 1.30,
    "step_memory": 0.45,
    "peak_rss": 0.45,
}
LR = 1e-4
TARGETS = {"qv": ("q_proj", "v_proj"), "all": "all-linear"}
# method -> (base: "f32" | "nf4" | "nf4_bf16", adapter targets)
METHODS = {
    "lora_qv": ("f32", "qv"),
    "qlora_qv": ("nf4", "qv"),
    "lora_all": ("f32", "all"),
    "qlora_all": ("nf4", "all"),
    "qlora_qv_bf16": ("nf4_bf16", "qv"),
}
PAIRS = {  # QLoRA method -> its LoRA baseline
    "qlora_qv": "lora_qv", "qlora_all": "lora_all", "qlora_qv_bf16": "lora_qv"}
RSS_METHODS = ("lora_qv", "qlora_qv")  # + lora_all, qlora_all with --rss-all-linear


def nf4_spec(base: str) -> quant.NF4:
  return quant.NF4(block_size=64, double_quant=True,
                   compute_dtype=jnp.bfloat16 if base == "nf4_bf16" else jnp.float32)


def lora_config(targets: str) -> pj.LoRAConfig:
  return pj.LoRAConfig(rank=8, alpha=16.0, target_modules=TARGETS[targets])


def model_config(name: str, **overrides) -> llama.LlamaConfig:
  return (llama.LlamaConfig.bench(**overrides) if name == "bench"
          else llama.LlamaConfig.tiny(**overrides))


def light_params(config: llama.LlamaConfig, spec: quant.NF4 | None):
  """Params leaf by leaf (N(0, 0.02)); with ``spec``, each targeted kernel is
  quantized as soon as it is drawn, so the float32 model never exists whole
  (a QLoRA user loading a checkpoint shard by shard has the same peak)."""
  shapes = jax.eval_shape(functools.partial(llama.init_params, config), jax.random.key(0))
  inner, wrapped = targeting.unwrap_params(shapes)
  selected = ({f"{m}/{leaf}" for m, leaf in targeting.select_modules(
      inner, targeting.ALL_LINEAR).items()} if spec else set())
  flat = targeting.flatten(inner)
  keys = jax.random.split(jax.random.key(0), len(flat))
  out = {}
  for k, (path, s) in zip(keys, flat.items()):
    leaf = 0.02 * jax.random.normal(k, s.shape, s.dtype)
    out[path] = quant.quantize_array(leaf, spec) if path in selected else leaf
    jax.block_until_ready(out[path])
    del leaf
  tree = targeting.unflatten(out)
  return {"params": tree} if wrapped else tree


class Setup:
  """Model, float32 and NF4 params, one batch, from fixed keys."""

  def __init__(self, args, light: str | None = None, **config_overrides):
    self.model_config = model_config(args.model, **config_overrides)
    self.model = llama.LlamaForCausalLM(self.model_config)
    self.params = {}
    if light is None:  # the float32 params, and the NF4 bases quantized from them
      self.params["f32"] = llama.init_params(self.model_config, jax.random.key(0))
      for base in ("nf4", "nf4_bf16"):
        self.params[base] = quant.quantize(self.params["f32"], nf4_spec(base))
    else:  # one base only, drawn leaf by leaf (peak-RSS children)
      self.params[light] = light_params(self.model_config,
                                        None if light == "f32" else nf4_spec(light))
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0,
                                self.model_config.vocab_size)
    self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]
    self.key = jax.random.key(3)
    self.optimizer = optax.adamw(LR)

  def compiled_step(self, method: str, params=None):
    """(compiled step, initial state, base) of one method."""
    base_kind, targets = METHODS[method]
    config = lora_config(targets)
    params = self.params[base_kind] if params is None else params
    trainable, base = pj.split(pj.lora_transform(params, config, key=jax.random.key(2)))
    step = training.make_train_step(self.model, config, self.optimizer)
    state = training.init_train_state(trainable, self.optimizer)
    compiled = step.lower(state, base, self.inputs, self.labels, self.key).compile()
    return compiled, state, base


def rss_child(args) -> None:
  """One method (or the floor) in this fresh process; prints its peak RSS."""
  method = args.rss_child
  if method == "floor":  # jax, the batch and a trivial jitted op; no params
    setup = None
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, 8)
    jax.block_until_ready(jax.jit(lambda t: t + 1)(tokens))
    print(json.dumps({"method": "floor", "rss_after_setup_bytes": C.rss_now(),
                      "peak_rss_bytes": C.peak_rss_self()}))
    return
  base_kind = METHODS[method][0]
  setup = Setup(args, light=base_kind)
  out = {"method": method, "rss_after_setup_bytes": C.rss_now(),
         "peak_rss_after_setup_bytes": C.peak_rss_self(),
         "quantized_kernels": len(quant.quantized_paths(setup.params[base_kind]))}
  compiled, state, base = setup.compiled_step(method)
  del setup.params[base_kind]  # `base` holds the frozen leaves; the state the adapters
  out["rss_after_compile_bytes"] = C.rss_now()
  for _ in range(3):  # the state is donated
    state, loss = compiled(state, base, setup.inputs, setup.labels, setup.key)
  jax.block_until_ready((state, loss))
  out["step_bytes"] = C.memory_analysis(compiled)["step_bytes"]
  out["base_bytes"] = C.tree_bytes(base)
  out["rss_after_steps_bytes"] = C.rss_now()
  out["peak_rss_bytes"] = C.peak_rss_self()
  print(json.dumps(out))


def base_bytes(setup: Setup) -> dict:
  """Bytes of the float32 and NF4 bases, and bits/param of the quantized kernels."""
  f32, nf4 = setup.params["f32"], setup.params["nf4"]
  flat_q = jax.tree_util.tree_flatten_with_path(nf4, is_leaf=quant.is_quantized)[0]
  kernels = [(jax.tree_util.keystr(p), w) for p, w in flat_q if quant.is_quantized(w)]
  q_bytes = sum(w.nbytes for _, w in kernels)
  q_size = sum(w.size for _, w in kernels)
  m = setup.inputs.size
  per_module = collections.defaultdict(lambda: {"count": 0, "bits_per_param": None})
  for path, w in kernels:
    name = re.findall(r"'(\w+)'", path)[-2]  # ...['mlp']['down_proj']['kernel']
    entry = per_module[name]
    entry["count"] += 1
    entry.update(shape=list(w.shape), tiled=bool(w.tiled),
                 bits_per_param=w.bits_per_param, impl=quant.select_impl(w, m))
  total_f32 = C.tree_bytes(f32)
  total_nf4 = C.tree_bytes(nf4)
  unquantized = total_nf4 - q_bytes
  no_dq = quant.quantize(f32, quant.NF4(block_size=64, double_quant=False,
                                        compute_dtype=jnp.float32))
  no_dq_bytes = sum(w.nbytes for w in jax.tree.leaves(no_dq, is_leaf=quant.is_quantized)
                    if quant.is_quantized(w))
  return {"params": q_size + unquantized // 4, "quantized_params": q_size,
          "f32_base_bytes": total_f32, "nf4_base_bytes": total_nf4,
          "nf4_over_f32": total_nf4 / total_f32,
          "quantized_kernel_bytes_nf4": q_bytes, "quantized_kernel_bytes_f32": 4 * q_size,
          "quantized_kernels_over_f32": q_bytes / (4 * q_size),
          "bits_per_param": 8 * q_bytes / q_size,
          "bits_per_param_no_double_quant": 8 * no_dq_bytes / q_size,
          "unquantized_bytes": unquantized,  # embeddings, lm_head, norms
          "per_module": dict(per_module)}


_DEQUANT_RE = re.compile(r'op_name="[^"]*?(\w+)/jit\(_matmul_2d\)/jit\(_dequantize\)')


def hlo_facts(compiled) -> dict:
  """Which projections dequantize their whole weight in the compiled step."""
  text = compiled.as_text()
  modules = collections.Counter(_DEQUANT_RE.findall(text))
  return {"whole_weight_dequantize_ops_by_module": dict(modules),
          "hlo_chars": len(text)}


def bench_steps(setup: Setup, args) -> dict:
  out = {"compile_s": {}, "memory": {}, "flops": {}, "tree_bytes": {}, "hlo": {}}
  fns = {}
  methods = [m for m in METHODS if args.bf16 or m != "qlora_qv_bf16"]
  for method in methods:
    t0 = time.perf_counter()
    compiled, state, base = setup.compiled_step(method)
    out["compile_s"][method] = time.perf_counter() - t0
    out["memory"][method] = C.memory_analysis(compiled)
    out["flops"][method] = C.flops(compiled)
    out["tree_bytes"][method] = {"trainable": C.tree_bytes(state.trainable),
                                 "optimizer_state": C.tree_bytes(state.opt_state),
                                 "frozen_base": C.tree_bytes(base)}
    if method.startswith("qlora"):
      out["hlo"][method] = hlo_facts(compiled)
    holder = [jax.tree.map(jnp.copy, state)]  # the step donates its state

    def run(c=compiled, holder=holder, base=base):
      holder[0], loss = c(holder[0], base, setup.inputs, setup.labels, setup.key)
      return loss

    fns[method] = run
    del compiled, state
  out["timing"] = C.time_interleaved(fns, reps=args.reps, warmup=1)
  del fns
  out["ratios"] = {q: C.ratio(out["timing"], q, l) for q, l in PAIRS.items() if q in methods}
  mem = {m: v["step_bytes"] for m, v in out["memory"].items()}
  out["memory_ratios"] = {q: mem[q] / mem[l] for q, l in PAIRS.items() if q in methods}
  return out


def bench_ablations(setup: Setup, args) -> dict:
  """Compile-only memory_analysis of variants that locate QLoRA's temporaries."""
  out = {}
  spec = nf4_spec("nf4")
  # 1. down_proj (K = intermediate_size) left in float32: is its dequantize the extra?
  out["qlora_qv_down_proj_f32"] = C.memory_analysis(setup.compiled_step(
      "qlora_qv", quant.quantize(setup.params["f32"], spec, exclude_modules=("down_proj",)))[0])
  # 2. per-layer gradient checkpointing, both methods: what is left once activations shrink.
  if not args.no_remat:
    remat = Setup.__new__(Setup)
    remat.__dict__.update(setup.__dict__)
    remat.model = llama.LlamaForCausalLM(dataclasses.replace(setup.model_config, remat=True))
    for method in ("lora_qv", "qlora_qv"):
      out[f"{method}_remat"] = C.memory_analysis(remat.compiled_step(method)[0])
  return out


def bench_rss(args) -> dict:
  script = str(pathlib.Path(__file__).resolve())
  common = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
  methods = (*RSS_METHODS, "lora_all", "qlora_all") if args.rss_all_linear else RSS_METHODS
  children = {m: C.peak_rss_subprocess([script, "--rss-child", m, *common])
              for m in ("floor", *methods)}
  rss = {m: c["peak_rss_bytes"] for m, c in children.items()}
  floor = rss["floor"]
  ratios = {}
  for q in ("qlora_qv", "qlora_all"):
    l = PAIRS[q]
    if q not in rss:
      continue
    ratios[q] = {"peak_rss": rss[q] / rss[l],
                 "above_floor": (rss[q] - floor) / (rss[l] - floor) if rss[l] > floor else None}
  return {"children": children, "ratios": ratios}


def verdict(value: float | None, goal: float) -> str:
  if value is None:
    return "n/a"
  if value <= goal:
    return "pass"
  return f"**miss** (+{(value / goal - 1) * 100:.0f}%)"


def markdown(result: dict) -> str:
  s, m, bb = result["setup"], result["machine"], result["base_bytes"]
  st, rs, ab = result["steps"], result["peak_rss"], result["ablations"]
  t, mem = st["timing"], {k: v["step_bytes"] for k, v in st["memory"].items()}
  rss = {k: v["peak_rss_bytes"] for k, v in rs["children"].items()}
  spread = lambda r: f"{r['ratio']:.3f} ({r['paired_min']:.3f}-{r['paired_max']:.3f})"
  lines = [
      f"QLoRA (NF4 base, block 64, double quantization) vs LoRA on the float32 base of the same "
      f"model. Llama `{s['model']}` ({bb['params'] / 1e6:.1f}M params, float32; "
      f"{bb['quantized_params'] / 1e6:.1f}M in quantized kernels, the rest embeddings, lm_head "
      f"and norms), batch {s['batch']} x {s['seq']}, LoRA r=8 alpha 16, AdamW (lr {s['lr']}), "
      f"{s['reps']} interleaved reps. {C.machine_line(m)}",
      "",
      "Ratios: median over median; in brackets the min-max of the per-rep ratios (rep i of "
      "both methods ran back to back). compute_dtype float32 unless marked bf16.",
      "",
  ]
  rows = [
      ["bits/param of the quantized kernels (double quant)", f"{bb['bits_per_param']:.3f}",
       f"{bb['quantized_kernels_over_f32']:.4f}x f32", "<= 4.13",
       verdict(bb["bits_per_param"], GOALS["bits_per_param"])],
      ["... without double quant", f"{bb['bits_per_param_no_double_quant']:.3f}", "", "(info)", ""],
      ["base params: NF4 / float32 (whole tree)", f"{C.mib(bb['nf4_base_bytes'])} / "
       f"{C.mib(bb['f32_base_bytes'])}", f"{bb['nf4_over_f32']:.3f}", "(info)",
       f"unquantized part: {C.mib(bb['unquantized_bytes'])}"],
  ]
  names = {"qlora_qv": ("q,v", "lora_qv"), "qlora_all": ("all-linear", "lora_all"),
           "qlora_qv_bf16": ("q,v, bf16 compute", "lora_qv")}
  for q, (label, l) in names.items():
    if q not in t:
      continue
    rows.append([f"QLoRA / LoRA step time ({label})", f"{C.ms(t[q]['median_s'])} / "
                 f"{C.ms(t[l]['median_s'])}", spread(st["ratios"][q]),
                 "<= 1.3" if "bf16" not in q else "(info)",
                 verdict(st["ratios"][q]["ratio"], GOALS["step_time"]) if "bf16" not in q else ""])
  for q, (label, l) in names.items():
    if q not in mem:
      continue
    rows.append([f"QLoRA / LoRA step memory_analysis ({label})", f"{C.mib(mem[q])} / "
                 f"{C.mib(mem[l])}", f"{st['memory_ratios'][q]:.3f}",
                 "<= 0.45" if "bf16" not in q else "(info)",
                 verdict(st["memory_ratios"][q], GOALS["step_memory"]) if "bf16" not in q else ""])
  for q in rs["ratios"]:
    label, l = names[q]
    r = rs["ratios"][q]
    rows.append([f"QLoRA / LoRA peak RSS, fresh process ({label})",
                 f"{C.mib(rss[q])} / {C.mib(rss[l])}", f"{r['peak_rss']:.3f}", "<= 0.45",
                 verdict(r["peak_rss"], GOALS["peak_rss"])])
    rows.append([f"... above the floor ({C.mib(rss['floor'])}: jax + batch, no params)",
                 f"{C.mib(rss[q] - rss['floor'])} / {C.mib(rss[l] - rss['floor'])}",
                 "n/a" if r["above_floor"] is None else f"{r['above_floor']:.3f}", "(info)",
                 "" if r["above_floor"] is None else verdict(r["above_floor"], GOALS["peak_rss"])])
  lines.append(C.markdown_table(["figure", "value / baseline (median)", "ratio", "goal", "result"],
                                rows))
  gflops = lambda f, tt: "n/a" if f is None else f"{f / 1e9:.1f} GFLOP, {f / tt / 1e9:.0f} GFLOP/s"
  detail = [[k, C.ms(v["median_s"]), C.ms(v["min_s"]), C.ms(v["max_s"]),
             gflops(st["flops"][k], v["median_s"]), f"{st['compile_s'][k]:.1f} s"]
            for k, v in t.items()]
  lines += ["", C.markdown_table(["step", "median", "min", "max", "cost_analysis", "compile"],
                                 detail)]
  parts = [[k, C.mib(v["argument_bytes"]), C.mib(v["temp_bytes"]), C.mib(v["output_bytes"]),
            C.mib(v["alias_bytes"]), C.mib(v["step_bytes"])]
           for k, v in [*st["memory"].items(), *ab.items()]]
  lines += ["", "memory_analysis of each step, and of compile-only ablations:", "",
            C.markdown_table(["step", "arguments", "temporaries", "outputs", "aliased",
                              "step memory"], parts)]
  pm = [[name, e["count"], "x".join(map(str, e["shape"])), "yes" if e["tiled"] else "no (flat)",
         e["impl"], f"{e['bits_per_param']:.3f}"] for name, e in bb["per_module"].items()]
  lines += ["", f"Quantized kernels and the `nf4_matmul` path each takes at M = "
            f"{s['batch'] * s['seq']} (\"reference\" dequantizes the whole weight):", "",
            C.markdown_table(["module", "layers", "kernel (in x out)", "K-tiled", "impl",
                              "bits/param"], pm)]
  kids = [[k, C.mib(v.get("rss_after_setup_bytes")), C.mib(v.get("rss_after_compile_bytes")),
           C.mib(v.get("rss_after_steps_bytes")), C.mib(v["peak_rss_bytes"]),
           f"{v['wall_s']:.0f} s"] for k, v in rs["children"].items()]
  lines += ["", "Fresh process per method (params drawn leaf by leaf; QLoRA kernels quantized "
            "as drawn, so the float32 model never exists whole):", "",
            C.markdown_table(["process", "RSS after setup", "after compile", "after 3 steps",
                              "peak RSS", "wall"], kids)]
  if result.get("diagnosis"):
    lines += ["", result["diagnosis"]]
  return "\n".join(lines)


def diagnose(result: dict) -> str:
  """Where the memory goes, from the numbers of this run (written into the .md)."""
  bb, st, ab = result["base_bytes"], result["steps"], result["ablations"]
  mem = st["memory"]
  lq, qq = mem["lora_qv"], mem["qlora_qv"]
  no_down = ab.get("qlora_qv_down_proj_f32")
  flat = [n for n, e in bb["per_module"].items() if e["impl"] == "reference"]
  out = ["Diagnosis (this run's figures):", ""]
  out.append(
      f"* Arguments: QLoRA saves {C.mib(lq['argument_bytes'] - qq['argument_bytes'])} "
      f"({C.mib(lq['argument_bytes'])} -> {C.mib(qq['argument_bytes'])}); of the NF4 base's "
      f"{C.mib(bb['nf4_base_bytes'])}, {C.mib(bb['unquantized_bytes'])} are embeddings, "
      f"lm_head and norms, not quantized. Even with arguments alone, the base cannot go below "
      f"{bb['nf4_over_f32']:.2f}x.")
  out.append(
      f"* Temporaries dominate both steps: LoRA {C.mib(lq['temp_bytes'])}, QLoRA "
      f"{C.mib(qq['temp_bytes'])} ({(qq['temp_bytes'] / lq['temp_bytes'] - 1) * 100:+.0f}%). "
      f"They are the activations saved for the backward pass (batch x seq = "
      f"{result['setup']['batch'] * result['setup']['seq']} tokens; the logits alone are "
      f"batch x seq x vocab x 4 bytes per copy), which QLoRA does not shrink. With equal "
      f"temporaries the best ratio here would be "
      f"{(qq['argument_bytes'] + lq['temp_bytes']) / lq['step_bytes']:.2f}x.")
  if flat:
    out.append(
        f"* {', '.join(flat)} ({bb['per_module'][flat[0]]['shape'][0]} input rows, not a "
        f"multiple of the block size 64) is stored in bitsandbytes' flat layout, for which "
        f"`nf4_matmul` takes the \"reference\" path: the whole float32 weight is dequantized in "
        f"the forward and again in the backward pass (HLO instructions from `_dequantize` "
        f"inside `_matmul_2d`, by module: "
        f"{st['hlo'].get('qlora_qv', {}).get('whole_weight_dequantize_ops_by_module', {})})." + (
            f" Leaving it in float32 gives QLoRA temporaries of {C.mib(no_down['temp_bytes'])} "
            f"(step {C.mib(no_down['step_bytes'])}, "
            f"{no_down['step_bytes'] / lq['step_bytes']:.3f}x LoRA)." if no_down else ""))
  if "qlora_qv_remat" in ab:
    rl, rq = ab["lora_qv_remat"], ab["qlora_qv_remat"]
    out.append(
        f"* With remat=True (per-layer checkpointing) the temporaries fall to "
        f"{C.mib(rl['temp_bytes'])} (LoRA) and {C.mib(rq['temp_bytes'])} (QLoRA): step "
        f"{C.mib(rq['step_bytes'])} / {C.mib(rl['step_bytes'])} = "
        f"{rq['step_bytes'] / rl['step_bytes']:.3f}x.")
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny model, batch 2 x 32, 3 reps; writes only with --out")
  parser.add_argument("--model", choices=("bench", "tiny"), default=None)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--seq", type=int, default=None)
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                      help="skip the bf16-compute QLoRA step")
  parser.add_argument("--no-remat", action="store_true", help="skip the remat ablation")
  parser.add_argument("--rss-all-linear", action="store_true",
                      help="also measure peak RSS of the all-linear methods (2 more processes)")
  parser.add_argument("--out", default=None,
                      help="path prefix of the .json/.md (default benchmarks/results/qlora)")
  parser.add_argument("--rss-child", choices=("floor", *METHODS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  defaults = (dict(model="tiny", batch=2, seq=32, reps=3) if args.quick
              else dict(model="bench", batch=4, seq=128, reps=5))
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.rss_child:
    rss_child(args)
    return
  out_prefix = (pathlib.Path(args.out) if args.out
                else None if args.quick else C.RESULTS / "qlora")

  t_start = time.perf_counter()
  machine = C.machine_info()
  setup = Setup(args)
  result = {"benchmark": "qlora", "machine": machine,
            "setup": {"model": args.model, "batch": args.batch, "seq": args.seq,
                      "dtype": "float32", "nf4": {"block_size": 64, "double_quant": True,
                                                  "compute_dtype": "float32 (and bfloat16)"},
                      "lora": {k: lora_config(k).to_dict() for k in TARGETS},
                      "optimizer": f"optax.adamw({LR})", "lr": LR, "reps": args.reps,
                      "goals": GOALS}}
  result["base_bytes"] = base_bytes(setup)
  print(f"base: {result['base_bytes']['bits_per_param']:.3f} bits/param, NF4/f32 "
        f"{result['base_bytes']['nf4_over_f32']:.3f}", flush=True)
  print("timing train steps ...", flush=True)
  result["steps"] = bench_steps(setup, args)
  print(result["steps"]["ratios"], result["steps"]["memory_ratios"], flush=True)
  print("ablations (compile only) ...", flush=True)
  result["ablations"] = bench_ablations(setup, args)
  del setup
  print("peak RSS, one fresh process per method ...", flush=True)
  result["peak_rss"] = bench_rss(args)
  want = result["base_bytes"]["per_module"]
  for m, child in result["peak_rss"]["children"].items():  # children quantize leaf by leaf
    if m.startswith("qlora"):
      assert child["quantized_kernels"] == sum(e["count"] for e in want.values()), child
  result["parent_peak_rss_bytes"] = C.peak_rss_self()
  result["wall_s"] = time.perf_counter() - t_start
  result["machine"]["load_average_after"] = list(os.getloadavg())
  result["diagnosis"] = diagnose(result)
  table = markdown(result)
  print(table)
  print(f"\nwall {result['wall_s']:.0f} s")
  if out_prefix:
    C.write_json(out_prefix.with_suffix(".json"), result)
    out_prefix.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out_prefix.with_suffix('.json')} and {out_prefix.with_suffix('.md')}")


if __name__ == "__main__":
  main()
