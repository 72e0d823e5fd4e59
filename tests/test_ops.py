"""Op-level adapters on custom linen modules: twins of the built-in modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import multitask, targeting

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
