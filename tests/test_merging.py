"""Combining and pruning adapters vs NumPy oracles, ALGORITHMS.md 10.3 and peft 0.21.2."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax.merging import (
    combine_adapters, elect_sign_mask, merge_task_tensors, prune_by_magnitude,
    prune_lora_adapters, prune_randomly, task_arithmetic)

REFERENCE = pathlib.Path(__file__).parent / "data" / "peft_merge_reference.json"

# ALGORITHMS.md 10.3
TAU = np.array([[[0.5, -0.2, 0.1], [0.05, -0.9, 0.3]],
                [[-0.4, -0.3, 0.2], [0.6, 0.1, -0.05]],
                [[0.1, 0.25, -0.7], [-0.2, -0.1, 0.4]]], np.float32)
W3 = [1.0, 0.5, 2.0]


# -- NumPy float64 oracle of the spec ---------------------------------------------------
def np_prune(t, density):
  if density >= 1:
    return t
  keep = int(density * t.size)
  order = np.argsort(-np.abs(t).ravel(), kind="stable")[:keep]
  mask = np.zeros(t.size)
  mask[order] = 1
  return t * mask.reshape(t.shape)


def np_merge(tensors, weights, method, density=None, sign_method="total"):
  tensors = [np.asarray(t, np.float64) for t in tensors]
  if method in ("ties", "magnitude_prune"):
    tensors = [np_prune(t, density) for t in tensors]
  stack = np.stack(tensors)
  w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (stack.ndim - 1))
  if method == "ties":
    votes = stack.sum(0) if sign_method == "total" else np.sign(stack).sum(0)
    mask = np.sign(stack) == np.where(votes >= 0, 1, -1)
    return (stack * w * mask).sum(0) / np.maximum(mask.sum(0), 1)
  return (stack * w).sum(0)


def np_add_weighted(entries, method, density=None, svd_rank=None):
  """PEFT add_weighted_adapter on torch-layout [(weight, scale, A (r,in), B (out,r))]."""
  if method == "cat":
    return (np.concatenate([w * s * a for w, s, a, _ in entries], 0),
            np.concatenate([b for *_, b in entries], 1))
  if method.endswith("svd"):
    base = "linear" if method == "svd" else method[:-4]
    delta = np_merge([s * b @ a for _, s, a, b in entries], [e[0] for e in entries], base, density)
    u, sv, vh = np.linalg.svd(delta, full_matrices=False)
    k = svd_rank or max(a.shape[0] for _, _, a, _ in entries)
    return vh[:k], u[:, :k] * sv[:k]
  wa = [np.sign(w * s) * np.sqrt(abs(w * s)) for w, s, _, _ in entries]
  wb = [np.sqrt(abs(w * s)) for w, s, _, _ in entries]
  return (np_merge([a for _, _, a, _ in entries], wa, method, density),
          np_merge([b for *_, b in entries], wb, method, density))


# -- primitives -----------------------------------------------------------------------
@pytest.mark.parametrize("method,density,sign_method,expected", [
    ("linear", None, "total", [0.5, 0.15, -1.2, -0.05, -1.05, 1.075]),
    ("magnitude_prune", 0.5, "total", [0.3, 0.35, -1.4, 0.3, -0.9, 1.1]),
    ("ties", 0.5, "total", [0.5, -0.15, -1.4, 0.3, -0.9, 0.55]),
    ("ties", 0.5, "frequency", [0.5, 0.5, -1.4, 0.3, -0.9, 0.55]),
    ("ties", 1.0, "total", [0.35, -0.175, -1.4, 0.175, -0.55, 0.55]),
])
def test_algorithms_10_3_vectors(method, density, sign_method, expected):
  got = merge_task_tensors(list(TAU), W3, method, density=density,
                           majority_sign_method=sign_method)
  np.testing.assert_allclose(np.asarray(got).ravel(), expected, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got), np_merge(TAU, W3, method, density, sign_method),
                             atol=1e-6)


def test_prune_by_magnitude_vector_and_edge_densities():
  np.testing.assert_allclose(np.asarray(prune_by_magnitude(jnp.asarray(TAU[0]), 0.5)).ravel(),
                             [0.5, 0, 0, 0, -0.9, 0.3])
  t = jnp.asarray(TAU[1])
  assert prune_by_magnitude(t, 1.0) is t
  assert not np.any(np.asarray(prune_by_magnitude(t, 0.1)))  # int(0.6) = 0 kept
  with pytest.raises(ValueError, match="density"):
    prune_by_magnitude(t, -0.1)


def test_sign_election_zero_sum_elects_plus_and_pruned_zeros_never_vote():
  stack = jnp.asarray([[1.0, 0.0], [-1.0, 0.0]])
  mask = np.asarray(elect_sign_mask(stack, "total"))
  np.testing.assert_array_equal(mask, [[True, False], [False, False]])


def test_prune_randomly_seeded_rescaled_and_near_density():
  t = jnp.ones((100, 100))
  a = prune_randomly(t, 0.3, jax.random.key(0))
  b = prune_randomly(t, 0.3, jax.random.key(0))
  c = prune_randomly(t, 0.3, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))
  np.testing.assert_allclose(np.unique(np.asarray(a)), [0.0, 1 / 0.3], rtol=1e-6)
  kept = float(jnp.mean(a != 0))
  assert abs(kept - 0.3) < 4 * np.sqrt(0.3 * 0.7 / t.size)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", ["linear", "magnitude_prune", "ties"])
def test_merge_task_tensors_matches_numpy_oracle(method, seed):
  rng = np.random.default_rng(seed)
  tensors = [rng.normal(size=(7, 5)).astype(np.float32) for _ in range(3)]
  weights = [0.8, -0.3, 1.5]
  got = merge_task_tensors(tensors, weights, method, density=0.4)
  np.testing.assert_allclose(got, np_merge(tensors, weights, method, 0.4), atol=2e-6)


# -- combine_adapters -------------------------------------------------------------
def _reference_adapters(ref):
  trees, configs = {}, {}
  for name, spec in ref["merge_inputs"]["adapters"].items():
    lin, emb = spec["lin"], spec["emb"]
    trees[name] = {
        "lin": {"lora_a": jnp.asarray(lin["lora_A"], jnp.float32).T,
                "lora_b": jnp.asarray(lin["lora_B"], jnp.float32).T},
        "emb": {"lora_a": jnp.asarray(emb["lora_embedding_A"], jnp.float32).T,
                "lora_b": jnp.asarray(emb["lora_embedding_B"], jnp.float32).T}}
    configs[name] = pj.LoRAConfig(rank=spec["rank"], alpha=spec["alpha"],
                                  target_modules=("lin", "emb"))
  return trees, configs


@pytest.fixture(scope="module")
def reference():
  return json.loads(REFERENCE.read_text())


def test_combine_adapters_matches_peft_add_weighted_adapter(reference):
  trees, configs = _reference_adapters(reference)
  weights = reference["merge_inputs"]["weights"]
  for name, case in reference["add_weighted_adapter"].items():
    method = case["combination_type"]
    names = case["adapters"]
    merged, config = combine_adapters(
        [trees[n] for n in names], weights, method, configs=[configs[n] for n in names],
        density=case["density"], key=jax.random.key(0))
    assert (config.rank, config.alpha) == (case["r"], case["lora_alpha"]), name
    assert config.scale_for("lin") == 1.0
    for module, a_key, b_key in (("lin", "lora_A", "lora_B"),
                                 ("emb", "lora_embedding_A", "lora_embedding_B")):
      ours = merged[module]
      delta = np.asarray(ours["lora_a"] @ ours["lora_b"])
      want_delta = np.asarray(case[module]["delta"])
      np.testing.assert_allclose(delta, want_delta.T if module == "lin" else want_delta,
                                 atol=2e-5, err_msg=f"{name} {module}")
      if not method.endswith("svd"):  # SVD factors are defined up to signs
        np.testing.assert_allclose(ours["lora_a"].T, case[module][a_key], atol=2e-6)
        np.testing.assert_allclose(ours["lora_b"].T, case[module][b_key], atol=2e-6)


@pytest.mark.parametrize("method", ["cat", "linear", "ties", "magnitude_prune", "svd",
                                    "ties_svd", "magnitude_prune_svd"])
def test_combine_adapters_matches_numpy_oracle(method):
  rng = np.random.default_rng(3)
  rank, weights = 3, [0.6, -1.2]
  configs = [pj.LoRAConfig(rank=rank, alpha=a, target_modules=("lin",), use_rslora=rs)
             for a, rs in ((6.0, False), (2.0, True))]
  trees = [{"lin": {"lora_a": rng.normal(size=(8, rank)).astype(np.float32),
                    "lora_b": rng.normal(size=(rank, 5)).astype(np.float32)}} for _ in weights]
  merged, _ = combine_adapters(trees, weights, method, configs=configs, density=0.5)
  entries = [(w, c.scale_for("lin"), t["lin"]["lora_a"].T.astype(np.float64),
              t["lin"]["lora_b"].T.astype(np.float64))
             for w, c, t in zip(weights, configs, trees)]
  a, b = np_add_weighted(entries, method, 0.5)
  np.testing.assert_allclose(merged["lin"]["lora_a"] @ merged["lin"]["lora_b"], (b @ a).T,
                             atol=5e-5)


def test_cat_and_svd_are_exact_linear_is_not():
  rng = np.random.default_rng(4)
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("lin",))
  trees = [{"lin": {"lora_a": rng.normal(size=(6, 2)).astype(np.float32),
                    "lora_b": rng.normal(size=(2, 6)).astype(np.float32)}} for _ in range(2)]
  exact = sum(w * 2.0 * t["lin"]["lora_a"] @ t["lin"]["lora_b"] for w, t in zip((1.0, 0.5), trees))
  for method, rank, close in (("cat", 4, True), ("svd", 4, True), ("linear", 2, False)):
    merged, cfg = combine_adapters(trees, [1.0, 0.5], method, configs=config, svd_rank=4)
    delta = cfg.scale_for("lin") * merged["lin"]["lora_a"] @ merged["lin"]["lora_b"]
    assert merged["lin"]["lora_a"].shape[-1] == rank
    assert np.allclose(delta, exact, atol=1e-5) == close, method


def test_stacked_adapters_combine_per_layer():
  rng = np.random.default_rng(5)
  config = pj.LoRAConfig(rank=2, alpha=2.0, target_modules=("lin",))
  stacked = [{"lin": {"lora_a": rng.normal(size=(2, 6, 2)).astype(np.float32),
                      "lora_b": rng.normal(size=(2, 2, 4)).astype(np.float32)}} for _ in range(2)]
  for method in ("ties", "svd"):
    merged, _ = combine_adapters(stacked, [1.0, 0.7], method, configs=config, density=0.5)
    for layer in range(2):
      single = [jax.tree.map(lambda x: x[layer], t) for t in stacked]
      want, _ = combine_adapters(single, [1.0, 0.7], method, configs=config, density=0.5)
      got = jax.tree.map(lambda x: x[layer], merged)
      np.testing.assert_allclose(got["lin"]["lora_a"] @ got["lin"]["lora_b"],
                                 want["lin"]["lora_a"] @ want["lin"]["lora_b"], atol=1e-5)


def test_dare_is_seeded_and_density_one_is_linear():
  rng = np.random.default_rng(6)
  config = pj.LoRAConfig(rank=2, alpha=2.0, target_modules=("lin",))
  trees = [{"lin": {"lora_a": rng.normal(size=(40, 2)).astype(np.float32),
                    "lora_b": rng.normal(size=(2, 30)).astype(np.float32)}} for _ in range(2)]
  run = lambda method, key, density=0.5: combine_adapters(
      trees, [1.0, 0.5], method, configs=config, density=density, key=key)[0]["lin"]["lora_a"]
  np.testing.assert_array_equal(run("dare_ties", jax.random.key(1)),
                                run("dare_ties", jax.random.key(1)))
  assert np.any(np.asarray(run("dare_linear", jax.random.key(1)))
                != np.asarray(run("dare_linear", jax.random.key(2))))
  np.testing.assert_allclose(run("dare_linear", jax.random.key(1), 1.0), run("linear", None),
                             atol=1e-6)
  with pytest.raises(ValueError, match="PRNG key"):
    run("dare_linear", None)


def test_combine_rejects_bad_inputs():
  config = pj.LoRAConfig(rank=2, alpha=2.0, target_modules=("lin",))
  tree = lambda r: {"lin": {"lora_a": jnp.ones((4, r)), "lora_b": jnp.ones((r, 4))}}
  with pytest.raises(ValueError, match="equal ranks"):
    combine_adapters([tree(2), tree(3)], [1, 1], "linear", configs=config)
  with pytest.raises(ValueError, match="density"):
    combine_adapters([tree(2), tree(2)], [1, 1], "ties", configs=config)
  with pytest.raises(ValueError, match="Unknown method"):
    combine_adapters([tree(2), tree(2)], [1, 1], "average", configs=config)
  dora = {"lin": {**tree(2)["lin"], "lora_magnitude": jnp.ones(4)}}
  with pytest.raises(ValueError, match="task_arithmetic"):
    combine_adapters([dora, dora], [1, 1], "cat", configs=config)


# -- exact task arithmetic on a model ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
  from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params
  llama = LlamaConfig.tiny(num_hidden_layers=1)
  return LlamaForCausalLM(llama), init_params(llama, jax.random.key(0))


def _random_adapters(params, config, seed):
  adapters, base = pj.split(pj.lora_transform(params, config, key=jax.random.key(seed)))
  rng = np.random.default_rng(seed)  # NumPy: no compilation per leaf shape
  noise = lambda x: jnp.asarray(0.1 * rng.normal(size=x.shape) + (x if x.ndim == 1 else 0),
                                x.dtype)
  return jax.tree.map(noise, adapters), base


def test_task_arithmetic_is_exact_sum_of_deltas(tiny_llama):
  _, params = tiny_llama
  lora = pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
  dora = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("v_proj", "up_proj"), use_dora=True)
  ad1, base = _random_adapters(params, lora, 1)
  ad2, _ = _random_adapters(params, dora, 2)
  weights = [0.7, -0.4]
  merged = task_arithmetic(base, [ad1, ad2], weights, [lora, dora])
  flat_base, flat_merged = (pj.targeting.flatten(t) for t in (base, merged))
  deltas = {}
  for adapters, config, w in ((ad1, lora, weights[0]), (ad2, dora, weights[1])):
    single = pj.targeting.flatten(pj.merge(pj.combine(base, adapters), config))
    for path in single:
      deltas[path] = deltas.get(path, 0.0) + w * (np.asarray(single[path], np.float64)
                                                  - np.asarray(flat_base[path], np.float64))
  assert "model/layers_0/self_attn/v_proj/kernel" in deltas
  for path, value in flat_merged.items():
    want = np.asarray(flat_base[path], np.float64) + deltas.get(path, 0.0)
    np.testing.assert_allclose(value, want, atol=2e-6, err_msg=path)
  # One adapter at weight 1 is an ordinary merge.
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6)
  jax.tree.map(chex_close, task_arithmetic(base, [ad1], [1.0], lora),
               pj.merge(pj.combine(base, ad1), lora))


# -- pruning adapters -------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75])
def test_prune_lora_adapters_reports_achieved_sparsity(tiny_llama, sparsity):
  _, params = tiny_llama
  config = pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), use_dora=True)
  adapters, _ = _random_adapters(params, config, 3)
  pruned = prune_lora_adapters(adapters, sparsity)
  flat_in, flat_out = (pj.targeting.flatten(t) for t in (adapters, pruned.adapters))
  zeros = total = 0
  for path, before in flat_in.items():
    after = np.asarray(flat_out[path])
    if path.endswith("lora_magnitude"):
      np.testing.assert_array_equal(after, before)
      continue
    kept = after != 0
    assert kept.sum() == int((1 - sparsity) * after.size)
    if 0 < kept.sum() < after.size:  # the kept entries are the largest ones
      assert np.abs(after[kept]).min() >= np.abs(np.asarray(before)[~kept]).max()
    np.testing.assert_array_equal(after[kept], np.asarray(before)[kept])
    zeros += after.size - kept.sum()
    total += after.size
  assert pruned.sparsity == pytest.approx(zeros / total)
  assert pruned.sparsity == pytest.approx(sparsity, abs=0.02)
  with pytest.raises(ValueError, match="sparsity"):
    prune_lora_adapters(adapters, 1.5)
