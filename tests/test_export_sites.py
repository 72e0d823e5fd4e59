"""Hugging Face PEFT files of op-level adapters (``<weight>_lora`` sites), linen and NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import peft_jax as pj
from peft_jax import multitask, targeting
from test_nnx import D, T, LCustomModel, NCustomModel, _close

WEIGHTS = ("kernel", "embedding", "w_gate", "w_out")


def _adapted(use_dora):
  x = jax.random.normal(jax.random.key(1), (2, T, D))
  lmodel = LCustomModel()
  lparams = lmodel.init(jax.random.key(0), x)["params"]
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("w_gate", "w_out", "ffw", "proj"),
                         weight_names=WEIGHTS, use_dora=use_dora, rank_pattern={"w_out": 3},
                         alpha_pattern={"w_gate": 6.0})
  adapted = pj.lora_transform(lparams, config, key=jax.random.key(3))
  adapted = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if "lora_b" in jax.tree_util.keystr(p) else v, adapted)
  adapters, base = pj.split(adapted)
  with pj.intercept(config):
    y = lmodel.apply({"params": adapted}, x)
  return lmodel, base, adapters, config, x, y


@pytest.mark.parametrize("use_dora", [pytest.param(False, marks=pytest.mark.slow), True])
def test_weight_sites_round_trip_through_peft_files(tmp_path, use_dora):
  lmodel, base, adapters, config, x, y = _adapted(use_dora)
  hf_config = pj.export_peft(tmp_path / "hf", adapters, config)
  keys = set(load_file(tmp_path / "hf" / "adapter_model.safetensors"))
  prefix = "base_model.model."
  for module in ("ffw", "ffw.w_gate", "ffw.w_out", "proj"):  # the weight's path names the module
    assert f"{prefix}{module}.lora_A.weight" in keys and f"{prefix}{module}.lora_B.weight" in keys
    assert (f"{prefix}{module}.lora_magnitude_vector" in keys) == use_dora
  assert hf_config["rank_pattern"] == {"ffw.w_out": 3}
  assert hf_config["alpha_pattern"] == {"ffw.w_gate": 6}
  assert sorted(hf_config["target_modules"]) == ["ffw", "proj", "w_gate", "w_out"]

  want = targeting.flatten(adapters)
  for kwargs in ({"weight_names": WEIGHTS}, {"base_params": base}):
    imported, imported_config = pj.import_peft(tmp_path / "hf", **kwargs)
    got = targeting.flatten(imported)
    assert sorted(got) == sorted(want), kwargs
    for path, value in want.items():
      np.testing.assert_array_equal(got[path], value)
    assert imported_config.rank_for("ffw/w_out_lora") == 3
    assert imported_config.scale_for("ffw/w_gate") == 3.0
    with pj.intercept(imported_config):
      _close(lmodel.apply({"params": pj.combine(base, imported)}, x), y)

  nmodel = NCustomModel(nnx.Rngs(0))  # the NNX twin loads the file and exports it back
  pj.nnx.sync(nmodel, base, None)
  pj.nnx.load_adapters(nmodel, imported, imported_config)
  _close(nmodel(x), y, 1e-5)
  pj.export_peft(tmp_path / "nnx", pj.nnx.adapters(nmodel), imported_config)
  again = load_file(tmp_path / "nnx" / "adapter_model.safetensors")
  first = load_file(tmp_path / "hf" / "adapter_model.safetensors")
  assert sorted(again) == sorted(first)
  for key, value in first.items():
    np.testing.assert_array_equal(again[key], value)


def test_leaves_without_a_peft_name_are_refused_naming_the_path(tmp_path):
  _, base, adapters, config, _, _ = _adapted(False)
  stack = multitask.stack_adapters({"t": multitask.TaskAdapter(adapters, config)})
  both = targeting.unflatten(targeting.flatten(adapters) | targeting.flatten(stack.leaves))
  with pytest.raises(ValueError, match=r"no Hugging Face PEFT name.*ffw/w_gate_lora/lora_a_stack"):
    pj.export_peft(tmp_path / "hf", both, config)
  assert not (tmp_path / "hf").exists()
  # Without weight_names or base_params a weight reads as a module: the fit check names it.
  pj.export_peft(tmp_path / "hf", adapters, config)
  plain, _ = pj.import_peft(tmp_path / "hf")
  assert "lora_a" in plain["ffw"]["w_gate"]
  with pytest.raises(ValueError, match="ffw/w_gate"):
    pj.checkpoint.check_adapters_fit(plain, base, config)
