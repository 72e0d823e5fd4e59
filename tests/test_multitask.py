"""Named task adapters over one base, switching, and mixed-adapter batches."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import multitask
from peft_jax.models import (LlamaConfig, LlamaForCausalLM, init_params,
                             params_unrolled_to_scanned)

TASKS = {
    "task1": pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")),
    "task2": pj.LoRAConfig(rank=2, alpha=3.0, target_modules=("q_proj", "up_proj"),
                           use_rslora=True),
    "task3": pj.LoRAConfig(rank=3, alpha=6.0, target_modules=("embed_tokens", "v_proj")),
}


def _randomise(adapters, seed):
  rng = np.random.default_rng(seed)  # NumPy: no compilation per leaf shape
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), adapters)


# One compiled forward per (model, config), shared by the tests.
_forward = jax.jit(lambda model, params, tokens, config: pj.apply(model, params, tokens,
                                                                    config=config),
                   static_argnums=(0, 3))


@pytest.fixture(scope="module")
def setup():
  llama = LlamaConfig.tiny()
  params = init_params(llama, jax.random.key(0))
  library = {}
  for i, (name, config) in enumerate(TASKS.items()):
    adapters, base = pj.split(pj.lora_transform(params, config, key=jax.random.key(i)))
    adapters = _randomise(adapters, 10 + i)
    library[name] = multitask.TaskAdapter(adapters, config)
  tokens = jax.random.randint(jax.random.key(5), (5, 7), 0, llama.vocab_size)
  return llama, base, library, tokens


def test_save_load_each_alone_and_switch_without_reloading_base(tmp_path, setup):
  llama, base, library, tokens = setup
  model = LlamaForCausalLM(llama)
  for name, (adapters, config) in library.items():
    multitask.save_named(tmp_path, name, adapters, config)
  assert multitask.saved_names(tmp_path) == sorted(TASKS)
  loaded = {name: multitask.load_named(tmp_path, name, base_params=base)
            for name in ("task2", "task1")}
  for name, task in loaded.items():
    assert task.config == TASKS[name]
    jax.tree.map(np.testing.assert_array_equal, task.adapters, library[name].adapters)
  outputs = {}
  for name in ("task1", "task2", "task1"):
    params, config = multitask.with_adapter(base, loaded, name)
    kernel = params["model"]["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert kernel is base["model"]["layers_0"]["mlp"]["down_proj"]["kernel"]  # same base arrays
    outputs.setdefault(name, []).append(_forward(model, params, tokens, config))
  np.testing.assert_array_equal(*outputs["task1"])
  assert not np.allclose(outputs["task1"][0], outputs["task2"][0], atol=1e-3)
  with pytest.raises(KeyError, match="known"):
    multitask.with_adapter(base, loaded, "task3")


@pytest.mark.parametrize("scanned", [False, True])
def test_mixed_batch_rows_equal_each_adapter_alone(setup, scanned):
  llama, base, library, tokens = setup
  names = ["task2", None, "task1", "task3", "task2"]
  model = LlamaForCausalLM(llama)
  # Rows are independent, so row b of a whole-batch run with adapter k is row b run alone.
  alone = {None: _forward(model, base, tokens, None)}
  for name in library:
    params, config = multitask.with_adapter(base, library, name)
    alone[name] = _forward(model, params, tokens, config)
  expected = jnp.stack([alone[name][row] for row, name in enumerate(names)])
  if scanned:
    model = LlamaForCausalLM(dataclasses.replace(llama, scan_layers=True))
    base = params_unrolled_to_scanned(base)
    library = {n: multitask.TaskAdapter(params_unrolled_to_scanned(t.adapters), t.config)
               for n, t in library.items()}
  stack = multitask.stack_adapters(library)
  params = multitask.attach(base, stack)

  @jax.jit
  def mixed(params, tokens, index):
    with multitask.mixed_adapters(index):
      return model.apply({"params": params}, tokens)

  logits = mixed(params, tokens, stack.index(names))
  np.testing.assert_allclose(logits, expected, atol=2e-5)


def test_stack_pads_ranks_and_rejects_dora(setup):
  _, base, library, _ = setup
  stack = multitask.stack_adapters(library)
  q = stack.leaves["model"]["layers_0"]["self_attn"]["q_proj"]
  assert q["lora_a_stack"].shape == (3, 64, 4) and q["lora_b_stack"].shape == (3, 4, 64)
  np.testing.assert_allclose(q["lora_scale_stack"], [2.0, 3.0 / np.sqrt(2), 0.0])
  assert not np.any(q["lora_a_stack"][1, :, 2:]) and not np.any(q["lora_a_stack"][2])
  with pytest.raises(KeyError, match="task9"):
    stack.index(["task9"])
  dora = pj.LoRAConfig(rank=2, target_modules=("q_proj",), use_dora=True)
  adapters, _ = pj.split(pj.lora_transform(base, dora, key=jax.random.key(0)))
  with pytest.raises(ValueError, match="lora_magnitude"):
    multitask.stack_adapters({"dora": multitask.TaskAdapter(adapters, dora)})
  with pytest.raises(ValueError, match="base lacks"):
    multitask.attach({"lm_head": base["lm_head"]}, stack)
