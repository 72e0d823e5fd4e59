"""PEFT's ``ensure_weight_tying=True`` on tied models: ONE trainable copy of the table.

The PEFT side comes from tests/data/make_peft_options_reference.py (peft
0.21.2 on the tiny tied Llama of hf_tiny/llama_tied, SmolLM2's family, and
the tiny tied Gemma 3 of hf_tiny/gemma3), all with ``ensure_weight_tying=True``:
``modules_to_save`` naming the head and/or the embedding (one trained copy
that the input lookup and the tied head share, written under both
``model.embed_tokens.weight`` and ``lm_head.weight``), and LoRA on the tied
embedding (the head's LoRA is the embedding's, transposed). Our own
behaviour is checked against closed forms on the same tiny Llama.
"""

import dataclasses
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import peft_jax as pj
from hostile_helpers import edit_json
from peft_jax import training
from peft_jax.checkpoint import export_peft, import_peft
from peft_jax.models.gemma3_checkpoint import load_gemma3_hf
from peft_jax.models.hf_checkpoint import load_hf_checkpoint
from peft_jax.models.llama import LlamaForCausalLM, causal_lm_loss

HF_TINY = pathlib.Path(__file__).parent / "data" / "hf_tiny"
INPUTS = json.loads((HF_TINY / "gemma3" / "reference.json").read_text())  # llama_tied's too
HEAD_KEY, EMBED_KEY = "base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"
IDS = jnp.asarray(INPUTS["input_ids"])
REAL = np.asarray(INPUTS["attention_mask"], bool)


@pytest.fixture(scope="module")
def llama():
  config, params = load_hf_checkpoint(HF_TINY / "llama_tied")
  assert config.tie_word_embeddings and "lm_head" not in params
  return LlamaForCausalLM(config), params


def _args():
  return [jnp.asarray(INPUTS[k]) for k in ("input_ids", "attention_mask", "positions")]


def _untied(params):
  """The same params with an output head of their own."""
  return {**params, "lm_head": {"kernel": params["model"]["embed_tokens"]["embedding"].T}}


def _transform(params, config):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # ensure_weight_tying on a tied model: nothing to warn about
    return pj.lora_transform(params, config, key=jax.random.PRNGKey(1))


def _with_table(params, table):
  return {**params, "model": {**params["model"], "embed_tokens": {"embedding": table}}}


def _assert_reference(logits, case):
  expected = np.asarray(json.loads((HF_TINY / case / "reference.json").read_text())["logits"])
  np.testing.assert_allclose(np.asarray(logits)[REAL], expected[REAL], atol=1e-5)


def _assert_peft_file(tmp_path, adapters, config, case):
  """Our export of ``adapters`` is PEFT's file: key for key, bit for bit, and its config
  (``target_modules`` compared sorted: PEFT writes it from a set)."""
  written = export_peft(tmp_path, adapters, config)
  ours = load_file(tmp_path / "adapter_model.safetensors")
  theirs = load_file(HF_TINY / case / "adapter_model.safetensors")
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == value.dtype and ours[key].tobytes() == value.tobytes(), key
  peft_config = json.loads((HF_TINY / case / "adapter_config.json").read_text())
  for fields in (written, peft_config):
    fields["base_model_name_or_path"] = None
    fields["target_modules"] = sorted(fields["target_modules"])
  assert written == peft_config


# -- the linen Llama (SmolLM2's tie_word_embeddings) against PEFT 0.21.2 ----------------
@pytest.mark.parametrize("case,saved,targets", [
    ("llama_tied_saved", ("embed_tokens", "lm_head"), ("q_proj",)),
    ("llama_tied_lora", None, ("embed_tokens", "q_proj")),
    # target_modules=["q_proj", "lm_head"], alpha_pattern={"lm_head": 32}: PEFT targets the
    # embedding, ties the head to it and scales the head's term by 32 / r.
    ("llama_tied_head", None, ("lm_head", "q_proj"))])
