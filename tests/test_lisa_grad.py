"""LISA with gradients for the active layers only (peft_jax.optim.lisa_grad)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax.optim as po
from peft_jax.models import LlamaConfig, LlamaForCausalLM, causal_lm_loss, init_params

L, D, V = 6, 4, 7
TOKENS = jnp.array([[1, 2, 3, 4], [5, 6, 0, 1]])


def toy_params(layout, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((L, D, D)).astype(np.float32) * 0.5
  g = 1 + 0.1 * rng.standard_normal((L, D)).astype(np.float32)
  params = {"model": {"embed_tokens": {"embedding": rng.standard_normal((V, D)).astype(np.float32)},
                      "norm": {"weight": np.ones(D, np.float32)}},
            "lm_head": {"kernel": rng.standard_normal((D, V)).astype(np.float32)}}
  if layout == "stacked":
    params["model"]["layers"] = {"mlp": {"kernel": w}, "norm": {"weight": g}}
  else:
    for i in range(L):
      params["model"][f"layers_{i}"] = {"mlp": {"kernel": w[i]}, "norm": {"weight": g[i]}}
  return jax.tree.map(jnp.asarray, params)


def toy_loss(params, tokens=TOKENS):
  m = params["model"]
  x = m["embed_tokens"]["embedding"][tokens]
  if "layers" in m:  # scanned
    def body(x, layer):
      return x + jnp.tanh(x @ layer["mlp"]["kernel"]) * layer["norm"]["weight"], None
    x, _ = jax.lax.scan(body, x, m["layers"])
  else:
    for i in range(L):
      layer = m[f"layers_{i}"]
      x = x + jnp.tanh(x @ layer["mlp"]["kernel"]) * layer["norm"]["weight"]
  logits = (x * m["norm"]["weight"]) @ params["lm_head"]["kernel"]
  labels = jnp.roll(tokens, -1, axis=1)
  return jnp.mean(jax.nn.logsumexp(logits, -1)
                  - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0])


def layer_leaf(tree, layout, i, name="mlp"):
  m = tree["model"]
  return m["layers"][name]["kernel" if name == "mlp" else "weight"][i] if layout == "stacked" \
      else m[f"layers_{i}"][name]["kernel" if name == "mlp" else "weight"]


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
@pytest.mark.parametrize("at_point", [False, True])
def test_active_gradients_equal_full_gradients_at_active_slots(layout, at_point):
  params = toy_params(layout)
  idx = jnp.array([1, 4], jnp.int32)
  full = jax.grad(toy_loss)(params)
  if at_point:
    _, grads, active, _ = jax.jit(po.lisa_value_and_grad(toy_loss))(params, idx)
  else:
    active, frozen = po.lisa_split(params, idx)
    grads = jax.jit(jax.grad(lambda a, idx: toy_loss(po.lisa_combine(frozen, a, idx))))(
        active, idx)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, active)
  for s, i in enumerate([1, 4]):
    slot = grads if layout == "stacked" else {"model": {"layers_0": grads["model"][f"layers_{s}"],
                                                        "layers_1": grads["model"][f"layers_{s}"]}}
    for name in ("mlp", "norm"):
      got = layer_leaf(slot, layout, s if layout == "stacked" else 0, name)
      np.testing.assert_allclose(got, layer_leaf(full, layout, i, name), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads["lm_head"]["kernel"], full["lm_head"]["kernel"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(grads["model"]["embed_tokens"]["embedding"],
                             full["model"]["embed_tokens"]["embedding"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_split_combine_roundtrip_and_frozen_untouched(layout):
  params = toy_params(layout)
  idx = jnp.array([0, 5], jnp.int32)
  active, frozen = po.lisa_split(params, idx)
  chex.assert_trees_all_equal(po.lisa_combine(frozen, active, idx), params)
  bumped = po.lisa_combine(frozen, jax.tree.map(lambda x: x + 1, active), idx)
  for i in range(L):
    same = layer_leaf(bumped, layout, i) == layer_leaf(params, layout, i)
    assert bool(jnp.all(same)) == (i not in (0, 5))
  if layout == "stacked":
    assert active["model"]["layers"]["mlp"]["kernel"].shape == (2, D, D)
  else:
    assert sorted(k for k in active["model"] if k.startswith("layers_")) == ["layers_0", "layers_1"]


def test_always_trainable_leaves_out_frozen_non_layers():
  params = toy_params("stacked")
  idx = jnp.array([2, 3], jnp.int32)
  kwargs = dict(always_trainable=r"lm_head/.*")
  active, frozen = po.lisa_split(params, idx, **kwargs)
  assert "embed_tokens" not in active["model"] and "lm_head" in active
  _, grads, _, _ = po.lisa_value_and_grad(toy_loss, **kwargs)(params, idx)
  tx = po.lisa(optax.sgd(0.1), n_layers=2, **kwargs)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  chex.assert_trees_all_equal_shapes(updates, active)
  # A split that disagrees with the optimizer's layout is rejected.
  _, other_grads, _, _ = po.lisa_value_and_grad(toy_loss)(params, idx)
  with pytest.raises(ValueError, match="neither"):
    tx.update(other_grads, state, params)


def _mask_step(tx):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(toy_loss)(params), state, params)
    return optax.apply_updates(params, updates), state
  return step


def _active_step(tx, value_and_grad=True):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  @chex.assert_max_traces(n=1)
  def step(params, state):
    idx = po.lisa_active_layers(state)
    if value_and_grad:
      _, grads, active, frozen = po.lisa_value_and_grad(toy_loss)(params, idx)
    else:
      active, frozen = po.lisa_split(params, idx)
      grads = jax.grad(lambda a: toy_loss(po.lisa_combine(frozen, a, idx)))(active)
    updates, state = tx.update(grads, state, params)
    return po.lisa_combine(frozen, optax.apply_updates(active, updates), idx), state
  return step


@pytest.mark.parametrize("layout,state_mode,value_and_grad", [
    ("stacked", "reset", True), ("stacked", "keep", False),
    ("unrolled", "reset", False), ("unrolled", "keep", True)])
def test_training_equals_mask_lisa_step_for_step_without_retrace(layout, state_mode,
                                                                  value_and_grad):
  chex.clear_trace_counter()
  params = toy_params(layout)
  make = lambda: optax.chain(
      optax.clip(0.5),  # elementwise: same on both paths
      po.lisa(optax.adamw(0.05, weight_decay=0.1), n_layers=2, interval_steps=2,
              key=jax.random.key(7), state_mode=state_mode))
  tx_mask, tx_active = make(), make()
  mask_step, active_step = _mask_step(tx_mask), _active_step(tx_active, value_and_grad)
  p_mask, s_mask = params, tx_mask.init(params)
  p_act, s_act = jax.tree.map(jnp.copy, params), tx_active.init(params)
  seen = set()
  for _ in range(9):  # four switches
    active = np.asarray(po.lisa_active_layers(s_act))
    seen.add(tuple(active))
    before = jax.device_get(p_act)
    p_mask, s_mask = mask_step(p_mask, s_mask)
    p_act, s_act = active_step(p_act, s_act)
    chex.assert_trees_all_close(p_act, p_mask, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(po.lisa_active_layers(s_act), po.lisa_active_layers(s_mask))
    after = jax.device_get(p_act)
    for i in set(range(L)) - set(active.tolist()):  # frozen layers: bitwise untouched
      np.testing.assert_array_equal(layer_leaf(after, layout, i), layer_leaf(before, layout, i))
      np.testing.assert_array_equal(layer_leaf(after, layout, i, "norm"),
                                    layer_leaf(before, layout, i, "norm"))
  assert len(seen) > 1  # the active set did change, under one trace
  chex.assert_trees_all_equal_shapes_and_dtypes(s_act, s_mask)


def test_scanned_llama_active_gradients():
  config = LlamaConfig.tiny(num_hidden_layers=3, scan_layers=True)
  model = LlamaForCausalLM(config)
  params = init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)

  def loss_fn(p):
    return causal_lm_loss(model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])

  idx = jnp.array([0, 2], jnp.int32)
  full = jax.jit(jax.grad(loss_fn))(params)
  loss, grads, _, _ = jax.jit(po.lisa_value_and_grad(loss_fn))(params, idx)
  np.testing.assert_allclose(loss, loss_fn(params), rtol=1e-6)
  want = jax.tree.map(lambda g: g[idx], full["model"]["layers"])
  chex.assert_trees_all_close(grads["model"]["layers"], want, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(grads["lm_head"], full["lm_head"], rtol=1e-4, atol=1e-7)
