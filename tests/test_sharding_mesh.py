"""Sharded fine-tuning (peft_jax.sharding) on 8 simulated CPU devices, in one subprocess.

The subprocess (tests/sharding_worker.py) checks, for LoRA and QLoRA (with -m slow also
DoRA, GaLore and full fine-tuning), that a sharded run on a data=2,fsdp=2,tp=2 mesh
matches the single-device run over 3 steps and that every leaf has the promised
sharding; that NF4 shards hold whole blocks; the same for LoRA and QLoRA on the NNX
Gemma 3 through peft_jax.training_nnx; (slow) the compiled HLO's all-gathers;
restore of its checkpoint onto 4 devices; the Pallas NF4 kernels per shard
(shard_map, interpret mode) against the XLA product and in the QLoRA step, and
their GPU/TPU lowering; nnx.Optimizer + nnx.jit placed by training_nnx.shard_model /
constrain_model. This process restores the checkpoint onto one device.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding_worker as worker
from peft_jax import sharding, training
from peft_jax.checkpoint import orbax as ckpt
from peft_jax.cli import finetune, main

# Long (one 8-device subprocess runs every check (~2 min); tests/test_sharding.py stays in the default run): run with -m slow.
pytestmark = pytest.mark.slow

FAST_CHECKS = ("equivalence lora", "equivalence qlora", "promised specs", "nf4 blocks",
               "nnx lora", "nnx qlora", "spread adapters", "restore 8->4",
               "pallas shard_map", "pallas step", "nnx optimizer lora", "nnx optimizer qlora")
ALL_CHECKS = FAST_CHECKS + ("equivalence dora", "equivalence galore", "equivalence full",
                            "collectives")


def _run_worker(tmp_path_factory, suite):
  out = tmp_path_factory.mktemp(f"sharding_{suite}")
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                    " --xla_force_host_platform_device_count=8").strip())
  result = subprocess.run([sys.executable, worker.__file__, str(out), suite],
                          capture_output=True, text=True, timeout=3000, env=env)
  return out, result


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory):
  """LoRA and QLoRA (the default suite; every method runs with -m slow)."""
  return _run_worker(tmp_path_factory, "fast")


@pytest.fixture(scope="module")
def worker_run_all(tmp_path_factory):
  return _run_worker(tmp_path_factory, "all")


@pytest.mark.parametrize("check", FAST_CHECKS)
def test_sharded_check(worker_run, check):
  _, result = worker_run
  assert f"CHECK {check} OK" in result.stdout, (result.stdout[-2000:], result.stderr[-4000:])


@pytest.mark.slow
@pytest.mark.parametrize("check", ALL_CHECKS)
def test_sharded_check_every_method(worker_run_all, check):
  """LoRA, DoRA, QLoRA, GaLore, full fine-tuning and the compiled HLO's all-gathers."""
  _, result = worker_run_all
  assert f"CHECK {check} OK" in result.stdout, (result.stdout[-2000:], result.stderr[-4000:])


def test_restore_sharded_checkpoint_onto_one_device(worker_run):
  out, result = worker_run
  assert result.returncode == 0, result.stderr[-4000:]
  expected = json.loads((out / "result.json").read_text())
  _, model, ids, labels = worker.model_and_data()
  config, adapters, base, tx = worker.setup("lora", model, ids)
  with ckpt.AdapterCheckpointManager(expected["run_dir"], config) as manager:
    restored, _ = manager.restore(shardings=jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), adapters))
    opt_state = manager.restore_opt_state(tx.init(adapters))
  state = training.TrainState(jnp.asarray(worker.STEPS, jnp.int32), restored, opt_state)
  step = training.make_train_step(model, config, tx)
  _, loss = step(state, base, ids, labels, jax.random.key(2))
  np.testing.assert_allclose(float(loss), expected["next_loss"], rtol=1e-5)


def test_mesh_text_is_validated():
  assert sharding.parse_mesh("data=2,fsdp=2,tp=2") == {"data": 2, "fsdp": 2, "tp": 2}
  for bad in ("data=2,data=2", "data", "data=x", "2=data", "data=0"):
    with pytest.raises(ValueError):
      sharding.parse_mesh(bad)
  with pytest.raises(ValueError, match="needs 8 devices; jax.device_count"):
    sharding.make_mesh("data=2,fsdp=2,tp=2")
  mesh = sharding.make_mesh(f"fsdp={jax.device_count()}")
  assert sharding.batch_spec(mesh) == jax.sharding.PartitionSpec(("fsdp",))


