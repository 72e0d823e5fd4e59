"""PEFT's `modules_to_save` and `bias` options on the reference Llama (linen).

The PEFT side comes from tests/data/make_peft_options_reference.py (peft
0.21.2 on the tiny Qwen2 of hf_tiny/qwen2, q/k/v biases): its adapter
directories hf_tiny/qwen2_saved (modules_to_save lm_head + embed_tokens,
bias="lora_only") and hf_tiny/qwen2_bias_all (bias="all"), and the PEFT
model's logits; on the tiny tied Gemma 3 of hf_tiny/gemma3, hf_tiny/gemma3_saved
(the embedding saved) and hf_tiny/gemma3_head (the tied lm_head saved: an untied copy).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import peft_jax as pj
import peft_jax.optim as po
from hostile_helpers import edit_json
from peft_jax import targeting, training
from peft_jax.checkpoint import export_peft, import_peft
from peft_jax.models.gemma3_checkpoint import load_gemma3_hf
from peft_jax.models.gemma3_loss import gemma3_lm_loss
from peft_jax.models.hf_checkpoint import load_hf_checkpoint
from peft_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

HF_TINY = pathlib.Path(__file__).parent / "data" / "hf_tiny"
INPUTS = json.loads((HF_TINY / "qwen2" / "reference.json").read_text())
CASES = {
    "qwen2_saved": pj.LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"),
                                 modules_to_save=("embed_tokens", "lm_head"), bias="lora_only"),
    "qwen2_bias_all": pj.LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "o_proj"),
                                    bias="all"),
}


@pytest.fixture(scope="module")
def qwen2():
  config, params = load_hf_checkpoint(HF_TINY / "qwen2")
  return LlamaForCausalLM(config), params


def _logits(model, params, config):
  return np.asarray(pj.apply(
      model, params, jnp.asarray(INPUTS["input_ids"]), jnp.asarray(INPUTS["attention_mask"]),
      jnp.asarray(INPUTS["positions"]), config=config))


def _assert_reference(logits, case):
  real = np.asarray(INPUTS["attention_mask"], bool)
  expected = np.asarray(json.loads((HF_TINY / case / "reference.json").read_text())["logits"])
  np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=1e-4)


def _flat(tree):
  return targeting.flatten(targeting.unwrap_params(tree)[0])


# -- the PEFT fixtures ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_import_gives_peft_logits(qwen2, case):
  model, params = qwen2
  adapters, config = import_peft(HF_TINY / case, base_params=params)
  assert (config.modules_to_save, config.bias) == (CASES[case].modules_to_save, CASES[case].bias)
  logits = _logits(model, pj.combine(params, adapters), config)
  _assert_reference(logits, case)
  # Without the copies the numbers differ: the test can fail.
  plain = {p: v for p, v in _flat(adapters).items() if "/saved/" not in p}
  other = _logits(model, pj.combine(params, targeting.unflatten(plain)), config)
  assert np.abs(other - logits).max() > 1e-2
  # merge replaces the base params by the copies: the plain model computes the same.
  merged = pj.merge(pj.combine(params, adapters), config)
  assert not any("/saved/" in p for p in _flat(merged))
  plain_logits = LlamaForCausalLM(model.config).apply(
      {"params": merged}, jnp.asarray(INPUTS["input_ids"]), jnp.asarray(INPUTS["attention_mask"]),
      jnp.asarray(INPUTS["positions"]))
  np.testing.assert_allclose(plain_logits, logits, atol=1e-5)


def test_import_scanned_gives_peft_logits():
  config, params = load_hf_checkpoint(HF_TINY / "qwen2", scan_layers=True)
  adapters, lora = import_peft(HF_TINY / "qwen2_bias_all", scanned=True, base_params=params)
  assert _flat(adapters)["model/layers/self_attn/k_proj/saved/bias"].shape == (2, 16)
  _assert_reference(_logits(LlamaForCausalLM(config), pj.combine(params, adapters), lora),
                    "qwen2_bias_all")


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_writes_what_peft_writes(tmp_path, qwen2, case):
  _, params = qwen2
  adapters, config = import_peft(HF_TINY / case, base_params=params)
  assert config == CASES[case].replace(target_modules=config.target_modules)
  written = export_peft(tmp_path, adapters, config)
  peft_config = json.loads((HF_TINY / case / "adapter_config.json").read_text())
  for key in ("bias", "r", "lora_alpha"):
    assert written[key] == peft_config[key], key
  assert sorted(written["modules_to_save"] or []) == sorted(peft_config["modules_to_save"] or [])
  ours, theirs = load_file(tmp_path / "adapter_model.safetensors"), load_file(
      HF_TINY / case / "adapter_model.safetensors")
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
  again, again_config = import_peft(tmp_path)
  assert again_config == config
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), again, adapters))


def test_wrong_shape_in_the_file_names_file_and_key(tmp_path, qwen2):
  _, params = qwen2
  adapters, config = import_peft(HF_TINY / "qwen2_saved")
  export_peft(tmp_path, adapters, config)
  weights = tmp_path / "adapter_model.safetensors"
  tensors = load_file(weights)
  key = "base_model.model.lm_head.weight"
  tensors[key] = tensors[key][:-1]
  save_file(tensors, weights, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*lm_head\.weight"):
    import_peft(tmp_path, base_params=params)
  # Without base_params the misfit surfaces when the copy meets the base.
  loose, _ = import_peft(tmp_path)
  with pytest.raises(ValueError, match=r"lm_head/saved/kernel: shape \(32, 127\)"):
    pj.combine(params, loose)


def test_saved_tensor_without_its_option_is_refused(tmp_path):
  adapters, config = import_peft(HF_TINY / "qwen2_bias_all")
  export_peft(tmp_path, adapters, config)
  on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
  on_disk["bias"] = "none"
  (tmp_path / "adapter_config.json").write_text(json.dumps(on_disk))
  with pytest.raises(ValueError, match=r"not LoRA weights.*bias"):
    import_peft(tmp_path)
  on_disk["bias"] = "some"
  (tmp_path / "adapter_config.json").write_text(json.dumps(on_disk))
  with pytest.raises(ValueError, match=r"adapter_config\.json: field 'bias'"):
    import_peft(tmp_path)


# -- the options on our side ---------------------------------------------------------
def test_copies_split_train_and_keep_the_base(qwen2):
  model, params = qwen2
  config = CASES["qwen2_saved"]
  full = pj.lora_transform(params, config, key=jax.random.PRNGKey(0))
  flat = _flat(full)
  assert sorted(p for p in flat if "/saved/" in p) == [
      "lm_head/saved/kernel", "model/embed_tokens/saved/embedding",
      "model/layers_0/self_attn/q_proj/saved/bias", "model/layers_0/self_attn/v_proj/saved/bias",
      "model/layers_1/self_attn/q_proj/saved/bias", "model/layers_1/self_attn/v_proj/saved/bias"]
  np.testing.assert_allclose(_logits(model, full, config), _logits(model, params, None), atol=1e-6)
  trainable, base = pj.split(full, config)
  assert "saved" in trainable["lm_head"] and set(base["lm_head"]) == {"kernel"}
  ids = jnp.asarray(INPUTS["input_ids"])
  before = {p: np.asarray(v) for p, v in _flat(trainable).items()}
  step = training.make_train_step(model, config, optax.sgd(0.1))
  state = training.init_train_state(trainable, optax.sgd(0.1))
  state, _ = step(state, base, ids[:, :-1], ids[:, 1:], jax.random.PRNGKey(1))
  after = _flat(state.trainable)
  for path in before:
    if "/saved/" in path or path.endswith("lora_b"):  # (lora_a's first gradient is 0: B = 0)
      assert not np.allclose(before[path], after[path]), f"{path} did not train"
  np.testing.assert_array_equal(base["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_options_that_cannot_act_are_errors(qwen2):
  _, params = qwen2
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="bias must be one of"):
    pj.LoRAConfig(bias="some")
  with pytest.raises(ValueError, match="modules_to_save entry 'head' matched no module"):
    pj.lora_transform(params, pj.LoRAConfig(modules_to_save=("head",)), key=key)
  with pytest.raises(ValueError, match="both a LoRA target and in modules_to_save"):
    pj.lora_transform(params, pj.LoRAConfig(target_modules=("q_proj", "lm_head"),
                                            modules_to_save=("lm_head",)), key=key)
  with pytest.raises(ValueError, match="bias='lora_only': no adapted module"):
    pj.lora_transform(params, pj.LoRAConfig(target_modules=("o_proj",), bias="lora_only"),
                      key=key)
  _, mistral = load_hf_checkpoint(HF_TINY / "mistral")
  with pytest.raises(ValueError, match="bias='all': no module of these params has a 'bias'"):
    pj.lora_transform(mistral, pj.LoRAConfig(bias="all"), key=key)
  full = pj.lora_transform(params, CASES["qwen2_saved"], key=key)
  with pytest.raises(ValueError, match="saved modules and biases"):
    pj.unmerge(pj.merge(full, CASES["qwen2_saved"]), pj.split(full)[0], CASES["qwen2_saved"])


def test_tied_embedding_copy_acts_on_the_input_only():
  config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, tie_word_embeddings=True)
  model = LlamaForCausalLM(config)
  ids = jnp.arange(8)[None] % 64
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  lora = pj.LoRAConfig(rank=2, modules_to_save=("embed_tokens",))
  with pytest.warns(UserWarning, match="tied head .* keeps the original"):
    full = pj.lora_transform(params, lora, key=jax.random.PRNGKey(1))
  copy = full["model"]["embed_tokens"]["saved"]["embedding"]
  full["model"]["embed_tokens"]["saved"]["embedding"] = copy + 0.5
  # Oracle: the input lookup uses the copy, the head (attend) the original.
  hidden = model.apply({"params": {**params, "model": {**params["model"], "embed_tokens": {
      "embedding": copy + 0.5}}}}, ids, method=lambda m, x: m.model(x))
  want = hidden @ params["model"]["embed_tokens"]["embedding"].T
  np.testing.assert_allclose(pj.apply(model, full, ids, config=lora), want, atol=1e-5)
  with pytest.raises(ValueError, match="tied embedding"):
    pj.merge(full, lora)


def test_tied_head_saved_is_an_untied_copy(tmp_path):
  # PEFT deep-copies a tied lm_head: the head trains untied, the input lookup keeps the table.
  config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, tie_word_embeddings=True)
  model = LlamaForCausalLM(config)
  ids = jnp.arange(8)[None] % 64
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  lora = pj.LoRAConfig(rank=2, target_modules=("q_proj",), modules_to_save=("lm_head",))
  with pytest.warns(UserWarning, match="untied trainable copy"):
    full = pj.lora_transform(params, lora, key=jax.random.PRNGKey(1))
  table = params["model"]["embed_tokens"]["embedding"]
  saved = full["model"]["embed_tokens"]["saved"]
  assert set(saved) == {"untied_head"}
  np.testing.assert_array_equal(saved["untied_head"], table)
  saved["untied_head"] = table + 0.5
  hidden = model.apply({"params": params}, ids, method=lambda m, x: m.model(x))
  logits = pj.apply(model, full, ids, config=lora)
  np.testing.assert_allclose(logits, hidden @ (table + 0.5).T, atol=1e-5)
  # The fused loss takes the copy too; the gradient reaches the copy, not the table.
  adapters, base = pj.split(full, lora)
  loss, grads = jax.value_and_grad(
      lambda a: training.lm_loss(model, lora, pj.combine(base, a), ids, ids))(adapters)
  np.testing.assert_allclose(loss, causal_lm_loss(logits, ids), rtol=1e-5)
  assert np.abs(grads["model"]["embed_tokens"]["saved"]["untied_head"]).max() > 0
  with pytest.raises(ValueError, match="untied head copy"):
    pj.merge(full, lora)
  # Orbax and PEFT's format keep it (PEFT's key: lm_head.weight, the (vocab, hidden) table).
  pj.save_lora_state_dict(tmp_path / "orbax", adapters, lora)
  restored, _ = pj.load_lora_state_dict(tmp_path / "orbax", base_params=params)
  np.testing.assert_array_equal(restored["model"]["embed_tokens"]["saved"]["untied_head"],
                                table + 0.5)
  export_peft(tmp_path / "peft", adapters, lora)
  tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
  np.testing.assert_array_equal(tensors["base_model.model.lm_head.weight"], table + 0.5)
  back, back_config = import_peft(tmp_path / "peft", base_params=params)
  assert back_config.modules_to_save == ("lm_head",)
  np.testing.assert_array_equal(back["model"]["embed_tokens"]["saved"]["untied_head"], table + 0.5)
  # Without the base, the file's lm_head copy cannot land: an error says what to pass.
  unplaced, _ = import_peft(tmp_path / "peft")
  with pytest.raises(ValueError, match=r"lm_head/saved/kernel.*base_params=base"):
    pj.apply(model, pj.combine(params, unplaced), ids, config=back_config)


def test_orbax_round_trip_and_checks(tmp_path, qwen2):
  _, params = qwen2
  config = CASES["qwen2_saved"]
  adapters, _ = pj.split(pj.lora_transform(params, config, key=jax.random.PRNGKey(0)), config)
  pj.save_lora_state_dict(tmp_path / "ok", adapters, config)
  restored, restored_config = pj.load_lora_state_dict(tmp_path / "ok", base_params=params)
  assert restored_config == config
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), restored, adapters))
  # Copies the config does not ask for (or a config asking for absent copies) are refused.
  with pytest.raises(ValueError, match="saved copies do not match the config"):
    pj.save_lora_state_dict(tmp_path / "other", adapters, config.replace(modules_to_save=None))
  edit_json(tmp_path / "ok" / "config" / "metadata", lambda c: {**c, "modules_to_save": None})
  with pytest.raises(ValueError, match=r"adapters: the saved copies do not match the config"):
    pj.load_lora_state_dict(tmp_path / "ok")
  # A copy that does not fit the base is named.
  small = jax.tree.map(lambda x: x, params)
  small["lm_head"] = {"kernel": params["lm_head"]["kernel"][:, :-1]}
  pj.save_lora_state_dict(tmp_path / "fit", adapters, config)
  with pytest.raises(ValueError, match=r"lm_head/saved/kernel: shape \(32, 128\) but the base"):
    pj.load_lora_state_dict(tmp_path / "fit", base_params=small)


def test_lora_plus_groups_copies_as_peft():
  # PEFT's create_loraplus_optimizer: a saved module's weight is a plain 2-D
  # param (groupA, also for an embedding copy), a bias is 1-D without decay.
  tree = {"lm_head": {"saved": {"kernel": jnp.ones((4, 8))}},
          "embed_tokens": {"saved": {"embedding": jnp.ones((8, 4))}},
          "q_proj": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4)),
                     "saved": {"bias": jnp.ones(4)}}}
  groups = po.lora_plus_groups(tree)
  assert groups["lm_head"]["saved"]["kernel"] == "groupA"
  assert groups["embed_tokens"]["saved"]["embedding"] == "groupA"
  assert groups["q_proj"]["saved"]["bias"] == "groupB_no_decay"
  assert groups["q_proj"]["lora_b"] == "groupB"


# -- the NNX Gemma 3 (tied embeddings) -----------------------------------------------
def _assert_gemma3_peft(model, config, case, tmp_path, saved_key):
  """``model``'s logits are PEFT's for ``case``; its export has PEFT's keys and saved tensor."""
  inputs = json.loads((HF_TINY / "gemma3" / "reference.json").read_text())
  logits = np.asarray(model(jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]),
                            jnp.asarray(inputs["positions"])))
  real = np.asarray(inputs["attention_mask"], bool)
  expected = np.asarray(json.loads((HF_TINY / case / "reference.json").read_text())["logits"])
  np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=1e-4)
  export_peft(tmp_path, pj.nnx.adapters(model), config)
  ours = load_file(tmp_path / "adapter_model.safetensors")
  theirs = load_file(HF_TINY / case / "adapter_model.safetensors")
  assert sorted(ours) == sorted(theirs)
  np.testing.assert_array_equal(ours["base_model.model." + saved_key],
                                theirs["base_model.model." + saved_key])


