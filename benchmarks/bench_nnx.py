"""NNX LoRA train step against the linen LoRA train step (issue 10, goal <= 1.05x).

The same Llama-shaped model twice: the reference linen `LlamaForCausalLM`
and an NNX twin with the same weights (`NnxLlama` below: the same module
paths, so `peft_jax.nnx.sync` copies the linen params in), LoRA r=8 on
q_proj/v_proj with the same adapters. The script first checks that both give
the same logits, then times interleaved (A B A B ...):

* `linen`: `jax.jit` step: `jax.value_and_grad` over the adapter tree
  (`peft_jax.split`), `peft_jax.intercept`, AdamW;
* `nnx_jit`: `nnx.jit` step with `nnx.Optimizer(model, tx, wrt=pj.nnx.Adapter)`
  (the idiomatic NNX loop; it also pays NNX's per-call graph traversal);
* `nnx_cached_partial`: that step through `nnx.cached_partial(step, model,
  optimizer)` (NNX's way to skip the graph traversal on every call);
* `nnx_functional`: the same NNX step under `jax.jit` on `nnx.split` state:
  the frozen base passed in, the adapters and optimizer state donated and
  returned (`nnx.merge` inside), as the linen step does.

Writes `benchmarks/results/nnx.json` / `nnx.md`. Usage::

    python benchmarks/bench_nnx.py           # LlamaConfig.tiny(hidden 256, 4 layers), batch 4 x 64
    python benchmarks/bench_nnx.py --quick   # smaller, seconds; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402  pylint: disable=wrong-import-position

import peft_jax as pj  # noqa: E402
from peft_jax.models import llama  # noqa: E402


class RMSNorm(nnx.Module):

  def __init__(self, size, eps):
    self.weight = nnx.Param(jnp.ones((size,)))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * normed


def _linear(n_in, n_out, rngs):
  return nnx.Linear(n_in, n_out, use_bias=False, rngs=rngs)


class Attention(nnx.Module):

  def __init__(self, cfg, rngs):
    self.cfg = cfg
    d, hd = cfg.hidden_size, cfg.head_dim
    self.q_proj = _linear(d, cfg.num_attention_heads * hd, rngs)
    self.k_proj = _linear(d, cfg.num_key_value_heads * hd, rngs)
    self.v_proj = _linear(d, cfg.num_key_value_heads * hd, rngs)
    self.o_proj = _linear(cfg.num_attention_heads * hd, d, rngs)

  def __call__(self, hidden, mask, cos, sin):
    cfg = self.cfg
    b, s, _ = hidden.shape
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    group = cfg.num_attention_heads // kv
    q = llama.apply_rotary(self.q_proj(hidden).reshape(b, s, cfg.num_attention_heads, hd), cos, sin)
    k = llama.apply_rotary(self.k_proj(hidden).reshape(b, s, kv, hd), cos, sin)
    v = self.v_proj(hidden).reshape(b, s, kv, hd)
    q = q.reshape(b, s, kv, group, hd)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k).astype(jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", jax.nn.softmax(scores, axis=-1), v)
    return self.o_proj(out.reshape(b, s, cfg.num_attention_heads * hd))


class Mlp(nnx.Module):

  def __init__(self, cfg, rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj, self.up_proj, self.down_proj = _linear(d, f, rngs), _linear(d, f, rngs), _linear(f, d, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nnx.Module):

  def __init__(self, cfg, rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, hidden, mask, cos, sin):
    hidden = hidden + self.self_attn(self.input_layernorm(hidden), mask, cos, sin)
    return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Decoder(nnx.Module):

  def __init__(self, cfg, rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

  def __call__(self, ids):
    seq = ids.shape[-1]
    positions = jnp.broadcast_to(jnp.arange(seq), ids.shape)
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None]
    cos, sin = llama.rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
    hidden = self.embed_tokens(ids)
    for layer in self.layers:
      hidden = layer(hidden, mask, cos, sin)
    return self.norm(hidden)


class NnxLlama(nnx.Module):
  """The reference Llama (untied head, float32, no dropout) as NNX modules."""

  def __init__(self, cfg, rngs):
    self.model = Decoder(cfg, rngs)
    self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, rngs)

  def __call__(self, ids):
    return self.lm_head(self.model(ids)).astype(jnp.float32)


def _xent(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  if args.quick:
    cfg, batch, seq, reps = llama.LlamaConfig.tiny(), 2, 32, args.reps or 10
  else:
    cfg = llama.LlamaConfig.tiny(hidden_size=256, intermediate_size=688, num_hidden_layers=4)
    batch, seq, reps = 4, 64, args.reps or 30
  ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
  config = pj.LoRAConfig(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))

  linen_model = llama.LlamaForCausalLM(cfg)
  params = linen_model.init(jax.random.key(0), ids)["params"]
  params = pj.lora_transform(params, config, key=jax.random.key(2))
  params = jax.tree_util.tree_map_with_path(  # non-zero B: the adapters act
      lambda p, v: v + 0.01 if "lora_b" in jax.tree_util.keystr(p) else v, params)
  adapters, base = pj.split(params)
  model = NnxLlama(cfg, nnx.Rngs(0))
  pj.nnx.sync(model, params, config)
  with pj.intercept(config):
    same = float(jnp.abs(linen_model.apply({"params": params}, ids) - model(ids)).max())
  assert same < 1e-4, f"twins differ by {same}"

  tx = optax.adamw(1e-3)

  def linen_loss(adapters, base, ids):
    with pj.intercept(config):
      return _xent(linen_model.apply({"params": pj.combine(base, adapters)}, ids), ids)

  @jax.jit
  def linen_step(adapters, opt_state, base, ids):
    loss, grads = jax.value_and_grad(linen_loss)(adapters, base, ids)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  lin = {"adapters": adapters, "opt": tx.init(adapters)}

  def run_linen():
    lin["adapters"], lin["opt"], loss = linen_step(lin["adapters"], lin["opt"], base, ids)
    return loss

  optimizer = nnx.Optimizer(model, tx, wrt=pj.nnx.Adapter)
  diff = nnx.DiffState(0, pj.nnx.Adapter)

  @nnx.jit
  def nnx_step(model, optimizer, ids):
    loss, grads = nnx.value_and_grad(lambda m: _xent(m(ids), ids), argnums=diff)(model)
    optimizer.update(model, grads)
    return loss

  def run_nnx():
    return nnx_step(model, optimizer, ids)

  model_c = NnxLlama(cfg, nnx.Rngs(0))
  pj.nnx.sync(model_c, params, config)
  cached_step = nnx.cached_partial(nnx_step, model_c, nnx.Optimizer(model_c, tx, wrt=pj.nnx.Adapter))

  def run_cached():
    return cached_step(ids)

  model_f = NnxLlama(cfg, nnx.Rngs(0))
  pj.nnx.sync(model_f, params, config)
  optimizer_f = nnx.Optimizer(model_f, tx, wrt=pj.nnx.Adapter)
  frozen_filter = nnx.All(nnx.Param, nnx.Not(pj.nnx.Adapter))
  graphdef, frozen, trainable = nnx.split((model_f, optimizer_f), frozen_filter, ...)

  @functools.partial(jax.jit, donate_argnums=0)
  def functional_step(trainable, frozen, ids):
    m, opt = nnx.merge(graphdef, frozen, trainable)
    loss, grads = nnx.value_and_grad(lambda m: _xent(m(ids), ids), argnums=diff)(m)
    opt.update(m, grads)
    return nnx.state((m, opt), nnx.Not(frozen_filter)), loss

  fun = {"trainable": trainable}

  def run_functional():
    fun["trainable"], loss = functional_step(fun["trainable"], frozen, ids)
    return loss

  losses = [float(run_linen()), float(run_nnx()), float(run_cached()), float(run_functional())]
  assert np.allclose(losses, losses[0], rtol=1e-5), losses
  flops = {"linen": C.flops(linen_step.lower(lin["adapters"], lin["opt"], base, ids).compile()),
           "nnx_functional": C.flops(functional_step.lower(fun["trainable"], frozen, ids).compile())}
  names = ("linen", "nnx_jit", "nnx_cached_partial", "nnx_functional")
  load_before = os.getloadavg()
  timings = C.time_interleaved(dict(zip(names, (run_linen, run_nnx, run_cached, run_functional))),
                               reps=reps)
  load_after = os.getloadavg()
  result = {
      "machine": C.machine_info(),
      "settings": {"config": repr(cfg), "batch": batch, "seq": seq, "reps": reps,
                   "lora": config.to_dict(), "twin_max_abs_diff": same},
      "timings": timings,
      "ratios": {name: C.ratio(timings, name, "linen") for name in names[1:]},
      "flops": flops,
      "load_average_before_after": [list(load_before), list(load_after)],
      "goal": {"nnx_over_linen": 1.05},
  }
  rows = [[name, f"{C.ms(timings[name]['median_s'])} ({C.ms(timings[name]['min_s'])}-"
           f"{C.ms(timings[name]['max_s'])})",
           "1.00" if name == "linen" else f"{result['ratios'][name]['ratio']:.3f} "
           f"({result['ratios'][name]['paired_min']:.2f}-{result['ratios'][name]['paired_max']:.2f})"]
          for name in names]
  table = C.markdown_table(["step", "median (min-max)", "over linen (per-rep spread)"], rows)
  text = (f"# NNX vs linen LoRA train step\n\n{C.machine_line(result['machine'])}\n\n"
          f"Load average (1 min) before / after the timed reps: {load_before[0]:.2f} / "
          f"{load_after[0]:.2f} ({os.cpu_count()} cores; above ~0.75 per core the times are noise).\n\n"
          f"{table}\n\n"
          f"Compiled step FLOPs: linen {flops['linen']:.4g}, NNX {flops['nnx_functional']:.4g}.\n")
  print(text)
  out = args.out or (None if args.quick else C.RESULTS / "nnx")
  if out is not None:
    C.write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(text)
  return result


if __name__ == "__main__":
  main()
