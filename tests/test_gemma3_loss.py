"""Gemma 3's fused loss equals the plain one; the Hugging Face writer round-trips."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax as pj
from peft_jax.models import causal_lm_loss, gemma3_lm_loss, gemma3_params, load_gemma3_hf
from peft_jax.models import save_gemma3_hf
from peft_jax.models.fused_ce import linear_cross_entropy
from peft_jax.models.gemma3 import FULL_ATTENTION, SLIDING_ATTENTION, Gemma3Config, Gemma3ForCausalLM
from peft_jax.models.gemma3_export import gemma3_config_to_hf_dict
from peft_jax.models.gemma3_loss import _plain_embedding

DATA = pathlib.Path(__file__).parent / "data"


def test_softcapped_head_matches_plain_loss_and_gradients():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((2, 5, 8)) * 3, jnp.float32)
  w = jnp.asarray(rng.standard_normal((11, 8)), jnp.float32)  # tied: (vocab, hidden)
  y = jnp.asarray(rng.integers(0, 11, (2, 5)))
  mask = jnp.asarray(rng.integers(0, 2, (2, 5)))
  cap = 4.0  # logits reach ~20 here: the cap bends them

  def plain(h, w):
    return causal_lm_loss(jnp.tanh((h @ w.T) / cap) * cap, y, mask)

  def fused(h, w):
    return linear_cross_entropy(h, w, y, mask, vocab_axis=0, chunk_tokens=3, softcap=cap,
                                chunk_vocab=4)  # two chunks of 4 ids and a tail of 3

  want = jax.jit(jax.value_and_grad(plain, (0, 1)))(h, w)
  got = jax.jit(jax.value_and_grad(fused, (0, 1)))(h, w)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # A frozen head (the one-pass path): the same gradient of the hidden states.
  np.testing.assert_allclose(jax.jit(jax.grad(fused))(h, w), want[1][0], rtol=1e-5, atol=1e-6)
  uncapped = linear_cross_entropy(h, w, y, mask, vocab_axis=0)
  assert abs(float(uncapped) - float(want[0])) > 1e-2  # the cap changes the loss


def _model(vocab=256, softcap=None):
  # One local and one global layer: the smallest Gemma with both kinds (fast to compile).
  config = Gemma3Config.tiny(vocab_size=vocab, final_logit_softcapping=softcap,
                             num_hidden_layers=2, layer_types=(SLIDING_ATTENTION, FULL_ATTENTION))
  return Gemma3ForCausalLM(config, rngs=nnx.Rngs(0))


def _batch(vocab, batch=2, seq=9):
  ids = jax.random.randint(jax.random.key(1), (batch, seq + 1), 3, vocab)
  return ids[:, :-1], ids[:, 1:]


def test_gemma_loss_matches_plain_values_and_gradients():
  # Softcapped and masked; the LoRA test below covers no cap and no mask.
  model = _model(softcap=3.0)
  inputs, labels = _batch(256)
  mask = (jnp.arange(inputs.shape[1]) > 1).astype(jnp.int32)[None].repeat(2, 0)
  assert _plain_embedding(model) is not None
  plain = lambda mod: causal_lm_loss(mod(inputs), labels, mask)
  # Pads 18 -> 20 tokens; 256 ids in chunks of 100: two and a tail of 56.
  fused = lambda mod: gemma3_lm_loss(mod, inputs, labels, mask, chunk_tokens=5, chunk_vocab=100)
  want = nnx.jit(nnx.value_and_grad(plain))(model)  # every param, the tied embedding too
  got = nnx.jit(nnx.value_and_grad(fused))(model)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(want[1]), jax.tree.leaves(got[1])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_gemma_lora_step_matches_and_holds_no_full_logits():
  vocab = 4096
  model = _model(vocab=vocab)
  lora = pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
  pj.nnx.lora_transform(model, lora, key=jax.random.key(2))
  inputs, labels = _batch(vocab, batch=4, seq=64)
  diff = nnx.DiffState(0, pj.nnx.Adapter)
  graphdef, adapters, rest = nnx.split(model, pj.nnx.Adapter, ...)

  def compiled(loss_fn):  # the functional form: adapters and the frozen rest as arguments
    def step(adapters, rest):
      return nnx.value_and_grad(loss_fn, argnums=diff)(nnx.merge(graphdef, adapters, rest))
    return jax.jit(step).lower(adapters, rest).compile()

  plain = compiled(lambda mod: causal_lm_loss(mod(inputs), labels))
  fused = compiled(lambda mod: gemma3_lm_loss(mod, inputs, labels, chunk_vocab=512))
  want, got = plain(adapters, rest), fused(adapters, rest)
  assert len(jax.tree.leaves(got[1])) == 2 * 2 * 2  # lora_a, lora_b of q and v in 2 layers
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  logits_bytes = inputs.size * vocab * 4
  assert temp(fused) + logits_bytes <= temp(plain)


def test_adapted_embedding_takes_the_plain_path():
  model = _model()
  lora = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("embed_tokens",))
  pj.nnx.lora_transform(model, lora, key=jax.random.key(3))
  assert _plain_embedding(model) is None  # its lookups carry the adapter: model(...) runs it
  pj.nnx.merge(model)
  assert _plain_embedding(model) is not None


def test_nnx_train_step_with_fused_loss_trains_and_compiles_once():
  model = _model()
  pj.nnx.lora_transform(model, pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")),
                        key=jax.random.key(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=pj.nnx.Adapter)
  inputs, labels = _batch(256)
  traces = []

  @nnx.jit
  def step(model, optimizer, inputs, labels):
    traces.append(1)
    loss_fn = lambda m: gemma3_lm_loss(m, inputs, labels)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, pj.nnx.Adapter))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, inputs, labels)) for _ in range(4)]
  assert losses[-1] < losses[0] - 1e-3, losses
  assert len(traces) == 1


def test_hf_writer_round_trips_the_transformers_checkpoint(tmp_path):
  config, model = load_gemma3_hf(DATA / "hf_tiny" / "gemma3")
  written = json.loads((DATA / "hf_tiny" / "gemma3" / "config.json").read_text())
  ours = gemma3_config_to_hf_dict(config)
  # Every architecture key transformers wrote, with the value it wrote.
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "rope_parameters", "sliding_window", "layer_types", "query_pre_attn_scalar",
              "final_logit_softcapping", "max_position_embeddings", "hidden_activation",
              "tie_word_embeddings", "model_type", "architectures", "dtype"):
    assert ours[key] == written[key], key
  save_gemma3_hf(tmp_path / "out", config, gemma3_params(model))
  config2, model2 = load_gemma3_hf(tmp_path / "out")
  assert config2 == config
  for a, b in zip(jax.tree.leaves(gemma3_params(model)), jax.tree.leaves(gemma3_params(model2))):
    np.testing.assert_array_equal(a, b)
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  theirs = load_file(DATA / "hf_tiny" / "gemma3" / "model.safetensors")
  mine = load_file(tmp_path / "out" / "model.safetensors")
  assert sorted(mine) == sorted(k for k in theirs if k != "lm_head.weight")
  for name, array in mine.items():
    np.testing.assert_array_equal(array, theirs[name], err_msg=name)
  assert not list((tmp_path / "out").glob("*.partial"))


def test_hf_writer_refuses_params_that_do_not_fit(tmp_path):
  model = _model()
  pj.nnx.lora_transform(model, pj.LoRAConfig(rank=2, target_modules=("q_proj",)),
                        key=jax.random.key(0))
  with pytest.raises(ValueError, match="unexpected.*lora_a.*merge adapters"):
    save_gemma3_hf(tmp_path / "out", model.config, gemma3_params(model))
  assert not (tmp_path / "out").exists()
  params = gemma3_params(_model())
  params["model"]["norm"]["weight"] = jnp.zeros((3,))
  with pytest.raises(ValueError, match="model/norm/weight has shape"):
    save_gemma3_hf(tmp_path / "out", _model().config, params)
