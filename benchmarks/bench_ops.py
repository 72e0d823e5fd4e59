"""Op-level adapters cost no more than the module path (issue 10's benchmark).

The reference Llama twice, with the same weights: its projections as
built-in ``nn.Dense`` (adapters by the module interceptor), and as a custom
module holding a param ``w`` used by ``jnp.einsum`` (adapters by
:mod:`peft_jax.lora.ops`). A LoRA r=8 train step on q_proj/v_proj
(``peft_jax.training.make_train_step``, AdamW) of each is compiled, then
timed interleaved (A B A B ...). Goal: custom / built-in <= 1.05. Writes
``benchmarks/results/ops.json`` and ``ops.md``. Usage::

    python benchmarks/bench_ops.py            # LlamaConfig.bench(), batch 4 x 128
    python benchmarks/bench_ops.py --quick    # tiny model, seconds; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402  pylint: disable=wrong-import-position

import peft_jax as pj  # noqa: E402
from peft_jax import targeting, training  # noqa: E402
from peft_jax.models import llama  # noqa: E402

GOAL = 1.05
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class EinsumDense(nn.Module):
  """A custom projection: param ``w`` (in, out) and a raw einsum."""

  features: int
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                   self.param_dtype)
    dtype = self.dtype or x.dtype
    y = jnp.einsum("...d,df->...f", x.astype(dtype), w.astype(dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(dtype)
    return y


@contextlib.contextmanager
def custom_projections():
  """The reference Llama builds its projections with EinsumDense meanwhile."""
  original = llama._dense  # pylint: disable=protected-access

  def dense(config, features, name, use_bias=False):
    return EinsumDense(features, config.dtype, config.param_dtype, use_bias, name=name)

  llama._dense = dense  # pylint: disable=protected-access
  try:
    yield
  finally:
    llama._dense = original  # pylint: disable=protected-access


def to_custom(params):
  """Built-in params -> the custom twin's (``.../q_proj/kernel`` -> ``.../q_proj/w``)."""
  flat = {}
  for path, value in targeting.flatten(params).items():
    module, leaf = targeting.split_path(path)
    is_projection = targeting.split_path(module)[1] in PROJECTIONS
    flat[f"{module}/w" if leaf == "kernel" and is_projection else path] = value
  return targeting.unflatten(flat)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  model_config = llama.LlamaConfig.tiny() if args.quick else llama.LlamaConfig.bench()
  batch, seq = (2, 32) if args.quick else (4, 128)
  reps = args.reps or (5 if args.quick else 15)
  params = llama.init_params(model_config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, model_config.vocab_size)
  inputs, labels, key = tokens[:, :-1], tokens[:, 1:], jax.random.key(3)
  optimizer = optax.adamw(1e-4)
  builtin_cfg = pj.LoRAConfig(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
  custom_cfg = builtin_cfg.replace(target_modules=("q_proj/w", "v_proj/w"), weight_names=("w",))

  def compiled(model, config, params):
    adapters, base = pj.split(pj.lora_transform(params, config, key=jax.random.key(2)))
    step = training.make_train_step(model, config, optimizer)
    state = training.init_train_state(adapters, optimizer)
    return step.lower(state, base, inputs, labels, key).compile(), state, base

  steps = {"builtin": compiled(llama.LlamaForCausalLM(model_config), builtin_cfg, params)}
  with custom_projections():  # traced and compiled here; the executables need no Python
    steps["custom_einsum"] = compiled(llama.LlamaForCausalLM(model_config), custom_cfg,
                                      to_custom(params))
  losses = {}

  def runner(name):
    def run():
      fn, state, base = steps[name]
      state, loss = fn(state, base, inputs, labels, key)
      steps[name] = (fn, state, base)
      losses.setdefault(name, float(loss))
      return loss
    return run

  compiled_stats = {n: {"flops": C.flops(steps[n][0]),
                        "step_bytes": (C.memory_analysis(steps[n][0]) or {}).get("step_bytes")}
                    for n in steps}
  load_before = os.getloadavg()
  timings = C.time_interleaved({n: runner(n) for n in steps}, reps=reps)
  load_after = os.getloadavg()
  result = {"machine": C.machine_info(), "model": "tiny" if args.quick else "bench",
            "batch": batch, "seq": seq, "reps": reps, "timings": timings,
            "first_loss": losses, "compiled": compiled_stats,
            "load_average_before_after": [list(load_before), list(load_after)],
            "custom_over_builtin": C.ratio(timings, "custom_einsum", "builtin"), "goal": GOAL}
  r = result["custom_over_builtin"]
  table = C.markdown_table(
      ["figure", "median", "spread (per-rep ratios; min - max times)", "goal"],
      [["LoRA step, custom einsum Llama / built-in Llama", f"{r['ratio']:.3f}",
        f"{r['paired_min']:.3f} - {r['paired_max']:.3f}", f"<= {GOAL}"],
       *[[f"step time, {n}", C.ms(timings[n]["median_s"]),
         f"{C.ms(timings[n]['min_s'])} - {C.ms(timings[n]['max_s'])}", ""] for n in steps],
       ["compiled FLOPs, custom / built-in", f"{_over(compiled_stats, 'flops'):.4f}", "exact", ""],
       ["step memory (memory_analysis), custom / built-in",
        f"{_over(compiled_stats, 'step_bytes'):.4f}", "exact", ""]])
  text = (f"# Op-level adapters: custom-module Llama vs built-in\n\n{C.machine_line(result['machine'])}\n\n"
          f"Load average (1 min) before / after the timed reps: {load_before[0]:.2f} / "
          f"{load_after[0]:.2f} ({os.cpu_count()} cores; above ~0.75 per core the times are noise).\n\n"
          f"{table}\n\nFirst-step losses (same weights): {losses}\n")
  print(text)
  out = args.out or (None if args.quick else C.RESULTS)
  if out is not None:
    C.write_json(out / "ops.json", result)
    (out / "ops.md").write_text(text)


def _over(stats, key):
  a, b = stats["custom_einsum"][key], stats["builtin"][key]
  return float("nan") if not a or not b else a / b


if __name__ == "__main__":
  main()
