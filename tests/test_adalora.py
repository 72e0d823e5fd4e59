"""AdaLoRA: Hugging Face PEFT reference numbers, float64 NumPy oracles, resizing, training."""

import functools
import importlib
import json
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax.lora import adalora as la
from peft_jax.models import llama

# The module (the package re-exports the function `adalora` under the same name).
oa = importlib.import_module("peft_jax.optim.adalora")

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "data" / "adalora_reference.json").read_text())


def mat(m, n, s):
  k = np.arange(m * n, dtype=np.float64).reshape(m, n)
  return (np.sin(0.37 * k + s) * (1 + k % 5) / 3).astype(np.float32)


# --------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_r=4, target_r=6, total_step=100), "target_r=6 is larger than init_r=4"),
    (dict(tinit=50, tfinal=50, total_step=100), "leave no budgeting phase"),
    (dict(tinit=60, tfinal=50, total_step=100), "leave no budgeting phase"),
    (dict(), "needs total_step"),
    (dict(total_step=0), "total_step must be a positive integer"),
    (dict(total_step=10, beta1=1.0), "beta1 must be in"),
    (dict(total_step=10, deltaT=0), "deltaT must be a positive integer"),
    (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(total_step=10, rank=4), "Leave rank unset"),
    (dict(total_step=10, use_dora=True), "does not support DoRA"),
    (dict(total_step=10, use_rslora=True), "use_rslora"),
    (dict(total_step=10, init="pissa"), "own init"),
    (dict(total_step=10, rank_pattern={"q_proj": 4}), "rank_pattern must be empty"),
])
def test_config_rejects_bad_input(kwargs, message):
  with pytest.raises(ValueError, match=message):
    la.AdaLoRAConfig(**kwargs)


def test_config_round_trips_hashes_and_scales():
  config = la.AdaLoRAConfig(init_r=6, target_r=2, total_step=50, tinit=3, tfinal=7, alpha=12.0,
                            alpha_pattern={"v_proj": 3.0})
  assert config.rank == 6 and config.rank_for("model/q_proj") == 6
  assert la.AdaLoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  assert hash(config) == hash(config.replace())
  assert config.replace(init_r=8).rank == 8
  # Hugging Face SVDLinear: scaling / (ranknum + 1e-5), ranknum = init_r at every rank.
  assert config.scale_for("a/q_proj", 2) == 12.0 / (6 + 1e-5)
  assert config.scale_for("a/v_proj") == 3.0 / (6 + 1e-5)
  assert config.final_phase_start == 43


# --------------------------------------------------------------------------
# Budget schedule.


def oracle_budget(steps, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT):
  """Vectorised float64 NumPy form of RankAllocator.budget_schedule."""
  steps = np.asarray(steps, np.int64)
  mul = 1.0 - (steps - tinit) / (total_step - tfinal - tinit)
  cubic = np.floor((init_bgt - target_bgt) * mul**3 + target_bgt).astype(np.int64)
  budget = np.where(steps <= tinit, init_bgt, np.where(steps > total_step - tfinal, target_bgt, cubic))
  mask = np.where(steps <= tinit, False, (steps > total_step - tfinal) | (steps % deltaT == 0))
  return budget, mask


@pytest.mark.parametrize("case", range(len(REFERENCE["budget"])))
def test_budget_schedule_every_step_matches_reference_and_oracle(case):
  ref = REFERENCE["budget"][case]
  schedule = ref["schedule"]
  config = la.AdaLoRAConfig(**schedule)
  num_matrices = ref["init_bgt"] // schedule["init_r"]
  steps = np.arange(len(ref["budget"]))
  budget, mask = jax.jit(lambda t: oa.budget_schedule(t, config, num_matrices=num_matrices))(steps)
  np.testing.assert_array_equal(np.asarray(budget), ref["budget"])
  np.testing.assert_array_equal(np.asarray(mask), ref["mask"])
  oracle_b, oracle_m = oracle_budget(steps, ref["init_bgt"], ref["target_bgt"], **{
      k: schedule[k] for k in ("tinit", "tfinal", "total_step", "deltaT")})
  np.testing.assert_array_equal(np.asarray(budget), oracle_b)
  np.testing.assert_array_equal(np.asarray(mask), oracle_m)


