"""Sharded training checks on 8 simulated CPU devices (run by tests/test_sharding_mesh.py).

Run as ``python tests/sharding_worker.py OUT_DIR [all|fast]``: one process for every check, so
that the test suite pays for one JAX start with 8 devices. Prints ``CHECK <name> OK``
per check and writes ``OUT_DIR/result.json`` for the single-device restore check
that the parent process runs (it imports this module's setup; importing sets no flag).
"""

import functools
import json
import math
import os
import re
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import peft_jax as pj
from peft_jax import sharding, training, training_nnx
from peft_jax.checkpoint import orbax as ckpt
from peft_jax.quant import sharded_matmul
from peft_jax.models import Gemma3Config, Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM, init_params

METHODS = ("lora", "dora", "qlora", "galore", "full")
STEPS = 3


def model_and_data():
  config = LlamaConfig.tiny(scan_layers=True)
  model = LlamaForCausalLM(config)
  ids = (jnp.arange(8 * 12).reshape(8, 12) * 7) % config.vocab_size
  return config, model, ids, jnp.roll(ids, -1, axis=1)


def setup(method, model, ids):
  """``(lora_config, trainable, base, optimizer)`` of a method on the tiny model."""
  params = init_params(model.config, jax.random.key(0))
  if method == "full":
    return None, params, {}, optax.adamw(1e-3)
  if method == "galore":
    return None, params, {}, pj.optim.galore(1e-3, rank=4, update_proj_gap=200)
  if method == "qlora":
    params = pj.quantize(params, pj.NF4(block_size=16, compute_dtype=jnp.float32))
  config = pj.LoRAConfig(rank=4, target_modules="all-linear", use_dora=method == "dora")
  params = pj.lora_transform(params, config, key=jax.random.key(1),
                             layouts=pj.kernel_layouts(model, ids[:1]))
  adapters, base = pj.split(params)
  # Non-zero lora_b, so every adapter leaf gets a gradient from step 1.
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.01 if p[-1].key == "lora_b" else x, adapters)
  return config, adapters, base, optax.adamw(1e-2)


def run(method, model, ids, labels, mesh=None, rules=None, steps=STEPS, spread=False,
        loss_fn=None):
  config, trainable, base, tx = setup(method, model, ids)
  state = training.init_train_state(trainable, tx)
  step = training.make_train_step(model, config, tx, mesh=mesh, rules=rules,
                                  spread_adapters=spread, loss_fn=loss_fn)
  if mesh is not None:
    state, base = training.shard_train_inputs(state, base, mesh, rules, spread_adapters=spread)
  losses, key = [], jax.random.key(2)
  for _ in range(steps):
    state, loss = step(state, base, ids, labels, key)
    losses.append(float(loss))
  return losses, state, base, step


def check_equivalence_and_placement(model, ids, labels, mesh, rules, out_dir, methods):
  states = {}
  for method in methods:
    ref_losses, ref_state, _, _ = run(method, model, ids, labels)
    losses, state, base, step = run(method, model, ids, labels, mesh, rules)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=method)
    # Adam turns a near-zero gradient's rounding into up to one step (lr 1e-2) of a
    # parameter; a wrong sharding would move many by several steps.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-3,
                                                         err_msg=method),
                 state.trainable, ref_state.trainable)
    assert_placed(state, base, rules, mesh, method)
    if method == "lora":
      save_and_step(setup(method, model, ids)[0], state, base, step, ids, labels, out_dir)
    states[method] = (state, base)
    print(f"CHECK equivalence {method} OK {losses}", flush=True)
  return states


def assert_placed(state, base, rules, mesh, what, spread=False):
  """Every leaf of the state and the base has the sharding the rules promise."""
  state_specs, base_specs = sharding.train_specs(state, base, rules, mesh, spread_adapters=spread)
  for tree, specs in ((state, state_specs), (base, base_specs)):
    arrays = jax.tree.leaves(tree)
    shardings = jax.tree.leaves(sharding.to_shardings(specs, mesh))
    assert len(arrays) == len(shardings), what
    for x, s in zip(arrays, shardings):
      assert x.sharding.is_equivalent_to(s, x.ndim), (what, x.shape, x.sharding, s)


