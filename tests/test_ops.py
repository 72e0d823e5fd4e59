"""Op-level adapters on custom linen modules: twins of the built-in modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import multitask, targeting
from peft_jax.lora import ops

TOL = dict(rtol=1e-6, atol=1e-6)
PRODUCTS = ("einsum", "matmul", "dot", "dot_general")
_DOT_GENERAL = jax.lax.dot_general  # bound at import time, as MaxText-style layers do


class Linear(nn.Module):
  """A custom layer: param ``w`` (in, out) used by a raw product."""

  features: int
  product: str = "einsum"

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    w = w.astype(x.dtype)  # a cast before the product, as mixed-precision code does
    if self.product == "einsum":
      return jnp.einsum("...d,df->...f", x, w)
    if self.product == "matmul":
      return x @ w
    if self.product == "dot":
      return jnp.dot(x, w)
    return _DOT_GENERAL(x, w, (((x.ndim - 1,), (0,)), ((), ())))


class FeedForward(nn.Module):
  """Gemma-style: two weights of one scope, both in einsums."""

  hidden: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    gating = self.param("gating_einsum", nn.initializers.lecun_normal(), (d, self.hidden))
    linear = self.param("linear", nn.initializers.lecun_normal(), (self.hidden, d))
    return jnp.einsum("...h,hd->...d", jax.nn.gelu(jnp.einsum("...d,dh->...h", x, gating)), linear)


class BuiltinFeedForward(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, use_bias=False, name="gating_einsum")(x)
    return nn.Dense(x.shape[-1], use_bias=False, name="linear")(jax.nn.gelu(h))


class Net(nn.Module):
  """Two projections and a feed-forward, built-in or custom."""

  custom: bool
  product: str = "einsum"

  @nn.compact
  def __call__(self, x):
    if self.custom:
      h = Linear(16, self.product, name="up")(x)
      h = FeedForward(32, name="mlp")(jax.nn.relu(h))
      return Linear(16, self.product, name="down")(h)
    h = nn.Dense(16, use_bias=False, name="up")(x)
    h = BuiltinFeedForward(32, name="mlp")(jax.nn.relu(h))
    return nn.Dense(16, use_bias=False, name="down")(h)


# Built-in path <-> custom path of the same weights.
_MAP = {"up/kernel": "up/w", "down/kernel": "down/w",
        "mlp/gating_einsum/kernel": "mlp/gating_einsum", "mlp/linear/kernel": "mlp/linear"}


def _to_custom(tree):
  """A built-in Net's params (with adapters) as the custom Net's params."""
  out = {}
  for path, value in targeting.flatten(tree["params"]).items():
    site, leaf = targeting.split_path(path)
    if path in _MAP:
      out[_MAP[path]] = value
    else:  # an adapter leaf: into the '<weight>_lora' site of the custom weight
      out[f"{_MAP[site + '/kernel']}_lora/{leaf}"] = value
  return {"params": targeting.unflatten(out)}


def _from_custom(tree):
  back = {v: k for k, v in _MAP.items()}
  out = {}
  for path, value in targeting.flatten(tree["params"]).items():
    if path in back:
      out[back[path]] = value
      continue
    site, leaf = targeting.split_path(path)
    weight = site[: -len("_lora")]
    out[f"{back[weight][: -len('/kernel')]}/{leaf}"] = value
  return {"params": targeting.unflatten(out)}


def _builtin_params(config, quantized=False):
  x = jnp.ones((2, 3, 16))
  params = Net(custom=False).init(jax.random.key(0), x)
  if quantized:
    params = pj.quantize(params, pj.NF4(block_size=16, double_quant=False, compute_dtype=jnp.float32),
                         target_modules=("up", "down", "gating_einsum", "linear"))
  params = pj.lora_transform(params, config, key=jax.random.key(1))
  # Non-zero B so that the adapters change the output.
  return jax.tree.map(lambda v: v + 0.05 if getattr(v, "dtype", None) == jnp.float32 and v.ndim == 2
                      and v.shape[0] <= 4 else v, params, is_leaf=pj.quant.is_quantized)


CUSTOM_WEIGHTS = ("w", "gating_einsum", "linear")
TARGETS = ("up", "down", "gating_einsum", "linear")


def _configs():
  base = dict(rank=4, alpha=8.0, target_modules=TARGETS)
  return {"lora": pj.LoRAConfig(**base), "rslora": pj.LoRAConfig(**base, use_rslora=True),
          "dora": pj.LoRAConfig(**base, use_dora=True)}


def _loss(model, config, params, x):
  with pj.intercept(config):
    return jnp.sum(model.apply(params, x) ** 2)


@pytest.mark.parametrize("method,product", [(m, "einsum") for m in ("lora", "rslora", "dora", "qlora")]
                         + [("lora", p) for p in PRODUCTS[1:]] + [("dora", "dot_general")])
def test_custom_twin_matches_builtin(method, product):
  config = _configs()["lora" if method == "qlora" else method]
  params = _builtin_params(config, quantized=method == "qlora")
  custom = _to_custom(params)
  ccfg = config.replace(weight_names=("kernel", "embedding") + CUSTOM_WEIGHTS,
                        target_modules=("up/w", "down/w", "gating_einsum", "linear"))
  x = jax.random.normal(jax.random.key(3), (2, 3, 16))
  builtin_model, custom_model = Net(custom=False), Net(custom=True, product=product)
  with pj.intercept(config):
    want = builtin_model.apply(params, x)
  with pj.intercept(ccfg):
    got = custom_model.apply(custom, x)
  with pj.intercept(config):
    base = builtin_model.apply(pj.split(params)[1], x)
  assert float(jnp.abs(want - base).max()) > 1e-3  # the adapters act
  np.testing.assert_allclose(got, want, **TOL)
  # Gradients with respect to the adapters.
  adapters, frozen = pj.split(params)
  cadapters, cfrozen = pj.split(custom)
  g_want = jax.grad(lambda a: _loss(builtin_model, config, pj.combine(frozen, a), x))(adapters)
  g_got = jax.grad(lambda a: _loss(custom_model, ccfg, pj.combine(cfrozen, a), x))(cadapters)
  for path, value in targeting.flatten(_from_custom(g_got)["params"]).items():
    np.testing.assert_allclose(value, targeting.flatten(g_want["params"])[path], rtol=1e-5, atol=1e-6)
  # Merged weights.
  merged = pj.merge(params, config)
  cmerged = pj.merge(custom, ccfg)
  for path, value in targeting.flatten(_from_custom(cmerged)["params"]).items():
    np.testing.assert_allclose(value, targeting.flatten(merged["params"])[path], **TOL)
  np.testing.assert_allclose(custom_model.apply(cmerged, x), want, rtol=1e-5, atol=1e-5)


class KernelEinsum(nn.Module):
  """The issue's example: a ``kernel`` param used by ``jnp.einsum``."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 8))
    return jnp.einsum("bd,df->bf", x, kernel)


