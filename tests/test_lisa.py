"""LISA tests, plus the conformance table shared by GaLore, LoRA+ and LISA."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax.optim as po

L = 6


def unrolled_params(num_layers=L):
  layers = {
      f"layers_{i}": {"mlp": {"up_proj": {"kernel": jnp.full((3, 5), float(i + 1))}},
                      "input_layernorm": {"weight": jnp.ones(3)}}
      for i in range(num_layers)
  }
  return {"model": {"embed_tokens": {"embedding": jnp.ones((7, 3))}, **layers,
                    "norm": {"weight": jnp.ones(3)}},
          "lm_head": {"kernel": jnp.ones((3, 7))}}


def stacked_params(num_layers=L):
  return {"model": {"embed_tokens": {"embedding": jnp.ones((7, 3))},
                    "layers": {"mlp": {"up_proj": {"kernel": jnp.ones((num_layers, 3, 5))}},
                               "input_layernorm": {"weight": jnp.ones((num_layers, 3))}},
                    "norm": {"weight": jnp.ones(3)}},
          "lm_head": {"kernel": jnp.ones((3, 7))}}


def random_grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)


def layer_nonzero(updates, layout):
  """Which layers got a nonzero update, from either layout."""
  updates = jax.device_get(updates)
  if layout == "stacked":
    k = updates["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    return np.any(k.reshape(k.shape[0], -1) != 0, axis=1)
  return np.array([np.any(updates["model"][f"layers_{i}"]["mlp"]["up_proj"]["kernel"] != 0)
                   for i in range(L)])


def test_layer_draws_are_uniform_without_replacement():
  params = {"layers": {"w": jnp.zeros((L, 2))}}
  tx = po.lisa(optax.sgd(1.0), n_layers=2, interval_steps=1, key=jax.random.key(3))
  n_switches = 1500

  def body(state, _):
    _, state = tx.update({"layers": {"w": jnp.ones((L, 2))}}, state, params)
    return state, state.active_layers

  _, drawn = jax.lax.scan(body, tx.init(params), None, length=n_switches)
  drawn = np.asarray(drawn)
  assert (drawn[:, 0] < drawn[:, 1]).all()  # distinct, sorted
  # Each layer: expected n_switches * 2 / L draws. Chi-square, 5 dof:
  # 20.5 is the 0.999 quantile (the key is fixed, so this is deterministic).
  counts = np.bincount(drawn.ravel(), minlength=L)
  expected = n_switches * 2 / L
  assert ((counts - expected) ** 2 / expected).sum() < 20.5
  # Each of the 15 pairs equally likely: 14 dof, 0.999 quantile 36.1.
  pairs = list(itertools.combinations(range(L), 2))
  pair_counts = np.array([np.sum((drawn[:, 0] == a) & (drawn[:, 1] == b)) for a, b in pairs])
  expected = n_switches / len(pairs)
  assert ((pair_counts - expected) ** 2 / expected).sum() < 36.1
  # Consecutive intervals are not stuck on the same set.
  assert np.mean((drawn[1:] == drawn[:-1]).all(axis=1)) < 0.2


@pytest.mark.parametrize("layout", ["unrolled", "stacked"])
@pytest.mark.parametrize("state_mode", ["reset", "keep"])
def test_frozen_layers_get_exactly_zero_and_active_match_inner(layout, state_mode):
  params = unrolled_params() if layout == "unrolled" else stacked_params()
  inner = optax.adamw(0.1, weight_decay=0.1)
  tx = po.lisa(inner, n_layers=2, interval_steps=3, key=jax.random.key(0),
               state_mode=state_mode)
  state = tx.init(params)
  step = jax.jit(tx.update)
  reference_state = inner.init(params)  # plain AdamW on everything
  reference_step = jax.jit(inner.update)
  for t in range(3):  # one interval: the active layers evolve like plain AdamW
    active = np.asarray(po.lisa_active_layers(state))
    grads = random_grads(params, t)
    updates, state = step(grads, state, params)
    expected, reference_state = reference_step(grads, reference_state, params)
    updates, expected = jax.device_get((updates, expected))
    mask = np.zeros(L, bool)
    mask[active] = True
    np.testing.assert_array_equal(layer_nonzero(updates, layout), mask)
    if layout == "stacked":
      got = updates["model"]["layers"]["mlp"]["up_proj"]["kernel"]
      want = expected["model"]["layers"]["mlp"]["up_proj"]["kernel"]
      np.testing.assert_allclose(got[active], want[active], rtol=1e-6)
      assert not np.any(np.asarray(got[~mask]))
    else:
      for i in range(L):
        got = updates["model"][f"layers_{i}"]["mlp"]["up_proj"]["kernel"]
        want = expected["model"][f"layers_{i}"]["mlp"]["up_proj"]["kernel"]
        if mask[i]:
          np.testing.assert_allclose(got, want, rtol=1e-6)
        else:
          assert not np.any(np.asarray(got))
    for name in ("lm_head",):
      np.testing.assert_allclose(updates[name]["kernel"], expected[name]["kernel"], rtol=1e-6)


def test_state_modes_reset_and_keep():
  params = unrolled_params()
  grads = jax.tree.map(jnp.ones_like, params)
  for mode in ("reset", "keep"):
    tx = po.lisa(optax.adam(0.1), n_layers=2, interval_steps=2, key=jax.random.key(1),
                 state_mode=mode)
    state = tx.init(params)
    step = jax.jit(tx.update)
    history = []
    for _ in range(12):
      history.append((np.asarray(state.active_layers), state))
      _, state = step(grads, state, params)
    if mode == "reset":
      # Only two layer slots of moments; a fresh (zero) state after a switch.
      mu = state.inner_state[0].mu["model"]
      assert sorted(k for k in mu if k.startswith("layers_")) == ["layers_0", "layers_1"]
      # 12 % 2 == 0: just switched; the reset is applied by the next update.
      assert int(state.inner_state[0].count) == 2
      assert int(step(grads, state, params)[1].inner_state[0].count) == 1
    else:
      # A layer's moments stay frozen while it is inactive.
      history = jax.device_get(history)
      for (active_a, state_a), (active_b, state_b) in zip(history, history[1:]):
        for i in set(range(L)) - set(active_a.tolist()):
          mu_a = state_a.inner_state[0].mu["model"][f"layers_{i}"]["mlp"]["up_proj"]["kernel"]
          mu_b = state_b.inner_state[0].mu["model"][f"layers_{i}"]["mlp"]["up_proj"]["kernel"]
          np.testing.assert_array_equal(mu_a, mu_b)
      seen = {i for active, _ in history for i in active.tolist()}
      assert len(seen) > 2  # several switches happened


def test_stacked_state_is_for_active_layers_only():
  params = stacked_params(num_layers=8)
  state = po.lisa(optax.adam(1e-3), n_layers=2).init(params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  layer_bytes = nbytes(params["model"]["layers"])
  other_bytes = nbytes(params) - layer_bytes
  assert state.inner_state[0].mu["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 3, 5)
  full = nbytes(optax.adam(1e-3).init(params))
  lisa_bytes = nbytes(state.inner_state)
  assert lisa_bytes <= 2 * (other_bytes + layer_bytes * 2 / 8) + 64
  assert lisa_bytes < 0.6 * full


def test_always_trainable_pattern_and_errors():
  params = unrolled_params()
  tx = po.lisa(optax.sgd(1.0), n_layers=1, always_trainable=r"lm_head/.*")
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert np.all(np.asarray(updates["lm_head"]["kernel"]) != 0)
  assert not np.any(np.asarray(updates["model"]["embed_tokens"]["embedding"]))
  assert not np.any(np.asarray(updates["model"]["norm"]["weight"]))
  with pytest.raises(ValueError, match="lm_haed"):
    po.lisa(optax.sgd(1.0), always_trainable=r"lm_haed/.*").init(params)
  with pytest.raises(ValueError, match="exceeds"):
    po.lisa(optax.sgd(1.0), n_layers=7).init(params)
  with pytest.raises(ValueError, match="disagree"):
    po.lisa(optax.sgd(1.0), num_layers=5).init(params)
  with pytest.raises(ValueError, match="no decoder layers"):
    po.lisa(optax.sgd(1.0)).init({"w": jnp.ones(3)})


# --------------------------------------------------------------------------
# Conformance table: every optimizer of peft_jax.optim through the same
# checks (jit, no retrace across refreshes/switches, chaining, schedules).

CONFORMANCE = {
    "galore": lambda: po.galore(optax.linear_schedule(1e-2, 1e-3, 10), rank=2,
                                update_proj_gap=2, weight_decay=0.01),
    "galore_randomized": lambda: po.galore(1e-2, rank=2, update_proj_gap=2,
                                           refresh="randomized", proj_type="full"),
    "lora_plus": lambda: po.lora_plus(optax.adamw, optax.cosine_decay_schedule(1e-2, 10),
                                      ratio=16, weight_decay=0.01),
    "lisa_reset": lambda: po.lisa(optax.adamw(1e-2), n_layers=2, interval_steps=2),
    "lisa_keep_over_galore": lambda: po.lisa(
        po.galore(1e-2, rank=2, update_proj_gap=2), n_layers=2, interval_steps=2,
        state_mode="keep"),
}


def conformance_params():
  p = stacked_params()
  p["model"]["layers"]["mlp"]["up_proj"]["lora_a"] = jnp.ones((L, 3, 2))
  p["model"]["layers"]["mlp"]["up_proj"]["lora_b"] = jnp.zeros((L, 2, 5))
  return p


@pytest.mark.parametrize("name", sorted(CONFORMANCE))
def test_conformance(name):
  chex.clear_trace_counter()
  params = conformance_params()
  tx = optax.chain(optax.clip_by_global_norm(1.0), CONFORMANCE[name]())
  state = tx.init(params)

  # Donation also proves no two state leaves share a buffer.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  @chex.assert_max_traces(n=1)
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def loss(p):
    return sum(jnp.sum(jnp.sin(x) * (1 + x)) for x in jax.tree.leaves(p))

  first = loss(params)
  fresh = jax.eval_shape(tx.init, params)
  for _ in range(5):  # crosses refreshes (gap 2) and switches (interval 2)
    params, state = step(params, state, jax.grad(loss)(params))
  chex.assert_tree_all_finite(params)
  assert loss(params) < first
  # State shapes are fixed: a fresh init has the same structure and shapes.
  chex.assert_trees_all_equal_shapes_and_dtypes(state, fresh)


def test_reset_step_updates_state_in_place():
  """Issue #12: a reset after the update kept the new compact moments in temporaries."""
  layer = lambda: {"mlp": {"up": jnp.zeros((64, 256)), "down": jnp.zeros((256, 64))}}
  params = {"model": {"embed": jnp.zeros((1024, 64)),
                      **{f"layers_{i}": layer() for i in range(4)}}}
  tx = po.lisa(optax.adamw(1e-3), n_layers=2, interval_steps=2)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  # The gathered active layers and their updates remain (0.5x here); the old
  # reset added the compact moments (embedding's included): 1.25x.
  assert compiled.memory_analysis().temp_size_in_bytes <= 0.75 * nbytes
