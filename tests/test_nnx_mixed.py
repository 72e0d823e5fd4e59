"""Flax NNX mixed-adapter batches: rows equal each adapter alone, and the linen twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax as pj
from peft_jax import multitask
from test_nnx import D, T, V, LCustomModel, NCustomModel, Stacked, _close, _twins

MIXED = ("q_proj", "v_proj", "o_proj", "embed", "lm_head")  # Linear, LinearGeneral, Einsum, Embed
NAMES = ["task2", None, "task1", "task3"]
TASKS = {
    "lora": [pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj", "embed")),
             pj.LoRAConfig(rank=3, alpha=3.0, target_modules=("q_proj", "o_proj", "lm_head")),
             pj.LoRAConfig(rank=1, alpha=2.0, target_modules=MIXED)],
    "rslora": [pj.LoRAConfig(rank=2, alpha=4.0, target_modules=MIXED, use_rslora=True),
               pj.LoRAConfig(rank=4, alpha=2.0, target_modules=("v_proj", "o_proj"),
                             use_rslora=True),
               pj.LoRAConfig(rank=3, alpha=6.0, target_modules=("embed", "lm_head"),
                             use_rslora=True, rank_pattern={"lm_head": 1})],
}
TASKS["qlora"] = TASKS["lora"]
TASKS["dora"] = TASKS["rslora"]
QUANTIZED = ("q_proj", "lm_head")
SPEC = pj.QLoRAConfig(block_size=16, compute_dtype="float32").quant_spec()
SHARED_DORA = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj", "conv"), use_dora=True)


def _randomised(params, seed):
  """Non-zero adapters, so that every task moves every row it runs."""
  rng = np.random.default_rng(seed)
  adapters, base = pj.split(params)
  adapters = jax.tree.map(lambda v: jnp.asarray(0.3 * rng.normal(size=v.shape), v.dtype), adapters)
  return adapters, base


def _library(base, layouts, configs):
  library = {}
  for k, config in enumerate(configs):
    params = pj.lora_transform(base, config, key=jax.random.key(k), layouts=layouts)
    library[f"task{k + 1}"] = multitask.TaskAdapter(_randomised(params, 10 + k)[0], config)
  return library


def _setup(method):
  lmodel, lparams, nmodel, tokens = _twins()
  tokens = jnp.concatenate([tokens, tokens[::-1] + 1], axis=0) % V  # 4 rows
  layouts = pj.kernel_layouts(lmodel, tokens)
  library = _library(lparams, layouts, TASKS[method])
  base, config = lparams, None
  if method == "qlora":
    base = pj.quantize(lparams, SPEC, target_modules=QUANTIZED)
    pj.nnx.quantize(nmodel, SPEC, target_modules=QUANTIZED)
  if method == "dora":  # one DoRA adapter shared by every row, beside the stacks
    config = SHARED_DORA
    shared, _ = _randomised(pj.lora_transform(lparams, config, key=jax.random.key(9),
                                              layouts=layouts), 7)
    base = pj.combine(base, shared)
    pj.nnx.load_adapters(nmodel, shared, config)
  return lmodel, base, nmodel, tokens, library, config


def _check_mixed(method, rows):
  """NNX mixed batch == its linen twin; with ``rows``, each row == its adapter alone."""
  lmodel, base, nmodel, tokens, library, config = _setup(method)
  stack = multitask.stack_adapters(library)
  index = stack.index(NAMES)
  with multitask.mixed_adapters(index, config):
    want = lmodel.apply({"params": multitask.attach(base, stack)}, tokens)
  pj.nnx.attach(nmodel, stack)
  assert type(nmodel.embed).__name__ == "PeftEmbed"
  with multitask.mixed_adapters(index, config):
    got = nmodel(tokens)
  _close(got, want)
  if not rows:  # (DoRA rows run the shared adapter plus their own: no single run)
    return
  alone = {}
  for name in set(NAMES):
    _, _, model, _ = _twins()
    if method == "qlora":
      pj.nnx.quantize(model, SPEC, target_modules=QUANTIZED)
    if name is not None:
      pj.nnx.load_adapters(model, library[name].adapters, library[name].config)
    alone[name] = model(tokens)
  for row, name in enumerate(NAMES):
    _close(got[row], alone[name][row], 1e-5)
    if name is not None:  # the row's adapter moved it
      assert float(jnp.abs(alone[name][row] - alone[None][row]).max()) > 1e-3


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_mixed_batch_equals_linen_twin(method):
  _check_mixed(method, rows=False)


def test_mixed_batch_rows_equal_each_adapter_alone_and_linen_twin():
  _check_mixed("rslora", rows=True)  # ranks padded, rank/alpha patterns


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_mixed_batch_rows_equal_each_adapter_alone_more(method):
  _check_mixed(method, rows=True)


@pytest.mark.slow
def test_mixed_batch_jitted_traces_once_and_checks_indices():
  lmodel, base, nmodel, tokens, library, _ = _setup("lora")
  stack = multitask.stack_adapters(library)
  pj.nnx.attach(nmodel, stack)
  traces = []

  @nnx.jit
  def serve(model, tokens, index):
    traces.append(1)
    with multitask.mixed_adapters(index):
      return model(tokens)

  with multitask.mixed_adapters(stack.index(NAMES)):
    eager = nmodel(tokens)
  _close(serve(nmodel, tokens, stack.index(NAMES)), eager)
  reordered = serve(nmodel, tokens, stack.index(["task1", "task1", None, "task3"]))
  assert len(traces) == 1
  assert float(jnp.abs(reordered[0] - eager[0]).max()) > 1e-3
  with pytest.raises(ValueError, match=r"out of range.*embed"):
    with multitask.mixed_adapters(jnp.array([0, 3, -1, 1])):
      nmodel(tokens)
  bad = serve(nmodel, tokens, jnp.array([0, 7, -1, 1]))  # traced: the row comes out NaN
  assert np.isnan(np.asarray(bad[1])).all() and not np.isnan(np.asarray(bad[0])).any()


def test_mixed_batch_refusals_name_the_path():
  lmodel, lparams, nmodel, tokens = _twins()
  layouts = pj.kernel_layouts(lmodel, tokens)
  conv = pj.LoRAConfig(rank=2, target_modules=("conv",))
  stack = multitask.stack_adapters(_library(lparams, layouts, [conv]), layouts=layouts)
  with pytest.raises(ValueError, match="layers_0/conv"):
    pj.nnx.attach(nmodel, stack)
  stack = multitask.stack_adapters(_library(lparams, layouts, TASKS["lora"][:1]))
  pj.nnx.attach(nmodel, stack)
  with pytest.raises(ValueError, match="already holds stacked"):
    pj.nnx.attach(nmodel, stack)
  with pytest.raises(ValueError, match=r"\[1\] are out of range.*'embed'"):
    with multitask.mixed_adapters(jnp.array([0, 1])):  # one task stacked: 1 is out of range
      nmodel(tokens)
  with pytest.raises(ValueError, match=r"'embed'.*mixed_adapters"):
    nmodel(tokens)  # stacks outside a mixed batch would add nothing
  pj.nnx.detach(nmodel)
  assert type(nmodel.embed) is nnx.Embed and not hasattr(nmodel.embed, "lora_a_stack")
  _close(nmodel(tokens), lmodel.apply({"params": lparams}, tokens))
  dora = pj.LoRAConfig(rank=2, target_modules=("q_proj",), use_dora=True)
  with pytest.raises(ValueError, match="lora_magnitude"):
    multitask.stack_adapters(_library(lparams, layouts, [dora]))


def test_mixed_batch_custom_nnx_module_equals_custom_linen_twin():
  x = jax.random.normal(jax.random.key(1), (3, T, D))
  lmodel = LCustomModel()
  lparams = lmodel.init(jax.random.key(0), x)["params"]
  nmodel = NCustomModel(nnx.Rngs(0))
  pj.nnx.sync(nmodel, lparams, None)
  weights = ("kernel", "embedding", "w_gate", "w_out")
  library = _library(lparams, None, [
      pj.LoRAConfig(rank=2, target_modules=("w_gate", "ffw", "proj"), weight_names=weights),
      pj.LoRAConfig(rank=3, alpha=2.0, target_modules=("w_out", "w_gate"), weight_names=weights,
                    use_rslora=True, alpha_pattern={"w_gate": 5.0}, rank_pattern={"w_out": 1})])
  stack = multitask.stack_adapters(library)
  names = ["task2", "task1", None]
  with multitask.mixed_adapters(stack.index(names)):
    want = lmodel.apply({"params": multitask.attach(lparams, stack)}, x)
  pj.nnx.attach(nmodel, stack)
  assert "lora_a_stack" in nmodel.ffw.w_gate_lora
  with multitask.mixed_adapters(stack.index(names)):
    got = nmodel(x)
  _close(got, want)
  config = library["task2"].config  # row 0 alone (patterns resolve by the weight's path)
  single = NCustomModel(nnx.Rngs(0))
  pj.nnx.sync(single, lparams, None)
  pj.nnx.load_adapters(single, library["task2"].adapters, config)
  _close(got[:1], single(x[:1]), 1e-5)


@pytest.mark.slow
def test_mixed_batch_under_nnx_scan_of_stacked_layers():
  x = jax.random.normal(jax.random.key(1), (3, T, D))
  model = Stacked(nnx.Rngs(0))
  layouts = pj.nnx.layouts(model)
  library = _library(pj.nnx.params(model), layouts, [
      pj.LoRAConfig(rank=2, target_modules=("up", "down")),
      pj.LoRAConfig(rank=1, alpha=3.0, target_modules=("down",), use_rslora=True)])
  stack = multitask.stack_adapters(library, layouts=layouts)
  pj.nnx.attach(model, stack)
  assert model.layers.up.lora_a_stack.shape == (3, 2, D, 2)
  names = ["task2", None, "task1"]
  with multitask.mixed_adapters(stack.index(names)):
    got = model(x)
  for row, name in enumerate(names):
    alone = Stacked(nnx.Rngs(0))
    if name is not None:
      pj.nnx.load_adapters(alone, library[name].adapters, library[name].config)
    _close(got[row], alone(x)[row], 1e-5)
