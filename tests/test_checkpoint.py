"""Orbax adapter checkpoints: round trips, validation, versions, NF4 bases, crash safety."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import checkpoint
from peft_jax.models import LlamaConfig, init_params


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def llama_params():
  return init_params(LlamaConfig.tiny(num_hidden_layers=2), jax.random.key(0))


@pytest.fixture(scope="module")
def dora_adapters(llama_params):
  config = pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "embed_tokens"),
                         use_dora=True, use_rslora=True, rank_pattern={"v_proj": 2},
                         adapter_dtype="bfloat16")
  adapters, base = pj.split(pj.lora_transform(llama_params, config, key=jax.random.key(1)))
  adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # non-zero B
  return adapters, base, config


def test_round_trip_is_exact_and_saves_adapters_only(tmp_path, dora_adapters):
  adapters, base, config = dora_adapters
  path = checkpoint.save(tmp_path / "ckpt", pj.combine(base, adapters), config)
  restored, restored_config = checkpoint.restore(path, base_params=base)
  assert restored_config == config
  assert_trees_equal(restored, adapters)
  assert jax.tree.leaves(restored)[0].dtype == jnp.bfloat16
  wrapped, _ = checkpoint.restore(checkpoint.save(tmp_path / "wrapped", {"params": adapters},
                                                  config))
  assert set(wrapped) == {"params"}
  with pytest.raises(FileExistsError):
    checkpoint.save(tmp_path / "ckpt", adapters, config)
  checkpoint.save(tmp_path / "ckpt", adapters, config, overwrite=True)


def test_restore_lists_every_mismatch(tmp_path, dora_adapters):
  adapters, base, config = dora_adapters
  checkpoint.save(tmp_path / "ckpt", adapters, config)
  other = init_params(LlamaConfig.tiny(num_hidden_layers=1, hidden_size=32, intermediate_size=64),
                      jax.random.key(0))
  with pytest.raises(ValueError) as error:
    checkpoint.restore(tmp_path / "ckpt", base_params=other)
  message = str(error.value)
  assert "mismatches" in message
  assert "model/layers_1/self_attn/q_proj: no kernel or embedding" in message
  assert "model/layers_0/self_attn/q_proj: Adapters at" in message  # shape
  wrong_rank = checkpoint.adapter_mismatches(adapters, base, config.replace(rank_pattern={}))
  assert wrong_rank == [f"model/layers_{i}/self_attn/v_proj: rank 2 but the config gives 4"
                        for i in (0, 1)]
  assert checkpoint.adapter_mismatches(adapters, base, config) == []
  assert any("already holds" in m
             for m in checkpoint.adapter_mismatches(adapters, pj.combine(base, adapters)))


@pytest.mark.parametrize("item", ["config", "manifest"])
def test_newer_format_is_refused(tmp_path, dora_adapters, item):
  adapters, _, config = dora_adapters
  path = checkpoint.save(tmp_path / "ckpt", adapters, config)
  metadata = os.path.join(path, item, "metadata")
  content = json.loads(open(metadata).read())
  content["format_version"] = 99
  with open(metadata, "w") as f:
    json.dump(content, f)
  with pytest.raises(ValueError, match="newer"):
    checkpoint.restore(path)


def test_quantized_base_saves_and_restores_exactly(tmp_path, llama_params):
  nf4 = pytest.importorskip("peft_jax.quant.nf4")
  kernel = llama_params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
  stacked = jnp.stack([kernel, 2 * kernel])
  base = {"params": {
      "up": {"kernel": nf4.quantize_array(kernel, nf4.NF4(double_quant=True))},
      "fp4": {"kernel": nf4.quantize_array(kernel.astype(jnp.bfloat16), nf4.NF4(
          quant_type="fp4", block_size=128))},
      "scanned": {"kernel": nf4.quantize_array(stacked, stack_ndim=1)},
      "norm": {"weight": jnp.ones(4)}}}
  checkpoint.save_params(tmp_path / "base", base)
  restored = checkpoint.restore_params(tmp_path / "base")
  assert_trees_equal(restored, base)
  for name in ("up", "fp4", "scanned"):
    got, want = restored["params"][name]["kernel"], base["params"][name]["kernel"]
    assert type(got) is type(want) and got.shape == want.shape
    np.testing.assert_array_equal(got.dequantize(), want.dequantize())
  with pytest.raises(ValueError, match="holds 'params', not 'adapters'"):
    checkpoint.restore(tmp_path / "base")


def test_manager_keeps_last_n_every_k_steps_with_opt_state(tmp_path, dora_adapters):
  import optax
  adapters, base, config = dora_adapters
  adapters = jax.tree.map(lambda x: x.astype(jnp.float32), adapters)
  tx = optax.adam(1e-3)
  opt_state = tx.init(adapters)
  with checkpoint.AdapterCheckpointManager(tmp_path / "run", config, max_to_keep=2,
                                           save_interval_steps=3) as manager:
    saved = [manager.save(step, jax.tree.map(lambda x, s=step: x + s, adapters),
                          opt_state=opt_state) for step in range(8)]
    manager.wait_until_finished()
    assert saved == [s % 3 == 0 for s in range(8)]
    assert manager.all_steps() == [3, 6]
    restored, restored_config = manager.restore(base_params=base)
    assert restored_config == config
    assert_trees_equal(restored, jax.tree.map(lambda x: x + 6, adapters))
    assert_trees_equal(manager.restore_opt_state(opt_state), opt_state)
  # The plain API reads the manager's steps.
  assert checkpoint.finished_steps(tmp_path / "run") == [3, 6]
  assert_trees_equal(checkpoint.restore(tmp_path / "run", step=3)[0],
                     jax.tree.map(lambda x: x + 3, adapters))


_SAVER = textwrap.dedent("""
    import asyncio, sys
    import jax, jax.numpy as jnp
    import peft_jax as pj
    from peft_jax import checkpoint
    root, marker, pause = sys.argv[1], sys.argv[2], sys.argv[3] == "pause"
    if pause:  # hold the save after its arrays are written, before the final rename
      from orbax.checkpoint._src.path import atomicity
      original = atomicity.AtomicRenameTemporaryPath.finalize
      async def finalize(self):
        open(marker, "w").close()
        await asyncio.sleep(120)
        await original(self)
      atomicity.AtomicRenameTemporaryPath.finalize = finalize
    else:
      open(marker, "w").close()
    big = {"layer": {"lora_a": jnp.full((1024, 2048), 2.0), "lora_b": jnp.full((2048, 1024), 2.0)}}
    checkpoint.save(root, big, pj.LoRAConfig(rank=2048, target_modules=("layer",)), step=2)
