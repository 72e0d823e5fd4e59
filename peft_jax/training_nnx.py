"""The train step of :mod:`peft_jax.training` for Flax NNX models, on one device or a mesh.

An NNX model trains functionally, as a linen one: its ``nnx.Param`` values
are read as the linen-shaped params dict (:mod:`peft_jax.nnx.state`: list
items as ``layers_3``), split into the trainable tree (adapters, or every
param for full fine-tuning) and the frozen base, and
:func:`peft_jax.training.make_train_step` differentiates the trainable tree;
inside the step the model is rebuilt from its graph definition and the
params (``nnx.merge``) and called. So linen and NNX models share the
``TrainState``, the sharding rules (:mod:`peft_jax.sharding`: adapters,
``NF4Array`` blocks and optimizer states follow the kernels' specs), the
optimizers, the checkpoints and the non-finite guard, and an NNX model gets
the shardings of its linen twin leaf for leaf.

Example::

  pj.nnx.apply_qlora(model, config, key=key)             # or lora_transform
  trainable, base = training_nnx.split_params(model)
  state = training.init_train_state(trainable, tx)
  state, base = training.shard_train_inputs(state, base, mesh, rules)
  step = training_nnx.make_train_step(model, tx, mesh=mesh, rules=rules)
  state, loss = step(state, base, ids, labels, key)
  training_nnx.update_model(model, state.trainable)       # back into the model

Users who keep ``nnx.Optimizer`` and ``nnx.jit`` get the same shardings from
:func:`shard_model` (places the model's and the optimizer's state, in place)
and :func:`constrain_model` (pins them inside the jitted step)::

  optimizer = nnx.Optimizer(model, tx, wrt=pj.nnx.Adapter)
  training_nnx.shard_model(model, mesh, rules, optimizer)

  @nnx.jit
  def train_step(model, optimizer, ids, labels):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, pj.nnx.Adapter))(
        model, ids, labels)
    optimizer.update(model, grads)
    training_nnx.constrain_model(model, mesh, rules, optimizer)
    return loss
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from peft_jax import sharding, targeting, training
from peft_jax.lora.interceptor import intercept
from peft_jax.lora.tree import split
from peft_jax.models.llama import causal_lm_loss
from peft_jax.nnx import state as nnx_state
from peft_jax.nnx.transform import model_config, sync

__all__ = ["constrain_model", "make_train_step", "next_token_loss", "shard_model",
           "split_params", "state_shardings", "update_model"]


def next_token_loss(model: nnx.Module, inputs: jax.Array, labels: jax.Array,
                    key: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy of ``model(inputs)`` (logits) against ``labels``."""
  del key
  return causal_lm_loss(model(inputs), labels)


