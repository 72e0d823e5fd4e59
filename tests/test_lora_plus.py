"""LoRA+: groups and effective learning rates against peft's create_loraplus_optimizer."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import peft_jax.optim as po

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "data" / "lora_plus_reference.json").read_text()
)
META = REFERENCE["_meta"]


def _reference_tree(value=0.0):
  flat = {tuple(r["flax_path"].split("/")): jnp.full(r["flax_shape"], value, jnp.float32)
          for r in REFERENCE["params"]}
  return traverse_util.unflatten_dict(flat)


def _flat(tree):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def test_groups_match_peft():
  groups = _flat(po.lora_plus_groups(_reference_tree()))
  for record in REFERENCE["params"]:
    assert groups[record["flax_path"]] == record["group"], record["torch_name"]


def test_effective_learning_rates_and_decay_match_peft():
  params = _reference_tree(1.0)
  # Learning rates: SGD on unit gradients moves each leaf by -lr.
  tx = po.lora_plus(optax.sgd, learning_rate=META["lr"], ratio=META["ratio"],
                    embedding_lr=META["embedding_lr"])
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  lrs = {k: -np.asarray(v) for k, v in _flat(updates).items()}
  # Decay: AdamW with zero gradients moves each leaf by -lr * wd * p.
  tx = po.lora_plus(optax.adamw, learning_rate=META["lr"], ratio=META["ratio"],
                    embedding_lr=META["embedding_lr"], weight_decay=META["weight_decay"])
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  decays = {k: -np.asarray(v) for k, v in _flat(updates).items()}
  for record in REFERENCE["params"]:
    path = record["flax_path"]
    np.testing.assert_allclose(lrs[path], record["lr"], rtol=1e-6, err_msg=path)
    np.testing.assert_allclose(decays[path], record["lr"] * record["weight_decay"],
                               rtol=1e-5, atol=1e-12, err_msg=path)


def test_schedule_follows_for_lora_a_and_lora_b():
  params = {"layers_0": {"q_proj": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}}}
  schedule = optax.linear_schedule(1e-2, 0.0, 4)
  tx = po.lora_plus(optax.sgd, learning_rate=schedule, ratio=16.0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, params)
  for t in range(3):
    updates, state = step(grads, state, params)
    a = -updates["layers_0"]["q_proj"]["lora_a"][0, 0]
    b = -updates["layers_0"]["q_proj"]["lora_b"][0, 0]
    np.testing.assert_allclose(a, schedule(t), rtol=1e-6)
    np.testing.assert_allclose(b, 16.0 * schedule(t), rtol=1e-6)


def test_transform_form_and_stacked_layers():
  # A learning-rate-free transformation plus stacked (L, ...) leaves: a
  # stacked magnitude (L, out) is still 1-D per layer -> groupB.
  params = {"model": {"layers": {"q_proj": {"lora_a": jnp.ones((3, 4, 2)),
                                            "lora_b": jnp.ones((3, 2, 4)),
                                            "lora_magnitude": jnp.ones((3, 4))},
                                 "input_layernorm": {"weight": jnp.ones((3, 4))}}}}
  groups = _flat(po.lora_plus_groups(params))
  assert groups == {
      "model/layers/q_proj/lora_a": "groupA",
      "model/layers/q_proj/lora_b": "groupB",
      "model/layers/q_proj/lora_magnitude": "groupB",
      "model/layers/input_layernorm/weight": "groupB_no_decay",
  }
  tx = po.lora_plus(optax.identity(), learning_rate=0.5, ratio=4.0, weight_decay=0.1)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  flat = _flat(updates)
  np.testing.assert_allclose(flat["model/layers/q_proj/lora_a"], -0.5 * 1.1)
  np.testing.assert_allclose(flat["model/layers/q_proj/lora_b"], -2.0 * 1.1)
  np.testing.assert_allclose(flat["model/layers/input_layernorm/weight"], -2.0)


def test_rejects_weight_decay_for_factory_without_it():
  with pytest.raises(TypeError, match="weight_decay"):
    po.lora_plus(optax.sgd, learning_rate=1e-3, weight_decay=0.1)


def test_optimizer_state_only_per_group():
  params = _reference_tree()
  state = po.lora_plus(optax.adam, learning_rate=1e-3).init(params)
  n_state = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size"))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  # Two moments per parameter, plus a few scalar counts: no duplication.
  assert 2 * n_params <= n_state <= 2 * n_params + 16
