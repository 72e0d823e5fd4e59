"""LISA gradients for the active layers only.

`lisa` trains `n_layers` decoder layers at a time; with a plain
`jax.grad(loss)(params)` the train step still builds a gradient (and an
update) for every layer. Here the loss is differentiated with respect to the
*active* tree only: the always-trainable leaves, stacked (scanned) leaves
gathered at the active layer indices (leading axis `n_layers`), and for
unrolled `layers_{i}` params the active layers in slots `layers_0 ..
layers_{n_layers-1}` -- the same compact tree `lisa`'s inner optimizer sees,
so `lisa.update` takes these gradients directly (given the full params) and
returns updates of the same shape::

  tx = po.lisa(optax.adamw(1e-4), n_layers=2)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, batch):
    idx = po.lisa_active_layers(state)            # traced: no recompile
    loss, grads, active, frozen = po.lisa_value_and_grad(loss_fn)(
        params, idx, batch)                       # grads: active-only tree
    updates, state = tx.update(grads, state, params)
    params = po.lisa_combine(frozen, optax.apply_updates(active, updates), idx)
    return params, state, loss

The active indices are data (gather with `jnp.take` / `lax.switch`, scatter
with `.at[idx].set` / `jnp.where`), so a layer switch does not recompile.

What this saves and what it cannot: the gradient tree handed to the
optimizer, the zero-filled full update tree and the full `apply_updates` are
`n_layers`-sized. The backward pass itself still runs through every layer
above the lowest active one (activation gradients are needed there), and
because the active set is traced, XLA cannot drop the weight-gradient
matmuls of frozen layers: in a scanned model the scan's transpose computes
every iteration's weight gradient into a stacked (L, ...) buffer that is
then gathered; in an unrolled model each layer's weight gradient feeds a
data-dependent select. Skipping those FLOPs needs either a static active set
(one compilation per set: `jax.grad` never emits weight gradients for
constants) or a `lax.cond` on "is this layer active" inside the model's layer
backward. benchmarks/bench_lisa.py measures both sides.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peft_jax.optim import _paths
# The module, not the `lisa` function that `peft_jax.optim` exports.
lisa_lib = importlib.import_module("peft_jax.optim.lisa")

__all__ = [
    "LisaFrozen",
    "lisa_combine",
    "lisa_split",
    "lisa_value_and_grad",
]


@flax.struct.dataclass
class LisaFrozen:
  """The full params a `lisa_split` came from, with their static layout.

  Attributes:
    params: the full params tree (frozen layers are read from here; it costs
      nothing extra, it is the same buffers).
    layout: static description of which leaves are layers (not a pytree node).
  """

  params: Any
  layout: Any = flax.struct.field(pytree_node=False)


def _indices(active_layers: Any) -> jax.Array:
  if isinstance(active_layers, (jax.Array, np.ndarray)) or hasattr(active_layers, "shape"):
    idx = jnp.asarray(active_layers)
  else:
    idx = lisa_lib.lisa_active_layers(active_layers)
  if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"active layers must be a 1-D integer array, got {idx.dtype}{idx.shape}.")
  return idx


def lisa_split(
    params: Any,
    active_layers: Any,
    *,
    num_layers: Optional[int] = None,
    always_trainable: _paths.Patterns = None,
    layer_pattern: str = _paths.DEFAULT_UNROLLED_LAYER_PATTERN,
    stacked_pattern: str = _paths.DEFAULT_STACKED_LAYER_PATTERN,
) -> tuple[Any, LisaFrozen]:
  """Splits `params` into the active tree and the rest.

  Args:
    params: the full params (nested dicts).
    active_layers: shape=(n_layers,) int array of layer indices (traced is
      fine), or a `lisa` state / optimizer state holding one
      (`lisa_active_layers`).
    num_layers, always_trainable, layer_pattern, stacked_pattern: as given to
      `lisa` (they must agree, or `lisa.update` rejects the gradients).

  Returns:
    `(active, frozen)`: `active` is the compact tree -- always-trainable
    leaves as they are, stacked leaves gathered to shape `(n_layers, ...)`,
    unrolled layers in slots `layers_0 .. layers_{n_layers-1}` (slot `s` holds
    layer `active_layers[s]`); non-layer leaves outside `always_trainable`
    are left out. `frozen` holds the full params for `lisa_combine`.
  """
  idx = _indices(active_layers)
  flat = traverse_util.flatten_dict(params)
  layout = lisa_lib._layout(flat, num_layers, always_trainable, layer_pattern, stacked_pattern)
  n_layers = idx.shape[0]
  if n_layers > layout.num_layers:
    raise ValueError(f"{n_layers} active layers exceed the {layout.num_layers} layers.")
  active = traverse_util.unflatten_dict(lisa_lib._compact_flat(layout, flat, idx, n_layers))
  return active, LisaFrozen(params=params, layout=layout)


def lisa_combine(frozen: LisaFrozen, active: Any, active_layers: Any) -> Any:
  """Writes `active` (a `lisa_split` tree) back into the full params.

  Differentiable with respect to `active`: the gradient of
  `loss(lisa_combine(frozen, a, idx))` at `a = active` is the full gradient
  gathered at the active layers. Stacked leaves scatter with `.at[idx].set`;
  unrolled layers select their slot with `jnp.where`; always-trainable
  leaves are taken from `active`; everything else from `frozen`.
  """
  idx = _indices(active_layers)
  base = traverse_util.flatten_dict(frozen.params)
  compact = traverse_util.flatten_dict(active)
  out = lisa_lib._scatter_flat(frozen.layout, compact, base, idx, idx.shape[0])
  return traverse_util.unflatten_dict(out)


@jax.custom_vjp
def _same_as(full: jax.Array, compact: jax.Array, idx: jax.Array) -> jax.Array:
  """`full`, whose gradient flows to `compact = full[idx]` (gathered)."""
  del compact, idx
  return full


def _same_as_fwd(full, compact, idx):
  del compact
  return full, idx


def _same_as_bwd(idx, ct):
  return None, jnp.take(ct, idx, axis=0), None


_same_as.defvjp(_same_as_fwd, _same_as_bwd)


def _combine_at_point(frozen: LisaFrozen, active: Any, idx: jax.Array) -> Any:
  """`lisa_combine` for `active` equal to `lisa_split(frozen.params, idx)[0]`.

  Same value and gradient, but stacked leaves are the original buffers
  (custom VJP: gather the cotangent) instead of a scattered copy.
  """
  layout = frozen.layout
  base = traverse_util.flatten_dict(frozen.params)
  compact = traverse_util.flatten_dict(active)
  out = lisa_lib._scatter_flat(layout, compact, base, idx, idx.shape[0])
  for key, leaf in zip(layout.keys, layout.leaves):
    if leaf.kind == "stacked" and getattr(base[key], "size", 0):
      out[key] = _same_as(base[key], compact[key], idx)
  return traverse_util.unflatten_dict(out)


def lisa_value_and_grad(
    fun: Callable[..., Any],
    has_aux: bool = False,
    **layout_kwargs: Any,
) -> Callable[..., tuple[Any, Any, Any, LisaFrozen]]:
  """`jax.value_and_grad` of `fun(params, ...)` with respect to the active tree.

  Args:
    fun: a loss written on the full params, `fun(params, *args, **kwargs)`.
    has_aux: as in `jax.value_and_grad`.
    **layout_kwargs: `num_layers`, `always_trainable`, `layer_pattern`,
      `stacked_pattern`, as given to `lisa`.

  Returns:
    `g(params, active_layers, *args, **kwargs) -> (value, grads, active,
    frozen)`: `grads` has the structure and shapes of `active` (the
    `lisa_split` tree) and is what `lisa(...).update(grads, state, params)`
    takes; apply the updates with
    `lisa_combine(frozen, optax.apply_updates(active, updates), idx)`.
    Stacked leaves enter `fun` as the original buffers (no scattered copy).
  """

  def wrapped(params, active_layers, *args, **kwargs):
    idx = _indices(active_layers)
    active, frozen = lisa_split(params, idx, **layout_kwargs)
    value, grads = jax.value_and_grad(
        lambda a: fun(_combine_at_point(frozen, a, idx), *args, **kwargs), has_aux=has_aux
    )(active)
    return value, grads, active, frozen

  return wrapped
