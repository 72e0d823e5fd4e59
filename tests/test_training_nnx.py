"""The functional (and shardable) train step for NNX models, on one device.

The 8-device sharded runs are in tests/sharding_worker.py (`-m slow`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax as pj
from peft_jax import training, training_nnx
from peft_jax.models.gemma3 import FULL_ATTENTION, Gemma3Config, Gemma3ForCausalLM
from peft_jax.models.llama import causal_lm_loss

CONFIG = pj.LoRAConfig(rank=4, target_modules="all-linear")


def _adapted():
  cfg = Gemma3Config.tiny(num_hidden_layers=1, layer_types=(FULL_ATTENTION,))
  model = Gemma3ForCausalLM(cfg, rngs=nnx.Rngs(0))
  pj.nnx.lora_transform(model, CONFIG, key=jax.random.key(1))
  trainable, _ = training_nnx.split_params(model)
  # Non-zero lora_b, so lora_a gets a gradient from the first step.
  training_nnx.update_model(model, jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.01 if p[-1].key == "lora_b" else x, trainable))
  return model


def _batch():
  ids = jax.random.randint(jax.random.key(2), (2, 9), 3, 256)
  return ids[:, :-1], ids[:, 1:]


def test_functional_step_matches_nnx_optimizer_and_compiles_once():
  inputs, labels = _batch()
  tx = optax.adamw(1e-2)
  reference = _adapted()
  optimizer = nnx.Optimizer(reference, tx, wrt=pj.nnx.Adapter)

  @nnx.jit
  def nnx_step(model, optimizer):
    loss_fn = lambda m: causal_lm_loss(m(inputs), labels)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, pj.nnx.Adapter))(model)
    optimizer.update(model, grads)
    return loss

  model = _adapted()
  traces = []

  def loss_fn(m, x, y, key):
    traces.append(1)
    return training_nnx.next_token_loss(m, x, y, key)

  trainable, base = training_nnx.split_params(model)
  assert set(jax.tree.leaves(jax.tree_util.tree_map_with_path(
      lambda p, _: p[-1].key, trainable))) == {"lora_a", "lora_b"}
  state = training.init_train_state(trainable, tx)
  step = training_nnx.make_train_step(model, tx, loss_fn=loss_fn)
  losses, ref_losses = [], []
  for _ in range(2):
    state, loss = step(state, base, inputs, labels, jax.random.key(3))
    losses.append(float(loss))
    ref_losses.append(float(nnx_step(reference, optimizer)))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  assert len(traces) == 1 and int(state.step) == 2

  before = model(inputs)
  training_nnx.update_model(model, state.trainable)
  np.testing.assert_allclose(model(inputs), reference(inputs), rtol=1e-5, atol=1e-5)
  assert not np.allclose(before, model(inputs))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               pj.nnx.adapters(model), pj.nnx.adapters(reference))


def test_params_that_do_not_fit_the_model_raise_naming_them():
  model = _adapted()
  trainable, base = training_nnx.split_params(model)
  with pytest.raises(ValueError, match="model/extra/lora_a"):
    training_nnx.update_model(model, {"model": {"extra": {"lora_a": jnp.zeros((2, 2))}}})
  step = training_nnx.make_train_step(model, optax.sgd(0.1))
  state = training.init_train_state(trainable, optax.sgd(0.1))
  inputs, labels = _batch()
  del base["model"]["norm"]
  with pytest.raises(ValueError, match="missing.*model/norm/weight"):
    step(state, base, inputs, labels, jax.random.key(0))