def test_budget_schedule_table_from_alg_md():
  """The step: (budget, mask) table of ALGORITHMS.md section 5.3."""
  config = la.AdaLoRAConfig(init_r=12, target_r=8, tinit=200, tfinal=1000, total_step=3000,
                            deltaT=10)
  table = {0: (120, False), 200: (120, False), 201: (119, False), 210: (119, True),
           500: (103, True), 1000: (86, True), 1500: (80, True), 1990: (80, True),
           1999: (80, False), 2000: (80, True), 2001: (80, True)}
  for step, want in table.items():
    budget, mask = oa.budget_schedule(step, config, num_matrices=10)
    assert (int(budget), bool(mask)) == want, step


# --------------------------------------------------------------------------
# The reference training run (two SVDLinear layers, SGD, deltaT = 2).


class TwoLayerNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="lin1")(jnp.tanh(nn.Dense(5, name="lin0")(x)))


def reference_setup():
  run = REFERENCE["run"]
  config = la.AdaLoRAConfig(target_modules=("lin0", "lin1"), alpha=run["lora_alpha"],
                            **run["schedule"])
  params = {}
  for name, init in run["init"].items():
    params[name] = {
        "kernel": jnp.asarray(np.array(init["weight"], np.float32).T),
        "bias": jnp.asarray(np.array(init["bias"], np.float32)),
        "lora_a": jnp.asarray(np.array(init["lora_A"], np.float32).T),   # (in, r)
        "lora_b": jnp.asarray(np.array(init["lora_B"], np.float32).T),   # (r, out)
        "lora_e": jnp.asarray(np.array(init["lora_E"], np.float32)[:, 0]),
    }
  adapters, base = pj.split({"params": params})
  return run, config, adapters, base


def reference_loss(config, base):
  model = TwoLayerNet()

  def loss_fn(adapters, x, y):
    with pj.intercept(config):
      out = model.apply(pj.combine(base, adapters), x)
    mse = jnp.mean((out - y) ** 2)
    return mse + config.orth_reg_weight * la.orthogonal_regularization(adapters), mse
  return loss_fn


