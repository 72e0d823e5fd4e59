"""Adapters under JAX sharding, on 8 simulated CPU devices (a subprocess)."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from peft_jax import sharding
from peft_jax.quant import NF4, nf4_matmul, quantize_array, sharded_matmul

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import peft_jax as pj
    from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params, causal_lm_loss

    assert len(jax.devices()) == 8
    config = LlamaConfig.tiny()
    model = LlamaForCausalLM(config)
    lora = pj.LoRAConfig(rank=4, target_modules="all-linear")
    params = pj.lora_transform(init_params(config, jax.random.key(0)), lora, key=jax.random.key(1))
    params = jax.tree.map(lambda a: a + 0.01, params)
    adapters, base = pj.split(params)
    ids = jnp.arange(64).reshape(8, 8) % 256
    labels = jnp.roll(ids, -1, axis=1)

    def loss(adapters, base, ids, labels):
        with pj.intercept(lora):
            logits = model.apply({"params": pj.combine(base, adapters)}, ids)
        return causal_lm_loss(logits, labels)

    ref_loss, ref_grads = jax.value_and_grad(loss)(adapters, base, ids, labels)

    # Tensor-parallel kernels (output axis over "model"); each lora_b follows its kernel's
    # output axis and lora_a its input axis; the batch goes over "data".
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    def place(path, leaf):
        name = path[-1].key
        spec = P()
        if leaf.ndim == 2 and name in ("kernel", "lora_b") and leaf.shape[-1] % 2 == 0:
            spec = P(None, "model")
        return jax.device_put(leaf, NamedSharding(mesh, spec))
    adapters_s = jax.tree_util.tree_map_with_path(place, adapters)
    base_s = jax.tree_util.tree_map_with_path(place, base)
    ids_s = jax.device_put(ids, NamedSharding(mesh, P("data", None)))
    labels_s = jax.device_put(labels, NamedSharding(mesh, P("data", None)))
    value, grads = jax.jit(jax.value_and_grad(loss))(adapters_s, base_s, ids_s, labels_s)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    q_proj = adapters_s["model"]["layers_0"]["self_attn"]["q_proj"]
    assert not q_proj["lora_b"].sharding.is_fully_replicated  # the test really shards
    print("sharded OK")
""")


def test_lora_step_under_sharding_matches_single_device():
  result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sharded OK" in result.stdout


def test_spread_adapters_split_the_non_rank_axis_over_unused_mesh_axes():
  """No devices needed: specs from the mesh's {axis: size}."""
  params = {"q": {"kernel": jnp.zeros((8, 4)), "lora_a": jnp.zeros((8, 2)),
                  "lora_b": jnp.zeros((2, 4))},
            "o": {"kernel": jnp.zeros((6, 4)), "lora_a": jnp.zeros((6, 2)),
                  "lora_b": jnp.zeros((2, 4))}}
  rules = ((r".*kernel", P("fsdp", "tp")),)
  mesh = {"data": 2, "fsdp": 2, "tp": 2}
  plain = sharding.param_specs(params, rules, mesh)
  assert plain["q"]["lora_a"] == P("fsdp", None) and plain["q"]["lora_b"] == P(None, "tp")
  specs = sharding.param_specs(params, rules, mesh, spread_adapters=True)
  assert specs["q"]["lora_a"] == P(("fsdp", "data", "tp"), None)
  assert specs["q"]["lora_b"] == P(None, ("tp", "data"))  # 4 columns: not over fsdp too
  assert specs["q"]["kernel"] == P("fsdp", "tp")  # the base is as the rules say
  assert specs["o"]["lora_a"] == P("fsdp", None)  # 6 rows do not split 4 ways: as the kernel
  moments = sharding.opt_state_specs(optax.adam(1e-3).init(params), params, specs)
  assert moments[0].mu["q"]["lora_a"] == P(("fsdp", "data", "tp"), None)


def test_placed_nf4_weight_runs_the_kernels_per_shard():
  """One device: a placed weight runs XLA's path on CPU and the kernel per shard for "cuda"."""
  mesh = sharding.make_mesh({"fsdp": 1, "tp": 1}, jax.devices()[:1])
  w = quantize_array(jax.random.normal(jax.random.key(0), (128, 64)),
                     NF4(block_size=16, compute_dtype=jnp.float32))
  specs = sharding.param_specs({"w": w}, ((r"w", P("fsdp", "tp")),), mesh)
  placed = sharded_matmul.place({"w": w}, specs, mesh, batch_axes=("data",))["w"]
  assert placed.placement == sharded_matmul.Placement(mesh, ("fsdp",), ("tp",), ())
  assert repr(placed) == repr(w)
  x = jax.random.normal(jax.random.key(1), (4, 128))

  def value_and_grad(w, impl):
    return jax.value_and_grad(lambda x: jnp.sum(nf4_matmul(x, w, impl=impl) ** 2))(x)

  want = jax.jit(value_and_grad, static_argnums=1)(w, "xla")
  got = jax.jit(value_and_grad, static_argnums=1)(placed, None)  # CPU: XLA, as without a mesh
  for a, b in zip(got, want):  # (the kernels per shard: tests/sharding_worker.py, 8 devices)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  text = jax.jit(lambda x, w: nf4_matmul(x, w, platform="gpu")).trace(x, placed).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("@__gpu$xla.gpu.triton") == 1  # 8 devices: tests/sharding_worker.py