def test_llama_peft_file_gives_peft_logits(tmp_path, llama, case, saved, targets):
  model, params = llama
  adapters, config = import_peft(HF_TINY / case, base_params=params)
  assert (config.modules_to_save, config.target_modules, config.ensure_weight_tying) == (
      saved, targets, True)
  assert "lm_head" not in adapters  # the head's tensors are the embedding's
  full = pj.combine(params, adapters)
  _assert_reference(pj.apply(model, full, *_args(), config=config), case)
  _assert_peft_file(tmp_path, adapters, config, case)
  if case == "llama_tied_head":  # one merged table cannot scale by two alphas
    assert dict(config.alpha_pattern) == {"lm_head": 32}
    with pytest.raises(ValueError, match=r"scales its LoRA by 2 and the tied head 'lm_head' by 8"):
      pj.merge(full, config)
    # A file giving the tied head a rank of its own (PEFT: alpha over a rank A, B lack).
    edit_json(tmp_path / "adapter_config.json", lambda c: {**c, "rank_pattern": {"lm_head": 2}})
    with pytest.raises(ValueError, match="tied head 'lm_head' gets rank 2 but shares the rank-4"):
      import_peft(tmp_path)
    # PEFT's untied head LoRA (lm_head targeted without the option) on the tied base: refused.
    edit_json(tmp_path / "adapter_config.json", lambda c: {**c, "ensure_weight_tying": False,
                                                           "rank_pattern": {}})
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "embed_tokens" not in k},
              tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'lm_head', the output head of a base with tied"):
      import_peft(tmp_path, base_params=params)
    return
  # merge: the one table holds the copy (or E + s A B); the plain model gives PEFT's logits.
  _assert_reference(model.apply({"params": pj.merge(full, config)}, *_args()), case)