def test_reference_run_loss_emas_masks_and_weights():
  run, config, adapters, base = reference_setup()
  loss_fn = reference_loss(config, base)
  tx = oa.adalora(optax.sgd(run["lr"]), config)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(adapters, opt_state, x, y):
    (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters, x, y)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss, mse

  opt_state = tx.init(adapters)
  dims = run["dims"]
  for rec in run["records"]:
    t = rec["t"]
    x = mat(run["batch"], dims["n_in"], 10 + t)
    y = mat(run["batch"], dims["n_out"], 30 + t)
    adapters, opt_state, loss, mse = step(adapters, opt_state, x, y)
    np.testing.assert_allclose(loss, rec["loss"], rtol=2e-6, err_msg=f"t={t}")
    np.testing.assert_allclose(mse, rec["mse"], rtol=2e-6, err_msg=f"t={t}")
    assert int(opt_state.budget) == rec["budget"]
    for name in ("lin0", "lin1"):
      leaves = adapters["params"][name]
      e_ref = np.array(rec["lora_E"][name], np.float32)[:, 0]
      np.testing.assert_allclose(leaves["lora_e"], e_ref, rtol=1e-5, atol=1e-7, err_msg=f"t={t}")
      # Pruned singular values are exact zeros in both.
      np.testing.assert_array_equal(np.asarray(leaves["lora_e"]) == 0, e_ref == 0)
      np.testing.assert_allclose(leaves["lora_a"], np.array(rec["lora_A"][name]).T, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(leaves["lora_b"], np.array(rec["lora_B"][name]).T, rtol=1e-5, atol=1e-7)
      for leaf, to_ours in (("lora_A", lambda v: v.T), ("lora_B", lambda v: v.T),
                            ("lora_E", lambda v: v[:, 0])):
        ours_ipt = opt_state.sensitivity_ema[name][leaf.lower()]
        ours_unc = opt_state.uncertainty_ema[name][leaf.lower()]
        ema = rec["ema"].get(f"{name}/{leaf}")
        if ema is None:  # reset at T - tfinal, unused after
          assert not np.any(ours_ipt) and not np.any(ours_unc)
          continue
        np.testing.assert_allclose(ours_ipt, to_ours(np.array(ema["ipt"])), rtol=2e-5, atol=1e-9)
        np.testing.assert_allclose(ours_unc, to_ours(np.array(ema["unc"])), rtol=2e-5, atol=1e-9)
    if rec["rank_pattern"] is not None:
      pattern = la.rank_pattern(opt_state)
      assert {k: v.tolist() for k, v in pattern.items()} == rec["rank_pattern"], f"t={t}"
  # E regrew between allocations (deltaT = 2) in the reference; the pattern froze at t = 7.
  assert run["records"][3]["lora_E"]["lin1"][1][0] != 0.0
  assert la.kept_ranks(opt_state) == {"lin0": 2, "lin1": 2}


# --------------------------------------------------------------------------
# Float64 oracle with fixed gradients: stacked and multi-axis modules.


def oracle_allocator(params, grads, lr, config, steps):
  """NumPy float64 RankAllocator after SGD steps with the same gradients each step."""
  p = {m: {k: np.asarray(v, np.float64) for k, v in leaves.items()} for m, leaves in params.items()}
  ipt = {m: {k: np.zeros_like(v) for k, v in leaves.items()} for m, leaves in p.items()}
  unc = {m: {k: np.zeros_like(v) for k, v in leaves.items()} for m, leaves in p.items()}
  num_matrices = sum(int(np.prod(leaves["lora_e"].shape[:-1])) for leaves in p.values())
  init_bgt = config.init_r * num_matrices
  masks = {m: np.ones(leaves["lora_e"].shape, bool) for m, leaves in p.items()}
  history = []
  for t in range(steps):
    for m in p:
      for k in p[m]:
        p[m][k] = p[m][k] - lr * grads[m][k]
    final_start = config.total_step - config.tfinal
    if t < final_start:
      for m in p:
        for k in p[m]:
          sensitivity = np.abs(p[m][k] * grads[m][k])
          ipt[m][k] = config.beta1 * ipt[m][k] + (1 - config.beta1) * sensitivity
          unc[m][k] = config.beta2 * unc[m][k] + (1 - config.beta2) * np.abs(sensitivity - ipt[m][k])
    budget, mask_now = oracle_budget([t], init_bgt, config.target_r * num_matrices, config.tinit,
                                     config.tfinal, config.total_step, config.deltaT)
    budget = int(budget[0])
    if (t < final_start and mask_now[0]) or t == final_start:
      scores = {}
      for m in p:
        e = p[m]["lora_e"]
        batch = e.ndim - 1
        s = {k: ipt[m][k] * unc[m][k] for k in p[m]}
        a_axes = tuple(range(batch, s["lora_a"].ndim - 1))
        b_axes = tuple(range(batch + 1, s["lora_b"].ndim))
        scores[m] = s["lora_e"] + s["lora_a"].mean(axis=a_axes) + s["lora_b"].mean(axis=b_axes)
      flat = np.sort(np.concatenate([s.ravel() for s in scores.values()]))
      threshold = flat[init_bgt - budget - 1] if init_bgt > budget else -np.inf
      masks = {m: s > threshold for m, s in scores.items()}
      for m in p:
        p[m]["lora_e"] = np.where(masks[m], p[m]["lora_e"], 0.0)
    elif t > final_start:
      for m in p:
        p[m]["lora_e"] = np.where(masks[m], p[m]["lora_e"], 0.0)
    if t == final_start:
      ipt = {m: {k: np.zeros_like(v) for k, v in leaves.items()} for m, leaves in p.items()}
      unc = {m: {k: np.zeros_like(v) for k, v in leaves.items()} for m, leaves in p.items()}
    copy = lambda tree: {m: dict(v) for m, v in tree.items()}
    history.append({"p": copy(p), "ipt": copy(ipt), "unc": copy(unc),
                    "masks": dict(masks), "budget": budget})
  return history


def random_adapters(rng, shapes, rank):
  """{module: (batch, in_dims, out_dims)} -> AdaLoRA leaves in our layout."""
  tree = {}
  for module, (batch, in_dims, out_dims) in shapes.items():
    tree[module] = {
        "lora_a": rng.standard_normal(batch + in_dims + (rank,)).astype(np.float32),
        "lora_e": rng.standard_normal(batch + (rank,)).astype(np.float32),
        "lora_b": rng.standard_normal(batch + (rank,) + out_dims).astype(np.float32),
    }
  return tree


def test_emas_and_masks_match_float64_oracle_with_fixed_gradients():
  rng = np.random.default_rng(0)
  config = la.AdaLoRAConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8, deltaT=1,
                            beta1=0.7, beta2=0.8)
  shapes = {"dense": ((), (6,), (5,)),             # plain Dense
            "stacked": ((3,), (4,), (7,)),         # scanned layers: 3 matrices
            "general": ((), (2, 3), (4, 2))}       # DenseGeneral: 2 input and 2 output axes
  params = random_adapters(rng, shapes, config.init_r)
  grads = {m: {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in leaves.items()}
           for m, leaves in params.items()}
  lr = 0.05
  history = oracle_allocator(params, grads, lr, config, steps=10)
  tx = oa.adalora(optax.sgd(lr), config)
  state = tx.init(params)
  update = jax.jit(tx.update)
  current = jax.tree.map(jnp.asarray, params)
  num_matrices = 5
  for t, want in enumerate(history):
    updates, state = update(grads, state, current)
    current = optax.apply_updates(current, updates)
    chex.assert_trees_all_close(current, want["p"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.sensitivity_ema, want["ipt"], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(state.uncertainty_ema, want["unc"], rtol=1e-5, atol=1e-7)
    assert int(state.budget) == want["budget"]
    for module, mask in want["masks"].items():
      np.testing.assert_array_equal(state.rank_mask[module], mask, err_msg=f"t={t} {module}")
    kept = sum(int(np.sum(m)) for m in state.rank_mask.values())
    if t >= 2:  # every step from the first allocation on allocates (deltaT = 1)
      assert kept == int(state.budget)
    if t >= config.final_phase_start:
      assert kept == config.target_r * num_matrices
  # The schedule really pruned, and pruned unevenly across modules.
  ranks = la.kept_ranks(state)
  assert ranks["stacked"].shape == (3,) and sum(int(np.sum(r)) for r in ranks.values()) == 10


def test_update_requires_params_and_adalora_leaves():
  config = la.AdaLoRAConfig(init_r=2, target_r=1, total_step=10)
  tx = oa.adalora(optax.sgd(0.1), config)
  params = random_adapters(np.random.default_rng(1), {"m": ((), (3,), (3,))}, 2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state)
  with pytest.raises(ValueError, match="no AdaLoRA module"):
    tx.init({"m": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 3))}})
  with pytest.raises(TypeError, match="AdaLoRAConfig"):
    oa.adalora(optax.sgd(0.1), pj.LoRAConfig())


