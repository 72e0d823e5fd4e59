"""LoRA / rsLoRA / DoRA: transform, interceptor, merge, against oracles.

Oracles: Hugging Face PEFT's own outputs (tests/data/peft_lora_reference.json,
made by tests/data/make_lora_reference.py) and float64 NumPy formulas.
"""

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
from peft_jax import training
from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params

REF = json.loads((pathlib.Path(__file__).parent / "data" / "peft_lora_reference.json").read_text())
A64 = lambda x: np.asarray(x, np.float64)


def _set(params, module, **leaves):
  params = jax.tree.map(lambda a: a, params)
  inner = params["params"] if "params" in params else params
  for name, value in leaves.items():
    inner[module][name] = jnp.asarray(value, jnp.float32)
  return params


# --------------------------------------------------------------------------- reference library


class Proj(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name="proj")(x)


@pytest.mark.parametrize("case", ["lora", "rslora", "dora"])
def test_linear_matches_peft(case):
  ref = REF[case]
  model = Proj()
  x = jnp.asarray(ref["x"], jnp.float32)
  config = pj.LoRAConfig(rank=ref["r"], alpha=ref["alpha"], target_modules=("proj",),
                         use_dora=ref["use_dora"], use_rslora=ref["use_rslora"])
  assert config.scale_for("proj") == pytest.approx(ref["scaling"])
  params = {"params": {"proj": {"kernel": A64(ref["W"]).T, "bias": A64(ref["b"])}}}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  params = pj.lora_transform(params, config, key=jax.random.key(0))
  leaves = {"lora_a": A64(ref["A"]).T, "lora_b": A64(ref["B"]).T}
  if ref["use_dora"]:
    leaves["lora_magnitude"] = ref["m"]
  params = _set(params, "proj", **leaves)
  with pj.intercept(config):
    y = model.apply(params, x)
  np.testing.assert_allclose(y, ref["y"], rtol=1e-5, atol=1e-5)
  merged = pj.merge(params, config)
  np.testing.assert_allclose(merged["params"]["proj"]["kernel"], A64(ref["W_merged"]).T,
                             rtol=1e-5, atol=1e-5)


def test_dora_magnitude_init_matches_peft():
  ref = REF["dora"]
  config = pj.DoRAConfig(rank=2, alpha=4.0, target_modules=("proj",))
  params = {"proj": {"kernel": jnp.asarray(A64(ref["W"]).T, jnp.float32)}}
  params = pj.lora_transform(params, config, key=jax.random.key(0))
  np.testing.assert_allclose(params["proj"]["lora_magnitude"], ref["m_init"], rtol=1e-6)


def test_dora_train_step_selects_no_state_leaf():
  """The step's finite check is a ``lax.cond``, not a select between the new and the old
  value of every state leaf: with those selects Gemma 3 270M's DoRA process peaked at
  7.4 GiB against 3.5 GiB (README, "DoRA's peak RSS"). Lowered only, nothing compiles."""
  config = LlamaConfig.tiny()
  dora = pj.DoRAConfig(rank=4, target_modules="all-linear")
  adapters, base = pj.split(pj.lora_transform(init_params(config, jax.random.key(0)), dora,
                                              key=jax.random.key(1)))
  optimizer = optax.adamw(1e-2)
  state = training.init_train_state(adapters, optimizer)
  ids = jnp.zeros((2, 8), jnp.int32)
  text = training.make_train_step(LlamaForCausalLM(config), dora, optimizer).lower(
      state, base, ids, ids, jax.random.key(0)).as_text()
  assert "lora_magnitude" in str(jax.tree_util.tree_structure(state))
  assert text.count("stablehlo.select") < len(jax.tree.leaves(state)), text.count("select")


