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


_MESH_HEAD = """
import os, re
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import PartitionSpec as P
import peft_jax as pj
from peft_jax import sharding, training
from peft_jax.cli.gemma import NnxCausalLM
from peft_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from peft_jax.quant import embed

assert jax.device_count() == 8
V, D, CHUNK = 1024, 128, 128
embed.HEAD_CHUNK_ROWS = CHUNK  # the tied head reads the table in 8 chunks
config = Gemma3Config.tiny(vocab_size=V, hidden_size=D, num_hidden_layers=1,
                           layer_types=("full_attention",))
module = NnxCausalLM(config)
params = pj.nnx.params(Gemma3ForCausalLM(config, rngs=nnx.Rngs(0)))
lora = pj.QLoRAConfig(rank=4, target_modules="all-linear", compute_dtype="float32")
params = pj.quantize(params, lora.quant_spec(), target_modules=lora.quantize_modules,
                     include_embeddings=True)
trainable, base = pj.split(pj.lora_transform(params, lora, key=jax.random.key(1),
                                             layouts=module.layouts()))
trainable = jax.tree.map(lambda a: a + 0.01, trainable)  # B != 0: every adapter has a gradient
tx = optax.sgd(1.0)  # the update is minus the gradient
ids = (jnp.arange(64).reshape(4, 16) * 37) % V
labels = jnp.roll(ids, -1, 1)

start = jax.device_get(trainable)
fresh = lambda: training.init_train_state(jax.tree.map(jnp.copy, trainable), tx)  # donated
one = training.make_train_step(module, lora, tx)
state1, loss1 = one(fresh(), base, ids, labels, jax.random.key(0))

mesh = sharding.make_mesh("data=2,fsdp=2,tp=2")
rules = sharding.llama_rules(mesh=mesh)
step = training.make_train_step(module, lora, tx, mesh=mesh, rules=rules)
state, placed = training.shard_train_inputs(fresh(), base, mesh, rules)
table = placed["model"]["embed_tokens"]["embedding"]
assert isinstance(table, pj.NF4Array) and table.kernel_shape == (V, D)
for name, shape in (("codes", (V // 2, D)), ("absmax", (V // 64, D))):
  leaf = getattr(table, name)  # vocabulary over tp, features over fsdp, whole blocks
  assert leaf.sharding.spec == P("tp", "fsdp"), (name, leaf.sharding.spec)
  assert leaf.addressable_shards[0].data.shape == (shape[0] // 2, shape[1] // 2), name
assert table.nested_absmax.sharding.is_fully_replicated
compiled = step.lower(state, placed, ids, labels, jax.random.key(0)).compile()
hlo = compiled.as_text()
shapes = {(t, int(a), int(b)) for t, a, b in re.findall(r"\\b(f32|bf16|u8)\\[(\\d+),(\\d+)\\]", hlo)}
assert ("u8", V // 4, D // 2) in shapes  # each device's own codes
for dtype, a, b in shapes:  # no float rows beyond one chunk; the codes are never gathered
  assert dtype == "u8" or not (a in (V, V // 2, V // 4) and b in (D, D // 2)), (dtype, a, b)
  assert dtype != "u8" or (a, b) not in ((V // 2, D), (V // 2, D // 2), (V // 4, D)), (a, b)
state, loss = compiled(state, placed, ids, labels, jax.random.key(0))
np.testing.assert_allclose(loss, loss1, rtol=1e-5)
for got, want, start in zip(jax.tree.leaves(jax.device_get(state.trainable)),
                            jax.tree.leaves(state1.trainable), jax.tree.leaves(start)):
  np.testing.assert_allclose(start - got, start - want, rtol=1e-4, atol=1e-7)  # the gradients
print("mesh head OK", float(loss), len(jax.tree.leaves(trainable)))
"""


def test_tied_nf4_head_on_a_mesh_matches_one_device():
  """``nf4_attend`` under ``make_train_step(mesh=...)`` on 8 simulated devices (a subprocess):
  the NF4 table sharded on whole blocks as the rules say, never gathered or made float
  beyond one chunk, and the loss and gradients of the single-device step."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", _MESH_HEAD], capture_output=True, text=True,
                          timeout=600, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh head OK" in result.stdout