# --------------------------------------------------------------------------
# Orthogonal regulariser.


def test_orthogonal_regularization_matches_oracle_and_reference():
  rng = np.random.default_rng(2)
  shapes = {"a/q": ((), (6,), (5,)), "b/layers/v": ((2,), (4,), (3,)), "c/g": ((), (2, 3), (4,))}
  adapters = random_adapters(rng, shapes, 3)
  norms = []
  for leaves in adapters.values():
    batch = leaves["lora_e"].shape[:-1]
    for idx in np.ndindex(*batch):
      q = leaves["lora_a"][idx].reshape(-1, 3).T.astype(np.float64)   # torch A (r, in)
      p = leaves["lora_b"][idx].reshape(3, -1).T.astype(np.float64)   # torch B (out, r)
      norms.append(np.linalg.norm(q @ q.T - np.eye(3)))
      norms.append(np.linalg.norm(p.T @ p - np.eye(3)))
  np.testing.assert_allclose(la.orthogonal_regularization({"params": adapters}), np.mean(norms),
                             rtol=1e-5)
  # Reference value: (loss - mse) / orth_reg_weight of the first reference step.
  run, config, ref_adapters, _ = reference_setup()
  rec = run["records"][0]
  np.testing.assert_allclose(la.orthogonal_regularization(ref_adapters),
                             (rec["loss"] - rec["mse"]) / config.orth_reg_weight, rtol=2e-5)


def test_orthogonal_regularization_gradient_is_finite_at_orthonormal():
  q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((5, 3)))
  adapters = {"m": {"lora_a": jnp.asarray(q, jnp.float32), "lora_e": jnp.ones(3),
                    "lora_b": jnp.asarray(q.T, jnp.float32)}}
  grads = jax.grad(la.orthogonal_regularization)(adapters)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(la.orthogonal_regularization(adapters)) < 1e-5


# --------------------------------------------------------------------------
# Transform and training on the tiny Llama; resizing on a model with stacked
# (scanned) layers and a multi-axis DenseGeneral kernel.


