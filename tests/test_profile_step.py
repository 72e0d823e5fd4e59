"""benchmarks/profile_step.py: the HLO parsing and classification behind its per-op table."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp

_PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"
_SPEC = importlib.util.spec_from_file_location("profile_step", _PATH)
profile_step = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(profile_step)


def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def test_ops_are_classified_by_direction_kind_and_source():
  def loss(w, x):
    return jnp.sum(jnp.tanh(_rms(x) @ w))

  w, x = jnp.ones((64, 32)), jnp.ones((16, 64))
  text = jax.jit(jax.value_and_grad(loss)).lower(w, x).compile().as_text()
  hlo = profile_step.parse_hlo(text)
  assert hlo["frames"] and all(":" in v for v in hlo["frames"].values())
  labels = {name: profile_step.classify(info, hlo["frames"])
            for name, info in hlo["instrs"].items()}
  kinds = {(direction, kind) for _, direction, kind in labels.values()}
  assert ("forward", "matmul") in kinds and ("backward", "matmul") in kinds, kinds
  parts = {part for part, _, _ in labels.values()}
  assert "_rms" in parts or "loss" in parts, parts  # the innermost source function names the part
