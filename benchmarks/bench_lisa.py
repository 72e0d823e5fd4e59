"""LISA with active-only gradients vs full-gradient LISA vs full AdamW (scanned layers).

Writes benchmarks/results/lisa.json and benchmarks/results/lisa.md.

    python benchmarks/bench_lisa.py [--reps 5] [--batch 2] [--seq 128]

Model `LlamaConfig.bench(scan_layers=True)`, float32. Three jitted train
steps (params and state donated):

* adamw: `jax.grad` of the loss, `optax.adamw`, `apply_updates`;
* lisa_full_grad: the same full gradient into `po.lisa(adamw, 2 of 8)`
  (frozen layers get zero updates);
* lisa_active_grad: `po.lisa_value_and_grad` (gradient w.r.t. the active
  tree only), the same `po.lisa` taking those gradients, updates applied with
  `po.lisa_combine`.

Plus, for FLOPs only, `grad_no_layer_weights`: the gradient of the same loss
w.r.t. the non-layer params alone (embeddings, norm, head), the backward a
perfect skip of *all* layer weight gradients would leave. Memory is
`compiled.memory_analysis()` (arguments + temporaries + outputs - aliased);
FLOPs are `cost_analysis()`; times interleaved A B C A B C, median [min, max].
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import peft_jax.optim as po  # noqa: E402
from peft_jax.models import LlamaConfig, LlamaForCausalLM, causal_lm_loss, init_params  # noqa: E402

TEXT = pathlib.Path(__file__).resolve().parent.parent / "peft_jax" / "data" / "shakespeare.txt"


def batch_of(vocab: int, batch: int, seq: int) -> jnp.ndarray:
  data = np.frombuffer(TEXT.read_bytes(), np.uint8).astype(np.int32) % vocab
  starts = np.random.default_rng(0).integers(0, len(data) - seq - 1, batch)
  return jnp.asarray(np.stack([data[s: s + seq + 1] for s in starts]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--n-layers", type=int, default=2)
  args = parser.parse_args()
  started = time.perf_counter()

  config = LlamaConfig.bench(scan_layers=True)
  model = LlamaForCausalLM(config)
  params = init_params(config, jax.random.key(0))
  tokens = batch_of(config.vocab_size, args.batch, args.seq)
  lr = 1e-3
  n = args.n_layers

  def loss_fn(p, tokens):
    return causal_lm_loss(model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])

  adamw = lambda: optax.adamw(lr, eps=1e-6, weight_decay=0.0)
  txs = {
      "adamw": adamw(),
      "lisa_full_grad": po.lisa(adamw(), n_layers=n, interval_steps=20),
      "lisa_active_grad": po.lisa(adamw(), n_layers=n, interval_steps=20),
  }

  def full_step(tx):
    def step(p, state, tokens):
      loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state, loss
    return step

  def active_step(tx):
    def step(p, state, tokens):
      idx = po.lisa_active_layers(state)
      loss, grads, active, frozen = po.lisa_value_and_grad(loss_fn)(p, idx, tokens)
      updates, state = tx.update(grads, state, p)
      return po.lisa_combine(frozen, optax.apply_updates(active, updates), idx), state, loss
    return step

  steps = {"adamw": full_step(txs["adamw"]), "lisa_full_grad": full_step(txs["lisa_full_grad"]),
           "lisa_active_grad": active_step(txs["lisa_active_grad"])}

  results = {"methods": {}}
  compiled, states, current = {}, {}, {}
  for name, tx in txs.items():
    state = tx.init(params)
    t0 = time.perf_counter()
    compiled[name] = jax.jit(steps[name], donate_argnums=(0, 1)).lower(
        params, state, tokens).compile()
    grad_shapes = (
        jax.eval_shape(jax.grad(loss_fn), params, tokens) if name != "lisa_active_grad"
        else jax.eval_shape(lambda p, s: po.lisa_value_and_grad(loss_fn)(
            p, po.lisa_active_layers(s), tokens)[1], params, state))
    results["methods"][name] = {
        "compile_s": time.perf_counter() - t0,
        "state_bytes": _common.tree_bytes(state),
        "grad_tree_bytes": _common.tree_bytes(grad_shapes),
        "memory_analysis": _common.memory_analysis(compiled[name]),
        "flops": _common.flops(compiled[name]),
    }
    states[name] = state
    current[name] = jax.tree.map(jnp.copy, params)
    print(f"compiled {name} in {results['methods'][name]['compile_s']:.1f}s", flush=True)

  # FLOPs of the backward with no layer weight gradients at all, and of the
  # plain full gradient, for the what-could-be-skipped estimate.
  non_layer = {k: v for k, v in params.items() if k != "model"}
  non_layer["model"] = {k: v for k, v in params["model"].items() if k != "layers"}

  def loss_non_layer(nl, layers, tokens):
    p = dict(nl)
    p["model"] = dict(nl["model"], layers=layers)
    return loss_fn(p, tokens)

  extra = {
      "grad_full": jax.jit(jax.grad(loss_fn)).lower(params, tokens).compile(),
      "grad_no_layer_weights": jax.jit(jax.grad(loss_non_layer)).lower(
          non_layer, params["model"]["layers"], tokens).compile(),
      "forward_only": jax.jit(loss_fn).lower(params, tokens).compile(),
  }
  results["flops_only"] = {k: {"flops": _common.flops(c),
                               "memory_analysis": _common.memory_analysis(c)}
                           for k, c in extra.items()}

  # XLA's cost_analysis counts a while loop's body once, not once per
  # iteration, so the scanned figures above hold one layer. The same
  # gradients on the unrolled model count every layer.
  u_config = LlamaConfig.bench()
  u_model = LlamaForCausalLM(u_config)
  u_params = jax.eval_shape(functools.partial(init_params, u_config), jax.random.key(0))

  def u_loss(p, tokens):
    return causal_lm_loss(u_model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])

  static_active = [1, 5][:n] if n <= 2 else list(range(n))
  u_layers = {k: v for k, v in u_params["model"].items() if k.startswith("layers_")}
  u_rest = {"lm_head": u_params["lm_head"],
            "model": {k: v for k, v in u_params["model"].items() if not k.startswith("layers_")}}

  def u_loss_split(trainable, constant, tokens):
    p = {"lm_head": trainable["lm_head"],
         "model": {**trainable["model"], **constant["model"]}}
    return u_loss(p, tokens)

  def split_static(active_ids):
    trainable = {"lm_head": u_rest["lm_head"], "model": dict(u_rest["model"])}
    constant = {"model": {}}
    for k, v in u_layers.items():
      (trainable if int(k.split("_")[1]) in active_ids else constant)["model"][k] = v
    return trainable, constant

  idx_shape = jax.ShapeDtypeStruct((n,), jnp.int32)
  unrolled = {
      "forward_only": jax.jit(u_loss).lower(u_params, tokens),
      "grad_full": jax.jit(jax.grad(u_loss)).lower(u_params, tokens),
      "grad_active_traced_indices": jax.jit(
          lambda p, i, t: po.lisa_value_and_grad(u_loss)(p, i, t)[1]).lower(
              u_params, idx_shape, tokens),
      "grad_active_static_indices": jax.jit(jax.grad(u_loss_split)).lower(
          *split_static(static_active), tokens),
      "grad_no_layer_weights": jax.jit(jax.grad(u_loss_split)).lower(
          *split_static([]), tokens),
  }
  results["flops_unrolled"] = {k: _common.flops(c.compile()) for k, c in unrolled.items()}
  print("unrolled flops", results["flops_unrolled"], flush=True)

  def runner(name):
    def run():
      current[name], states[name], loss = compiled[name](current[name], states[name], tokens)
      return loss
    return run

  timings = _common.time_interleaved({name: runner(name) for name in txs}, reps=args.reps)
  for name, r in results["methods"].items():
    r["timing"] = timings[name]
    r["time_vs_adamw"] = _common.ratio(timings, name, "adamw")
    r["time_vs_lisa_full_grad"] = _common.ratio(timings, name, "lisa_full_grad")
    base = results["methods"]["adamw"]
    r["step_bytes_vs_adamw"] = r["memory_analysis"]["step_bytes"] / base["memory_analysis"]["step_bytes"]
    r["temp_bytes_vs_adamw"] = r["memory_analysis"]["temp_bytes"] / base["memory_analysis"]["temp_bytes"]
    r["flops_vs_adamw"] = r["flops"] / base["flops"]
    r["state_vs_adamw"] = r["state_bytes"] / base["state_bytes"]
    r["grad_tree_vs_adamw"] = r["grad_tree_bytes"] / base["grad_tree_bytes"]

  # The two LISA paths train identically: same loss after the same steps.
  results["final_losses"] = {name: float(jax.device_get(runner(name)())) for name in txs}
  results["params_bytes"] = _common.tree_bytes(params)
  results["layer_params_bytes"] = _common.tree_bytes(params["model"]["layers"])
  results["config"] = {"model": "LlamaConfig.bench(scan_layers=True)", "params": int(sum(
      x.size for x in jax.tree.leaves(params))), "batch": args.batch, "seq": args.seq,
      "reps": args.reps, "n_layers": n, "num_layers": config.num_hidden_layers}
  results["machine"] = _common.machine_info()
  results["wall_s"] = time.perf_counter() - started
  _common.write_json(_common.RESULTS / "lisa.json", results)
  text = markdown(results)
  (_common.RESULTS / "lisa.md").write_text(text)
  print(text)


def markdown(r: dict) -> str:
  c, m = r["config"], r["machine"]
  rows = []
  for name, x in r["methods"].items():
    t, ma = x["timing"], x["memory_analysis"]
    rows.append([
        name, f"{t['median_s'] * 1e3:.0f} ms [{t['min_s'] * 1e3:.0f}, {t['max_s'] * 1e3:.0f}]",
        f"{x['time_vs_adamw']['paired_median']:.2f}x [{x['time_vs_adamw']['paired_min']:.2f}, "
        f"{x['time_vs_adamw']['paired_max']:.2f}]",
        _common.mib(ma["step_bytes"]), f"{x['step_bytes_vs_adamw']:.2f}x",
        _common.mib(ma["temp_bytes"]), f"{x['temp_bytes_vs_adamw']:.2f}x",
        _common.mib(x["grad_tree_bytes"]), _common.mib(x["state_bytes"]),
        f"{x['flops'] / 1e9:.1f} G ({x['flops_vs_adamw']:.3f}x)",
    ])
  f = r["flops_only"]
  full_g, no_w, fwd = (f["grad_full"]["flops"], f["grad_no_layer_weights"]["flops"],
                       f["forward_only"]["flops"])
  a = r["methods"]["lisa_active_grad"]
  lf = r["methods"]["lisa_full_grad"]
  frac = c["n_layers"] / c["num_layers"]
  ideal = no_w + frac * (full_g - no_w)
  lines = [
      f"Model `{c['model']}` ({c['params'] / 1e6:.1f}M params, {c['num_layers']} scanned layers), "
      f"batch {c['batch']}x{c['seq']}, float32, LISA {c['n_layers']} of {c['num_layers']} "
      f"layers (reset mode), {c['reps']} interleaved reps. {_common.machine_line(m)}",
      "",
      _common.markdown_table(
          ["method", "step time median [min, max]", "vs AdamW (paired median [min, max])",
           "step memory", "vs AdamW", "temporaries", "vs AdamW", "gradient tree",
           "optimizer state", "FLOPs (vs AdamW)"], rows),
      "",
      f"Active-only vs full-gradient LISA: step time {a['time_vs_lisa_full_grad']['paired_median']:.2f}x "
      f"[{a['time_vs_lisa_full_grad']['paired_min']:.2f}, {a['time_vs_lisa_full_grad']['paired_max']:.2f}], "
      f"step memory {a['memory_analysis']['step_bytes'] / lf['memory_analysis']['step_bytes']:.2f}x, "
      f"gradient tree {a['grad_tree_bytes'] / lf['grad_tree_bytes']:.2f}x, "
      f"FLOPs {a['flops'] / lf['flops']:.3f}x. Loss after the same steps: "
      + ", ".join(f"{k} {v:.4f}" for k, v in r["final_losses"].items()) + ".",
      "",
      "Backward FLOPs (cost_analysis, gradient only, no optimizer):",
      "",
      _common.markdown_table(["computation", "FLOPs", "vs full gradient"], [
          ["forward (loss only)", f"{fwd / 1e9:.1f} G", f"{fwd / full_g:.3f}x"],
          ["full gradient", f"{full_g / 1e9:.1f} G", "1.000x"],
          ["gradient w.r.t. non-layer params only (no layer weight gradients)",
           f"{no_w / 1e9:.1f} G", f"{no_w / full_g:.3f}x"],
          [f"ideal active-only ({c['n_layers']}/{c['num_layers']} of the layer weight gradients)",
           f"{ideal / 1e9:.1f} G", f"{ideal / full_g:.3f}x"],
      ]),
      "",
      "XLA's cost_analysis counts a while loop's body once, so the scanned figures above "
      "hold one decoder layer plus everything outside the scan. The same gradients on the "
      "unrolled model (`LlamaConfig.bench()`), where every layer counts:",
      "",
      _common.markdown_table(["computation (unrolled)", "FLOPs", "vs full gradient"], [
          [k, f"{v / 1e9:.1f} G", f"{v / r['flops_unrolled']['grad_full']:.3f}x"]
          for k, v in r["flops_unrolled"].items()]),
      "",
      f"Whole benchmark: {r['wall_s']:.0f} s.",
  ]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