@functools.partial(jax.jit, static_argnums=(0, 1))
def forward(model, config, params, tokens):
  with pj.intercept(config):
    return model.apply(params, tokens)


@functools.lru_cache(maxsize=None)
def llama_setup(init_r=4, target_r=2, total_step=30, tinit=4, tfinal=8):
  model_config = llama.LlamaConfig.tiny()
  model = llama.LlamaForCausalLM(model_config)
  params = llama.init_params(model_config, jax.random.key(0))
  config = la.AdaLoRAConfig(init_r=init_r, target_r=target_r, total_step=total_step, tinit=tinit,
                            tfinal=tfinal, alpha=8.0, target_modules=("q_proj", "v_proj"))
  adapted = la.adalora_transform(params, config, key=jax.random.key(1))
  return model, params, config, adapted


def test_transform_init_matches_reference_and_starts_at_base_output():
  model, params, config, adapted = llama_setup()
  flat = pj.targeting.flatten(adapted)
  modules = [p[: -len("/lora_e")] for p in flat if p.endswith("/lora_e")]
  assert len(modules) == 4  # q_proj and v_proj of two layers
  q = "model/layers_0/self_attn/q_proj"
  assert flat[f"{q}/lora_a"].shape == (64, 4) and flat[f"{q}/lora_b"].shape == (4, 64)
  assert flat[f"{q}/lora_e"].shape == (4,) and not np.any(flat[f"{q}/lora_e"])
  a_all = np.concatenate([np.ravel(flat[f"{m}/lora_a"]) for m in modules])
  assert abs(a_all.std() - 0.02) < 0.002 and abs(a_all.mean()) < 0.002
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  np.testing.assert_array_equal(forward(model, config, {"params": adapted}, tokens),
                                forward(model, None, {"params": params}, tokens))
  with pytest.raises(TypeError, match="AdaLoRAConfig"):
    la.adalora_transform(params, pj.LoRAConfig(), key=jax.random.key(0))


def random_pattern(rng, adapters):
  pattern = {}
  for path, leaf in pj.targeting.flatten(adapters["params"]).items():
    if path.endswith("/lora_e"):
      pattern[path[: -len("/lora_e")]] = rng.random(leaf.shape) < 0.5
  return pattern


def mask_singular_values(adapters, pattern):
  flat = pj.targeting.flatten(adapters["params"])
  for module, mask in pattern.items():
    flat[f"{module}/lora_e"] = jnp.where(mask, flat[f"{module}/lora_e"], 0.0)
  return {"params": pj.targeting.unflatten(flat)}


class ResidualBlock(nn.Module):

  @nn.compact
  def __call__(self, h, _):
    return h + nn.Dense(6, name="down")(jnp.tanh(nn.Dense(8, name="up")(h))), None


class StackedNet(nn.Module):
  """DenseGeneral (two output axes), a Dense, and three scanned residual blocks."""

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 4), name="proj")(x).reshape(x.shape[:-1] + (8,))
    h = nn.Dense(6, name="inp")(h)
    blocks = nn.scan(ResidualBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
    h, _ = blocks(name="blocks")(h, None)
    return h


@functools.lru_cache(maxsize=None)
def stacked_setup():
  model = StackedNet()
  x = jnp.asarray(mat(5, 6, 0.5))
  params = jax.jit(model.init)(jax.random.key(0), x)
  config = la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, alpha=6.0,
                            target_modules=("proj", "inp", "up", "down"))
  adapted = la.adalora_transform(params, config, key=jax.random.key(1),
                                 layouts=pj.kernel_layouts(model, x))
  return model, x, config, adapted


