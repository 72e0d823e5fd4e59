"""Temporaries of an optimizer-only step: AdamW vs LISA (issue #12's diagnosis).

    python benchmarks/lisa_step_memory.py

A toy unrolled tree (a 4096 x 256 always-trained embedding, 6 layers of a
256 x 1024 MLP, float32), gradients passed in (so AdamW's step needs no
temporaries at all), params and state donated; each row is
`compiled.memory_analysis().temp_size_in_bytes` over the params' bytes,
without and with the train step's `lax.cond` finite check around the update.
Set `XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"` to read which
buffers they are (`*jit_step*buffer-assignment.txt`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import peft_jax as pj

LAYERS, HIDDEN, FFN, VOCAB = 6, 256, 1024, 4096


def toy_params() -> dict:
  layer = lambda: {"mlp": {"up": jnp.zeros((HIDDEN, FFN)), "down": jnp.zeros((FFN, HIDDEN))},
                   "norm": jnp.zeros((HIDDEN,))}
  layers = {f"layers_{i}": layer() for i in range(LAYERS)}
  return {"model": {"embed": jnp.zeros((VOCAB, HIDDEN)), **layers, "norm": jnp.zeros((HIDDEN,))}}


def temp_over_params(tx: optax.GradientTransformation, finite_check: bool) -> float:
  """Compiled temporaries of ``(params, state, grads) -> (params, state)`` / params bytes."""
  params = toy_params()

  def step(p, s, g):
    def update(ps):
      p, s = ps
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    if not finite_check:
      return update((p, s))
    ok = jnp.all(jnp.isfinite(g["model"]["embed"]))
    return jax.lax.cond(ok, update, lambda ps: ps, (p, s))

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return compiled.memory_analysis().temp_size_in_bytes / nbytes


def main() -> None:
  adamw = optax.adamw(1e-3)
  rows = {"adamw": adamw, "lisa reset": pj.optim.lisa(adamw, n_layers=2),
          "lisa keep": pj.optim.lisa(adamw, n_layers=2, state_mode="keep")}
  for check in (False, True):
    for name, tx in rows.items():
      print(f"{name:12s} finite_check={check!s:5s} temp/params={temp_over_params(tx, check):.3f}")


if __name__ == "__main__":
  main()