def test_gemma3_saved_embedding_gives_peft_logits(tmp_path):
  adapters, config = import_peft(HF_TINY / "gemma3_saved")
  assert (config.modules_to_save, config.bias) == (("embed_tokens",), "none")
  _, model = load_gemma3_hf(HF_TINY / "gemma3")
  pj.nnx.load_adapters(model, adapters, config)
  _assert_gemma3_peft(model, config, "gemma3_saved", tmp_path, "model.embed_tokens.weight")
  with pytest.raises(ValueError, match="tied embedding"):
    pj.nnx.merge(model)
  # On an nnx.State the copy becomes an Adapter variable at the module's `saved` dict.
  _, plain = load_gemma3_hf(HF_TINY / "gemma3")
  with pytest.warns(UserWarning, match="tied head"):
    state = pj.nnx.lora_transform(nnx.state(plain, nnx.Param), config, key=jax.random.key(0))
  copy = dict(nnx.to_flat_state(state))[("model", "embed_tokens", "saved", "embedding")]
  assert isinstance(copy, pj.nnx.Adapter)


def test_gemma3_saved_head_gives_peft_logits(tmp_path):
  # PEFT 0.21.2 on a tied Gemma 3, modules_to_save=["lm_head"]: an untied copy of the head.
  inputs = json.loads((HF_TINY / "gemma3" / "reference.json").read_text())
  _, model = load_gemma3_hf(HF_TINY / "gemma3")
  base = pj.nnx.params(model)
  adapters, config = import_peft(HF_TINY / "gemma3_head", base_params=base)
  assert config.modules_to_save == ("lm_head",)
  pj.nnx.load_adapters(model, adapters, config)
  _assert_gemma3_peft(model, config, "gemma3_head", tmp_path / "out", "lm_head.weight")
  ids, mask = jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"])
  np.testing.assert_array_equal(model.model.embed_tokens.embedding.get_value(),
                                base["model"]["embed_tokens"]["embedding"])
  loss = gemma3_lm_loss(model, ids[:, :-1], ids[:, 1:], mask[:, 1:], attention_mask=mask[:, :-1])
  want = causal_lm_loss(model(ids[:, :-1], mask[:, :-1]), ids[:, 1:], mask[:, 1:])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  with pytest.raises(ValueError, match="untied head copy"):
    pj.nnx.merge(model)
  # PEFT's ensure_weight_tying (one copy shared by input and head): tests/test_weight_tying.py.


