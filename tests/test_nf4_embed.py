"""NF4 embedding tables (``quantize(..., include_embeddings=True)``): row lookup, frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import training
from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params
from peft_jax.quant.embed import nf4_attend, nf4_lookup


@pytest.mark.parametrize("spec", [pj.NF4(block_size=16), pj.NF4(block_size=64, double_quant=False),
                                  pj.FP4(block_size=32)])
def test_lookup_is_the_dequantized_rows_bit_for_bit(spec):
  table = jax.random.normal(jax.random.key(0), (256, 48)).astype(jnp.bfloat16)
  w = pj.quant.quantize_array(table, spec)
  ids = jnp.array([[0, 1, 2, 255], [127, 64, 65, 7]])
  got = jax.jit(nf4_lookup)(w, ids)
  assert got.shape == (2, 4, 48) and got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(w.dequantize()[ids], np.float32))
  assert np.isnan(np.asarray(nf4_lookup(w, jnp.array([-1, 256]), jnp.float32))).all()


def test_lookup_rejects_what_it_cannot_read():
  w = pj.quant.quantize_array(jnp.ones((64, 8)), pj.NF4(block_size=16))
  with pytest.raises(TypeError, match="integers"):
    nf4_lookup(w, jnp.zeros(3))
  with pytest.raises(TypeError, match="NF4Array"):
    nf4_lookup(jnp.ones((64, 8)), jnp.zeros(3, jnp.int32))
  stacked = pj.quant.quantize_array(jnp.ones((2, 64, 8)), pj.NF4(block_size=16), stack_ndim=1)
  with pytest.raises(ValueError, match="unstacked"):
    nf4_lookup(stacked, jnp.zeros(3, jnp.int32))


def test_quantize_embeddings_only_when_asked_and_only_whole_blocks():
  abstract = lambda config: jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
  params = abstract(LlamaConfig.tiny())  # shapes only: nothing compiles
  paths = lambda **kw: pj.quant.quantized_paths(jax.eval_shape(
      lambda p: pj.quantize(p, pj.NF4(block_size=16), **kw), params))
  assert "model/embed_tokens/embedding" not in paths()
  assert "model/embed_tokens/embedding" in paths(include_embeddings=True)
  assert "model/embed_tokens/embedding" not in paths(include_embeddings=True,
                                                     exclude_modules=("embed_tokens",))
  with pytest.raises(ValueError, match=r"embed_tokens/embedding.*\(100, 64\).*block_size 64"):
    jax.eval_shape(lambda p: pj.quantize(p, include_embeddings=True),
                   abstract(LlamaConfig.tiny(vocab_size=100)))


def test_qlora_with_nf4_embedding_gives_the_dequantized_tables_loss():
  """Tied: the lookup and the head (``attend``) on the NF4 table, frozen (in the base)."""
  config = LlamaConfig.tiny(tie_word_embeddings=True, num_hidden_layers=1)
  model = LlamaForCausalLM(config)
  ids = (jnp.arange(2 * 8).reshape(2, 8) * 5) % config.vocab_size
  params = pj.quantize(init_params(config, jax.random.key(0)),
                       pj.NF4(block_size=16, compute_dtype=jnp.float32), ("q_proj",),
                       include_embeddings=True)
  lora = pj.LoRAConfig(rank=4, target_modules=("q_proj",))
  adapters, base = pj.split(pj.lora_transform(params, lora, key=jax.random.key(1)))
  adapters = jax.tree.map(lambda x: x + 0.01, adapters)
  table = base["model"]["embed_tokens"]["embedding"]
  assert isinstance(table, pj.NF4Array)
  dense = jax.tree.map(lambda x: x, base)
  dense["model"]["embed_tokens"]["embedding"] = table.dequantize()

  def loss(adapters, base):
    return training.lm_loss(model, lora, pj.combine(base, adapters), ids, jnp.roll(ids, -1, 1))

  np.testing.assert_allclose(jax.jit(loss)(adapters, base), jax.jit(loss)(adapters, dense),
                             rtol=1e-6)


def test_tied_head_on_the_nf4_table_chunk_by_chunk_is_the_dense_product_and_its_gradient():
  """``nf4_attend``: logits and d(query) of ``query @ dequantize(table).T``, chunked or not."""
  params = {"embed": {"embedding": jax.random.normal(jax.random.key(0), (256, 24))},
            "dense": {"kernel": jnp.ones((24, 64))}}
  table = pj.quantize(params, pj.NF4(block_size=32), ("dense",),
                      include_embeddings=True)["embed"]["embedding"]
  dense = table.dequantize(jnp.float32)
  query = jax.random.normal(jax.random.key(1), (2, 3, 24))
  weights = jax.random.normal(jax.random.key(2), (2, 3, 256))
  want = query @ dense.T
  want_grad = jax.grad(lambda q: jnp.sum(weights * (q @ dense.T)))(query)
  for chunk in (64, 100):  # 4 chunks; not a divisor of V: one chunk
    got = jax.jit(lambda q: nf4_attend(q, table, jnp.float32, chunk_rows=chunk))(query)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda q: jnp.sum(weights * nf4_attend(q, table, chunk_rows=chunk)))(query)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