# -- our side: closed forms on the same tiny Llama ----------------------------------------
@pytest.mark.parametrize("names", [("lm_head",), ("embed_tokens",), ("embed_tokens", "lm_head")])
def test_one_copy_serves_lookup_and_head(llama, names):
  model, params = llama
  lora = pj.LoRAConfig(rank=2, target_modules=("q_proj",), modules_to_save=names,
                       ensure_weight_tying=True)
  full = _transform(params, lora)
  saved = full["model"]["embed_tokens"]["saved"]
  assert set(saved) == {"tied_embedding"}
  table = params["model"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(saved["tied_embedding"], table)
  saved["tied_embedding"] = table + 0.25 * jnp.cos(table * 7.0)
  # Oracle: the plain model whose one table is the copy (lookup and head alike).
  want = model.apply({"params": _with_table(params, saved["tied_embedding"])}, *_args())
  logits = pj.apply(model, full, *_args(), config=lora)
  np.testing.assert_allclose(logits, want, atol=1e-5)
  # merge writes the copy into the one table: the plain model computes the same.
  merged = pj.merge(full, lora)
  np.testing.assert_array_equal(merged["model"]["embed_tokens"]["embedding"],
                                saved["tied_embedding"])
  np.testing.assert_allclose(model.apply({"params": merged}, *_args()), logits, atol=1e-5)


def test_the_shared_copy_gets_both_uses_gradients(tmp_path, llama):
  model, params = llama
  vocab = params["model"]["embed_tokens"]["embedding"].shape[0]
  lora = pj.LoRAConfig(rank=2, target_modules=("q_proj",), modules_to_save=("lm_head",),
                       ensure_weight_tying=True)
  adapters, base = pj.split(_transform(params, lora), lora)
  copy = adapters["model"]["embed_tokens"]["saved"]["tied_embedding"] + 0.1
  adapters["model"]["embed_tokens"]["saved"]["tied_embedding"] = copy
  loss_of = lambda a: training.lm_loss(model, lora, pj.combine(base, a), IDS, IDS)  # fused head
  loss, grads = jax.value_and_grad(loss_of)(adapters)
  logits = pj.apply(model, pj.combine(base, adapters), IDS, config=lora)
  np.testing.assert_allclose(loss, causal_lm_loss(logits, IDS), rtol=1e-6)
  tied = grads["model"]["embed_tokens"]["saved"]["tied_embedding"]
  # The head's part in closed form: logits = h C^T, mean cross-entropy over the N tokens.
  hidden = model.apply({"params": _with_table(params, copy)}, IDS, method=lambda m, x: m.model(x))
  d_logits = (jax.nn.softmax(logits, -1) - jax.nn.one_hot(IDS, vocab)) / IDS.size
  head_part = jnp.einsum("btv,btd->vd", d_logits, hidden)
  # The lookup's part: the same copy read by the lookup only (the head a separate constant).
  untied = pj.LoRAConfig(rank=2, target_modules=("q_proj",), modules_to_save=("embed_tokens",))
  with pytest.warns(UserWarning, match="input lookup only"):
    lookup_adapters, _ = pj.split(pj.lora_transform(_with_table(params, copy), untied,
                                                    key=jax.random.PRNGKey(1)), untied)
  lookup_adapters["model"]["layers_0"] = adapters["model"]["layers_0"]
  lookup_adapters["model"]["layers_1"] = adapters["model"]["layers_1"]
  lookup_part = jax.grad(lambda a: causal_lm_loss(pj.apply(
      model, pj.combine(_with_table(base, copy), a), IDS, config=untied), IDS))(
          lookup_adapters)["model"]["embed_tokens"]["saved"]["embedding"]
  assert np.abs(head_part).max() > 1e-3 and np.abs(lookup_part).max() > 1e-3
  np.testing.assert_allclose(tied, head_part + lookup_part, rtol=1e-5, atol=1e-6)
  # Orbax keeps the copy and the option; a base with its own head is refused.
  pj.save_lora_state_dict(tmp_path / "orbax", adapters, lora)
  restored, restored_config = pj.load_lora_state_dict(tmp_path / "orbax", base_params=params)
  assert restored_config == lora
  np.testing.assert_array_equal(restored["model"]["embed_tokens"]["saved"]["tied_embedding"], copy)
  with pytest.raises(ValueError, match="tied_embedding: a copy shared with the tied head"):
    pj.combine(_untied(params), restored)  # (restore(..., base_params=untied) says the same)
  with pytest.raises(ValueError, match="ensure_weight_tying is False"):
    pj.save_lora_state_dict(tmp_path / "other", adapters, lora.replace(ensure_weight_tying=False))


def test_export_and_import_write_both_keys(tmp_path, llama):
  _, params = llama
  lora = pj.LoRAConfig(rank=2, target_modules=("q_proj",), modules_to_save=("lm_head",),
                       ensure_weight_tying=True)
  adapters, _ = pj.split(_transform(params, lora), lora)
  written = export_peft(tmp_path, adapters, lora)
  assert (written["ensure_weight_tying"], written["modules_to_save"]) == (
      True, ["model.embed_tokens"])
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  np.testing.assert_array_equal(tensors[HEAD_KEY], tensors[EMBED_KEY])
  back, back_config = import_peft(tmp_path, base_params=params)
  assert back_config == lora.replace(target_modules=back_config.target_modules)
  # The two keys must hold the same bits: one flipped bit is an error naming both.
  bits = tensors[HEAD_KEY].view(np.uint32).copy()
  bits[3, 5] ^= 1
  tensors[HEAD_KEY] = bits.view(np.float32)
  save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"lm_head\.weight.*embed_tokens\.weight.*differ"):
    import_peft(tmp_path)
  # Without the option, the head key is a tensor no module claims.
  tensors[HEAD_KEY] = tensors[EMBED_KEY]
  save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
  edit_json(tmp_path / "adapter_config.json", lambda c: {**c, "ensure_weight_tying": False})
  with pytest.raises(ValueError, match="not LoRA weights.*lm_head"):
    import_peft(tmp_path)