class Single(nn.Module):
  """One custom layer under a parent (adapters live at ``proj``)."""

  layer: type = KernelEinsum

  @nn.compact
  def __call__(self, x):
    return self.layer(name="proj")(x)


class Unused(nn.Module):
  """Holds a weight that never enters a product."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], x.shape[-1]))
    return x * jnp.sum(w)


class Skipping(nn.Module):
  """Never calls its second layer."""

  @nn.compact
  def __call__(self, x, use_second=False):
    h = KernelEinsum(name="first")(x)
    second = KernelEinsum(name="second")
    return second(h) if use_second or self.is_initializing() else h


def _adapted(model, x, config, **kw):
  params = model.init(jax.random.key(0), x, **kw)
  params = pj.lora_transform(params, config, key=jax.random.key(1))
  return jax.tree.map(lambda v: v + 0.1 if v.ndim == 2 and v.shape[0] == 2 else v, params)


def test_kernel_param_in_custom_einsum_acts():
  x = jax.random.normal(jax.random.key(0), (3, 6))
  config = pj.LoRAConfig(rank=2, target_modules="all-linear")
  params = _adapted(Single(), x, config)
  p = params["params"]["proj"]
  with pj.intercept(config):
    got = Single().apply(params, x)
  want = x @ p["kernel"] + config.scale_for("proj") * (x @ p["lora_a"]) @ p["lora_b"]
  np.testing.assert_allclose(got, want, **TOL)


def test_weight_outside_any_product_raises_naming_path():
  x = jnp.ones((2, 4))
  config = pj.LoRAConfig(rank=2, target_modules=("w",), weight_names=("w",))
  params = _adapted(Single(Unused), x, config)
  with pytest.raises(ValueError, match=r"(?s)proj/w_lora: its weight was used only by .*reduce_sum"):
    with pj.intercept(config):
      Single(Unused).apply(params, x)


def test_module_never_called_raises_naming_path():
  x = jnp.ones((2, 4))
  config = pj.LoRAConfig(rank=2, target_modules="all-linear")
  params = _adapted(Skipping(), x, config)
  with pytest.raises(ValueError, match="second: its module was never called"):
    with pj.intercept(config):
      Skipping().apply(params, x)
  with pj.intercept(config):  # both used: no error
    Skipping().apply(params, x, use_second=True)


def test_stacked_adapters_outside_mixed_adapters_raise():
  x = jnp.ones((2, 4))
  config = pj.LoRAConfig(rank=2, target_modules="all-linear")
  params = _adapted(Single(), x, config)
  adapters, base = pj.split(params)
  stack = multitask.stack_adapters({"t": multitask.TaskAdapter(adapters, config)})
  with pytest.raises(ValueError, match="mixed_adapters"):
    with pj.intercept(config):
      Single().apply(multitask.attach(base, stack), x)


class CustomBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = Linear(16, name="up")(x)
    return x + Linear(x.shape[-1], "dot_general", name="down")(jax.nn.relu(h)), None


class BuiltinBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(16, use_bias=False, name="up")(x)
    return x + nn.Dense(x.shape[-1], use_bias=False, name="down")(jax.nn.relu(h)), None


def _scanned(block):
  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      layers = nn.scan(nn.remat(block), variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)
      return layers(name="layers")(x, None)[0]
  return Scanned()


def test_scanned_remat_custom_einsum_matches_builtin():
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  builtin, custom = _scanned(BuiltinBlock), _scanned(CustomBlock)
  bparams = builtin.init(jax.random.key(1), x)
  cparams = {"params": {"layers": {n: {"w": bparams["params"]["layers"][n]["kernel"]}
                                   for n in ("up", "down")}}}
  blayouts = pj.kernel_layouts(builtin, x)
  clayouts = pj.kernel_layouts(custom, x)
  assert clayouts["layers/up/w"] == blayouts["layers/up"]  # found by tracing the products
  assert clayouts["layers/up/w"].batch_ndim == 1
  config = pj.LoRAConfig(rank=2, target_modules=("up", "down"))
  ccfg = config.replace(weight_names=("w",), target_modules=("up/w", "down/w"))
  bparams = pj.lora_transform(bparams, config, key=jax.random.key(2), layouts=blayouts)
  bparams = jax.tree.map(lambda v: v + 0.1 if v.shape[1] == 2 else v, bparams)
  for n in ("up", "down"):
    layer = dict(bparams["params"]["layers"][n])
    cparams["params"]["layers"][n]["w_lora"] = {k: layer[k] for k in ("lora_a", "lora_b")}
  badapters, bbase = pj.split(bparams)
  cadapters, cbase = pj.split(cparams)

  def loss(model, cfg, base, a):
    with pj.intercept(cfg):
      return jnp.sum(model.apply(pj.combine(base, a), x) ** 2)

  np.testing.assert_allclose(loss(custom, ccfg, cbase, cadapters),
                             loss(builtin, config, bbase, badapters), rtol=1e-6)
  gb = jax.grad(lambda a: loss(builtin, config, bbase, a))(badapters)["params"]["layers"]
  gc = jax.grad(lambda a: loss(custom, ccfg, cbase, a))(cadapters)["params"]["layers"]
  for n in ("up", "down"):
    np.testing.assert_allclose(gc[n]["w_lora"]["lora_b"], gb[n]["lora_b"], rtol=1e-5, atol=1e-6)
  merged = pj.merge(cparams, ccfg, layouts=clayouts)
  np.testing.assert_allclose(merged["params"]["layers"]["up"]["w"],
                             pj.merge(bparams, config, layouts=blayouts)["params"]["layers"]["up"]["kernel"],
                             **TOL)


def test_jitted_custom_step_does_not_retrace():
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  config = pj.LoRAConfig(rank=2, target_modules=("up/w",), weight_names=("w",))
  model = Net(custom=True)
  params = pj.lora_transform(model.init(jax.random.key(1), x), config, key=jax.random.key(2))
  adapters, base = pj.split(params)
  traces = []

  @jax.jit
  def step(adapters, x):
    traces.append(1)
    grads = jax.grad(lambda a: _loss(model, config, pj.combine(base, a), x))(adapters)
    return jax.tree.map(lambda p, g: p - 0.1 * g, adapters, grads)

  for i in range(3):
    adapters = step(adapters, x + i)
  assert len(traces) == 1
  assert float(jnp.abs(adapters["params"]["up"]["w_lora"]["lora_b"]).max()) > 0  # it trained


def test_custom_dropout_uses_rng():
  x = jnp.ones((64, 6))
  config = pj.LoRAConfig(rank=2, target_modules="all-linear", dropout=0.5)
  params = _adapted(Single(), x, config)
  with pj.intercept(config):
    clean = Single().apply(params, x)
    drop = Single().apply(params, x, rngs={"dropout": jax.random.key(3)})
  with pj.intercept(config, deterministic=True):
    det = Single().apply(params, x, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(det, clean)
  assert not np.allclose(drop, clean)


def test_mixed_batch_custom_and_dense_general_match_single_runs():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((2, 4), name="proj")(x)
      return Linear(5, "matmul", name="out")(h.reshape(h.shape[:-2] + (8,)))

  x = jax.random.normal(jax.random.key(0), (3, 4, 6))
  model = Mixed()
  base = model.init(jax.random.key(1), x)
  layouts = pj.kernel_layouts(model, x)
  library = {}
  for k, rank in enumerate((2, 3)):
    cfg = pj.LoRAConfig(rank=rank, alpha=4.0 + k, target_modules=("proj", "out/w"),
                        weight_names=("w",))
    p = pj.lora_transform(base, cfg, key=jax.random.key(10 + k), layouts=layouts)
    p = jax.tree.map(lambda v: v + 0.1 * (k + 1) if v.shape[0] == rank else v, p)
    library[f"t{k}"] = multitask.TaskAdapter(pj.split(p)[0], cfg)
  stack = multitask.stack_adapters(library, layouts=layouts)
  index = stack.index(["t1", None, "t0"])
  with multitask.mixed_adapters(index):
    mixed = model.apply(multitask.attach(base, stack), x)
  for row, name in enumerate(["t1", None, "t0"]):
    if name is None:
      want = model.apply(base, x[row:row + 1])
    else:
      params, cfg = multitask.with_adapter(base, library, name)
      with pj.intercept(cfg):
        want = model.apply(params, x[row:row + 1])
    np.testing.assert_allclose(mixed[row:row + 1], want, **TOL)
  with pytest.raises(ValueError, match="out of range"):
    with multitask.mixed_adapters(jnp.array([0, 2, -1])):
      model.apply(multitask.attach(base, stack), x)
  jitted = jax.jit(lambda p, i: _mixed_apply(model, p, x, i))
  bad = jitted(multitask.attach(base, stack), jnp.array([0, 5, -1]))
  assert np.isnan(np.asarray(bad[1])).all() and not np.isnan(np.asarray(bad[0])).any()


def _mixed_apply(model, params, x, index):
  with multitask.mixed_adapters(index):
    return model.apply(params, x)


def test_checkpoint_roundtrip_of_weight_sites(tmp_path):
  x = jnp.ones((2, 3, 16))
  model = Net(custom=True)
  config = pj.LoRAConfig(rank=2, target_modules=("gating_einsum", "linear"),
                         weight_names=("gating_einsum", "linear"), rank_pattern={"linear": 3})
  params = pj.lora_transform(model.init(jax.random.key(0), x), config, key=jax.random.key(1))
  assert params["params"]["mlp"]["linear_lora"]["lora_a"].shape == (32, 3)
  adapters, base = pj.split(params)
  pj.checkpoint.save(tmp_path / "ckpt", adapters, config)
  restored, restored_config = pj.checkpoint.restore(tmp_path / "ckpt", base)
  assert restored_config == config
  for path, value in targeting.flatten(adapters["params"]).items():
    np.testing.assert_array_equal(targeting.flatten(restored["params"])[path], value)


def test_mixed_batch_custom_twin_matches_builtin():
  x = jax.random.normal(jax.random.key(3), (3, 2, 16))
  library, clibrary = {}, {}
  for k, method in enumerate(("lora", "rslora")):
    config = _configs()[method].replace(rank=2 + k)
    params = _builtin_params(config)
    library[method] = multitask.TaskAdapter(pj.split(params)[0], config)
    clibrary[method] = multitask.TaskAdapter(pj.split(_to_custom(params))[0], config)
  base = pj.split(params)[1]
  names = ["rslora", None, "lora"]
  stack, cstack = multitask.stack_adapters(library), multitask.stack_adapters(clibrary)
  with multitask.mixed_adapters(stack.index(names)):
    want = Net(custom=False).apply(multitask.attach(base, stack), x)
  with multitask.mixed_adapters(cstack.index(names)):
    got = Net(custom=True).apply(multitask.attach(_to_custom(base), cstack), x)
  np.testing.assert_allclose(got, want, **TOL)
  params, config = multitask.with_adapter(base, library, "rslora")
  with pj.intercept(config):
    np.testing.assert_allclose(want[:1], Net(custom=False).apply(params, x[:1]), rtol=1e-5, atol=1e-6)


class TorchLinear(nn.Module):
  """PyTorch layout: ``weight`` is (out, in), used as ``x @ weight.T``."""

  features: int

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.lecun_normal(), (self.features, x.shape[-1]))
    return x @ weight.T


def test_transposed_weight_layout_found_by_tracing_and_merged():
  x = jax.random.normal(jax.random.key(0), (3, 6))
  model = Single(lambda name: TorchLinear(4, name=name))
  layouts = pj.kernel_layouts(model, x)
  assert layouts["proj/weight"] == pj.KernelLayout((1,), (0,))
  config = pj.LoRAConfig(rank=2, target_modules=("weight",), weight_names=("weight",))
  params = pj.lora_transform(model.init(jax.random.key(1), x), config, key=jax.random.key(2),
                             layouts=layouts)
  params = jax.tree.map(lambda v: v + 0.1 if v.shape == (2, 4) else v, params)
  assert params["params"]["proj"]["weight_lora"]["lora_a"].shape == (6, 2)
  with pj.intercept(config):
    adapted = model.apply(params, x)
  merged = pj.merge(params, config, layouts=layouts)
  np.testing.assert_allclose(model.apply(merged, x), adapted, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(adapted - model.apply(pj.split(params)[1], x)).max()) > 1e-3


def test_constants_lifted_inside_an_adapted_call():
  """``jnp.asarray(2.0)`` inside the views' trace: jax >= 0.11 lifts it with ``lax.stage``,
  which the op trace passes to its parent (without that: NotImplementedError)."""
  w, a, b = jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3))

  def fn(views):
    x = jnp.ones((5, 4)) * jnp.asarray(2.0)
    return x @ views["w"] + jnp.asarray(np.float32(1.0))

  out, report = ops.run(fn, {"w": ops.WeightSpec(w, ops.AdapterSpec(a, b, 0.5))})
  np.testing.assert_allclose(out, jnp.full((5, 3), 8.0 + 0.5 * 16.0 + 1.0))
  assert report.contributed == {"w"}