@pytest.mark.parametrize("case", ["pissa", "olora"])
def test_pissa_olora_match_peft(case):
  ref = REF[case]
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("proj",), init=case)
  w_orig = A64(ref["W_res"]).T + ref["scaling"] * (A64(ref["B_init"]) @ A64(ref["A_init"])).T
  params = {"proj": {"kernel": jnp.asarray(w_orig, jnp.float32),
                     "bias": jnp.asarray(ref["b"], jnp.float32)}}
  out = pj.lora_transform(params, config, key=jax.random.key(0))["proj"]
  # Sign-invariant comparisons: the residual and B A.
  np.testing.assert_allclose(out["kernel"], A64(ref["W_res"]).T, atol=2e-5)
  ba = np.asarray(out["lora_a"], np.float64) @ np.asarray(out["lora_b"], np.float64)
  np.testing.assert_allclose(ba, (A64(ref["B_init"]) @ A64(ref["A_init"])).T, atol=2e-5)
  x = jnp.asarray(ref["x"], jnp.float32)
  with pj.intercept(config):
    y = Proj().apply({"params": {"proj": out}}, x)
  base = Proj().apply({"params": params}, x)
  np.testing.assert_allclose(y, base, atol=1e-5)
  np.testing.assert_allclose(y, ref["y_at_init"], atol=1e-5)


class Emb(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Embed(10, 6, name="emb")(ids)


@pytest.mark.parametrize("case", ["embedding_lora", "embedding_dora"])
def test_embedding_matches_peft(case):
  ref = REF[case]
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("emb",), use_dora=ref["use_dora"])
  params = {"emb": {"embedding": jnp.asarray(ref["W"], jnp.float32)}}
  params = pj.lora_transform(params, config, key=jax.random.key(0))
  leaves = {"lora_a": A64(ref["A"]).T, "lora_b": A64(ref["B"]).T}
  if ref["use_dora"]:
    leaves["lora_magnitude"] = ref["m"]
  params = _set(params, "emb", **leaves)
  ids = jnp.asarray(ref["ids"])
  with pj.intercept(config):
    y = Emb().apply({"params": params}, ids)
  np.testing.assert_allclose(y, ref["y"], rtol=1e-5, atol=1e-5)
  merged = pj.merge(params, config)
  np.testing.assert_allclose(Emb().apply({"params": merged}, ids), ref["y"], rtol=1e-5, atol=1e-5)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3, 3), padding="SAME", name="conv")(x)