""")


@pytest.mark.parametrize("when", ["pause", "early"])
def test_killed_save_leaves_previous_checkpoint_readable(tmp_path, when):
  config = pj.LoRAConfig(rank=1024, target_modules=("layer",))
  previous = {"layer": {"lora_a": jnp.ones((8, 1024)), "lora_b": jnp.ones((1024, 8))}}
  root = tmp_path / "run"
  checkpoint.save(root, previous, config, step=1)
  marker = tmp_path / "marker"
  process = subprocess.Popen([sys.executable, "-c", _SAVER, str(root), str(marker), when],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not marker.exists():
    assert process.poll() is None and time.monotonic() < deadline, "saver did not start"
    time.sleep(0.05)
  while not any(".orbax-checkpoint-tmp" in n for n in os.listdir(root)):
    assert process.poll() is None and time.monotonic() < deadline, "save did not start"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  steps = checkpoint.finished_steps(root)
  if when == "pause":  # killed mid-save: step 2 exists only as a temporary folder
    assert steps == [1]
    assert any(".orbax-checkpoint-tmp" in n for n in os.listdir(root))
  restored, restored_config = checkpoint.restore(root)
  if steps == [1]:
    assert restored_config == config
    assert_trees_equal(restored, previous)
  else:  # an early kill may land after the rename: then step 2 is whole
    assert steps == [1, 2] and restored_config.rank == 2048
    assert all(bool(jnp.all(x == 2.0)) for x in jax.tree.leaves(restored))
  # A new save after the crash works.
  checkpoint.save(root, previous, config, step=3)
  assert checkpoint.finished_steps(root)[-1] == 3
