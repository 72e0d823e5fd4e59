"""Numbers that are not numbers, and malformed inputs, fail at the boundary.

Configs (LoRA, QLoRA, AdaLoRA), ``quantize``/``nf4_matmul``, bitsandbytes
dicts (``from_bnb``) and optimizer hyperparameters: each bad value is one
``ValueError`` naming the field and the value, never a NaN, a silent cast or
a deep traceback later. A train step whose loss goes non-finite keeps the
last good state.
"""

from __future__ import annotations

import datetime
import json

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax import training
from peft_jax.quant import NF4, from_bnb, nf4_matmul, quantize_array, to_bnb
from peft_jax.validation import InvalidValue

INF, NAN = float("inf"), float("nan")


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=INF), r"alpha must be .* got inf"),
    (dict(alpha=1e300), r"alpha must be .* got 1e\+300"),
    (dict(alpha=NAN), r"alpha must be .* got nan"),
    (dict(alpha="16"), r"alpha must be .* got '16'"),
    (dict(rank=True), r"rank must be a positive integer, got True"),
    (dict(rank=2.5), r"rank must be a positive integer, got 2.5"),
    (dict(dropout=NAN), r"dropout must be .* got nan"),
    (dict(dropout=-0.1), r"dropout must be .* got -0.1"),
    (dict(alpha_pattern={"q_proj": INF}), r"alpha_pattern\['q_proj'\] .* got inf"),
    (dict(alpha_pattern={"q_proj": 1e300}), r"alpha_pattern\['q_proj'\]"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] .* got 0"),
    (dict(rank_pattern={3: 4}), r"rank_pattern keys .* got 3"),
    (dict(rank_pattern=[("q", 4)]), r"rank_pattern must be a mapping"),
    (dict(adapter_dtype="int32"), r"adapter_dtype must be a float dtype .* int32"),
    (dict(adapter_dtype="float33"), r"adapter_dtype must be a float dtype, got 'float33'"),
    (dict(init="pissa", adapter_dtype=jnp.int32), r"adapter_dtype .* int32"),
    (dict(use_dora="false"), r"use_dora must be True or False, got 'false'"),
    (dict(use_rslora=1), r"use_rslora must be True or False, got 1"),
    (dict(target_modules=[1, 2]), r"target_modules must be .* got \[1, 2\]"),
    (dict(target_modules=("q_proj", "")), r"target_modules"),
    (dict(exclude_modules=5), r"exclude_modules must be .* got 5"),
    (dict(layers_to_transform=[-1]), r"layers_to_transform .* got -1"),
    (dict(layers_to_transform="0"), r"layers_to_transform .* got '0'"),
    (dict(loftq_iter=0), r"loftq_iter .* got 0"),
])
def test_lora_config_rejects(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pj.LoRAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(compute_dtype="int8"), r"compute_dtype must be a float dtype .* int8"),
    (dict(block_size=0), r"block_size must be a power of two >= 16, got 0"),
    (dict(block_size=48), r"block_size .* got 48"),
    (dict(block_size=64.0), r"block_size .* got 64.0"),
    (dict(quant_type="int4"), r"quant_type must be one of .* got 'int4'"),
    (dict(double_quant="no"), r"double_quant must be True or False, got 'no'"),
    (dict(quantize_modules=[None]), r"quantize_modules"),
    (dict(alpha=INF), r"alpha"),
])
def test_qlora_config_rejects(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pj.QLoRAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(orth_reg_weight=INF), r"orth_reg_weight .* got inf"),
    (dict(beta1=NAN), r"beta1 .* got nan"),
    (dict(beta2=1.0), r"beta2 .* got 1.0"),
    (dict(total_step=0), r"total_step .* got 0"),
    (dict(target_r=True), r"target_r .* got True"),
])
def test_adalora_config_rejects(kwargs, match):
  kwargs = {"total_step": 100, **kwargs}
  with pytest.raises(ValueError, match=match):
    pj.AdaLoRAConfig(**kwargs)


def test_config_from_file_dict_gets_the_same_checks():
  saved = pj.LoRAConfig(rank=4, alpha=8.0).to_dict()
  saved["alpha"] = INF
  with pytest.raises(ValueError, match="alpha .* got inf"):
    pj.lora.config.config_from_dict(saved)


def test_valid_configs_still_build():
  config = pj.LoRAConfig(rank=4, alpha=1e6, adapter_dtype=jnp.bfloat16, dropout=0.5,
                         layers_to_transform=[0, 2], rank_pattern={"q_proj": 2})
  assert config.adapter_dtype == "bfloat16" and config.layers_to_transform == (0, 2)
  assert pj.QLoRAConfig(compute_dtype="float32").quant_spec().compute_dtype == np.float32


