"""Adapter dropout in NNX layers stacked with ``nnx.vmap`` and run with ``nnx.scan``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax as pj

D, N = 8, 3  # width, stacked layers


class Proj(nnx.Module):
  """A custom layer: its own weight in an einsum."""

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)))

  def __call__(self, x):
    return jnp.einsum("btd,de->bte", x, self.w[...])


class Probe(nnx.Module):
  """N stacked layers; the scan returns every layer's output on the same input."""

  def __init__(self, custom: bool, rngs):
    @nnx.split_rngs(splits=N)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Proj(rngs) if custom else nnx.Linear(D, D, rngs=rngs)
    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
    def body(layer, x):
      return x, layer(x)
    return body(self.layers, x)[1]


@pytest.mark.parametrize("custom", [False, pytest.param(True, marks=pytest.mark.slow)])  # True: + nnx.jit
def test_dropout_masks_differ_per_layer_and_per_call_and_follow_train_eval(custom):
  model = Probe(custom, nnx.Rngs(0))
  x = jnp.ones((2, 5, D))
  base = model(x)
  # rank D with A = B = I and scale 1: each layer adds exactly dropout(x) to its output.
  targets = ("w",) if custom else ("layers",)
  config = pj.LoRAConfig(rank=D, alpha=float(D), dropout=0.5, target_modules=targets,
                         weight_names=("kernel", "embedding", "w"))
  layouts = {"layers/w": pj.KernelLayout((0,), (1,), 1)} if custom else None
  pj.nnx.lora_transform(model, config, key=jax.random.key(0), layouts=layouts,
                        rngs=nnx.Rngs(dropout=1))
  site = model.layers.w_lora if custom else model.layers
  leaves = {"lora_a": site["lora_a"], "lora_b": site["lora_b"]} if custom else {
      "lora_a": site.lora_a, "lora_b": site.lora_b}
  for var in leaves.values():
    assert var.get_value().shape == (N, D, D)
    var.set_value(jnp.broadcast_to(jnp.eye(D), (N, D, D)))

  model.eval()
  np.testing.assert_allclose(model(x) - base, jnp.ones((N,) + x.shape), atol=1e-5)

  model.train()
  first, second = model(x) - base, model(x) - base
  for delta in (first, second):
    np.testing.assert_allclose(jnp.minimum(jnp.abs(delta), jnp.abs(delta - 2.0)), 0.0, atol=1e-5)
    for layer in range(N):
      dropped = float(jnp.mean(jnp.abs(delta[layer]) < 1.0))
      assert 0.2 < dropped < 0.8, (layer, dropped)
  masks = [np.asarray(d > 1.0) for d in (first, second)]
  assert all((m[0] != m[1]).any() and (m[1] != m[2]).any() for m in masks)  # per layer
  assert (masks[0] != masks[1]).any()  # per call

  if not custom:  # under nnx.jit too: with -m slow
    return
  traces = []

  @nnx.jit
  def forward(model, x):
    traces.append(1)
    return model(x)

  a, b = forward(model, x), forward(model, x)
  assert len(traces) == 1 and float(jnp.abs(a - b).max()) > 0.5
  model.eval()
  np.testing.assert_allclose(forward(model, x) - base, jnp.ones((N,) + x.shape), atol=1e-5)