def check_spread_adapters(model, ids, labels, mesh, rules):
  """LoRA with spread_adapters=True: the same run; adapters split over all 8 devices."""
  ref_losses, _, _, _ = run("lora", model, ids, labels)
  losses, state, base, _ = run("lora", model, ids, labels, mesh, rules, spread=True)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_placed(state, base, rules, mesh, "spread", spread=True)
  q = state.trainable["model"]["layers"]["self_attn"]["q_proj"]
  assert spec_is(q["lora_a"], None, ("fsdp", "data", "tp"), None), q["lora_a"].sharding
  assert spec_is(q["lora_b"], None, None, ("tp", "data", "fsdp")), q["lora_b"].sharding
  mu = state.opt_state[0].mu["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
  assert mu.sharding.is_equivalent_to(q["lora_a"].sharding, 3)
  print(f"CHECK spread adapters OK {losses}", flush=True)


def nnx_run(method, ids, labels, mesh=None, rules=None, steps=STEPS):
  """LoRA or QLoRA on the NNX Gemma 3 tiny through peft_jax.training_nnx."""
  model = Gemma3ForCausalLM(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
  if method == "qlora":
    pj.nnx.quantize(model, pj.NF4(block_size=16, compute_dtype=jnp.float32))
  pj.nnx.lora_transform(model, pj.LoRAConfig(rank=4, target_modules="all-linear"),
                        key=jax.random.key(1))
  trainable, base = training_nnx.split_params(model)
  trainable = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.01 if p[-1].key == "lora_b" else x, trainable)
  tx = optax.adamw(1e-2)
  state = training.init_train_state(trainable, tx)
  step = training_nnx.make_train_step(model, tx, mesh=mesh, rules=rules)
  if mesh is not None:
    state, base = training.shard_train_inputs(state, base, mesh, rules)
  losses = []
  for _ in range(steps):
    state, loss = step(state, base, ids, labels, jax.random.key(2))
    losses.append(float(loss))
  return losses, state, base


def check_nnx(ids, labels, mesh, rules):
  """The NNX Gemma 3: sharded and single-device runs agree; leaves sit where promised."""
  ids, labels = ids % 256, labels % 256
  for method in ("lora", "qlora"):
    ref_losses, ref_state, _ = nnx_run(method, ids, labels)
    losses, state, base = nnx_run(method, ids, labels, mesh, rules)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=method)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-3,
                                                         err_msg=method),
                 state.trainable, ref_state.trainable)
    assert_placed(state, base, rules, mesh, f"nnx {method}")
    layer = state.trainable["model"]["layers_0"]
    q, o = layer["self_attn"]["q_proj"], layer["mlp"]["down_proj"]
    assert spec_is(q["lora_a"], "fsdp", None) and spec_is(q["lora_b"], None, "tp")
    assert spec_is(o["lora_a"], "tp", None) and spec_is(o["lora_b"], None, "fsdp")
    mu = state.opt_state[0].mu["model"]["layers_0"]["self_attn"]["q_proj"]["lora_b"]
    assert mu.sharding.is_equivalent_to(q["lora_b"].sharding, 2)
    assert spec_is(base["model"]["embed_tokens"]["embedding"], "tp", "fsdp")
    kernel = base["model"]["layers_2"]["self_attn"]["q_proj"]["kernel"]
    if method == "qlora":
      assert isinstance(kernel, pj.NF4Array) and spec_is(kernel.codes, "fsdp", "tp")
      assert kernel.nested_absmax.sharding.is_fully_replicated
    else:
      assert spec_is(kernel, "fsdp", "tp")
    print(f"CHECK nnx {method} OK {losses}", flush=True)


