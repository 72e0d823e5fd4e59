"""A jitted causal-LM train step that differentiates only the adapters."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax import sharding
from peft_jax.lora.config import LoRAConfig
from peft_jax.lora import saved as saved_lib
from peft_jax.lora.interceptor import intercept
from peft_jax.lora.tree import combine
from peft_jax.models.fused_ce import linear_cross_entropy
from peft_jax.models.llama import LlamaForCausalLM, causal_lm_loss
from peft_jax.quant import sharded_matmul


class TrainState(NamedTuple):
  """What changes during training: the trainable tree and its optimizer state."""

  step: jax.Array  # int32 scalar
  trainable: Any  # adapters (or the full params for full fine-tuning)
  opt_state: optax.OptState


def lm_loss(model: nn.Module, config: LoRAConfig | None, params: Mapping[str, Any],
            inputs: jax.Array, labels: jax.Array, dropout_key: jax.Array | None = None, *,
            quant_impl: str | None = None, quant_platform: str | None = None) -> jax.Array:
  """Next-token cross-entropy of ``model`` with its adapters active.

  For a ``LlamaForCausalLM`` whose head is a plain matrix (tied embedding, or
  an ``lm_head`` kernel without adapters or quantization) the head and the
  loss run fused and chunked (:func:`peft_jax.models.fused_ce.
  linear_cross_entropy`): the same number, without the batch's full logits.
  ``quant_impl``, ``quant_platform``: the ``nf4_matmul`` implementation for
  quantized kernels and the Pallas target (default: by backend).
  """
  rngs = {"dropout": dropout_key} if dropout_key is not None else None
  head = _plain_head(model, params, config)
  with intercept(config, quant_impl=quant_impl, quant_platform=quant_platform):
    if head is None:
      logits = model.apply({"params": params}, inputs, rngs=rngs)
    else:
      hidden = model.apply({"params": params}, inputs, rngs=rngs, method=_hidden_states)
  if head is None:
    return causal_lm_loss(logits, labels)
  weight, vocab_axis = head
  return linear_cross_entropy(hidden, weight, labels, vocab_axis=vocab_axis,
                              dtype=model.config.dtype)


def _hidden_states(module: LlamaForCausalLM, inputs: jax.Array) -> jax.Array:
  return module.model(inputs)


def _plain_head(model: nn.Module, params: Mapping[str, Any], config=None):
  """``(weight, vocab_axis)`` of a Llama head the fused loss can take, else None."""
  if type(model) is not LlamaForCausalLM or not isinstance(params, Mapping):  # pylint: disable=unidiomatic-typecheck
    return None
  try:
    if model.config.tie_word_embeddings:
      embed = params["model"]["embed_tokens"]
      if "lora_a" in embed and config is not None and config.ensure_weight_tying:
        return None  # the head adds the embedding's LoRA: the interceptor must run it
      saved = embed.get(saved_lib.SAVED, {})  # the head saved untied, or tied to the lookup
      head = saved.get(saved_lib.HEAD, saved.get(saved_lib.TIED))
      weight, vocab_axis = embed["embedding"] if head is None else head, 0
    else:
      head = params["lm_head"]
      if set(head) != {"kernel"}:
        return None  # adapters on the head: the interceptor must run it
      weight, vocab_axis = head["kernel"], 1
  except (KeyError, TypeError):
    return None
  if not isinstance(weight, jax.Array) or weight.ndim != 2:
    return None  # e.g. a quantized head
  return weight, vocab_axis


def make_train_step(
    model: nn.Module,
    config: LoRAConfig | None,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: Callable[..., jax.Array] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules | None = None,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    indivisible: str = "error",
    spread_adapters: bool = False,
) -> Callable[[TrainState, Any, jax.Array, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
  """Builds ``step(state, base, inputs, labels, key) -> (state, loss)``, jitted.

  Only ``state.trainable`` is differentiated; ``base`` (frozen, possibly
  quantized) is an argument rather than a closure so that it is not baked into
  the compiled program as a constant. The optimizer receives the trainable
  params as its ``params`` argument, so transformations that need them
  (weight decay, GaLore, AdaLoRA's allocator) work unchanged. The trainable
  state is donated: its buffers are reused for the new state.

  A step whose loss or gradients are not finite changes nothing: it returns
  the incoming state (``step`` not advanced) and a NaN loss, so the state in
  hand is always the last good one. Check the losses with
  :func:`check_finite_losses` (at logging points and before saving) to stop
  such a run.

  Args:
    model: the Flax model.
    config: the adapters' config (``None`` for full fine-tuning).
    optimizer: any optax transformation.
    loss_fn: ``loss_fn(model, config, params, inputs, labels, key)``; defaults
      to :func:`lm_loss`.
    mesh: run sharded on this mesh (see :mod:`peft_jax.sharding`). The
      state, base and batch are pinned to the shardings the rules give (the
      new state too, so nothing is resharded between steps); place them
      with :func:`shard_train_inputs` first.
    rules: ``((path_regex, spec), ...)`` for the base kernels (adapters and
      optimizer states follow them), e.g. :func:`sharding.llama_rules` or
      :func:`sharding.rules_from_params` of a placed base. Needed with ``mesh``.
      On a mesh the base's NF4 kernels are marked with their placement
      (:mod:`peft_jax.quant.sharded_matmul`), so ``nf4_matmul`` runs the
      Pallas kernels per shard where it would run them without a mesh
      (GPU/TPU) and XLA's path, which the partitioner splits, elsewhere.
    batch_axes: mesh axes the batch is split over (those in the mesh).
    indivisible: ``"error"`` or ``"replicate"`` (see :func:`sharding.param_specs`).
    spread_adapters: also split the adapters and their optimizer moments over
      the mesh axes their own specs leave unused (see
      :func:`sharding.param_specs`); pass the same to :func:`shard_train_inputs`.
  """
  loss_fn = loss_fn or lm_loss
  if (rules is None) != (mesh is None):
    raise ValueError("make_train_step takes mesh= and rules= together.")

  def step(state: TrainState, base, inputs, labels, key):
    if mesh is not None:
      state_specs, base_specs = sharding.train_specs(state, base, rules, mesh,
                                                     indivisible=indivisible,
                                                     spread_adapters=spread_adapters)
      state = sharding.constrain(state, state_specs, mesh)
      base = sharding.constrain(base, base_specs, mesh) if base else base
      base = sharded_matmul.place(base, base_specs, mesh, batch_axes) if base else base
      data = sharding.batch_spec(mesh, batch_axes)
      inputs, labels = sharding.constrain((inputs, labels), (data, data), mesh)
    new_state, loss = _step(state, base, inputs, labels, key)
    if mesh is not None:
      new_state = sharding.constrain(new_state, state_specs, mesh)
    return new_state, loss

  def _step(state: TrainState, base, inputs, labels, key):
    def objective(trainable):
      params = combine(base, trainable) if base else trainable
      return loss_fn(model, config, params, inputs, labels, key)

    loss, grads = jax.value_and_grad(objective)(state.trainable)

    def update(state: TrainState) -> TrainState:
      updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
      return TrainState(state.step + 1, optax.apply_updates(state.trainable, updates), opt_state)

    # The check comes before the update, which runs only on finite gradients: a
    # select between the new and the old state would keep the old moments alive
    # next to the new ones (XLA copies both AdamW moments of every leaf first).
    finite = jnp.isfinite(loss) & _all_finite(grads)
    kept = jax.lax.cond(finite, update, lambda state: state, state)
    return kept, jnp.where(finite, loss, jnp.nan)

  return jax.jit(step, donate_argnums=(0,))


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def shard_train_inputs(state: TrainState, base: Any, mesh: jax.sharding.Mesh,
                       rules: sharding.Rules, *, indivisible: str = "error",
                       spread_adapters: bool = False) -> tuple[TrainState, Any]:
  """Places a train state and its frozen base on ``mesh`` as ``make_train_step`` expects."""
  state_specs, base_specs = sharding.train_specs(state, base, rules, mesh,
                                                 indivisible=indivisible,
                                                 spread_adapters=spread_adapters)
  base = sharding.shard(base, base_specs, mesh) if base else base
  return sharding.shard(state, state_specs, mesh), base


def init_train_state(trainable: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0 with a fresh optimizer state for ``trainable``."""
  return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))