@pytest.mark.parametrize("case", ["conv_lora", "conv_dora"])
def test_conv_matches_peft(case):
  ref = REF[case]
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("conv",), use_dora=ref["use_dora"])
  model = ConvNet()
  x = jnp.asarray(A64(ref["x"]).transpose(0, 2, 3, 1), jnp.float32)  # NCHW -> NHWC
  layouts = pj.kernel_layouts(model, x)
  params = {"conv": {"kernel": jnp.asarray(A64(ref["W"]).transpose(2, 3, 1, 0), jnp.float32),
                     "bias": jnp.asarray(ref["b"], jnp.float32)}}
  params = pj.lora_transform(params, config, key=jax.random.key(0), layouts=layouts)
  leaves = {"lora_a": A64(ref["A"]).transpose(2, 3, 1, 0),
            "lora_b": A64(ref["B"])[:, :, 0, 0].T}
  if ref["use_dora"]:
    leaves["lora_magnitude"] = ref["m"]
  params = _set(params, "conv", **leaves)
  want = A64(ref["y"]).transpose(0, 2, 3, 1)
  with pj.intercept(config):
    y = model.apply({"params": params}, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  merged = pj.merge(params, config)
  np.testing.assert_allclose(model.apply({"params": merged}, x), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- float64 oracles


class Mixed(nn.Module):
  """Dense, DenseGeneral (both directions) and an interleaved Einsum."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(12, name="dense")(x)
    h = nn.DenseGeneral((3, 4), name="split_heads")(h)  # (..., 3, 4)
    h = nn.DenseGeneral(10, axis=(-2, -1), name="merge_heads")(h)
    return nn.Einsum((2, 10, 5), "btd,ndh->btnh", name="einsum")(h)


def _oracle_mixed(p, x, scales, dora):
  """Float64 NumPy forward of Mixed with LoRA/DoRA on every module."""
  def adapt(name, kernel, in_axes, out_axes):
    q = p[name]
    k = A64(q["kernel"])
    a, b = A64(q["lora_a"]), A64(q["lora_b"])
    n_in = len(in_axes)
    kl = "abcdefgh"[: k.ndim]
    in_l = "".join(kl[i] for i in in_axes)
    out_l = "".join(kl[o] for o in out_axes)
    delta = np.einsum(f"{in_l}z,z{out_l}->{kl}", a, b)
    w = k + scales[name] * delta
    if dora:
      norm = np.sqrt((w ** 2).sum(axis=tuple(in_axes)))
      g = A64(q["lora_magnitude"]) / norm
      shape = [1] * k.ndim
      for j, o in enumerate(out_axes):
        shape[o] = k.shape[o]
      w = w * g.reshape(shape)
    del n_in, kernel
    return w

  w = adapt("dense", None, (0,), (1,))
  h = A64(x) @ w + A64(p["dense"]["bias"])
  w = adapt("split_heads", None, (0,), (1, 2))
  h = np.einsum("btd,dnh->btnh", h, w) + A64(p["split_heads"]["bias"])
  w = adapt("merge_heads", None, (0, 1), (2,))
  h = np.einsum("btnh,nho->bto", h, w) + A64(p["merge_heads"]["bias"])
  w = adapt("einsum", None, (1,), (0, 2))
  return np.einsum("btd,ndh->btnh", h, w) + A64(p["einsum"]["bias"])


def _perturb(params, key):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_mixed_modules_match_float64_oracle(variant):
  model = Mixed()
  x = jax.random.normal(jax.random.key(0), (2, 3, 7))
  variables = model.init(jax.random.key(1), x)
  layouts = pj.kernel_layouts(model, x)
  assert layouts["einsum"] == pj.KernelLayout((1,), (0, 2))
  assert layouts["merge_heads"] == pj.KernelLayout((0, 1), (2,))
  config = pj.LoRAConfig(rank=2, alpha=5.0, target_modules="all-linear",
                         use_rslora=variant == "rslora", use_dora=variant == "dora",
                         rank_pattern={"einsum": 3}, alpha_pattern={"dense": 2.0})
  params = pj.lora_transform(variables, config, key=jax.random.key(2), layouts=layouts)
  assert params["params"]["einsum"]["lora_a"].shape == (10, 3)
  assert params["params"]["einsum"]["lora_b"].shape == (3, 2, 5)
  params = _perturb(params, jax.random.key(3))
  with pj.intercept(config):
    y = jax.jit(model.apply)(params, x)
  scales = {m: config.scale_for(m) for m in ("dense", "split_heads", "merge_heads", "einsum")}
  assert scales["dense"] == pytest.approx(2.0 / (np.sqrt(2) if variant == "rslora" else 2))
  want = _oracle_mixed(params["params"], x, scales, variant == "dora")
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
  merged = pj.merge(params, config, layouts=layouts)
  np.testing.assert_allclose(model.apply(merged, x), want, rtol=2e-5, atol=2e-5)


class Scanned(nn.Module):
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(h.shape[-1], name="proj")(h)), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    length=self.layers)
    return stack(name="layers")(x, None)[0]


@pytest.mark.parametrize("dora", [False, True])
def test_scanned_layers_match_loop_oracle(dora):
  model = Scanned()
  x = jax.random.normal(jax.random.key(0), (4, 8))
  variables = model.init(jax.random.key(1), x)
  layouts = pj.kernel_layouts(model, x)
  assert layouts["layers/proj"].batch_ndim == 1
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("proj",), use_dora=dora)
  with pytest.raises(ValueError, match="layouts=peft_jax.kernel_layouts"):
    pj.lora_transform(variables, config, key=jax.random.key(2))
  params = pj.lora_transform(variables, config, key=jax.random.key(2), layouts=layouts)
  assert params["params"]["layers"]["proj"]["lora_a"].shape == (3, 8, 2)
  params = _perturb(params, jax.random.key(3))
  with pj.intercept(config):
    y = model.apply(params, x)
  p = jax.tree.map(A64, params["params"]["layers"]["proj"])
  h = A64(x)
  for i in range(3):
    w = p["kernel"][i] + 2.0 * p["lora_a"][i] @ p["lora_b"][i]
    if dora:
      w = w * (p["lora_magnitude"][i] / np.linalg.norm(w, axis=0))
    h = np.tanh(h @ w + p["bias"][i])
  np.testing.assert_allclose(y, h, rtol=2e-5, atol=2e-5)
  merged = pj.merge(params, config)
  np.testing.assert_allclose(model.apply(merged, x), h, rtol=2e-5, atol=2e-5)

  # Gradients reach the stacked leaves, with the layer axis.
  adapters, base = pj.split(params)

  def loss(adapters):
    with pj.intercept(config):
      return jnp.sum(model.apply(pj.combine(base, adapters), x) ** 2)

  grads = jax.grad(loss)(adapters)
  assert grads["params"]["layers"]["proj"]["lora_b"].shape == (3, 2, 8)
  assert float(jnp.abs(grads["params"]["layers"]["proj"]["lora_b"]).min()) >= 0.0
  assert float(jnp.abs(grads["params"]["layers"]["proj"]["lora_b"]).sum()) > 0.0


# --------------------------------------------------------------------------- behaviour


def test_default_init_leaves_output_unchanged_exactly():
  model = Mixed()
  x = jax.random.normal(jax.random.key(0), (2, 3, 7))
  variables = model.init(jax.random.key(1), x)
  layouts = pj.kernel_layouts(model, x)
  base = model.apply(variables, x)
  config = pj.LoRAConfig(rank=2, alpha=8.0, target_modules="all-linear")
  params = pj.lora_transform(variables, config, key=jax.random.key(2), layouts=layouts)
  with pj.intercept(config):
    np.testing.assert_array_equal(model.apply(params, x), base)
  dora = pj.lora_transform(variables, config.replace(use_dora=True), key=jax.random.key(2),
                           layouts=layouts)
  with pj.intercept(config.replace(use_dora=True)):
    np.testing.assert_allclose(model.apply(dora, x), base, rtol=1e-6, atol=1e-6)


def test_no_interceptor_gives_base_output():
  model = Mixed()
  x = jax.random.normal(jax.random.key(0), (2, 3, 7))
  variables = model.init(jax.random.key(1), x)
  config = pj.LoRAConfig(rank=2, target_modules=("dense",))
  params = _perturb(pj.lora_transform(variables, config, key=jax.random.key(2)), jax.random.key(4))
  adapters, base = pj.split(params)
  np.testing.assert_array_equal(model.apply(params, x), model.apply(base, x))
  with pj.intercept(config):
    assert not np.allclose(model.apply(params, x), model.apply(base, x))


def test_merge_unmerge_round_trip():
  model = Mixed()
  x = jax.random.normal(jax.random.key(0), (2, 3, 7))
  variables = model.init(jax.random.key(1), x)
  layouts = pj.kernel_layouts(model, x)
  config = pj.LoRAConfig(rank=2, target_modules="all-linear")
  params = _perturb(pj.lora_transform(variables, config, key=jax.random.key(2), layouts=layouts),
                    jax.random.key(5))
  adapters, base = pj.split(params)
  with pj.intercept(config):
    adapted = model.apply(params, x)
  merged = pj.merge(params, config, layouts=layouts)
  assert "lora_a" not in merged["params"]["dense"]
  # Outputs reach ~20: atol 1e-4 is a few float32 ulps of them (W + BA rounds once more).
  np.testing.assert_allclose(model.apply(merged, x), adapted, rtol=1e-5, atol=1e-4)
  restored = pj.unmerge(merged, adapters, config, layouts=layouts)
  chex.assert_trees_all_close(pj.split(restored)[1], base, rtol=1e-5, atol=1e-5)
  dora_cfg = config.replace(use_dora=True)
  dora = pj.lora_transform(variables, dora_cfg, key=jax.random.key(2), layouts=layouts)
  with pytest.raises(ValueError, match="DoRA"):
    pj.unmerge(pj.merge(dora, dora_cfg, layouts=layouts), pj.split(dora)[0], dora_cfg, layouts=layouts)


def test_dropout_uses_rng_and_is_off_when_deterministic():
  model = Proj()
  x = jnp.ones((64, 7))
  variables = model.init(jax.random.key(0), x)
  config = pj.LoRAConfig(rank=2, alpha=2.0, target_modules=("proj",), dropout=0.5)
  params = _perturb(pj.lora_transform(variables, config, key=jax.random.key(1)), jax.random.key(2))
  with pj.intercept(config):
    clean = model.apply(params, x)
    drop1 = model.apply(params, x, rngs={"dropout": jax.random.key(3)})
    drop2 = model.apply(params, x, rngs={"dropout": jax.random.key(4)})
  with pj.intercept(config, deterministic=True):
    det = model.apply(params, x, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(det, clean)
  assert not np.allclose(drop1, clean) and not np.allclose(drop1, drop2)
  # Inverted dropout is unbiased: the mean over many masks is the clean output.
  with pj.intercept(config):
    many = jax.vmap(lambda k: model.apply(params, x, rngs={"dropout": k}))(
        jax.random.split(jax.random.key(5), 400))
  np.testing.assert_allclose(many.mean(0), clean, atol=0.1 * float(jnp.abs(clean).max()))
  # It touches only the adapter branch: with B = 0 the output is the base, exactly.
  zero_b = _set(params, "proj", lora_b=jnp.zeros_like(params["params"]["proj"]["lora_b"]))
  with pj.intercept(config):
    np.testing.assert_array_equal(
        model.apply(zero_b, x, rngs={"dropout": jax.random.key(3)}), model.apply(pj.split(params)[1], x))
  with pj.intercept(config, deterministic=False), pytest.raises(Exception):
    model.apply(params, x)


def test_adapter_dtype_and_output_dtype():
  model = nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  x = jnp.ones((2, 4), jnp.bfloat16)
  variables = model.init(jax.random.key(0), x)
  config = pj.LoRAConfig(rank=2, target_modules=".*", adapter_dtype="float32")
  params = pj.lora_transform(variables, config, key=jax.random.key(1)) if False else None
  del params
  # A bare module has the empty path; target it by regex over the whole path.
  wrapped = {"params": {"dense": variables["params"]}}

  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="dense")(x)

  config = pj.LoRAConfig(rank=2, target_modules=("dense",), adapter_dtype="float32")
  params = pj.lora_transform(wrapped, config, key=jax.random.key(1))
  assert params["params"]["dense"]["lora_a"].dtype == jnp.float32
  with pj.intercept(config):
    assert Wrap().apply(params, x).dtype == jnp.bfloat16
  default = pj.lora_transform(wrapped, config.replace(adapter_dtype=None), key=jax.random.key(1))
  assert default["params"]["dense"]["lora_a"].dtype == jnp.bfloat16


def test_jit_train_step_compiles_once_and_changes_only_adapters():
  model = Scanned()
  x = jax.random.normal(jax.random.key(0), (4, 8))
  variables = model.init(jax.random.key(1), x)
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("proj",), dropout=0.1)
  params = pj.lora_transform(variables, config, key=jax.random.key(2),
                             layouts=pj.kernel_layouts(model, x))
  adapters, base = pj.split(params)
  import optax
  tx = optax.adam(1e-2)
  opt_state = tx.init(adapters)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(adapters, opt_state, key):
    def loss(adapters):
      with pj.intercept(config):
        y = model.apply(pj.combine(base, adapters), x, rngs={"dropout": key})
      return jnp.mean((y - 0.5) ** 2)
    value, grads = jax.value_and_grad(loss)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value

  losses = []
  for i in range(30):
    adapters, opt_state, value = step(adapters, opt_state, jax.random.key(i))
    losses.append(float(value))
  assert losses[-1] < 0.5 * losses[0]
  assert {a.shape for a in jax.tree.leaves(adapters)} == {(3, 8, 2), (3, 2, 8)}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=2.5), "rank must be a positive integer"),
    (dict(alpha=0.0), "alpha must be a positive number"),
    (dict(init="xavier"), "Unknown init"),
    (dict(dropout=1.0), "dropout"),
    (dict(rank_pattern={"q": -1}), "rank_pattern"),
])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pj.LoRAConfig(**kwargs)


def test_bad_targets_and_shapes():
  params = {"params": {"model": {"layers_0": {"self_attn": {
      "q_proj": {"kernel": jnp.ones((8, 8))}, "v_proj": {"kernel": jnp.ones((8, 4))}}}}}}
  with pytest.raises(ValueError, match=r"'q_prj' matched no module.*q_proj"):
    pj.lora_transform(params, pj.LoRAConfig(target_modules=("q_prj",)), key=jax.random.key(0))
  with pytest.raises(ValueError, match="regex"):
    pj.lora_transform(params, pj.LoRAConfig(target_modules="k_.*"), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"rank 5 is larger than the layer 'model/layers_0/self_attn/v_proj'"):
    pj.lora_transform(params, pj.LoRAConfig(rank=5, target_modules=("v_proj",)), key=jax.random.key(0))
  with pytest.raises(ValueError, match="no adapters"):
    pj.merge(params, pj.LoRAConfig())
  with pytest.raises(ValueError, match="no adapter leaves"):
    pj.split(params)
  adapted = pj.lora_transform(params, pj.LoRAConfig(rank=2), key=jax.random.key(0))
  with pytest.raises(ValueError, match="already holds adapters"):
    pj.lora_transform(adapted, pj.LoRAConfig(rank=2), key=jax.random.key(0))
  with pytest.raises(ValueError, match="does not fit"):
    pj.merge(adapted, pj.LoRAConfig(rank=4))
  with pytest.raises(ValueError, match="rank_pattern key 'o_proj' matched no module"):
    pj.lora_transform(params, pj.LoRAConfig(rank=2, rank_pattern={"o_proj": 4}), key=jax.random.key(0))


def test_targeting_forms():
  params = {"model": {
      "embed_tokens": {"embedding": jnp.ones((16, 8))},
      "layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 8))}},
                   "mlp": {"up_proj": {"kernel": jnp.ones((8, 16))}}},
      "layers_1": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 8))}},
                   "mlp": {"up_proj": {"kernel": jnp.ones((8, 16))}}}},
      "lm_head": {"kernel": jnp.ones((8, 16))}}
  sel = lambda *a, **k: sorted(pj.targeting.select_modules(params, *a, **k))
  assert sel("all-linear") == ["model/layers_0/mlp/up_proj", "model/layers_0/self_attn/q_proj",
                               "model/layers_1/mlp/up_proj", "model/layers_1/self_attn/q_proj"]
  assert sel(["self_attn/q_proj"]) == ["model/layers_0/self_attn/q_proj", "model/layers_1/self_attn/q_proj"]
  assert sel(r"model/layers_1/.*") == ["model/layers_1/mlp/up_proj", "model/layers_1/self_attn/q_proj"]
  assert sel("all-linear", exclude_modules=["mlp/up_proj"]) == [
      "model/layers_0/self_attn/q_proj", "model/layers_1/self_attn/q_proj"]
  assert sel(["q_proj"], layers_to_transform=[1]) == ["model/layers_1/self_attn/q_proj"]
  assert sel(["embed_tokens"]) == ["model/embed_tokens"]
  config = pj.LoRAConfig(rank=2, target_modules=("q_proj", "up_proj"),
                         rank_pattern={"layers_1/.*": 4}, alpha_pattern={"up_proj": 1.0})
  out = pj.lora_transform(params, config, key=jax.random.key(0))
  assert out["model"]["layers_0"]["self_attn"]["q_proj"]["lora_a"].shape == (8, 2)
  assert out["model"]["layers_1"]["self_attn"]["q_proj"]["lora_a"].shape == (8, 4)
  assert config.scale_for("model/layers_0/mlp/up_proj") == 0.5
  assert pj.LoRAConfig(rank=16, alpha=3.0, use_rslora=True).scale_for("x") == 0.75


def test_config_json_round_trip_and_version():
  config = pj.DoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj",), rank_pattern={"q": 2})
  d = json.loads(json.dumps(config.to_dict()))
  assert pj.lora.config_from_dict(d) == config
  d["format_version"] = 99
  with pytest.raises(ValueError, match="newer"):
    pj.lora.config_from_dict(d)
  assert hash(config) == hash(pj.DoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj"],
                                            rank_pattern={"q": 2}))


def test_matrix_lora_gradients_equal_the_einsum_ones():
  # A plain (in, out) kernel takes the matrix-product path with its own VJP (dB = h^T g,
  # no transposed copy of g); its value and gradients are the einsum path's.
  from peft_jax.lora import terms  # pylint: disable=import-outside-toplevel
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (2, 5, 6))
  a, b = jax.random.normal(keys[1], (6, 3)), jax.random.normal(keys[2], (3, 4))
  weights = jax.random.normal(keys[3], (2, 5, 4))

  def loss(x, a, b, plain):
    if plain:
      y = terms.einsum_lora(x, a, b, "...i", "io", "...o")[0]
    else:
      y = jnp.einsum("...z,zo->...o", jnp.einsum("...i,iz->...z", x, a), b)
    return jnp.sum(jnp.sin(y) * weights)

  assert "custom_vjp_call" in str(jax.make_jaxpr(loss, static_argnums=3)(x, a, b, True))
  got = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, a, b, True)
  want = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, a, b, False)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
