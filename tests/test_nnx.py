"""Flax NNX: twins of linen models give the same outputs, gradients, merges and files."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax as pj
from peft_jax import targeting

V, D, T = 32, 16, 5
ALL = ("q_proj", "v_proj", "o_proj", "conv", "embed", "lm_head")


class LBlock(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="q_proj")(x)
    h = h + nn.DenseGeneral((2, 4), name="v_proj")(x).reshape(h.shape)
    h = h + nn.Conv(8, (3,), name="conv")(x)
    return x + nn.Einsum((8, D), "btd,de->bte", name="o_proj")(h)


class LModel(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D, name="embed")(tokens)
    for i in range(2):
      x = LBlock(name=f"layers_{i}")(x)
    return nn.Dense(V, name="lm_head")(x)


class NBlock(nnx.Module):

  def __init__(self, rngs):
    self.q_proj = nnx.Linear(D, 8, rngs=rngs)
    self.v_proj = nnx.LinearGeneral(D, (2, 4), rngs=rngs)
    self.conv = nnx.Conv(D, 8, (3,), rngs=rngs)
    self.o_proj = nnx.Einsum("btd,de->bte", (8, D), (D,), rngs=rngs)

  def __call__(self, x):
    h = self.q_proj(x)
    h = h + self.v_proj(x).reshape(h.shape)
    h = h + self.conv(x)
    return x + self.o_proj(h)


class NModel(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.layers = nnx.List([NBlock(rngs) for _ in range(2)])
    self.lm_head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(x)


def _twins():
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, V)
  lmodel = LModel()
  lparams = lmodel.init(jax.random.key(0), tokens)["params"]
  nmodel = NModel(nnx.Rngs(5))
  pj.nnx.sync(nmodel, lparams, None)  # the linen weights, in the NNX model
  return lmodel, lparams, nmodel, tokens


def _linen_adapted(lmodel, lparams, tokens, config):
  params = pj.lora_transform(lparams, config, key=jax.random.key(3),
                             layouts=pj.kernel_layouts(lmodel, tokens))
  # Non-zero B, so that every adapter changes the output.
  return jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if "lora_b" in jax.tree_util.keystr(p) else v, params)


def _close(a, b, tol=1e-6):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def _loss_linen(lmodel, config, tokens):
  def loss(adapters, base):
    with pj.intercept(config):
      return jnp.mean(lmodel.apply({"params": pj.combine(base, adapters)}, tokens) ** 2)
  return loss


def _loss_nnx(tokens):
  return lambda model: jnp.mean(model(tokens) ** 2)


CONFIGS = {
    "lora": pj.LoRAConfig(rank=2, alpha=4.0, target_modules=ALL),
    "rslora": pj.LoRAConfig(rank=2, alpha=4.0, target_modules=ALL, use_rslora=True,
                            rank_pattern={"layers_1/q_proj": 3}),
    "dora": pj.LoRAConfig(rank=2, alpha=4.0, target_modules=ALL, use_dora=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_twins_same_outputs_gradients_merges(name):
  config = CONFIGS[name]
  lmodel, lparams, nmodel, tokens = _twins()
  _close(lmodel.apply({"params": lparams}, tokens), nmodel(tokens))
  adapted = _linen_adapted(lmodel, lparams, tokens, config)
  adapters, base = pj.split(adapted)
  pj.nnx.load_adapters(nmodel, adapters, config)
  assert type(nmodel.layers[0].q_proj).__name__ == "PeftLinear"
  assert isinstance(nmodel.layers[0].q_proj.lora_a, pj.nnx.Adapter)
  assert isinstance(nmodel.layers[0].q_proj.lora_a, nnx.LoRAParam)
  with pj.intercept(config):
    y_linen = lmodel.apply({"params": adapted}, tokens)
  assert float(jnp.abs(y_linen - lmodel.apply({"params": lparams}, tokens)).max()) > 1e-2
  _close(y_linen, nmodel(tokens))

  g_linen = jax.grad(_loss_linen(lmodel, config, tokens))(adapters, base)
  g_nnx = nnx.grad(_loss_nnx(tokens), argnums=nnx.DiffState(0, pj.nnx.Adapter))(nmodel)
  g_nnx, _ = pj.nnx.state.to_linen(g_nnx)
  assert sorted(targeting.flatten(g_nnx)) == sorted(targeting.flatten(g_linen))
  for path, g in targeting.flatten(g_linen).items():
    _close(g, targeting.flatten(g_nnx)[path], 1e-5)

  merged = pj.merge(adapted, config, layouts=pj.kernel_layouts(lmodel, tokens))
  pj.nnx.merge(nmodel)
  assert type(nmodel.layers[0].q_proj) is nnx.Linear
  assert not hasattr(nmodel.layers[0].q_proj, "lora_a")
  flat_merged = targeting.flatten(merged)
  flat_nnx = targeting.flatten(pj.nnx.params(nmodel))
  assert sorted(flat_nnx) == sorted(flat_merged)
  for path, value in flat_merged.items():
    _close(value, flat_nnx[path])


def test_lora_transform_matches_linen_leaves_and_keeps_base_paths():
  config = pj.LoRAConfig(rank=2, target_modules="all-linear", use_dora=True,
                         exclude_modules=("v_proj",), alpha_pattern={"q_proj": 8.0})
  lmodel, lparams, nmodel, tokens = _twins()
  before = {p: type(v) for p, v in pj.nnx.state.variables(nmodel, nnx.Variable).items()}
  pj.nnx.lora_transform(nmodel, config, key=jax.random.key(0))
  linen = pj.lora_transform(lparams, config, key=jax.random.key(0),
                            layouts=pj.kernel_layouts(lmodel, tokens))
  flat_linen, flat_nnx = targeting.flatten(linen), targeting.flatten(pj.nnx.params(nmodel))
  assert {p: v.shape for p, v in flat_linen.items()} == {p: v.shape for p, v in flat_nnx.items()}
  after = pj.nnx.state.variables(nmodel, nnx.Variable)
  for path, kind in before.items():
    assert type(after[path]) is kind, path
  new = sorted(set(after) - set(before))
  assert new and all(isinstance(after[p], pj.nnx.Adapter) for p in new)
  assert not any("v_proj" in p or "lm_head" in p or "embed" in p for p in new)
  # Zero-initialised B: the adapted model starts at the base model's output.
  _close(nmodel(tokens), lmodel.apply({"params": lparams}, tokens), 1e-5)


def test_targeting_errors_and_layers_as_on_linen():
  _, _, nmodel, _ = _twins()
  with pytest.raises(ValueError, match="q_prj"):
    pj.nnx.lora_transform(nmodel, pj.LoRAConfig(target_modules=("q_prj",)), key=jax.random.key(0))
  with pytest.raises(ValueError, match="rank_pattern"):
    pj.nnx.lora_transform(nmodel, pj.LoRAConfig(rank=2, target_modules=("q_proj",),
                                                rank_pattern={"nothing": 2}),
                          key=jax.random.key(0))
  assert pj.nnx.model_config(nmodel) is None  # a failed transform changes nothing
  pj.nnx.lora_transform(nmodel, pj.LoRAConfig(rank=2, target_modules=("q_proj",),
                                              layers_to_transform=(1,)), key=jax.random.key(0))
  assert pj.nnx.is_peft_module(nmodel.layers[1].q_proj)
  assert not pj.nnx.is_peft_module(nmodel.layers[0].q_proj)
  assert sorted(targeting.flatten(pj.nnx.adapters(nmodel))) == [
      "layers_1/q_proj/lora_a", "layers_1/q_proj/lora_b"]


def test_qlora_twin_same_outputs_gradients_and_merge():
  config = pj.QLoRAConfig(rank=2, target_modules=("q_proj", "lm_head"),
                          quantize_modules=("q_proj", "lm_head"), block_size=16,
                          compute_dtype="float32")
  lmodel, lparams, nmodel, tokens = _twins()
  qparams = pj.quantize(lparams, config.quant_spec(), target_modules=("q_proj", "lm_head"))
  pj.nnx.quantize(nmodel, config.quant_spec(), target_modules=("q_proj", "lm_head"))
  assert isinstance(nmodel.lm_head.kernel.get_value(), pj.NF4Array)
  with pj.intercept(None):
    _close(lmodel.apply({"params": qparams}, tokens), nmodel(tokens))
  adapted = _linen_adapted(lmodel, qparams, tokens, config)
  adapters, base = pj.split(adapted)
  pj.nnx.load_adapters(nmodel, adapters, config)
  with pj.intercept(config):
    y_linen = lmodel.apply({"params": adapted}, tokens)
  _close(y_linen, nmodel(tokens))
  g_linen = jax.grad(_loss_linen(lmodel, config, tokens))(adapters, base)
  g_nnx = nnx.grad(_loss_nnx(tokens), argnums=nnx.DiffState(0, pj.nnx.Adapter))(nmodel)
  g_nnx = targeting.flatten(pj.nnx.state.to_linen(g_nnx)[0])
  for path, g in targeting.flatten(g_linen).items():
    _close(g, g_nnx[path], 1e-5)
  spec = config.quant_spec()
  merged, _ = pj.merge_into_quantized(adapted, config, spec)
  pj.nnx.merge(nmodel, requantize=spec)
  assert type(nmodel.q_proj if hasattr(nmodel, "q_proj") else nmodel.lm_head).__name__ == "PeftLinear"
  with pj.intercept(None):
    _close(lmodel.apply({"params": merged}, tokens), nmodel(tokens))


def test_adapter_only_training_compiles_once():
  config = pj.LoRAConfig(rank=2, target_modules="all-linear", use_dora=True)
  _, _, model, tokens = _twins()
  pj.nnx.lora_transform(model, config, key=jax.random.key(0))
  base = targeting.flatten(pj.nnx.params(model))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=pj.nnx.Adapter)
  traces = []

  @nnx.jit
  def step(model, optimizer, tokens):
    traces.append(1)
    loss, grads = nnx.value_and_grad(_loss_nnx(tokens),
                                     argnums=nnx.DiffState(0, pj.nnx.Adapter))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, tokens)) for _ in range(4)]
  assert len(traces) == 1
  assert losses[-1] < losses[0]
  after = targeting.flatten(pj.nnx.params(model))
  for path, value in base.items():
    leaf = targeting.split_path(path)[1]
    if leaf in targeting.ADAPTER_LEAVES:
      assert float(jnp.abs(after[path] - value).max()) > 0, path
    else:
      np.testing.assert_array_equal(after[path], value)


def _train_both(config, tx, lmodel, lparams, nmodel, tokens, steps=2, adalora=False):
  adapted = _linen_adapted(lmodel, lparams, tokens, config) if not adalora else lparams
  adapters, base = pj.split(adapted)
  pj.nnx.load_adapters(nmodel, adapters, config)
  loss_l = _loss_linen(lmodel, config, tokens)
  state = tx.init(adapters)
  for _ in range(steps):
    grads = jax.grad(loss_l)(adapters, base)
    updates, state = tx.update(grads, state, adapters)
    adapters = optax.apply_updates(adapters, updates)
  optimizer = nnx.Optimizer(nmodel, pj.nnx.linen_paths(tx), wrt=pj.nnx.Adapter)
  for _ in range(steps):
    grads = nnx.grad(_loss_nnx(tokens), argnums=nnx.DiffState(0, pj.nnx.Adapter))(nmodel)
    optimizer.update(nmodel, grads)
  flat_nnx = targeting.flatten(pj.nnx.adapters(nmodel))
  for path, value in targeting.flatten(adapters).items():
    _close(value, flat_nnx[path], 1e-5)


@pytest.mark.parametrize("which", ["lora_plus", "galore", "lisa"])
def test_peft_optimizers_under_nnx_optimizer_match_linen(which):
  config = pj.LoRAConfig(rank=2, target_modules=("q_proj", "o_proj"))
  txs = {
      "lora_plus": lambda: pj.optim.lora_plus(optax.adam, 1e-2, ratio=4.0),
      "galore": lambda: pj.optim.galore(1e-2, rank=1, update_proj_gap=1,
                                        targets=r".*/lora_a"),
      "lisa": lambda: pj.optim.lisa(optax.sgd(0.1), n_layers=1, interval_steps=1, key=1),
  }
  lmodel, lparams, nmodel, tokens = _twins()
  _train_both(config, txs[which](), lmodel, lparams, nmodel, tokens)


def test_adalora_under_nnx_optimizer_matches_linen():
  config = pj.AdaLoRAConfig(init_r=3, target_r=1, tinit=0, tfinal=0, total_step=4, deltaT=1,
                            target_modules=("q_proj", "o_proj"))
  lmodel, lparams, nmodel, tokens = _twins()
  adapted = pj.adalora_transform(lparams, config, key=jax.random.key(2))
  adapted = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if "lora_b" in jax.tree_util.keystr(p) else v, adapted)
  _train_both(config, pj.optim.adalora(optax.adam(1e-2), config), lmodel, adapted, nmodel,
              tokens, steps=3, adalora=True)


class Block(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(D, 8, rngs=rngs)
    self.down = nnx.Linear(8, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(x)))


class Stacked(nnx.Module):
  """Layers created with ``nnx.vmap`` and run with ``nnx.scan`` (the NNX idiom)."""

  def __init__(self, rngs, n=3):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)
    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, x):
      return layer(x)
    return body(self.layers, x)


def test_scan_stacked_layers():
  model = Stacked(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, T, D))
  config = pj.LoRAConfig(rank=2, target_modules=("up", "down"), use_dora=True)
  pj.nnx.lora_transform(model, config, key=jax.random.key(0))
  assert pj.nnx.layouts(model)["layers/up"].batch_ndim == 1
  assert model.layers.up.lora_a.shape == (3, D, 2)
  model.layers.up.lora_b.set_value(model.layers.up.lora_b.get_value() + 0.1)
  params = targeting.flatten(pj.nnx.params(model))

  def unrolled(x):  # each layer by hand, from the stacked leaves
    for i in range(3):
      for name in ("up", "down"):
        p = {k.rsplit("/", 1)[1]: v[i] for k, v in params.items() if k.startswith(f"layers/{name}/")}
        w = p["kernel"] + config.scale_for(name) * p["lora_a"] @ p["lora_b"]
        w = w * p["lora_magnitude"] / jnp.linalg.norm(w, axis=0)
        h = (jax.nn.gelu(x @ w + p["bias"]) if name == "up" else x + h @ w + p["bias"])
      x = h
    return x

  _close(model(x), unrolled(x), 1e-5)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=pj.nnx.Adapter)
  traces = []

  @nnx.jit
  def step(model, optimizer, x):
    traces.append(1)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2),
                                     argnums=nnx.DiffState(0, pj.nnx.Adapter))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, x)) for _ in range(3)]
  assert len(traces) == 1 and losses[-1] < losses[0]
  pj.nnx.merge(model)
  assert type(model.layers.up) is nnx.Linear


def test_linen_saved_adapters_load_into_nnx_twin(tmp_path):
  config = CONFIGS["dora"]
  lmodel, lparams, nmodel, tokens = _twins()
  adapted = _linen_adapted(lmodel, lparams, tokens, config)
  with pj.intercept(config):
    y_linen = lmodel.apply({"params": adapted}, tokens)
  pj.checkpoint.save(tmp_path / "orbax", pj.split(adapted)[0], config)
  adapters, restored_config = pj.checkpoint.restore(tmp_path / "orbax")
  pj.nnx.load_adapters(nmodel, adapters, restored_config)
  _close(y_linen, nmodel(tokens))


def test_nnx_adapters_export_to_hugging_face_and_load_into_linen(tmp_path):
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj", "lm_head"), use_dora=True)
  lmodel, lparams, nmodel, tokens = _twins()
  pj.nnx.lora_transform(nmodel, config, key=jax.random.key(0))
  nmodel.lm_head.lora_b.set_value(nmodel.lm_head.lora_b.get_value() + 0.05)
  pj.export_peft(tmp_path / "hf", pj.nnx.adapters(nmodel), config)
  adapters, hf_config = pj.import_peft(tmp_path / "hf")
  y_nnx = nmodel(tokens)
  with pj.intercept(hf_config):
    _close(y_nnx, lmodel.apply({"params": pj.combine(lparams, adapters)}, tokens))


def test_adapters_that_do_not_fit_raise_naming_the_path():
  config = pj.LoRAConfig(rank=2, target_modules=("q_proj",))
  lmodel, lparams, nmodel, tokens = _twins()
  adapters = targeting.flatten(pj.split(_linen_adapted(lmodel, lparams, tokens, config))[0])
  adapters["layers_0/q_proj/lora_b"] = jnp.zeros((2, 9))
  with pytest.raises(ValueError, match="layers_0/q_proj"):
    pj.nnx.load_adapters(nmodel, targeting.unflatten(adapters), config)


def test_silent_cases_raise():
  _, _, nmodel, tokens = _twins()
  # Adapters attached by hand to a plain nnx.Linear: its __call__ would ignore them.
  nmodel.lm_head.lora_a = nnx.Param(jnp.ones((D, 2)))
  nmodel.lm_head.lora_b = nnx.Param(jnp.ones((2, V)))
  with pytest.raises(ValueError, match="lm_head"):
    pj.nnx.check(nmodel)
  with pytest.raises(ValueError, match=r"nnx.Linear with kernel shape \(16, 32\)"), \
      pj.intercept(pj.LoRAConfig()):
    nmodel(tokens)
  del nmodel.lm_head.lora_a, nmodel.lm_head.lora_b
  pj.nnx.check(nmodel)
  kernel = nmodel.lm_head.kernel.get_value()
  nmodel.lm_head.kernel.set_value(pj.quantize({"m": {"kernel": kernel}})["m"]["kernel"])
  with pytest.raises(TypeError, match="peft_jax.nnx.quantize"), pj.intercept(None):
    nmodel(tokens)
  nmodel.lm_head.kernel.set_value(kernel)

  # A different config inside intercept would silently be ignored: refused.
  config = pj.LoRAConfig(rank=2, target_modules=("q_proj",))
  _, _, nmodel, tokens = _twins()
  pj.nnx.lora_transform(nmodel, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match="layers_0/q_proj"), pj.intercept(config.replace(alpha=1.0)):
    nmodel(tokens)
  with pj.intercept(config):
    nmodel(tokens)


def test_dropout_follows_train_and_eval():
  config = pj.LoRAConfig(rank=2, target_modules=("q_proj",), dropout=0.5)
  _, _, model, tokens = _twins()
  pj.nnx.lora_transform(model, config, key=jax.random.key(0), rngs=nnx.Rngs(dropout=1))
  model.layers[0].q_proj.lora_b.set_value(model.layers[0].q_proj.lora_b.get_value() + 1.0)
  model.eval()
  y1, y2 = model(tokens), model(tokens)
  np.testing.assert_array_equal(y1, y2)
  model.train()
  y3, y4 = model(tokens), model(tokens)
  assert float(jnp.abs(y3 - y4).max()) > 0
  assert float(jnp.abs(y3 - y1).max()) > 0


def test_lora_transform_on_state_and_pissa_on_model():
  config = pj.LoRAConfig(rank=2, target_modules=("q_proj", "lm_head"))
  lmodel, lparams, nmodel, tokens = _twins()
  state = nnx.state(nmodel)
  new = pj.nnx.lora_transform(state, config, key=jax.random.key(0))
  paths = {p for p, _ in nnx.to_flat_state(new)}
  assert paths == {p for p, _ in nnx.to_flat_state(state)} | {
      ("layers", i, "q_proj", n) for i in (0, 1) for n in ("lora_a", "lora_b")} | {
      ("lm_head", "lora_a"), ("lm_head", "lora_b")}
  assert isinstance(new["lm_head"]["lora_a"], pj.nnx.Adapter)
  y = nmodel(tokens)
  pj.nnx.lora_transform(nmodel, config.replace(init="pissa"), key=jax.random.key(0))
  _close(nmodel(tokens), y, 1e-4)  # PiSSA rewrote the kernels to residuals: same output
  assert float(jnp.abs(nmodel.lm_head.kernel.get_value() - lparams["lm_head"]["kernel"]).max()) > 1e-3


class LCustom(nn.Module):
  """Gemma/MaxText style: raw params, products through einsum, @ and dot_general."""

  @nn.compact
  def __call__(self, x):
    w_gate = self.param("w_gate", nn.initializers.normal(0.3), (D, 8))
    w_out = self.param("w_out", nn.initializers.normal(0.3), (8, D))
    kernel = self.param("kernel", nn.initializers.normal(0.3), (D, D))
    h = jax.nn.gelu(jnp.einsum("btd,df->btf", x, w_gate)) @ w_out
    return h + jax.lax.dot_general(x, kernel, (((2,), (0,)), ((), ())))


class LCustomModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    return LCustom(name="ffw")(nn.Dense(D, name="proj")(x))


class NCustom(nnx.Module):

  def __init__(self, rngs):
    self.w_gate = nnx.Param(jax.random.normal(rngs.params(), (D, 8)))
    self.w_out = nnx.Param(jax.random.normal(rngs.params(), (8, D)))
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (D, D)))

  def __call__(self, x):
    h = jax.nn.gelu(jnp.einsum("btd,df->btf", x, self.w_gate[...])) @ self.w_out[...]
    return h + jax.lax.dot_general(x, self.kernel[...], (((2,), (0,)), ((), ())))


class NCustomModel(nnx.Module):

  def __init__(self, rngs):
    self.proj = nnx.Linear(D, D, rngs=rngs)
    self.ffw = NCustom(rngs)

  def __call__(self, x):
    return self.ffw(self.proj(x))


@pytest.mark.parametrize("use_dora", [False, True])
def test_custom_nnx_module_twin_of_custom_linen_module(use_dora):
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("ffw", "w_gate", "w_out", "proj"),
                         weight_names=("kernel", "embedding", "w_gate", "w_out"), use_dora=use_dora)
  x = jax.random.normal(jax.random.key(1), (2, T, D))
  lmodel = LCustomModel()
  lparams = lmodel.init(jax.random.key(0), x)["params"]
  nmodel = NCustomModel(nnx.Rngs(0))
  pj.nnx.sync(nmodel, lparams, None)
  _close(lmodel.apply({"params": lparams}, x), nmodel(x))
  adapted = pj.lora_transform(lparams, config, key=jax.random.key(3))
  adapted = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if "lora_b" in jax.tree_util.keystr(p) else v, adapted)
  adapters, base = pj.split(adapted)
  assert "w_gate_lora" in adapters["ffw"] and "lora_a" in adapters["ffw"]
  pj.nnx.load_adapters(nmodel, adapters, config)
  assert type(nmodel.ffw).__name__ == "PeftNCustom"
  with pj.intercept(config):
    y_linen = lmodel.apply({"params": adapted}, x)
  _close(y_linen, nmodel(x), 1e-5)
  loss_l = lambda a: jnp.mean(lmodel.apply({"params": pj.combine(base, a)}, x) ** 2)
  with pj.intercept(config):
    g_linen = targeting.flatten(jax.grad(loss_l)(adapters))
  g_nnx = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, pj.nnx.Adapter))(nmodel)
  g_nnx = targeting.flatten(pj.nnx.state.to_linen(g_nnx)[0])
  assert sorted(g_nnx) == sorted(g_linen)
  for path, g in g_linen.items():
    _close(g, g_nnx[path], 1e-5)
  traces = []

  @nnx.jit
  def forward(model, x):
    traces.append(1)
    return model(x)

  _close(forward(nmodel, x), y_linen, 1e-5)
  forward(nmodel, x + 1.0)
  assert len(traces) == 1
  merged = targeting.flatten(pj.merge(adapted, config))
  pj.nnx.merge(nmodel)
  assert type(nmodel.ffw) is NCustom and not hasattr(nmodel.ffw, "w_gate_lora")
  flat = targeting.flatten(pj.nnx.params(nmodel))
  assert sorted(flat) == sorted(merged)
  for path, value in merged.items():
    _close(value, flat[path], 1e-5)


def test_custom_nnx_weight_outside_a_product_raises_naming_it():

  class Scaled(nnx.Module):

    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)))

    def __call__(self, x):
      return x * jnp.sum(self.w[...])  # the weight never enters a product

  model = Scaled(nnx.Rngs(0))
  config = pj.LoRAConfig(rank=2, target_modules=("w",), weight_names=("kernel", "embedding", "w"))
  pj.nnx.lora_transform(model, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match="'w'.*added nothing"):
    model(jnp.ones((2, D)))


def test_layouts_traced_for_custom_nnx_modules():

  class Heads(nnx.Module):  # a Gemma-style per-head projection: 3-D weight, interleaved axes

    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (4, D, 3)))

    def __call__(self, x):
      return jnp.einsum("btd,ndh->btnh", x, self.w[...])

  model = Heads(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, T, D))
  config = pj.LoRAConfig(rank=2, target_modules=("w",), weight_names=("kernel", "embedding", "w"))
  found = pj.nnx.layouts(model, x, weight_names=config.weight_names)
  assert found == {"w": pj.KernelLayout((1,), (0, 2))}
  assert type(model) is Heads
  y = model(x)
  pj.nnx.lora_transform(model, config, key=jax.random.key(0), layouts=found)
  assert model.w_lora["lora_a"].shape == (D, 2) and model.w_lora["lora_b"].shape == (2, 4, 3)
  model.w_lora["lora_b"].set_value(model.w_lora["lora_b"].get_value() + 0.1)
  a, b = model.w_lora["lora_a"].get_value(), model.w_lora["lora_b"].get_value()
  want = y + config.scale_for("w") * jnp.einsum("btd,dr,rnh->btnh", x, a, b)
  _close(model(x), want, 1e-5)