def make_eval_loss(model: nn.Module, config: LoRAConfig | None):
  """Jitted ``eval_loss(params, inputs, labels)`` without dropout."""
  return jax.jit(lambda params, inputs, labels: lm_loss(model, config, params, inputs, labels))


class NonFiniteLossError(FloatingPointError):
  """A training loss (or its gradients) became NaN or infinite."""

  def __init__(self, step: int, value: float):
    super().__init__(f"the loss became non-finite at step {step} (loss {value}; a NaN here "
                     "can also mean non-finite gradients). The step was not applied; lower "
                     "the learning rate, or check the data and the model's dtype.")
    self.step, self.value = step, value


def check_finite_losses(losses: Sequence[Any], first_step: int = 0) -> list[float]:
  """Fetches ``losses`` (device scalars of steps ``first_step, ...``) in one transfer.

  Call it at logging points and before every save rather than after each
  step, so the device is not synchronised per step.

  Returns:
    The losses as Python floats.

  Raises:
    NonFiniteLossError: naming the first step whose loss is not finite.
  """
  if not losses:
    return []
  values = np.asarray(jax.device_get(jnp.stack([jnp.asarray(x) for x in losses])), np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise NonFiniteLossError(first_step + int(bad[0]), float(values[bad[0]]))
  return values.tolist()