def test_the_option_that_cannot_act_warns_or_refuses(llama):
  _, params = llama
  # No tied table (an untied head): PEFT warns and trains separate copies; so do we.
  lora = pj.LoRAConfig(rank=2, modules_to_save=("lm_head",), ensure_weight_tying=True)
  with pytest.warns(UserWarning, match="no tied embeddings"):
    full = pj.lora_transform(_untied(params), lora, key=jax.random.PRNGKey(1))
  assert set(full["lm_head"]["saved"]) == {"kernel"}
  # A tied model whose saved modules do not touch the table: nothing to tie (PEFT warns).
  with pytest.warns(UserWarning, match="names neither the tied embedding nor the output head"):
    pj.lora_transform(params, lora.replace(modules_to_save=("norm",)), key=jax.random.PRNGKey(1))
  # LoRA on an untied embedding: nothing to tie, and export could not tell (PEFT warns).
  embed = pj.LoRAConfig(rank=2, target_modules=("embed_tokens",), ensure_weight_tying=True)
  with pytest.raises(ValueError, match="LoRA on the embedding.*output head of its own"):
    pj.lora_transform(_untied(params), embed, key=jax.random.PRNGKey(1))
  # Tied DoRA, and a table both adapted and saved, are refused by name.
  with pytest.raises(ValueError, match="DoRA, AdaLoRA"):
    pj.lora_transform(params, embed.replace(use_dora=True), key=jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="both a LoRA target and, tied, in modules_to_save"):
    pj.lora_transform(params, embed.replace(modules_to_save=("lm_head",)),
                      key=jax.random.PRNGKey(1))


def test_tied_lora_acts_in_lookup_and_head(tmp_path, llama):
  # PEFT's target_modules_to_tie: the head's LoRA is the embedding's (A, B transposed), so the
  # model is the plain one on the table E + s A B, and merge is exact.
  model, params = llama
  lora = pj.LoRAConfig(rank=2, alpha=3.0, target_modules=("q_proj", "embed_tokens"),
                       ensure_weight_tying=True)
  adapters, base = pj.split(_transform(params, lora), lora)
  embed = adapters["model"]["embed_tokens"]
  embed["lora_a"] = jax.random.normal(jax.random.PRNGKey(2), embed["lora_a"].shape) * 0.3
  table = params["model"]["embed_tokens"]["embedding"]
  scale = 3.0 / 2
  oracle = lambda a: _with_table(params, table + scale * a["lora_a"] @ a["lora_b"])
  logits = pj.apply(model, pj.combine(base, adapters), *_args(), config=lora)
  np.testing.assert_allclose(logits, model.apply({"params": oracle(embed)}, *_args()), atol=1e-5)
  untied = pj.apply(model, pj.combine(base, adapters), *_args(), config=lora.replace(
      ensure_weight_tying=False))
  assert np.abs(untied - logits).max() > 1e-3  # without the option the head ignores the LoRA
  # Gradients: both uses reach A and B (chain rule through the oracle's one table).
  grads = jax.grad(lambda a: training.lm_loss(model, lora, pj.combine(base, a), IDS, IDS))(
      adapters)["model"]["embed_tokens"]
  want = jax.grad(lambda e: causal_lm_loss(model.apply({"params": oracle(e)}, IDS), IDS))(
      {"lora_a": embed["lora_a"], "lora_b": embed["lora_b"]})
  for leaf in ("lora_a", "lora_b"):
    np.testing.assert_allclose(grads[leaf], want[leaf], rtol=1e-5, atol=1e-5)
  # PEFT's format: the head's LoRA keys are the embedding's transposed; import drops them.
  written = export_peft(tmp_path, adapters, lora)
  assert written["target_modules"] == ["embed_tokens", "model.embed_tokens", "q_proj"]
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  np.testing.assert_array_equal(tensors["base_model.model.lm_head.lora_B.weight"],
                                tensors["base_model.model.model.embed_tokens.lora_embedding_A"].T)
  back, back_config = import_peft(tmp_path, base_params=params)
  assert back_config.ensure_weight_tying and "lm_head" not in back
  np.testing.assert_array_equal(back["model"]["embed_tokens"]["lora_a"], embed["lora_a"])
  key = "base_model.model.lm_head.lora_A.weight"
  tensors[key] = tensors[key] * 1.5
  save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"lm_head\.lora_A\.weight.*lora_embedding_B.*transposed"):
    import_peft(tmp_path)