def check_nnx_optimizer(ids, labels, mesh, rules):
  """nnx.Optimizer + nnx.jit with shard_model/constrain_model: one device's losses over 3
  steps; every variable of the model and the optimizer stays where the rules put it."""
  ids, labels = ids % 256, labels % 256

  def build(method):
    model = Gemma3ForCausalLM(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
    if method == "qlora":
      pj.nnx.quantize(model, pj.NF4(block_size=16, compute_dtype=jnp.float32))
    pj.nnx.lora_transform(model, pj.LoRAConfig(rank=4, target_modules="all-linear"),
                          key=jax.random.key(1))
    trainable, _ = training_nnx.split_params(model)
    training_nnx.update_model(model, jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if p[-1].key == "lora_b" else x, trainable))
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=pj.nnx.Adapter)

  def make_step(mesh=None):
    @nnx.jit
    def step(model, optimizer, ids, labels):
      loss_fn = lambda m: training_nnx.next_token_loss(m, ids, labels)
      loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, pj.nnx.Adapter))(model)
      optimizer.update(model, grads)
      if mesh is not None:
        training_nnx.constrain_model(model, mesh, rules, optimizer)
      return loss
    return step

  for method in ("lora", "qlora"):
    model, optimizer = build(method)
    step = make_step()
    ref_losses = [float(step(model, optimizer, ids, labels)) for _ in range(STEPS)]
    model, optimizer = build(method)
    training_nnx.shard_model(model, mesh, rules, optimizer)
    data = jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh))
    step = make_step(mesh)
    losses = [float(step(model, optimizer, *jax.device_put((ids, labels), data)))
              for _ in range(STEPS)]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=method)
    model_shardings, opt_shardings = training_nnx.state_shardings(model, mesh, rules, optimizer)
    for tree, shardings in ((nnx.state(model), model_shardings),
                            (nnx.state(optimizer), opt_shardings)):
      arrays, wanted = jax.tree.leaves(tree), jax.tree.leaves(shardings)
      assert len(arrays) == len(wanted), (method, len(arrays), len(wanted))
      for x, want in zip(arrays, wanted):
        assert x.sharding.is_equivalent_to(want, x.ndim), (method, x.shape, x.sharding, want)
    split = {}
    for what, tree in (("opt", nnx.state(optimizer)), ("model", nnx.state(model))):
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if keys[-2:] == ["q_proj", "lora_b"] and (what == "model" or "mu" in keys):
          split[f"{what} lora_b"] = spec_is(x, None, "tp")
        if keys[-2:] == ["q_proj", "lora_a"] and what == "model":
          split["lora_a"] = spec_is(x, "fsdp", None)
    assert len(split) == 3, (method, split)
    assert all(split.values()), (method, split)
    print(f"CHECK nnx optimizer {method} OK {losses}", flush=True)


def save_and_step(config, state, base, step, ids, labels, out_dir):
  """Saves the LoRA run after 3 steps, then records its 4th loss (a copy steps on)."""
  run_dir = os.path.join(out_dir, "run")
  with ckpt.AdapterCheckpointManager(run_dir, config, async_save=False) as manager:
    manager.save(STEPS, state.trainable, opt_state=state.opt_state)
  copy = jax.tree.map(jnp.copy, state)
  _, loss = step(copy, base, ids, labels, jax.random.key(2))
  with open(os.path.join(out_dir, "result.json"), "w") as f:
    json.dump({"next_loss": float(loss), "run_dir": run_dir}, f)


def spec_is(x, *entries) -> bool:
  """Whether ``x`` is sharded as ``P(*entries)`` (trailing ``None``s do not matter)."""
  want = jax.sharding.NamedSharding(x.sharding.mesh, P(*entries))
  return x.sharding.is_equivalent_to(want, x.ndim)


