"""The fused, chunked head + cross-entropy equals the plain one (values and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax as pj
from peft_jax import training
from peft_jax.models import LlamaConfig, LlamaForCausalLM, causal_lm_loss, init_params
from peft_jax.models.fused_ce import linear_cross_entropy


@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk,chunk_vocab", [(3, 4), (64, 64)])  # 4: two chunks and a tail of 3
def test_matches_plain_loss_and_gradients(vocab_axis, masked, chunk, chunk_vocab):
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 11) if vocab_axis else (11, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 11, (2, 5)))
  mask = jnp.asarray(rng.integers(0, 2, (2, 5))) if masked else None

  def plain(h, w):
    return causal_lm_loss(h @ (w if vocab_axis else w.T), y, mask)

  def fused(h, w):
    return linear_cross_entropy(h, w, y, mask, vocab_axis=vocab_axis, chunk_tokens=chunk,
                                chunk_vocab=chunk_vocab)

  want = jax.value_and_grad(plain, (0, 1))(h, w)
  got = jax.jit(jax.value_and_grad(fused, (0, 1)))(h, w)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # Only the hidden states differentiated (a frozen head): same gradient.
  np.testing.assert_allclose(jax.grad(fused)(h, w), want[1][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fused(h, w), want[0], rtol=1e-6)


def test_rejects_mismatched_head():
  with pytest.raises(ValueError, match="do not fit"):
    linear_cross_entropy(jnp.ones((2, 4)), jnp.ones((5, 7)), jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("tied", [True, False])
def test_train_step_loss_matches_unfused_and_holds_no_full_logits(tied, monkeypatch):
  # Chunks of 256 ids: here the default chunk (8,192) would be the whole 256 x 2048 logits.
  monkeypatch.setattr(training, "linear_cross_entropy",
                      functools.partial(linear_cross_entropy, chunk_vocab=256))
  config = LlamaConfig.tiny(vocab_size=2048, tie_word_embeddings=tied)
  model = LlamaForCausalLM(config)
  params = init_params(config, jax.random.key(0))
  lora = pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
  adapted = pj.lora_transform(params, lora, key=jax.random.key(1))
  trainable, base = pj.split(adapted)
  tokens = jax.random.randint(jax.random.key(2), (4, 65), 0, config.vocab_size)
  inputs, labels = tokens[:, :-1], tokens[:, 1:]

  def unfused(tr):
    with pj.intercept(lora):
      logits = model.apply({"params": pj.combine(base, tr)}, inputs)
    return causal_lm_loss(logits, labels)

  def fused(tr):
    return training.lm_loss(model, lora, pj.combine(base, tr), inputs, labels)

  assert training._plain_head(model, adapted) is not None  # pylint: disable=protected-access
  plain_step = jax.jit(jax.value_and_grad(unfused)).lower(trainable).compile()
  fused_step = jax.jit(jax.value_and_grad(fused)).lower(trainable).compile()
  for a, b in zip(jax.tree.leaves(plain_step(trainable)), jax.tree.leaves(fused_step(trainable))):
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-7)
  # The fused step's scratch memory stays below one (tokens, vocab) float32 buffer
  # per extra copy the plain step keeps.
  temp = lambda compiled: compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = inputs.size * config.vocab_size * 4
  assert temp(fused_step) + logits_bytes <= temp(plain_step)


def test_adapted_head_falls_back_to_the_interceptor():
  config = LlamaConfig.tiny()
  params = init_params(config, jax.random.key(0))
  lora = pj.LoRAConfig(rank=2, target_modules=("lm_head",))
  adapted = pj.lora_transform(params, lora, key=jax.random.key(1))
  model = LlamaForCausalLM(config)
  assert training._plain_head(model, adapted) is None  # pylint: disable=protected-access
  tokens = jnp.arange(18).reshape(2, 9) % config.vocab_size
  with pj.intercept(lora):
    logits = model.apply({"params": adapted}, tokens[:, :-1])
  np.testing.assert_allclose(training.lm_loss(model, lora, adapted, tokens[:, :-1], tokens[:, 1:]),
                             causal_lm_loss(logits, tokens[:, 1:]), rtol=1e-6)


def test_train_step_does_not_retrace():
  config = LlamaConfig.tiny()
  params = init_params(config, jax.random.key(0))
  optimizer = optax.adam(1e-3)
  step = training.make_train_step(LlamaForCausalLM(config), None, optimizer)
  state = training.init_train_state(params, optimizer)
  tokens = jnp.arange(36).reshape(2, 18) % config.vocab_size
  for i in range(3):
    state, loss = step(state, {}, tokens[:, :-1], tokens[:, 1:], jax.random.key(i))
  assert np.isfinite(float(loss))
  assert step._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize("kwargs", [{"chunk_tokens": 0}, {"chunk_vocab": 0}, {"chunk_vocab": -8}])
def test_non_positive_chunk_sizes_are_errors(kwargs):
  hidden = jnp.zeros((2, 3, 4), jnp.float32)
  head = jnp.zeros((4, 5), jnp.float32)
  labels = jnp.zeros((2, 3), jnp.int32)
  name = next(iter(kwargs))
  with pytest.raises(ValueError, match=name):
    linear_cross_entropy(hidden, head, labels, **kwargs)
