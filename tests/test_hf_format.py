"""Hugging Face PEFT format: files as peft 0.21.2 writes them, same logits in PyTorch, round trips.

The torch-side numbers come from tests/data/make_peft_reference.py (peft
0.21.2, transformers 5.24, torch 2.13 CPU): PeftModel.from_pretrained of our
export gave the logits recorded there, and peft's own save_pretrained of the
same config gave the key names, shapes and config fields checked here.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import peft_jax as pj
from peft_jax.checkpoint import PathMap, export_peft, import_peft
from peft_jax.models import params_unrolled_to_scanned

DATA = pathlib.Path(__file__).parent / "data"


def _generator():
  spec = importlib.util.spec_from_file_location("make_peft_reference",
                                                DATA / "make_peft_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


GENERATOR = _generator()
REFERENCE = json.loads((DATA / "peft_merge_reference.json").read_text())


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module", params=sorted(GENERATOR.SCENARIOS))
def scenario(request):
  return (request.param,) + GENERATOR.build_scenario(request.param)


def test_export_matches_peft_files_and_torch_logits(tmp_path, scenario):
  name, model, base, adapters, config = scenario
  reference = REFERENCE["hf_format"][name]
  written = export_peft(tmp_path, adapters, config, base_model_name_or_path="tiny-llama")
  with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
    assert f.metadata() == reference["peft_saved_metadata"] == {"format": "pt"}
    shapes = {k: list(f.get_tensor(k).shape) for k in f.keys()}
  assert shapes == reference["peft_saved_shapes"]
  peft_config = reference["peft_saved_config"]
  on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
  assert on_disk == written
  assert set(on_disk) == set(peft_config)
  for key, value in peft_config.items():
    if key == "target_modules":
      assert sorted(on_disk[key]) == sorted(value)
    elif key != "base_model_name_or_path":
      assert on_disk[key] == value, key
  ids = jnp.asarray(REFERENCE["_meta"]["input_ids"], jnp.int32)
  forward = jax.jit(lambda p: pj.apply(model, p, ids, config=config))
  logits = forward(pj.combine(base, adapters))
  np.testing.assert_allclose(logits, np.asarray(reference["torch_logits"]), atol=1e-5)


def test_import_round_trip_is_exact(tmp_path, scenario):
  name, _, _, adapters, config = scenario
  export_peft(tmp_path, adapters, config)
  imported, imported_config = import_peft(tmp_path)
  assert_trees_equal(imported, adapters)
  for module in pj.adapter_paths(adapters):
    assert imported_config.rank_for(module) == config.rank_for(module)
    assert imported_config.scale_for(module) == pytest.approx(config.scale_for(module))
  assert (imported_config.use_dora, imported_config.use_rslora) == (config.use_dora,
                                                                    config.use_rslora)
  assert set(imported_config.target_modules) == set(config.target_modules)


def test_scanned_adapters_export_per_layer_and_import_stacked(tmp_path, scenario):
  name, _, _, adapters, config = scenario
  if config.rank_pattern:  # layer 1's q_proj has rank 2, layer 0's rank 4
    export_peft(tmp_path, adapters, config)
    with pytest.raises(ValueError, match="layers differ"):
      import_peft(tmp_path, scanned=True)
    return
  scanned = params_unrolled_to_scanned(adapters)
  export_peft(tmp_path / "unrolled", adapters, config)
  export_peft(tmp_path / "scanned", scanned, config)
  unrolled_tensors = load_file(str(tmp_path / "unrolled" / "adapter_model.safetensors"))
  scanned_tensors = load_file(str(tmp_path / "scanned" / "adapter_model.safetensors"))
  assert_trees_equal(scanned_tensors, unrolled_tensors)
  stacked, stacked_config = import_peft(tmp_path / "scanned", scanned=True)
  assert_trees_equal(stacked, scanned)
  assert stacked_config.scale_for("model/layers/self_attn/q_proj") == config.scale_for("q_proj")


def test_custom_path_map_for_other_models(tmp_path):
  pairs = {"encoder/block_0/attn/query": "transformer.h.0.attn.q",
           "encoder/block_1/attn/query": "transformer.h.1.attn.q"}
  path_map = PathMap.from_pairs(pairs)
  rng = np.random.default_rng(0)
  adapters = {"encoder": {f"block_{i}": {"attn": {"query": {
      "lora_a": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
      "lora_b": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}}} for i in range(2)}}
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("query",))
  export_peft(tmp_path, adapters, config, path_map=path_map)
  keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
  assert "base_model.model.transformer.h.1.attn.q.lora_B.weight" in keys
  imported, _ = import_peft(tmp_path, path_map=path_map)
  assert_trees_equal(imported, adapters)
  with pytest.raises(KeyError, match="not in the path map"):
    export_peft(tmp_path, {"other": adapters["encoder"]["block_0"]["attn"]["query"]}, config,
                path_map=path_map)


def test_bfloat16_adapters_keep_their_dtype(tmp_path):
  adapters = {"model": {"layers_0": {"self_attn": {"q_proj": {
      "lora_a": jnp.ones((8, 2), jnp.bfloat16), "lora_b": jnp.full((2, 4), 0.5, jnp.bfloat16)}}}}}
  config = pj.LoRAConfig(rank=2, alpha=2.0, target_modules=("q_proj",))
  export_peft(tmp_path, adapters, config)
  assert_trees_equal(import_peft(tmp_path)[0], adapters)


def test_export_and_import_refuse_what_they_cannot_represent(tmp_path, scenario):
  name, _, _, adapters, config = scenario
  with pytest.raises(ValueError, match="rewrote the base"):
    export_peft(tmp_path / "pissa", adapters, config.replace(init="pissa"))
  export_peft(tmp_path, adapters, config)
  hf_config = json.loads((tmp_path / "adapter_config.json").read_text())
  config_file = tmp_path / "adapter_config.json"
  config_file.write_text(json.dumps(hf_config | {"modules_to_save": ["lm_head"]}))
  with pytest.raises(ValueError, match="modules_to_save"):
    import_peft(tmp_path)
  config_file.write_text(json.dumps(hf_config | {"init_lora_weights": "pissa"}))
  with pytest.raises(ValueError, match="rewrote"):
    import_peft(tmp_path)
  (tmp_path / "adapter_config.json").write_text(json.dumps(hf_config))
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  without = {k: v for k, v in tensors.items() if ".layers.1.self_attn.q_proj." not in k}
  save_file(without, str(tmp_path / "adapter_model.safetensors"))
  if not config.rank_pattern:
    with pytest.raises(ValueError, match="adapts layers \\[0\\]"):
      import_peft(tmp_path, scanned=True)
    with pytest.raises(ValueError, match="of 3 layers"):
      import_peft(tmp_path, scanned=True, num_layers=3)
  save_file(without | {"base_model.model.lm_head.weight": np.ones((2, 2), np.float32)},
            str(tmp_path / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match="not LoRA weights"):
    import_peft(tmp_path)
  with pytest.raises(FileNotFoundError):
    import_peft(tmp_path / "missing")
