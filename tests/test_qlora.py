"""QLoRA: NF4 base kernels through the interceptor, with LoRA or DoRA on top."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax import quant, training
from peft_jax.lora.merge import merge_into_quantized
from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params

IDS = jnp.arange(32).reshape(2, 16) % 256


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def setup(request):
  config = LlamaConfig.tiny(scan_layers=request.param)
  model = LlamaForCausalLM(config)
  params = init_params(config, jax.random.key(0))
  qparams = quant.quantize(params, quant.NF4(block_size=64, double_quant=True,
                                             compute_dtype=jnp.float32))
  return model, params, qparams, pj.kernel_layouts(model, IDS)


def test_quantized_base_runs_as_its_dequantized_weights(setup):
  model, _, qparams, _ = setup
  with pj.intercept():
    y = model.apply({"params": qparams}, IDS)
  y_dense = model.apply({"params": quant.dequantize(qparams)}, IDS)
  np.testing.assert_allclose(y, y_dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_matches_lora_on_dequantized_base(setup, dora):
  model, _, qparams, layouts = setup
  config = pj.LoRAConfig(rank=4, alpha=8.0, target_modules="all-linear", use_dora=dora)
  adapted = pj.lora_transform(qparams, config, key=jax.random.key(1), layouts=layouts)
  adapters, base = pj.split(adapted)
  adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), adapters)
  dense = pj.combine(quant.dequantize(base), adapters)
  with pj.intercept(config):
    y_q = jax.jit(lambda p: model.apply({"params": p}, IDS))(pj.combine(base, adapters))
    y_d = model.apply({"params": dense}, IDS)
  np.testing.assert_allclose(y_q, y_d, rtol=1e-4, atol=1e-4)
  # Merging into a quantized base: dense kernels by default, or re-quantized on request.
  merged = pj.merge(pj.combine(base, adapters), config, layouts=layouts)
  np.testing.assert_allclose(model.apply({"params": merged}, IDS), y_d, rtol=1e-4, atol=1e-4)
  spec = quant.NF4(block_size=64, compute_dtype=jnp.float32)
  requantized, errors = merge_into_quantized(pj.combine(base, adapters), config, spec, layouts=layouts)
  assert set(errors) == set(pj.adapter_paths(adapted))
  # NF4's relative error on Gaussian-like weights is about 0.1 (bitsandbytes' own tests bound it so).
  assert 0.0 < max(errors.values()) < 0.12, errors
  assert set(quant.quantized_paths(requantized)) == set(quant.quantized_paths(qparams))
  with pj.intercept():
    y_rq = model.apply({"params": requantized}, IDS)
  np.testing.assert_allclose(y_rq, model.apply({"params": merged}, IDS), atol=0.3)


def test_qlora_train_step_compiles_once_and_learns(setup):
  model, _, qparams, layouts = setup
  config = pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
  adapters, base = pj.split(pj.lora_transform(qparams, config, key=jax.random.key(1), layouts=layouts))
  optimizer = optax.adam(3e-2)
  state = training.init_train_state(adapters, optimizer)
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(n=1)(training.make_train_step(model, config, optimizer).__wrapped__))
  labels = jnp.roll(IDS, -1, axis=1)
  losses = []
  for i in range(15):
    state, loss = step(state, base, IDS, labels, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.3
  # Codes are frozen: they are not among the differentiated leaves at all.
  assert not any(quant.is_quantized(l) for l in jax.tree.leaves(state.trainable, is_leaf=quant.is_quantized))


def test_qlora_step_does_not_keep_the_dequantized_weights():
  # From 64 rows the CPU path dequantizes a layer's weight whole, forward and
  # again backward: the step's scratch must not hold every layer's float
  # weights (or their int32 codes) from the forward pass to the backward (it
  # held 1.33x their size; 0.56x now).
  config = LlamaConfig.tiny(hidden_size=256, intermediate_size=512)
  model = LlamaForCausalLM(config)
  params = init_params(config, jax.random.key(0))
  ids = jnp.arange(4 * 17).reshape(4, 17) % 256  # 64 rows
  qparams = quant.quantize(params, quant.NF4(compute_dtype=jnp.float32))
  lora = pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
  adapters, base = pj.split(pj.lora_transform(qparams, lora, key=jax.random.key(1),
                                              layouts=pj.kernel_layouts(model, ids)))
  optimizer = optax.adam(1e-3)
  step = training.make_train_step(model, lora, optimizer)
  compiled = step.lower(training.init_train_state(adapters, optimizer), base, ids[:, :-1],
                        ids[:, 1:], jax.random.key(0)).compile()
  floats = sum(x.nbytes for x in jax.tree.leaves(params["model"]["layers_0"]) if x.ndim == 2)
  assert compiled.memory_analysis().temp_size_in_bytes < 0.8 * 2 * floats


def test_apply_qlora_seed_api():
  config_model = LlamaConfig.tiny()
  model = LlamaForCausalLM(config_model)
  params = init_params(config_model, jax.random.key(0))
  config = pj.QLoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), compute_dtype="float32")
  qparams = pj.apply_qlora(params, config, key=jax.random.key(1))
  assert len(quant.quantized_paths(qparams)) == 14  # every linear kernel but lm_head
  q_proj = qparams["model"]["layers_0"]["self_attn"]["q_proj"]
  assert quant.is_quantized(q_proj["kernel"]) and q_proj["lora_a"].shape == (64, 4)
  assert 4.0 < q_proj["kernel"].bits_per_param < 4.2
  with pj.intercept(config):
    y = model.apply({"params": qparams}, IDS)
  y_float = model.apply({"params": params}, IDS)
  assert float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float)) < 0.1  # NF4 error only
  assert pj.lora.config_from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="4 bits"):
    pj.QLoRAConfig(bits=8)
  loftq = pj.apply_qlora(params, config.replace(init="loftq", alpha=4.0), key=jax.random.key(1))
  assert len(quant.quantized_paths(loftq)) == 14


@pytest.mark.parametrize("platform, lowering, marker", [
    ("gpu", "cuda", "@__gpu$xla.gpu.triton"), ("tpu", "tpu", "@tpu_custom_call")])
def test_qlora_train_step_lowers_for_gpu_and_tpu(platform, lowering, marker):
  model_config = LlamaConfig.tiny(hidden_size=128, intermediate_size=256, scan_layers=True)
  model = LlamaForCausalLM(model_config)
  ids = jnp.zeros((2, 16), jnp.int32)
  params = init_params(model_config, jax.random.key(0))
  config = pj.QLoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"),
                          compute_dtype="bfloat16")
  adapted = pj.apply_qlora(params, config, key=jax.random.key(1),
                           layouts=pj.kernel_layouts(model, ids))
  adapters, base = pj.split(adapted)
  optimizer = optax.adamw(1e-3)

  def step(adapters, opt_state, base, ids):
    def loss(adapters):
      with pj.intercept(config, quant_impl="pallas", quant_platform=platform):
        logits = model.apply({"params": pj.combine(base, adapters)}, ids)
      return jnp.mean(logits)
    grads = jax.grad(loss)(adapters)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  lowered = jax.jit(step).trace(adapters, optimizer.init(adapters), base, ids).lower(
      lowering_platforms=(lowering,))
  # Quantized projections whose shapes tile run the Pallas kernel, forward and transposed
  # (backward); the others fall back to the XLA path. GPU tiles 8 here, TPU's 128-lane tiles 2.
  assert lowered.as_text().count(marker) >= 2