def test_resized_adapters_give_the_masked_outputs():
  model, x, config, adapted = stacked_setup()
  adapters, base = pj.split(adapted)
  assert adapters["params"]["blocks"]["up"]["lora_e"].shape == (3, 4)
  assert adapters["params"]["proj"]["lora_b"].shape == (4, 2, 4)
  rng = np.random.default_rng(4)
  adapters = jax.tree.map(  # trained-looking adapters: nonzero E
      lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype) * 0.3, adapters)
  pattern = {
      "proj": np.array([True, False, True, True]),
      "inp": np.array([False, False, False, False]),          # keeps nothing: adapters dropped
      "blocks/up": np.array([[True, True, True, False],       # stacked layers keep different
                             [False, True, False, False],     # ranks: padded to 3
                             [False, False, False, False]]),
      "blocks/down": np.array([[False, True, False, True]] * 3),
  }
  masked = mask_singular_values(adapters, pattern)
  resized, lora_config = la.resize_adapters(masked, pattern, config)
  assert type(lora_config) is pj.LoRAConfig
  want = forward(model, config, pj.combine(base, masked), x)
  got = forward(model, lora_config, pj.combine(base, resized), x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  flat = pj.targeting.flatten(resized["params"])
  assert not any(p.endswith("/lora_e") for p in flat)
  assert "inp/lora_a" not in flat and "inp" not in lora_config.target_modules
  assert flat["proj/lora_a"].shape == (6, 3) and flat["proj/lora_b"].shape == (3, 2, 4)
  assert flat["blocks/up/lora_a"].shape == (3, 6, 3) and flat["blocks/up/lora_b"].shape == (3, 3, 8)
  assert flat["blocks/down/lora_a"].shape == (3, 8, 2)
  assert lora_config.rank_for("blocks/up") == 3 and lora_config.rank_for("proj") == 3
  np.testing.assert_allclose(lora_config.scale_for("blocks/down"), config.scale_for("blocks/down"),
                             rtol=1e-12)
  size = lambda tree: sum(v.nbytes for v in jax.tree.leaves(tree))
  assert size(resized) < size(masked)
  # Merged kernels agree too (the serving path).
  merged_masked = pj.merge(pj.combine(base, masked), config)
  merged_resized = pj.merge(pj.combine(base, resized), lora_config)
  chex.assert_trees_all_close(merged_resized, merged_masked, rtol=1e-5, atol=1e-6)
  base_kernel = base["params"]["blocks"]["up"]["kernel"]
  assert not np.allclose(merged_masked["params"]["blocks"]["up"]["kernel"], base_kernel, atol=1e-3)


def test_resize_rejects_mismatched_patterns():
  _, _, config, adapted = stacked_setup()
  adapters, _ = pj.split(adapted)
  pattern = random_pattern(np.random.default_rng(5), adapters)
  missing = dict(list(pattern.items())[1:])
  with pytest.raises(ValueError, match="modules without a mask"):
    la.resize_adapters(adapters, missing, config)
  wrong = {k: np.ones(5, bool) for k in pattern}  # lora_e is (4,) or (3, 4)
  with pytest.raises(ValueError, match="has shape"):
    la.resize_adapters(adapters, wrong, config)
  with pytest.raises(ValueError, match="keeps no triplet"):
    la.resize_adapters(adapters, {k: np.zeros(v.shape, bool) for k, v in pattern.items()}, config)


def test_jitted_llama_training_loss_falls_and_ranks_reach_target():
  model, _, config, adapted = llama_setup(total_step=30, tinit=4, tfinal=8)
  adapters, base = pj.split({"params": adapted})
  tx = oa.adalora(optax.adam(1e-2), config)
  opt_state = tx.init(adapters)
  tokens = (jnp.arange(4 * 17, dtype=jnp.int32).reshape(4, 17) * 7) % 256
  inputs, labels = tokens[:, :-1], tokens[:, 1:]

  def loss_fn(adapters):
    with pj.intercept(config):
      logits = model.apply(pj.combine(base, adapters), inputs)
    return (llama.causal_lm_loss(logits, labels)
            + config.orth_reg_weight * la.orthogonal_regularization(adapters))

  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(adapters, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  losses, kept = [], []
  for _ in range(config.total_step):
    adapters, opt_state, loss = step(adapters, opt_state)
    losses.append(float(loss))
    kept.append(sum(int(np.sum(m)) for m in la.rank_pattern(opt_state).values()))
  assert losses[-1] < 0.9 * losses[0]
  num_matrices = 4
  assert kept[config.tinit] == config.init_r * num_matrices  # nothing pruned in the warm-up
  assert kept[-1] == config.target_r * num_matrices  # the final budget, exactly
  assert kept == sorted(kept, reverse=True)
  flat = pj.targeting.flatten(adapters["params"])
  pattern = la.rank_pattern(opt_state)
  for module, mask in pattern.items():
    e = np.asarray(flat[f"{module}/lora_e"])
    assert not np.any(e[~mask]) and np.all(e[mask] != 0)
  resized, lora_config = la.resize_adapters(adapters, opt_state, config)
  want = forward(model, config, pj.combine(base, adapters), inputs)
  got = forward(model, lora_config, pj.combine(base, resized), inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