def test_lm_head_target_and_head_alpha(tmp_path, llama):
  # target_modules naming the tied head: LoRA on the embedding (PEFT's mapping); the head's
  # own alpha_pattern entry scales the head's term only. Oracle: an untied model whose lookup
  # table is E + s_e A B and whose head is E + s_h A B.
  model, params = llama
  lora = pj.LoRAConfig(rank=2, alpha=3.0, target_modules=r".*(q_proj|lm_head)",
                       ensure_weight_tying=True, alpha_pattern={"lm_.*": 12.0})
  full = _transform(params, lora)
  embed = full["model"]["embed_tokens"]
  assert "lm_head" not in full and embed["lora_a"].shape == (128, 2)
  embed["lora_b"] = jax.random.normal(jax.random.PRNGKey(2), embed["lora_b"].shape) * 0.3
  table = params["model"]["embed_tokens"]["embedding"]
  delta = embed["lora_a"] @ embed["lora_b"]
  oracle = {**_with_table(params, table + 1.5 * delta), "lm_head": {"kernel": (table + 6.0 * delta).T}}
  untied = LlamaForCausalLM(dataclasses.replace(model.config, tie_word_embeddings=False))
  want = untied.apply({"params": oracle}, *_args())
  np.testing.assert_allclose(pj.apply(model, full, *_args(), config=lora), want, atol=1e-5)
  # A list naming the head maps the same way; Orbax keeps the head's alpha (a regex key).
  listed = lora.replace(target_modules=("q_proj", "lm_head"))
  assert set(_transform(params, listed)["model"]["embed_tokens"]) == {"embedding", "lora_a", "lora_b"}
  adapters, _ = pj.split(full, lora)
  pj.save_lora_state_dict(tmp_path / "orbax", adapters, lora)
  _, restored = pj.load_lora_state_dict(tmp_path / "orbax", base_params=params)
  assert restored.alpha_for("lm_head") == 12.0 and restored.alpha_for("model/embed_tokens") == 3.0
  # Refused by name: the head without the option (PEFT's untied head LoRA, whose merge writes
  # into the shared table), and a head rank other than the embedding's (shared A and B).
  with pytest.raises(ValueError, match="output head.*ensure_weight_tying=True.*'embed_tokens'"):
    pj.lora_transform(params, listed.replace(ensure_weight_tying=False), key=jax.random.PRNGKey(1))
  for ranks in ({"lm_head": 1}, {"embed_tokens": 1}):
    with pytest.raises(ValueError, match="tied head 'lm_head' gets rank"):
      pj.lora_transform(params, listed.replace(rank_pattern=ranks), key=jax.random.PRNGKey(1))
  same = _transform(params, listed.replace(rank_pattern={"embed_tokens": 1, "lm_head": 1}))
  assert same["model"]["embed_tokens"]["lora_a"].shape == (128, 1)


# -- the NNX Gemma 3 against PEFT 0.21.2 ------------------------------------------------
@pytest.mark.parametrize("case,saved,targets", [
    ("gemma3_tied", ("lm_head",), ("q_proj",)),
    ("gemma3_tied_embed", ("embed_tokens", "lm_head"), ("q_proj",)),
    ("gemma3_tied_lora", None, ("embed_tokens", "q_proj")),
    ("gemma3_tied_head", None, ("lm_head", "q_proj"))])
