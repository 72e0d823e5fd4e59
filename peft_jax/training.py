"""A jitted causal-LM train step that differentiates only the adapters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from peft_jax.lora.config import LoRAConfig
from peft_jax.lora.interceptor import intercept
from peft_jax.lora.tree import combine
from peft_jax.models.fused_ce import linear_cross_entropy
from peft_jax.models.llama import LlamaForCausalLM, causal_lm_loss


class TrainState(NamedTuple):
  """What changes during training: the trainable tree and its optimizer state."""

  step: jax.Array  # int32 scalar
  trainable: Any  # adapters (or the full params for full fine-tuning)
  opt_state: optax.OptState


def lm_loss(model: nn.Module, config: LoRAConfig | None, params: Mapping[str, Any],
            inputs: jax.Array, labels: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
  """Next-token cross-entropy of ``model`` with its adapters active.

  For a ``LlamaForCausalLM`` whose head is a plain matrix (tied embedding, or
  an ``lm_head`` kernel without adapters or quantization) the head and the
  loss run fused and chunked (:func:`peft_jax.models.fused_ce.
  linear_cross_entropy`): the same number, without the batch's full logits.
  """
  rngs = {"dropout": dropout_key} if dropout_key is not None else None
  head = _plain_head(model, params)
  with intercept(config):
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


def _plain_head(model: nn.Module, params: Mapping[str, Any]):
  """``(weight, vocab_axis)`` of a Llama head the fused loss can take, else None."""
  if type(model) is not LlamaForCausalLM or not isinstance(params, Mapping):  # pylint: disable=unidiomatic-typecheck
    return None
  try:
    if model.config.tie_word_embeddings:
      weight, vocab_axis = params["model"]["embed_tokens"]["embedding"], 0
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
) -> Callable[[TrainState, Any, jax.Array, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
  """Builds ``step(state, base, inputs, labels, key) -> (state, loss)``, jitted.

  Only ``state.trainable`` is differentiated; ``base`` (frozen, possibly
  quantized) is an argument rather than a closure so that it is not baked into
  the compiled program as a constant. The optimizer receives the trainable
  params as its ``params`` argument, so transformations that need them
  (weight decay, GaLore, AdaLoRA's allocator) work unchanged. The trainable
  state is donated: its buffers are reused for the new state.

  Args:
    model: the Flax model.
    config: the adapters' config (``None`` for full fine-tuning).
    optimizer: any optax transformation.
    loss_fn: ``loss_fn(model, config, params, inputs, labels, key)``; defaults
      to :func:`lm_loss`.
  """
  loss_fn = loss_fn or lm_loss

  def step(state: TrainState, base, inputs, labels, key):
    def objective(trainable):
      params = combine(base, trainable) if base else trainable
      return loss_fn(model, config, params, inputs, labels, key)

    loss, grads = jax.value_and_grad(objective)(state.trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return TrainState(state.step + 1, trainable, opt_state), loss

  return jax.jit(step, donate_argnums=(0,))


def init_train_state(trainable: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0 with a fresh optimizer state for ``trainable``."""
  return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))


def make_eval_loss(model: nn.Module, config: LoRAConfig | None):
  """Jitted ``eval_loss(params, inputs, labels)`` without dropout."""
  return jax.jit(lambda params, inputs, labels: lm_loss(model, config, params, inputs, labels))
