"""One-script accelerator benchmark of NF4: the Pallas kernel vs bf16 dense vs the XLA path.

    python benchmarks/gpu_nf4.py [--reps 10] [--out benchmarks/results/nf4_gpu.json]
    python benchmarks/gpu_nf4.py --dry-run      # the same logic at tiny sizes, on CPU

On a GPU (or TPU) it times, interleaved, forward and backward (``jax.vjp``:
``y`` and ``dx``) of ``x @ W`` for a bfloat16 dense weight,
``nf4_matmul(impl="pallas")`` and ``nf4_matmul(impl="xla")`` with bfloat16
compute, at M in {1, 16, 128, 2048} for W of 4096 x 4096, 4096 x 14336 and
14336 x 4096 (checking the kernel against the XLA path), then a QLoRA and a
LoRA train step of a 1B-shaped Llama (hidden 2048, 16 layers, bf16,
batch 4 x 512). It writes JSON (and a Markdown table next to it) and is
sized to finish in under 5 minutes on one accelerator. ``--dry-run`` (the
default without an accelerator) runs every part at tiny sizes with the
Pallas interpreter, so the script is exercised by the tests.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from peft_jax.quant import NF4, nf4_matmul, quantize_array, select_impl  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
FULL = {"shapes": [(4096, 4096), (4096, 14336), (14336, 4096)], "sizes": [1, 16, 128, 2048],
        "model": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
        "batch": (4, 512), "pallas": "pallas"}
DRY = {"shapes": [(256, 256), (256, 512), (512, 256)], "sizes": [1, 16], "model": None,
       "batch": (2, 16), "pallas": "pallas_interpret"}


def _time(fns: dict, reps: int) -> dict:
  """Median/min/max ms of each fn, interleaved, after a warm-up."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t)}
          for name, t in times.items()}


def matmuls(plan: dict, reps: int) -> list[dict]:
  """Forward and forward+backward of dense bf16, NF4 Pallas and NF4 XLA per shape and M."""
  rows = []
  key = jax.random.key(0)
  for k, n in plan["shapes"]:
    dense_w = (jax.random.normal(key, (k, n)) * 0.02).astype(jnp.bfloat16)
    w = quantize_array(dense_w, NF4(compute_dtype=jnp.bfloat16))
    products = {"dense_bf16": lambda x, w=dense_w: x @ w,
                "nf4_pallas": lambda x, w=w: nf4_matmul(x, w, impl=plan["pallas"]),
                "nf4_xla": lambda x, w=w: nf4_matmul(x, w, impl="xla")}
    fwd = {name: jax.jit(f) for name, f in products.items()}
    bwd = {name: jax.jit(lambda x, f=f: jax.vjp(f, x)[1](f(x))[0]) for name, f in products.items()}
    for m in plan["sizes"]:
      x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
      ref = fwd["nf4_xla"](x).astype(jnp.float32)
      err = float(jnp.max(jnp.abs(fwd["nf4_pallas"](x).astype(jnp.float32) - ref))
                  / jnp.max(jnp.abs(ref)))
      timed = _time({f"{name}/{phase}": (lambda f=f, x=x: f(x))
                     for phase, table in (("forward", fwd), ("backward", bwd))
                     for name, f in table.items()}, reps)
      row = {"k": k, "n": n, "m": m, "impl": select_impl(w, m, plan["pallas"]),
             "rel_err_pallas_vs_xla": err, "times": timed}
      rows.append(row)
      print(f"{k}x{n} M={m}: " + ", ".join(f"{name} {t['median_ms']:.3f} ms"
                                            for name, t in timed.items()), flush=True)
  return rows


def train_steps(plan: dict, reps: int) -> dict:
  """A QLoRA and a LoRA train step (all-linear, r=16) of the plan's model, bf16."""
  import optax  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax import training  # pylint: disable=import-outside-toplevel
  from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params  # pylint: disable=import-outside-toplevel
  settings = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  config = (LlamaConfig(**plan["model"], **settings) if plan["model"]
            else LlamaConfig.tiny(**settings))
  model = LlamaForCausalLM(config)
  params = init_params(config, jax.random.key(0))
  batch, seq = plan["batch"]
  tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
  out = {"model": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "vocab_size")},
         "batch": [batch, seq]}
  optimizer = optax.adamw(1e-4)
  for method in ("qlora", "lora"):
    kw = dict(rank=16, alpha=32.0, target_modules="all-linear")
    if method == "qlora":
      lora = pj.QLoRAConfig(**kw, compute_dtype="bfloat16")
      adapted = pj.apply_qlora(params, lora, key=jax.random.key(2))
    else:
      lora = pj.LoRAConfig(**kw)
      adapted = pj.lora_transform(params, lora, key=jax.random.key(2))
    trainable, base = pj.split(adapted)
    step = training.make_train_step(model, lora, optimizer)
    state = [training.init_train_state(trainable, optimizer)]

    def run(step=step, base=base, state=state):
      state[0], loss = step(state[0], base, tokens[:, :-1], tokens[:, 1:], jax.random.key(0))
      return loss

    out[method] = _time({"step": run}, reps)["step"]
    out[method]["tokens_per_s"] = batch * seq / out[method]["median_ms"] * 1e3
    print(f"{method} step: {out[method]['median_ms']:.1f} ms "
          f"({out[method]['tokens_per_s']:,.0f} tokens/s)", flush=True)
  return out


def markdown(result: dict) -> str:
  lines = [f"### NF4 on {result['device']} ({'dry run, tiny sizes' if result['dry_run'] else 'bf16'})",
           "", "| K x N | M | impl | dense fwd ms | Pallas fwd ms | XLA fwd ms | dense fwd+bwd ms "
           "| Pallas fwd+bwd ms | XLA fwd+bwd ms | rel err |", "|---" * 10 + "|"]
  for r in result["matmuls"]:
    t = r["times"]
    cells = [t[f"{name}/{phase}"]["median_ms"] for phase in ("forward", "backward")
             for name in ("dense_bf16", "nf4_pallas", "nf4_xla")]
    lines.append(f"| {r['k']} x {r['n']} | {r['m']} | {r['impl']} | "
                 + " | ".join(f"{c:.3f}" for c in cells) + f" | {r['rel_err_pallas_vs_xla']:.1e} |")
  steps = result["train_steps"]
  lines += ["", f"Train step ({steps['model']}, batch {steps['batch']}): QLoRA "
            f"{steps['qlora']['median_ms']:.1f} ms, LoRA {steps['lora']['median_ms']:.1f} ms."]
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--dry-run", action="store_true",
                      help="tiny sizes, Pallas interpreter (the default without GPU/TPU)")
  parser.add_argument("--out", default=str(RESULTS / "nf4_gpu.json"))
  args = parser.parse_args(argv)
  dry = args.dry_run or jax.default_backend() not in ("gpu", "tpu")
  plan = DRY if dry else FULL
  reps = 1 if dry else args.reps
  started = time.perf_counter()
  result = {"device": str(jax.devices()[0]), "dry_run": dry,
            "matmuls": matmuls(plan, reps), "train_steps": train_steps(plan, reps)}
  result["total_s"] = time.perf_counter() - started
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  out.with_suffix(".md").write_text(markdown(result) + "\n")
  print(markdown(result))
  return result


if __name__ == "__main__":
  main()