def test_gemma3_peft_file_gives_peft_logits(tmp_path, case, saved, targets):
  _, model = load_gemma3_hf(HF_TINY / "gemma3")
  adapters, config = import_peft(HF_TINY / case, base_params=pj.nnx.params(model))
  assert (config.modules_to_save, config.target_modules, config.ensure_weight_tying) == (
      saved, targets, True)
  assert "lm_head" not in adapters  # the head's tensors are the embedding's
  pj.nnx.load_adapters(model, adapters, config)
  _assert_reference(model(*_args()), case)
  _assert_peft_file(tmp_path, pj.nnx.adapters(model), config, case)
  if case == "gemma3_tied_head":  # the head's own alpha: one merged table cannot hold it
    with pytest.raises(ValueError, match="one merged table cannot hold both"):
      pj.nnx.merge(model)
    # Our own transform maps the head onto the embedding as PEFT did (same adapter shapes).
    _, fresh = load_gemma3_hf(HF_TINY / "gemma3")
    with pytest.raises(ValueError, match="output head.*ensure_weight_tying=True"):
      pj.nnx.lora_transform(fresh, config.replace(ensure_weight_tying=False),
                            key=jax.random.PRNGKey(0))
    pj.nnx.lora_transform(fresh, config, key=jax.random.PRNGKey(0))
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
    assert shapes(pj.nnx.adapters(fresh)) == shapes(adapters)
    return
  # The one table holds the shared copy (or E + s A B) after merge: PEFT's logits.
  pj.nnx.merge(model)
  _assert_reference(model(*_args()), case)


# -- the command line ------------------------------------------------------------------
def test_cli_flag_reaches_the_config():
  from peft_jax.cli import finetune as ft  # pylint: disable=import-outside-toplevel
  from peft_jax.cli.main import build_parser  # pylint: disable=import-outside-toplevel

  args = build_parser().parse_args(["finetune", "--modules-to-save", "lm_head",
                                    "--ensure-weight-tying", "--seed", "0"])
  hp = ft.hyperparameters_from_args(args)
  hp.validate()
  config = ft._lora_config(hp)  # pylint: disable=protected-access
  assert (config.modules_to_save, config.ensure_weight_tying) == (("lm_head",), True)
  assert not ft._lora_config(ft.hyperparameters_from_args(  # pylint: disable=protected-access
      build_parser().parse_args(["finetune"]))).ensure_weight_tying
  args = build_parser().parse_args(["finetune", "--ensure-weight-tying", "--method", "lisa",
                                    "--seed", "0"])
  with pytest.raises(ft.CliError, match="lisa would ignore them"):
    ft.hyperparameters_from_args(args).validate()


@pytest.mark.slow  # a gemma3-tiny finetune run (~30 s); the tests above run the same paths
def test_cli_finetune_trains_one_tied_copy(tmp_path):
  from peft_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from peft_jax.cli import finetune as ft  # pylint: disable=import-outside-toplevel
  from peft_jax.cli.main import main  # pylint: disable=import-outside-toplevel

  out = tmp_path / "run"
  assert main(["finetune", "--model", "gemma3-tiny", "--steps", "2", "--batch", "2",
               "--seq-len", "16", "--eval-batches", "1", "--rank", "4", "--lr", "1e-2",
               "--targets", "q_proj", "--modules-to-save", "lm_head", "--ensure-weight-tying",
               "--output", str(out)]) == 0
  adapters, config = checkpoint.restore(out / "adapter")
  assert config.ensure_weight_tying and config.modules_to_save == ("lm_head",)
  table = ft.load_model("gemma3-tiny", seed=0).params["model"]["embed_tokens"]["embedding"]
  copy = adapters["model"]["embed_tokens"]["saved"]["tied_embedding"]
  assert np.abs(np.asarray(copy) - np.asarray(table)).max() > 1e-4  # it trained
  assert main(["export-hf", "--adapter", str(out), "--output", str(tmp_path / "peft")]) == 0
  tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
  np.testing.assert_array_equal(tensors[HEAD_KEY], copy)
  np.testing.assert_array_equal(tensors[EMBED_KEY], copy)
  assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[
      "ensure_weight_tying"] is True
  assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "merged")]) == 0
  merged = checkpoint.restore_params(tmp_path / "merged")
  np.testing.assert_array_equal(merged["model"]["embed_tokens"]["embedding"], copy)