@pytest.mark.slow  # an nnx.jit train step (~20 s under load); the logits tests above run the copies
def test_gemma3_saved_embedding_trains_the_copy_only():
  # The embedding and the tied head saved: two separate copies train, the table stays.
  _, model = load_gemma3_hf(HF_TINY / "gemma3")
  original = np.asarray(model.model.embed_tokens.embedding.get_value())
  config = pj.LoRAConfig(rank=2, target_modules=("q_proj",),
                         modules_to_save=("embed_tokens", "lm_head"))
  with pytest.warns(UserWarning, match="tied head"), pytest.warns(UserWarning, match="untied"):
    pj.nnx.lora_transform(model, config, key=jax.random.key(0))
  assert isinstance(model.model.embed_tokens.saved["embedding"], pj.nnx.Adapter)
  optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=pj.nnx.Adapter)
  ids = jnp.asarray(json.loads((HF_TINY / "gemma3" / "reference.json").read_text())["input_ids"])

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: causal_lm_loss(m(ids[:, :-1]), ids[:, 1:])
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, pj.nnx.Adapter))(model)
    optimizer.update(model, grads)
    return loss

  step(model, optimizer)
  np.testing.assert_array_equal(model.model.embed_tokens.embedding.get_value(), original)
  copy = np.asarray(model.model.embed_tokens.saved["embedding"].get_value())
  head = np.asarray(model.model.embed_tokens.saved["untied_head"].get_value())
  assert np.abs(copy - original).max() > 1e-4
  assert np.abs(head - original).max() > 1e-4 and np.abs(head - copy).max() > 1e-4