@hypothesis.settings(max_examples=150, deadline=datetime.timedelta(seconds=10),
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(st.fixed_dictionaries({}, optional={
    "rank": st.one_of(st.integers(-3, 10**12), st.floats(), st.booleans(), st.text(max_size=3)),
    "alpha": st.one_of(st.floats(), st.integers(-10, 10**400), st.none()),
    "dropout": st.floats(),
    "adapter_dtype": st.sampled_from([None, "float32", "bfloat16", "int32", "uint8", "bool",
                                      "nope", 3]),
    "use_dora": st.one_of(st.booleans(), st.integers(0, 1), st.text(max_size=5)),
    "target_modules": st.one_of(st.text(max_size=8), st.lists(st.one_of(
        st.text(max_size=6), st.integers()), max_size=3), st.integers()),
    "layers_to_transform": st.one_of(st.none(), st.lists(st.integers(-2, 5), max_size=3),
                                     st.floats()),
    "rank_pattern": st.dictionaries(st.one_of(st.text(max_size=5), st.integers()),
                                    st.one_of(st.integers(-2, 8), st.floats()), max_size=2),
    "alpha_pattern": st.dictionaries(st.text(max_size=5), st.floats(), max_size=2),
    "loftq_iter": st.one_of(st.integers(-1, 5), st.floats()),
    "init": st.sampled_from(["default", "pissa", "olora", "gaussian", "xavier", True]),
}))
def test_random_lora_config_is_valid_or_a_clean_error(kwargs):
  try:
    config = pj.LoRAConfig(**kwargs)
  except ValueError as error:
    assert str(error) and "\n" not in str(error)
    return
  assert config.rank >= 1 and 0 < config.alpha <= 1e6 and 0 <= config.dropout < 1
  assert all(0 < config.scale_for(f"m/{i}") < float("inf") for i in range(2))
  hash(config)  # usable as a static jit argument


# --------------------------------------------------------------------------- quantize


def test_quantize_rejects_non_finite_weights():
  x = np.ones((64, 8), np.float32)
  x[3, 5] = np.nan
  x[10, 0] = np.inf
  with pytest.raises(ValueError, match=r"2 non-finite value\(s\) \(first: nan at index \(3, 5\)\)"):
    quantize_array(x)
  with pytest.raises(ValueError, match="dense/kernel: .*non-finite"):
    pj.quantize({"dense": {"kernel": jnp.asarray(x)}})


def test_quantize_under_jit_still_traces():
  x = jnp.ones((64, 8))
  got = jax.jit(lambda a: quantize_array(a, NF4(double_quant=False)).dequantize())(x)
  np.testing.assert_array_equal(got, x)


def test_nf4_compute_dtype_must_be_float():
  w = quantize_array(jnp.ones((64, 8)), NF4(compute_dtype=None))
  with pytest.raises(ValueError, match="compute_dtype must be a float dtype .* int8"):
    nf4_matmul(jnp.ones((2, 64)), w, compute_dtype=jnp.int8)
  with pytest.raises(ValueError, match="compute_dtype must be a float dtype .* int8"):
    NF4(compute_dtype="int8")
  with pytest.raises(ValueError, match="dtype must be a float dtype .* int32"):
    w.dequantize(jnp.int32)


# --------------------------------------------------------------------------- bitsandbytes


def _bnb(double_quant=True, shape=(64, 8)):
  x = jax.random.normal(jax.random.key(0), shape)
  return dict(to_bnb(quantize_array(x, NF4(double_quant=double_quant)))), x


def _set_info(state, **changes):
  key = "weight.quant_state.bitsandbytes__nf4"
  info = json.loads(state[key].tobytes())
  info.update(changes)
  info = {k: v for k, v in info.items() if v is not _DROP}
  state[key] = np.frombuffer(json.dumps(info).encode(), np.uint8).copy()
  return state


_DROP = object()


def _drop(state, key):
  del state[key]
  return state


def _put(state, key, value):
  state[key] = value
  return state


BNB_CASES = [
    ("missing nested_absmax", lambda s: _drop(s, "weight.nested_absmax"),
     r"no 'weight.nested_absmax' entry"),
    ("uint8 codes, no nested keys", lambda s: _set_info(
        _drop(_drop(s, "weight.nested_absmax"), "weight.nested_quant_map"),
        nested_blocksize=_DROP, nested_offset=_DROP, nested_dtype=_DROP),
     r"weight.absmax has dtype uint8; bitsandbytes stores it as float32"),
    ("float absmax with double quant", lambda s: _put(
        s, "weight.absmax", s["weight.absmax"].astype(np.float32)),
     r"weight.absmax has dtype float32; .* uint8"),
    ("int64 codes", lambda s: _put(s, "weight", s["weight"].astype(np.int64)),
     r"weight has dtype int64"),
    ("blocksize 0", lambda s: _set_info(s, blocksize=0), r"blocksize .* got 0"),
    ("blocksize string", lambda s: _set_info(s, blocksize="64"), r"blocksize .* got '64'"),
    ("blocksize other", lambda s: _set_info(s, blocksize=128), r"do not fit shape"),
    ("shape strings", lambda s: _set_info(s, shape=["8", "64"]), r"shape must be .*'8'"),
    ("shape 3-D", lambda s: _set_info(s, shape=[2, 4, 64]), r"shape must be 1 or 2"),
    ("dtype", lambda s: _set_info(s, dtype="int8"), r"dtype must be one of .* 'int8'"),
    ("quant_type mismatch", lambda s: _set_info(s, quant_type="fp4"),
     r"quant_type 'fp4' does not match"),
    ("nested_offset NaN", lambda s: _set_info(s, nested_offset=NAN), r"nested_offset .* nan"),
    ("nested_offset missing", lambda s: _set_info(s, nested_offset=_DROP),
     r"nested_offset .* None"),
    ("nested_blocksize", lambda s: _set_info(s, nested_blocksize=0),
     r"nested_blocksize must be 256, got 0"),
    ("nested_absmax size", lambda s: _put(s, "weight.nested_absmax", np.ones(3, np.float32)),
     r"nested_absmax has 3 values"),
    ("nested_absmax inf", lambda s: _put(s, "weight.nested_absmax",
                                         np.full_like(s["weight.nested_absmax"], np.inf)),
     r"nested_absmax holds 1 negative or non-finite"),
    ("quant_map", lambda s: _put(s, "weight.quant_map", np.zeros(16, np.float32)),
     r"quant_map is not"),
    ("json garbage", lambda s: _put(s, "weight.quant_state.bitsandbytes__nf4",
                                    np.frombuffer(b"{nope", np.uint8)), r"is not UTF-8 JSON"),
    ("json list", lambda s: _put(s, "weight.quant_state.bitsandbytes__nf4",
                                 np.frombuffer(b"[1]", np.uint8)), r"must hold a JSON object"),
    ("no quant state", lambda s: _drop(s, "weight.quant_state.bitsandbytes__nf4"),
     r"expected one 'weight.quant_state"),
    ("codes truncated", lambda s: _put(s, "weight", s["weight"][:-1]), r"packed bytes"),
]


@pytest.mark.parametrize("name, corrupt, match", BNB_CASES, ids=[c[0] for c in BNB_CASES])
def test_from_bnb_rejects(name, corrupt, match):
  del name
  state, _ = _bnb()
  with pytest.raises(ValueError, match=match):
    from_bnb(corrupt(state))


def test_from_bnb_rejects_non_finite_plain_absmax():
  state, _ = _bnb(double_quant=False)
  state["weight.absmax"] = state["weight.absmax"].copy()
  state["weight.absmax"][1] = np.nan
  with pytest.raises(ValueError, match=r"weight.absmax holds 1 negative or non-finite .*index 1"):
    from_bnb(state)
  with pytest.raises(ValueError, match="compute_dtype"):
    from_bnb(_bnb()[0], compute_dtype="int8")


def test_from_bnb_round_trip_still_exact():
  for dq in (True, False):
    state, x = _bnb(double_quant=dq)
    w = from_bnb(state, compute_dtype=None)
    np.testing.assert_array_equal(
        w.dequantize(), quantize_array(x, NF4(double_quant=dq)).dequantize())


_BNB_KEYS = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
             "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]


@hypothesis.settings(max_examples=150, deadline=datetime.timedelta(seconds=10),
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(
    drop=st.sets(st.sampled_from(_BNB_KEYS), max_size=2),
    cast=st.dictionaries(st.sampled_from(_BNB_KEYS),
                         st.sampled_from([np.uint8, np.int32, np.float32, np.float16]),
                         max_size=2),
    info=st.dictionaries(st.sampled_from(["blocksize", "shape", "dtype", "quant_type",
                                          "nested_offset", "nested_blocksize"]),
                         st.one_of(st.integers(-1, 300), st.floats(), st.text(max_size=4),
                                   st.lists(st.integers(-1, 70), max_size=3), st.none()),
                         max_size=2),
    double_quant=st.booleans())
def test_random_bnb_dicts_load_or_fail_cleanly(drop, cast, info, double_quant):
  state, _ = _bnb(double_quant=double_quant, shape=(64, 8))
  if info and "weight.quant_state.bitsandbytes__nf4" in state:
    _set_info(state, **info)
  for key, dtype in cast.items():
    if key in state:
      state[key] = state[key].astype(dtype)
  for key in drop:
    state.pop(key, None)
  try:
    w = from_bnb(state, compute_dtype=None)
  except ValueError as error:
    assert str(error) and "\n" not in str(error)
    return
  assert np.isfinite(np.asarray(w.dequantize())).all()


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("make, match", [
    (lambda: pj.optim.galore(INF), r"learning_rate .* got inf"),
    (lambda: pj.optim.galore(1e-3, rank=0), r"GaLore rank .* got 0"),
    (lambda: pj.optim.galore(1e-3, rank={"q": -1}), r"GaLore rank\['q'\] .* got -1"),
    (lambda: pj.optim.galore(1e-3, scale=NAN), r"GaLore scale .* got nan"),
    (lambda: pj.optim.galore(1e-3, update_proj_gap=0), r"update_proj_gap .* got 0"),
    (lambda: pj.optim.galore(1e-3, b1=1.0), r"b1 .* got 1.0"),
    (lambda: pj.optim.galore(1e-3, weight_decay=NAN), r"weight_decay .* got nan"),
    (lambda: pj.optim.lora_plus(optax.adamw, NAN), r"learning_rate .* got nan"),
    (lambda: pj.optim.lora_plus(optax.adamw, 1e-3, ratio=INF), r"LoRA\+ ratio .* got inf"),
    (lambda: pj.optim.lora_plus(optax.adamw, 1e-3, ratio=0), r"LoRA\+ ratio .* got 0"),
    (lambda: pj.optim.lora_plus(optax.adamw, 1e-3, embedding_lr=-1.0), r"embedding_lr"),
    (lambda: pj.optim.lisa(optax.adam(1e-3), n_layers=0), r"LISA n_layers .* got 0"),
    (lambda: pj.optim.lisa(optax.adam(1e-3), interval_steps=2.5), r"interval_steps .* 2.5"),
])
def test_optimizer_hyperparameters_rejected(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_schedules_are_still_accepted():
  pj.optim.galore(optax.constant_schedule(1e-3), rank=2)
  pj.optim.lora_plus(optax.adamw, optax.constant_schedule(1e-3))


# --------------------------------------------------------------------------- training


class _Linear:
  """A stand-in model for make_train_step: ``apply`` is ``x @ w``."""

  def apply(self, variables, inputs, rngs=None):
    del rngs
    return inputs @ variables["params"]["w"]


def _loss(model, config, params, inputs, labels, key):
  del config, key
  return jnp.mean((model.apply({"params": params}, inputs) - labels) ** 2)


def test_train_step_keeps_the_last_good_state_on_non_finite_loss():
  optimizer = optax.sgd(0.1)
  step = training.make_train_step(_Linear(), None, optimizer, loss_fn=_loss)
  state = training.init_train_state({"w": jnp.ones((2, 1))}, optimizer)
  x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
  state, loss = step(state, {}, x, y, jax.random.key(0))
  good = jax.device_get(state)
  assert np.isfinite(float(loss)) and int(good.step) == 1
  state, loss = step(state, {}, x.at[0, 0].set(jnp.nan), y, jax.random.key(1))
  assert np.isnan(float(loss)) and int(state.step) == 1
  np.testing.assert_array_equal(state.trainable["w"], good.trainable["w"])
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite at step 6 \(loss nan"):
    training.check_finite_losses([jnp.float32(1.0), loss], first_step=5)
  assert training.check_finite_losses([jnp.float32(2.0)], first_step=0) == [2.0]


def _sqrt_loss(model, config, params, inputs, labels, key):
  del model, config, inputs, labels, key
  return jnp.sum(jnp.sqrt(params["w"]))  # finite at w = 0, its gradient is not


def test_train_step_updates_adamw_in_place_and_skips_non_finite_gradients():
  # AdamW's moments are updated in place: the step's scratch holds the
  # gradients, not copies of the moments (they were 3x the kernel's size).
  optimizer = optax.adamw(0.1)
  w = jnp.ones((256, 128))
  step = training.make_train_step(_Linear(), None, optimizer, loss_fn=_sqrt_loss)
  state = training.init_train_state({"w": w}, optimizer)
  args = ({}, jnp.ones((4, 256)), jnp.zeros((4, 128)), jax.random.key(0))
  compiled = step.lower(state, *args).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * w.nbytes
  state, loss = compiled(state, *args)
  good = jax.device_get(state)
  assert np.isfinite(float(loss)) and int(good.step) == 1
  # A finite loss with an infinite gradient: nothing moves, the moments neither.
  zero = training.TrainState(state.step, {"w": state.trainable["w"].at[0, 0].set(0.0)},
                             state.opt_state)
  held = jax.device_get(zero)
  state, loss = compiled(zero, *args)
  assert np.isnan(float(loss)) and int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), held)