def test_indivisible_axis_names_leaf_and_sizes():
  params = {"model": {"q_proj": {"kernel": jax.ShapeDtypeStruct((6, 8), jnp.float32)}}}
  rules = ((r".*kernel", jax.sharding.PartitionSpec("fsdp", "tp")),)
  with pytest.raises(ValueError, match=r"q_proj/kernel.*axis 0 of size 6.*'fsdp' of size 4"):
    sharding.param_specs(params, rules, {"fsdp": 4, "tp": 2})
  with pytest.warns(sharding.ShardingFallbackWarning, match="size 6"):
    specs = sharding.param_specs(params, rules, {"fsdp": 4, "tp": 2}, indivisible="replicate")
  assert specs["model"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(None, "tp")


def test_opt_state_specs_follow_params():
  """Adam moments take their parameter's spec; a rank-sized axis is replicated."""
  P = jax.sharding.PartitionSpec
  params = {"q": {"kernel": jnp.zeros((8, 4)), "lora_a": jnp.zeros((8, 2)),
                  "lora_b": jnp.zeros((2, 4))}}
  rules = ((r".*kernel", P("fsdp", "tp")),)
  specs = sharding.param_specs(params, rules, {"fsdp": 2, "tp": 2})
  assert specs["q"]["lora_a"] == P("fsdp", None) and specs["q"]["lora_b"] == P(None, "tp")
  opt = sharding.opt_state_specs(optax.adam(1e-3).init(params), params, specs)
  assert opt[0].mu["q"]["lora_b"] == P(None, "tp") and opt[0].count == P()
  lisa_like = {"inner": {"q": {"lora_b": jnp.zeros((1, 4))}}}  # 1 active row of 2
  assert sharding.opt_state_specs(lisa_like, params, specs)["inner"]["q"]["lora_b"] == P(None, "tp")


def test_cli_mesh_option_is_checked_against_the_device_count():
  args = main.build_parser().parse_args(["finetune", "--mesh", "data=2,fsdp=2,tp=2"])
  assert args.mesh == "data=2,fsdp=2,tp=2"
  with pytest.raises(ValueError, match="needs 8 devices"):
    finetune.make_cli_mesh(args.mesh, batch=4)
  mesh = finetune.make_cli_mesh(f"data={jax.device_count()}", batch=4)
  assert mesh.shape["data"] == jax.device_count()


def test_specs_of_an_nnx_state_follow_the_same_paths():
  """NNX state (Variables holding arrays) is read by the same paths as linen params."""
  from flax import nnx  # noqa: PLC0415 (NNX only here)
  P = jax.sharding.PartitionSpec
  layer = nnx.Linear(8, 4, use_bias=False, rngs=nnx.Rngs(0))
  layer.lora_a = nnx.Param(jnp.zeros((8, 2)))
  layer.lora_b = nnx.Param(jnp.zeros((2, 4)))
  state = nnx.state(layer, nnx.Param)
  specs = sharding.param_specs(state, ((r"kernel", P("fsdp", "tp")),), {"fsdp": 2, "tp": 2})
  got = {path[0].key: spec for (path, _), spec in zip(
      jax.tree_util.tree_flatten_with_path(state)[0],
      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))}
  assert got == {"kernel": P("fsdp", "tp"), "lora_a": P("fsdp", None), "lora_b": P(None, "tp")}


def test_lisa_and_adalora_states_follow_their_params():
  """LISA's compact rows and AdaLoRA's EMAs take their parameter's axes; no compile."""
  import peft_jax as pj  # noqa: PLC0415
  from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params  # noqa: PLC0415
  P = jax.sharding.PartitionSpec
  config = LlamaConfig.tiny(scan_layers=True)
  mesh_shape = {"fsdp": 2, "tp": 2}
  rules = sharding.llama_rules()
  params = init_params(config, jax.random.key(0))
  specs = sharding.param_specs(params, rules, mesh_shape)
  lisa_state = jax.eval_shape(pj.optim.lisa(optax.adam(1e-3), n_layers=1).init, params)
  lisa_specs = sharding.opt_state_specs(lisa_state, params, specs)
  mu = jax.tree_util.tree_flatten_with_path(lisa_state)[0]
  mu_specs = jax.tree.leaves(lisa_specs, is_leaf=lambda x: isinstance(x, P))
  found = [(x.shape, s) for (path, x), s in zip(mu, mu_specs)
           if "q_proj" in jax.tree_util.keystr(path) and ".mu" in jax.tree_util.keystr(path)]
  assert found == [((1, 64, 64), P(None, "fsdp", "tp"))], found  # 1 active row of 2

  ada = pj.AdaLoRAConfig(init_r=4, target_r=2, target_modules=("q_proj",), total_step=10)
  adapters, base = pj.split(pj.adalora_transform(
      init_params(LlamaConfig.tiny(), jax.random.key(0)), ada, key=jax.random.key(1)))
  ada_specs = sharding.param_specs(adapters, rules, mesh_shape, base=base)
  state = jax.eval_shape(pj.optim.adalora(optax.adam(1e-3), ada).init, adapters)
  state_specs = sharding.opt_state_specs(state, adapters, ada_specs)
  ema = state_specs.sensitivity_ema["model/layers_0/self_attn/q_proj"]
  assert ema["lora_a"] == P("fsdp", None) and ema["lora_b"] == P(None, "tp")
  assert ema["lora_e"] == P(None)
