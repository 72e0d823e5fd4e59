"""End-to-end: LoRA / DoRA fine-tuning of the reference Llama on real text."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax import data, training
from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params


@pytest.fixture(scope="module")
def tokens():
  return np.asarray(data.ByteTokenizer().encode(data.load_text()[:200_000]), np.int32)


@pytest.mark.parametrize("scan, method", [(False, "lora"), (True, "lora"), (False, "dora")])
def test_lora_training_on_shakespeare(tokens, scan, method):
  config = LlamaConfig.tiny(scan_layers=scan)
  model = LlamaForCausalLM(config)
  params = init_params(config, jax.random.key(0))
  ids = jnp.zeros((1, 8), jnp.int32)
  layouts = pj.kernel_layouts(model, ids) if scan else None
  lora = pj.LoRAConfig(rank=8, alpha=16.0, target_modules="all-linear", dropout=0.05,
                       use_dora=method == "dora")
  adapted = pj.lora_transform(params, lora, key=jax.random.key(1), layouts=layouts)
  adapters, base = pj.split(adapted)
  paths = pj.adapter_paths(adapted)
  assert len(paths) == (7 if scan else 14)
  optimizer = optax.adamw(1e-2, weight_decay=0.0)
  state = training.init_train_state(adapters, optimizer)
  chex.clear_trace_counter()
  traced = chex.assert_max_traces(n=1)
  step = jax.jit(traced(training.make_train_step(model, lora, optimizer).__wrapped__),
                 donate_argnums=(0,))
  eval_loss = training.make_eval_loss(model, lora)
  eval_batch = next(data.batches(tokens, 8, 64, seed=0, split="eval"))
  before = float(eval_loss(adapted, *eval_batch))
  batches = data.batches(tokens, 8, 64, seed=1)
  initial = jax.tree.map(np.asarray, adapters)
  for i in range(40):
    state, loss = step(state, base, *next(batches), jax.random.key(i))
  after = float(eval_loss(pj.combine(base, state.trainable), *eval_batch))
  assert after < before - 0.2, (before, after)
  # Every adapter leaf moved; the base is untouched by construction (not an input of the update).
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.trainable, initial)
  assert min(jax.tree.leaves(moved)) > 0
  assert int(state.step) == 40