def split_params(model: nnx.Module, *, full: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(trainable, base)``: the model's params as linen-shaped dicts.

  ``trainable`` holds the adapter leaves (:func:`peft_jax.split` with the
  model's config, so a frozen DoRA magnitude stays in the base), or with
  ``full=True`` every param (``base`` is then ``{}``). ``trainable`` is a
  copy, since the step donates its state (with ``full=True`` the params are
  held twice until the model is dropped); ``base`` holds the model's arrays.
  """
  params = nnx_state.params(model)
  if full:
    trainable, base = params, {}
  else:
    trainable, base = split(params, model_config(model))
  return jax.tree.map(jnp.copy, trainable), base


def update_model(model: nnx.Module, trainable: Mapping[str, Any]) -> nnx.Module:
  """Writes trained values (linen-shaped, e.g. ``state.trainable``) into ``model``, in place.

  Raises:
    ValueError: naming a leaf the model does not hold.
  """
  params = targeting.flatten(nnx_state.params(model))
  new = targeting.flatten(trainable)
  unknown = sorted(set(new) - set(params))
  if unknown:
    raise ValueError(f"The model holds no param at {unknown[:5]}; these values are not "
                     "from this model.")
  params.update(new)
  return sync(model, targeting.unflatten(params), model_config(model))


def make_train_step(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: Callable[..., jax.Array] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules | None = None,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    indivisible: str = "error",
    spread_adapters: bool = False,
) -> Callable[..., tuple[training.TrainState, jax.Array]]:
  """``step(state, base, inputs, labels, key) -> (state, loss)`` of an NNX model, jitted.

  The same step as :func:`peft_jax.training.make_train_step` (arguments
  there), with ``state.trainable`` and ``base`` from :func:`split_params`.
  The step keeps the model's graph definition and the values of its
  non-param variables (RNG streams, statistics), not its params: those come
  in as arguments. Non-param variables are not updated by the step; a
  ``dropout`` RNG stream is reseeded from ``key`` on every step.

  Args:
    model: the NNX model, adapted (``pj.nnx.lora_transform``,
      ``apply_qlora``, ...) or plain for full fine-tuning.
    optimizer: any optax transformation (it sees linen-shaped trees, so
      GaLore, LoRA+, LISA and AdaLoRA select leaves as on linen).
    loss_fn: ``loss_fn(model, inputs, labels, key)``, the model being the
      rebuilt NNX model; default :func:`next_token_loss`.
    mesh, rules, batch_axes, indivisible, spread_adapters: as for
      :func:`peft_jax.training.make_train_step`; rules match linen-shaped
      paths (``model/layers_0/self_attn/q_proj/kernel``). Under a mesh, NF4
      kernels run per shard as in the linen step.
  """
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  # Types and metadata only: the step must not keep the model's arrays alive.
  slots = [(path, nnx_state.linen_path(path), type(var), var.get_metadata())
           for path, var in nnx.to_flat_state(params_state)]
  rest_slots = [(path, type(var), var.get_metadata(), var.get_raw_value())
                for path, var in nnx.to_flat_state(rest)]
  del params_state, rest
  user_loss = loss_fn or next_token_loss

  def rebuild(params: Mapping[str, Any]) -> nnx.Module:
    flat = targeting.flatten(params)
    missing = [linen for _, linen, _, _ in slots if linen not in flat]
    extra = sorted(set(flat) - {linen for _, linen, _, _ in slots})
    if missing or extra:
      raise ValueError(f"The params do not fit the NNX model: missing {missing[:5]}, "
                       f"unexpected {extra[:5]}.")
    state = nnx.from_flat_state([(path, cls.from_metadata(flat[linen], meta))
                                 for path, linen, cls, meta in slots])
    others = nnx.from_flat_state([(path, cls.from_metadata(value, meta))
                                  for path, cls, meta, value in rest_slots])
    return nnx.merge(graphdef, state, others)

  def loss(_model, _config, params, inputs, labels, key):
    module = rebuild(params)
    if key is not None:
      nnx.reseed(module, dropout=key)
    with intercept(None):
      return user_loss(module, inputs, labels, key)

  return training.make_train_step(None, None, optimizer, loss_fn=loss, mesh=mesh, rules=rules,
                                  batch_axes=batch_axes, indivisible=indivisible,
                                  spread_adapters=spread_adapters)


def state_shardings(model: nnx.Module, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                    optimizer: nnx.Optimizer | None = None, *, indivisible: str = "error",
                    spread_adapters: bool = False) -> tuple[Any, Any]:
  """``(model_shardings, optimizer_shardings)``: ``NamedSharding`` trees shaped like
  ``nnx.state(model)`` and ``nnx.state(optimizer)`` (``None`` without an optimizer).

  The rules match NNX paths (``model/layers/0/self_attn/q_proj/kernel``);
  adapters, NF4 kernels and the optimizer's moments follow their kernels as
  in :func:`peft_jax.sharding.param_specs` and :func:`~peft_jax.sharding.
  opt_state_specs`; other variables (RNG state, step counters) follow the
  rules or are replicated.
  """
  model_state = nnx.state(model)
  specs = sharding.param_specs(model_state, rules, mesh, indivisible=indivisible,
                               spread_adapters=spread_adapters)
  opt_shardings = None
  if optimizer is not None:
    opt_specs = sharding.opt_state_specs(nnx.state(optimizer), model_state, specs)
    opt_shardings = sharding.to_shardings(opt_specs, mesh)
  return sharding.to_shardings(specs, mesh), opt_shardings


def _place(put, model, mesh, rules, optimizer, **options) -> None:
  model_shardings, opt_shardings = state_shardings(model, mesh, rules, optimizer, **options)
  nnx.update(model, put(nnx.state(model), model_shardings))
  if optimizer is not None:
    nnx.update(optimizer, put(nnx.state(optimizer), opt_shardings))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                optimizer: nnx.Optimizer | None = None, *, indivisible: str = "error",
                spread_adapters: bool = False) -> None:
  """Places ``model`` (and ``optimizer``'s state) on ``mesh`` as the rules say, in place.

  For an ``nnx.Optimizer`` + ``nnx.jit`` loop; call :func:`constrain_model`
  with the same arguments at the end of the jitted step so that the updated
  state keeps these shardings.
  """
  _place(jax.device_put, model, mesh, rules, optimizer, indivisible=indivisible,
         spread_adapters=spread_adapters)


def constrain_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                    optimizer: nnx.Optimizer | None = None, *, indivisible: str = "error",
                    spread_adapters: bool = False) -> None:
  """Inside ``nnx.jit``: pins the model's (and optimizer's) state to the rules' shardings.

  ``jax.lax.with_sharding_constraint`` of every variable, written back with
  ``nnx.update``; arguments as for :func:`shard_model`.
  """
  _place(jax.lax.with_sharding_constraint, model, mesh, rules, optimizer,
         indivisible=indivisible, spread_adapters=spread_adapters)