def test_multitask_switches_copies_and_refuses_to_stack_them(qwen2):
  model, params = qwen2
  config = CASES["qwen2_bias_all"]
  one, _ = import_peft(HF_TINY / "qwen2_bias_all")
  two = jax.tree.map(lambda x: x * 0.5, one)
  library = {"one": pj.multitask.TaskAdapter(one, config), "two": pj.multitask.TaskAdapter(two, config)}
  first, _ = pj.multitask.with_adapter(params, library, "one")
  _assert_reference(_logits(model, first, config), "qwen2_bias_all")
  second, _ = pj.multitask.with_adapter(params, library, "two")
  assert np.abs(_logits(model, second, config) - _logits(model, first, config)).max() > 1e-3
  with pytest.raises(ValueError, match="saved copies"):
    pj.multitask.stack_adapters(library)


def test_cli_flags_reach_the_config():
  from peft_jax.cli import finetune as ft
  from peft_jax.cli.main import build_parser

  args = build_parser().parse_args(["finetune", "--modules-to-save", "lm_head, embed_tokens",
                                    "--bias", "lora_only", "--method", "loraplus", "--seed", "0"])
  hp = ft.hyperparameters_from_args(args)
  hp.validate()
  config = ft._lora_config(hp)  # pylint: disable=protected-access
  assert (config.modules_to_save, config.bias) == (("lm_head", "embed_tokens"), "lora_only")
  args = build_parser().parse_args(["finetune", "--bias", "all", "--method", "galore", "--seed", "0"])
  with pytest.raises(ft.CliError, match="galore would ignore them"):
    ft.hyperparameters_from_args(args).validate()


def test_copies_are_sharded_like_the_params_they_copy():
  from jax.sharding import PartitionSpec as P

  from peft_jax import sharding

  tree = {"lm_head": {"kernel": jnp.ones((4, 8)), "saved": {"kernel": jnp.ones((4, 8))}},
          "q_proj": {"bias": jnp.ones(8), "saved": {"bias": jnp.ones(8)}}}
  rules = ((r"lm_head/kernel", P(None, "model")), (r".*/bias", P("model")))
  specs = sharding.param_specs(tree, rules, {"model": 2})
  assert specs["lm_head"]["saved"]["kernel"] == specs["lm_head"]["kernel"] == P(None, "model")
  assert specs["q_proj"]["saved"]["bias"] == P("model")