def check_promised_specs(states):
  lora, _ = states["lora"]
  q = lora.trainable["model"]["layers"]["self_attn"]["q_proj"]
  o = lora.trainable["model"]["layers"]["self_attn"]["o_proj"]
  assert spec_is(q["lora_a"], None, "fsdp", None), q["lora_a"].sharding
  assert spec_is(q["lora_b"], None, None, "tp"), q["lora_b"].sharding
  assert spec_is(o["lora_a"], None, "tp", None), o["lora_a"].sharding
  assert spec_is(o["lora_b"], None, None, "fsdp"), o["lora_b"].sharding
  mu = lora.opt_state[0].mu["model"]["layers"]["self_attn"]["q_proj"]
  assert mu["lora_b"].sharding.is_equivalent_to(q["lora_b"].sharding, 3)
  if "dora" not in states:  # the fast suite: LoRA and QLoRA only
    print("CHECK promised specs OK", flush=True)
    return
  dora, _ = states["dora"]
  mag = dora.trainable["model"]["layers"]["mlp"]["down_proj"]["lora_magnitude"]
  assert spec_is(mag, None, "fsdp"), mag.sharding
  galore, _ = states["galore"]
  gstate = galore.opt_state[0]
  kernel = galore.trainable["model"]["layers"]["mlp"]["up_proj"]["kernel"]  # (L, 64, 128)
  assert spec_is(kernel, None, "fsdp", "tp")
  in_p = gstate.in_projector["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  mu = gstate.mu["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert in_p.shape == (2, 64, 4) and spec_is(in_p, None, "fsdp", None)
  assert mu.shape == (2, 4, 128) and spec_is(mu, None, None, "tp"), mu.sharding
  down = gstate.out_projector["model"]["layers"]["mlp"]["down_proj"]["kernel"]  # (L, 64, 4)
  assert down.shape == (2, 64, 4) and spec_is(down, None, "fsdp", None), down.sharding
  print("CHECK promised specs OK", flush=True)


def check_nf4_blocks(states):
  _, base = states["qlora"]
  flat = jax.tree_util.tree_flatten_with_path(base, is_leaf=pj.quant.is_quantized)[0]
  checked = 0
  for path, w in flat:
    if not isinstance(w, pj.NF4Array):
      continue
    half = w.block_size // 2
    absmax_index = {s.device: s.index for s in w.absmax.addressable_shards}
    split_k = False
    for shard in w.codes.addressable_shards:
      layer, rows, cols = shard.index
      rows = range(*rows.indices(w.codes.shape[-2]))
      assert rows.start % half == 0 and len(rows) % half == 0, (path, rows)
      a_layer, a_rows, a_cols = absmax_index[shard.device]
      a_rows = range(*a_rows.indices(w.absmax.shape[-2]))
      assert (a_rows.start, len(a_rows)) == (rows.start // half, len(rows) // half), path
      assert a_cols == cols and a_layer == layer, path
      split_k |= len(rows) < w.codes.shape[-2]
    assert split_k, f"{path}: K was not split"
    assert w.nested_absmax.sharding.is_fully_replicated
    checked += 1
  assert checked == 7, checked

  # Indivisible: block 64 on K = 64 leaves one block for two fsdp devices.
  q = pj.quantize(init_params(LlamaConfig.tiny(), jax.random.key(0)), pj.NF4(block_size=64))
  rules = sharding.llama_rules()
  mesh_shape = {"data": 2, "fsdp": 2, "tp": 2}
  try:
    sharding.param_specs(q, rules, mesh_shape)
  except ValueError as e:
    assert "/kernel" in str(e) and "1 blocks of 64" in str(e) and "fsdp" in str(e), e
  else:
    raise AssertionError("no error for an indivisible NF4 kernel")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    specs = sharding.param_specs(q, rules, mesh_shape, indivisible="replicate")
  assert any(issubclass(w.category, sharding.ShardingFallbackWarning) for w in caught)
  assert specs["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].codes == P(None, "tp")
  print("CHECK nf4 blocks OK", flush=True)


def gathered_shapes(hlo: str) -> set[tuple[int, ...]]:
  """Result shapes of every all-gather in HLO text (tuple-shaped combined ones too)."""
  shapes = set()
  for line in hlo.splitlines():
    match = re.search(r"=(.*?) all-gather(-start)?\(", line)
    if match:
      for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1)):
        shapes.add(tuple(int(d) for d in dims.split(",") if d))
  return shapes


def kernel_shapes(base) -> set[tuple[int, ...]]:
  """Shapes of the base's kernels and embedding, stacked and per layer."""
  shapes = set()
  for path, x in jax.tree_util.tree_flatten_with_path(base)[0]:
    if path[-1].key in ("kernel", "embedding"):
      shapes |= {tuple(x.shape[i:]) for i in range(x.ndim - 1)}
  return shapes


def check_collectives(mesh, rules):
  """No all-gather rebuilds a tensor-parallel base kernel; FSDP gathers only fsdp shards.

  On a model whose full kernel shapes differ from every FSDP-gathered (still
  tensor-parallel) shape, from their stacked forms and from the 96-token batch's
  activations, so an all-gather's result shape tells a tensor-parallel gather of a
  weight from what FSDP needs.
  """
  config = LlamaConfig.tiny(scan_layers=True, hidden_size=48, intermediate_size=160,
                            vocab_size=200, num_key_value_heads=1)
  model = LlamaForCausalLM(config)
  ids = (jnp.arange(8 * 12).reshape(8, 12) * 7) % config.vocab_size
  labels = jnp.roll(ids, -1, axis=1)
  _, state, base, step = run("lora", model, ids, labels, mesh, rules, steps=0)
  hlo = step.lower(state, base, ids, labels, jax.random.key(2)).compile().as_text()
  gathered = gathered_shapes(hlo)
  assert gathered, "FSDP needs all-gathers; none found (is the HLO parsed?)"
  assert not gathered & kernel_shapes(base), gathered & kernel_shapes(base)
  # Data + tensor parallel only: no weight is gathered at all.
  tp_mesh = sharding.make_mesh({"data": 4, "tp": 2})
  tp_rules = sharding.llama_rules(mesh=tp_mesh)
  _, state, base, step = run("lora", model, ids, labels, tp_mesh, tp_rules, steps=0)
  hlo = step.lower(state, base, ids, labels, jax.random.key(2)).compile().as_text()
  assert not gathered_shapes(hlo) & kernel_shapes(base), gathered_shapes(hlo)
  print(f"CHECK collectives OK {len(gathered)} gathers", flush=True)


def float_gathers(hlo: str) -> set[tuple[int, ...]]:
  """Result shapes of the float all-gathers in HLO text."""
  shapes = set()
  for line in hlo.splitlines():
    match = re.search(r"=(.*?) all-gather(-start)?\(", line)
    if match:
      for dims in re.findall(r"(?:f32|bf16|f16)\[([\d,]*)\]", match.group(1)):
        shapes.add(tuple(int(d) for d in dims.split(",") if d))
  return shapes


def kernel_operands(text: str, marker: str) -> list[tuple[int, ...]]:
  """Shapes of the uint8 operands (the codes) of every kernel custom call in StableHLO text."""
  shapes = []
  for line in text.splitlines():
    if marker in line and "custom_call" in line:
      signature = line.rsplit(") -> ", 1)[0].rsplit(": (", 1)[-1]
      shapes += [tuple(int(d) for d in dims.split("x"))
                 for dims in re.findall(r"tensor<([\dx]+)xui8>", signature)]
  return shapes


MARKERS = {"gpu": ("cuda", "@__gpu$xla.gpu.triton"), "tpu": ("tpu", "@tpu_custom_call")}


def check_pallas_shard_map(mesh):
  """The Pallas kernels per shard (interpret mode) equal the unsharded XLA product.

  Column-parallel (N split, K gathered by FSDP), row-parallel (K split: a psum of
  partial products) and K and N both split, forward and gradient; the lowering for
  GPU and TPU runs one kernel per shard (the codes' per-device shape); the compiled
  CPU program gathers no dequantized weight.
  """
  k, n = 256, 128
  w = pj.quant.quantize_array(jax.random.normal(jax.random.key(0), (k, n)) * 0.1,
                              pj.NF4(block_size=16, compute_dtype=jnp.float32))
  x = jax.random.normal(jax.random.key(1), (3, 8, k))
  cotangent = jax.random.normal(jax.random.key(2), (3, 8, n))

  def product(x, w, impl=None, platform=None):
    y, vjp = jax.vjp(lambda x: pj.nf4_matmul(x, w, impl=impl, platform=platform), x)
    return y, vjp(cotangent)[0]

  want = jax.jit(product, static_argnums=(2, 3))(x, w, "xla")
  dequantized = {(k // a, n // b) for a in (1, 2, 4, 8) for b in (1, 2, 4, 8)}
  cases = ((P("fsdp", "tp"), ("data", "fsdp"), (k // 2, n // 2)),
           (P("tp", "fsdp"), ("data", "fsdp"), (k // 4, n)),
           (P("tp", "fsdp"), ("data",), (k // 4, n // 2)),
           (P(("fsdp", "tp"), None), ("data",), (k // 8, n)))
  for spec, batch, local_codes in cases:
    specs = sharding.param_specs({"w": w}, ((r"w", spec),), mesh)
    placed = sharded_matmul.place(sharding.shard({"w": w}, specs, mesh), specs, mesh,
                                  batch)["w"]
    got = jax.jit(product, static_argnums=(2, 3))(x, placed, "pallas_interpret")
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(spec))
    hlo = jax.jit(product, static_argnums=(2, 3)).lower(
        x, placed, "pallas_interpret").compile().as_text()
    assert not float_gathers(hlo) & dequantized, (spec, float_gathers(hlo))
    for platform, (lowering, marker) in MARKERS.items():
      text = jax.jit(product, static_argnums=(2, 3)).trace(x, placed, None, platform).lower(
          lowering_platforms=(lowering,)).as_text()
      assert kernel_operands(text, marker) == [local_codes] * 2, (
          spec, platform, kernel_operands(text, marker))
  print("CHECK pallas shard_map OK", flush=True)


def per_device_codes(w):
  """A placed NF4 matrix's codes per device inside the kernels (batch axes gathered)."""
  p = w.placement
  size = lambda axes: math.prod(p.mesh.shape[a] for a in axes if a not in p.batch_axes)
  rows, cols = w.codes.shape[-2:]
  return rows // size(p.k_axes), cols // size(p.n_axes)


def check_pallas_step(mesh, rules):
  """The sharded QLoRA step with the kernels per shard: the single-device run; lowers per shard."""
  _, model, ids, labels = model_and_data()
  ref_losses, ref_state, _, _ = run("qlora", model, ids, labels)
  interpret = functools.partial(training.lm_loss, quant_impl="pallas_interpret")
  losses, state, base, _ = run("qlora", model, ids, labels, mesh, rules, loss_fn=interpret)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-3),
               state.trainable, ref_state.trainable)
  # Lowered for GPU and TPU with the kernels chosen as without a mesh (impl=None).
  # Widths chosen so that no kernel's per-device codes have another kernel's global shape.
  config = LlamaConfig.tiny(hidden_size=128, intermediate_size=384, num_key_value_heads=1,
                            scan_layers=True)
  model = LlamaForCausalLM(config)
  ids = jnp.zeros((8, 16), jnp.int32)
  _, state, base, _ = run("qlora", model, ids, ids, mesh, rules, steps=0)
  placed = sharded_matmul.place(base, sharding.param_specs(base, rules, mesh), mesh)
  nf4 = [w for w in jax.tree.leaves(placed, is_leaf=pj.quant.is_quantized)
         if isinstance(w, pj.NF4Array)]
  global_codes = {w.codes.shape[-2:] for w in nf4}
  local_codes = {per_device_codes(w) for w in nf4}
  for platform, (lowering, marker) in MARKERS.items():
    loss_fn = functools.partial(training.lm_loss, quant_platform=platform)
    step = training.make_train_step(model, setup("qlora", model, ids)[0], optax.adamw(1e-2),
                                    mesh=mesh, rules=rules, loss_fn=loss_fn)
    text = step.trace(state, base, ids, ids, jax.random.key(2)).lower(
        lowering_platforms=(lowering,)).as_text()
    operands = kernel_operands(text, marker)
    assert not local_codes & global_codes, (local_codes, global_codes)
    assert len(operands) >= 4 and set(operands) <= local_codes, (platform, set(operands))
  print(f"CHECK pallas step OK {losses}", flush=True)


def check_restore(model, ids, labels, rules, out_dir):
  """The checkpoint of the 8-device run, restored onto 4 devices, gives the same next loss."""
  with open(os.path.join(out_dir, "result.json")) as f:
    expected = json.load(f)
  config = setup("lora", model, ids)[0]
  mesh4 = sharding.make_mesh({"fsdp": 2, "tp": 2}, jax.devices()[:4])
  _, fresh, base4, _ = run("lora", model, ids, labels, mesh4, rules, steps=0)
  specs, _ = sharding.train_specs(fresh, base4, rules, mesh4)
  with ckpt.AdapterCheckpointManager(expected["run_dir"], config) as manager:
    adapters, _ = manager.restore(shardings=sharding.to_shardings(specs.trainable, mesh4))
    opt_state = manager.restore_opt_state(fresh.opt_state)
  for x in jax.tree.leaves((adapters, opt_state)):
    assert x.sharding.device_set <= set(mesh4.devices.flat), x.sharding
  lora_b = adapters["model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
  assert spec_is(lora_b, None, None, "tp") and lora_b.sharding.mesh == mesh4
  restored = training.TrainState(jnp.asarray(STEPS, jnp.int32), adapters, opt_state)
  step4 = training.make_train_step(model, config, optax.adamw(1e-2), mesh=mesh4, rules=rules)
  _, loss = step4(restored, base4, ids, labels, jax.random.key(2))
  np.testing.assert_allclose(float(loss), expected["next_loss"], rtol=1e-5)
  print("CHECK restore 8->4 OK", flush=True)


def _timed(fn):
  def wrapper(*args):
    start = time.perf_counter()
    out = fn(*args)
    print(f"TIME {fn.__name__} {time.perf_counter() - start:.1f}s", flush=True)
    return out
  return wrapper


def main(out_dir, suite="all"):
  """``suite``: ``"all"`` (every method, the HLO check), ``"fast"`` (LoRA, QLoRA) or
  ``"pallas"`` (the Pallas kernels per shard and nnx.Optimizer only)."""
  assert len(jax.devices()) == 8
  methods = METHODS if suite == "all" else ("lora", "qlora")
  _, model, ids, labels = model_and_data()
  mesh = sharding.make_mesh("data=2,fsdp=2,tp=2")
  rules = sharding.llama_rules()
  if suite == "pallas":  # only the kernels per shard and nnx.Optimizer
    _timed(check_pallas_shard_map)(mesh)
    _timed(check_pallas_step)(mesh, rules)
    _timed(check_nnx_optimizer)(ids, labels, mesh, rules)
    return
  states = _timed(check_equivalence_and_placement)(model, ids, labels, mesh, rules, out_dir,
                                                   methods)
  _timed(check_promised_specs)(states)
  _timed(check_nf4_blocks)(states)
  _timed(check_nnx)(ids, labels, mesh, rules)
  _timed(check_nnx_optimizer)(ids, labels, mesh, rules)
  _timed(check_spread_adapters)(model, ids, labels, mesh, rules)
  if suite == "all":
    _timed(check_collectives)(mesh, rules)
  _timed(check_restore)(model, ids, labels, rules, out_dir)
  _timed(check_pallas_shard_map)(mesh)
  _timed(check_pallas_step)(mesh, rules)


if __name__ == "__main__":
  # Read when the backend starts (first use), so setting it here is in time.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  main(*sys.argv[1:])
