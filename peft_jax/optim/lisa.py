"""LISA: layerwise importance sampling of decoder layers.

Every `interval_steps` steps, `n_layers` decoder layers are drawn uniformly
without replacement; only they and the always-trainable parts (embeddings,
final norm, head) are updated (Pan et al. 2024; OptimalScale/LMFlow
`DynamicLayerActivationCallback`).

The inner optimizer only ever sees a *compact* tree: the always-trainable
leaves, stacked (scanned) leaves gathered to the `n_layers` active rows, and
for unrolled layers (`layers_{i}`) the active layers stored in slots named
`layers_0 .. layers_{n_layers-1}`. Its state therefore costs `n_layers`
layers, not all of them, and the active set changes by data (gather and
scatter by index), so nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from optax._src import base
from optax._src import numerics

from peft_jax import validation
from peft_jax.optim import _paths

__all__ = [
    "LisaState",
    "lisa",
    "lisa_active_layers",
]

StateMode = Literal["reset", "keep"]


class LisaState(NamedTuple):
  """State of `lisa`.

  Attributes:
    count: shape=(), dtype=int32. Updates taken so far.
    key: a PRNG key, fixed; interval `k`'s layers are drawn with
      `fold_in(key, k)`.
    active_layers: shape=(n_layers,), dtype=int32, sorted. The layers the
      *next* update trains (so a train step can read them before it computes
      gradients).
    inner_state: the inner optimizer's state. With `state_mode="reset"` it
      covers the compact tree (active layers only, re-initialised at each
      switch: the first update of an interval starts from `inner.init`, so
      the state stored right after a switch still holds the last interval's
      moments, unused); with `"keep"` the whole trainable tree (frozen
      layers' state kept, stale, as LMFlow does).
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  key: jax.Array  # PRNG key
  active_layers: jax.Array  # shape=(n_layers,), dtype=jnp.int32
  inner_state: base.OptState


@dataclasses.dataclass(frozen=True)
class _Leaf:
  kind: str  # "always", "frozen", "stacked" or "unrolled"
  layer: int = -1  # unrolled: the layer index
  slot_key: tuple = ()  # unrolled: compact key with the index replaced by "{}"


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static description of a params tree, from paths and shapes."""

  keys: tuple  # flat keys of the params tree, in order
  leaves: tuple  # _Leaf per key
  num_layers: int
  # unrolled: slot_key -> keys of layers 0..L-1
  unrolled: tuple  # ((slot_key, (key_layer_0, ..., key_layer_L-1)), ...)


def _slot_key(key: tuple, match: "re.Match[str]") -> tuple:
  """`key` with the layer index (regex group 1) replaced by `{}`."""
  start, end = match.span(1)
  out, offset = [], 0
  for part in key:
    part = str(part)
    lo, hi = offset, offset + len(part)
    if lo <= start and end <= hi:
      part = part[: start - lo] + "{}" + part[end - lo:]
    out.append(part)
    offset = hi + 1  # the "/" separator
  return tuple(out)


def _layout(
    flat: dict,
    num_layers: Optional[int],
    always_trainable: _paths.Patterns,
    layer_pattern: str,
    stacked_pattern: str,
) -> _Layout:
  paths = ["/".join(map(str, k)) for k in flat]
  always = _paths.compile_patterns(always_trainable)
  _paths.check_all_match(always, paths, "LISA always_trainable")
  unrolled_re = re.compile(layer_pattern)
  stacked_re = re.compile(stacked_pattern)
  leaves, sizes = [], set()
  groups: dict[tuple, dict[int, tuple]] = {}
  for key, path in zip(flat, paths):
    leaf = flat[key]
    m = unrolled_re.fullmatch(path)
    if always and _paths.matches_any(path, always):
      leaves.append(_Leaf("always"))
    elif stacked_re.fullmatch(path):
      if not leaf.shape:
        raise ValueError(f"Stacked layer leaf {path!r} has no leading layer axis.")
      sizes.add(leaf.shape[0])
      leaves.append(_Leaf("stacked"))
    elif m:
      layer = int(m.group(1))
      slot = _slot_key(key, m)
      groups.setdefault(slot, {})[layer] = key
      leaves.append(_Leaf("unrolled", layer, slot))
    else:
      leaves.append(_Leaf("frozen" if always else "always"))
  layer_ids = {leaf.layer for leaf in leaves if leaf.kind == "unrolled"}
  if layer_ids:
    sizes.add(max(layer_ids) + 1)
  if num_layers is not None:
    sizes.add(num_layers)
  if len(sizes) != 1:
    raise ValueError(
        "LISA found no decoder layers (paths matching layer_pattern "
        f"{layer_pattern!r} or stacked_pattern {stacked_pattern!r})"
        if not sizes
        else f"LISA layer counts disagree: {sorted(sizes)} (num_layers, unrolled "
        "indices and stacked leading axes must agree)."
    )
  (n_total,) = sizes
  unrolled = []
  for slot, by_layer in groups.items():
    if sorted(by_layer) != list(range(n_total)):
      raise ValueError(
          f"Unrolled leaf {'/'.join(slot)!r} is missing in layers "
          f"{sorted(set(range(n_total)) - set(by_layer))}: LISA needs layers of "
          "identical structure."
      )
    keys = tuple(by_layer[i] for i in range(n_total))
    shapes = {(tuple(flat[k].shape), flat[k].dtype) for k in keys}
    if len(shapes) != 1:
      raise ValueError(f"Leaf {'/'.join(slot)!r} differs in shape across layers: {shapes}.")
    unrolled.append((slot, keys))
  return _Layout(tuple(flat), tuple(leaves), n_total, tuple(unrolled))


def _slot(slot_key: tuple, s: int) -> tuple:
  return tuple(part.replace("{}", str(s)) for part in slot_key)


def _compact_flat(layout: _Layout, flat: dict, active: jax.Array, n_layers: int) -> dict:
  """Gathers the active layers' leaves into the compact flat dict."""
  out = {}
  for key, leaf in zip(layout.keys, layout.leaves):
    if leaf.kind == "always":
      out[key] = flat[key]
    elif leaf.kind == "stacked":
      out[key] = _gather_stacked(flat[key], active, layout.num_layers)
  for slot, keys in layout.unrolled:
    layer_leaves = [flat[k] for k in keys]
    for s in range(n_layers):
      out[_slot(slot, s)] = _gather_unrolled(layer_leaves, active[s])
  return out


def _gather_stacked(x: Any, active: jax.Array, num_layers: int) -> Any:
  if isinstance(x, optax.MaskedNode) or getattr(x, "size", 1) == 0:
    return x
  if x.ndim == 0 or x.shape[0] != num_layers:
    raise ValueError(
        f"LISA expected a leading layer axis of {num_layers} in an optimizer "
        f"state leaf of shape {x.shape}."
    )
  return jnp.take(x, active, axis=0)


def _gather_unrolled(layer_leaves: list, index: jax.Array) -> Any:
  first = layer_leaves[0]
  if isinstance(first, optax.MaskedNode) or getattr(first, "size", 1) == 0:
    return first
  branches = [lambda i=i: layer_leaves[i] for i in range(len(layer_leaves))]
  return jax.lax.switch(index, branches)


def _scatter_flat(
    layout: _Layout, compact: dict, base_flat: dict, active: jax.Array, n_layers: int
) -> dict:
  """Writes compact leaves back at the active layers of `base_flat`.

  `base_flat` holds what inactive positions keep: zeros for updates, the
  old state for a kept optimizer state.
  """
  out = {}
  for key, leaf in zip(layout.keys, layout.leaves):
    old = base_flat[key]
    if leaf.kind == "always":
      out[key] = compact[key]
    elif leaf.kind == "stacked":
      new = compact[key]
      out[key] = new if getattr(new, "size", 1) == 0 or isinstance(new, optax.MaskedNode) \
          else old.at[active].set(new.astype(old.dtype))
    elif leaf.kind == "frozen":
      out[key] = old
    else:
      new = old
      if not (isinstance(old, optax.MaskedNode) or getattr(old, "size", 1) == 0):
        for s in range(n_layers):
          new = jnp.where(active[s] == leaf.layer, compact[_slot(leaf.slot_key, s)], new)
      out[key] = new
  return out


def _compact_shapes(layout: _Layout, flat_params: dict, n_layers: int) -> dict:
  """Flat key -> shape of the compact tree of `flat_params`."""
  out = {}
  for key, leaf in zip(layout.keys, layout.leaves):
    shape = tuple(flat_params[key].shape)
    if leaf.kind == "always":
      out[key] = shape
    elif leaf.kind == "stacked":
      out[key] = (n_layers,) + shape[1:]
  for slot, keys in layout.unrolled:
    for s in range(n_layers):
      out[_slot(slot, s)] = tuple(flat_params[keys[0]].shape)
  return out


def _is_compact(layout: _Layout, flat_updates: dict, flat_params: dict, n_layers: int) -> bool:
  """Whether `flat_updates` is the compact (active-only) tree, else the full one.

  Raises:
    ValueError: the updates are neither (e.g. `lisa_split` was called with
      other `always_trainable` or layer patterns than `lisa`).
  """
  shape = lambda x: tuple(getattr(x, "shape", ()))
  got = {k: shape(v) for k, v in flat_updates.items()}
  full = {k: shape(v) for k, v in flat_params.items()}
  if got == full:
    return False
  compact = _compact_shapes(layout, flat_params, n_layers)
  if got == compact:
    return True
  raise ValueError(
      "LISA updates match neither the params nor the active-only tree of "
      f"`lisa_split` for n_layers={n_layers} (same always_trainable and layer "
      f"patterns as `lisa`?). Unexpected keys: {sorted(set(got) - set(compact))[:5]}, "
      f"missing: {sorted(set(compact) - set(got))[:5]}, shape mismatches: "
      f"{[k for k in set(got) & set(compact) if got[k] != compact[k]][:5]}."
  )


def _is_param_tree(treedef: Any):
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return lambda x: jax.tree.structure(x, is_leaf=is_masked) == treedef


def _map_param_trees(fn, state: Any, treedef: Any) -> Any:
  """Applies `fn` to every subtree of `state` shaped like `treedef`."""
  is_param_tree = _is_param_tree(treedef)
  leaves, outer = jax.tree.flatten(state, is_leaf=is_param_tree)
  return outer.unflatten([fn(x) if is_param_tree(x) else x for x in leaves])


def _zip_param_trees(fn, old: Any, old_def: Any, new: Any, new_def: Any) -> Any:
  """`fn(old_sub, new_sub)` on matching param-shaped subtrees; else `new`.

  `old` holds subtrees shaped like `old_def` where `new` holds subtrees
  shaped like `new_def`; the rest of the two states agree in structure.
  """
  is_old = _is_param_tree(old_def)
  old_leaves, outer = jax.tree.flatten(old, is_leaf=is_old)
  new_leaves = jax.tree.flatten(new, is_leaf=_is_param_tree(new_def))[0]
  if len(old_leaves) != len(new_leaves):
    raise ValueError("LISA could not match the inner state's parameter subtrees.")
  return outer.unflatten(
      [fn(o, n) if is_old(o) else n for o, n in zip(old_leaves, new_leaves)]
  )


def _sample(key: jax.Array, interval: jax.Array, num_layers: int, n_layers: int) -> jax.Array:
  chosen = jax.random.choice(
      jax.random.fold_in(key, interval), num_layers, (n_layers,), replace=False
  )
  return jnp.sort(chosen).astype(jnp.int32)


def lisa(
    inner: base.GradientTransformation,
    n_layers: int = 2,
    interval_steps: int = 20,
    *,
    key: Union[jax.Array, int] = 0,
    num_layers: Optional[int] = None,
    always_trainable: _paths.Patterns = None,
    layer_pattern: str = _paths.DEFAULT_UNROLLED_LAYER_PATTERN,
    stacked_pattern: str = _paths.DEFAULT_STACKED_LAYER_PATTERN,
    state_mode: StateMode = "reset",
) -> base.GradientTransformationExtraArgs:
  r"""Trains `n_layers` randomly drawn decoder layers at a time with `inner`.

  At steps :math:`t = kK` (`K = interval_steps`, including 0) the active set
  :math:`S_k` of `n_layers` of the :math:`L` decoder layers is drawn
  uniformly without replacement from `fold_in(key, k)`; for
  :math:`kK \le t < (k+1)K`

  .. math::

    u_t[\ell] = \mathrm{inner}(g_t)[\ell] \text{ for } \ell \in S_k
    \cup \mathcal{A}, \qquad u_t[\ell] = 0 \text{ otherwise},

  where :math:`\mathcal{A}` is the always-trainable set. A parameter's layer
  comes from its path (`layers_{i}`, `layer_pattern`) or, under a scanned
  `layers` scope (`stacked_pattern`), from its leading axis.

  `state_mode` chooses between the reference's two behaviours for the inner
  state of layers that go inactive: "reset" (the paper's runs, which restart
  each interval from a checkpoint) re-initialises the inner state at each
  switch and stores it for the active layers only; "keep" (LMFlow) keeps
  every layer's state and resumes it, stale, when a layer comes back (the
  inner step count is global here, while torch counts per parameter).

  Args:
    inner: the optimizer for the trainable parameters (e.g. `optax.adamw`).
    n_layers: layers active at a time (LMFlow `lisa_activated_layers`).
    interval_steps: steps between switches (`lisa_interval_steps`).
    key: PRNG key or int seed of the layer draws.
    num_layers: number of decoder layers; inferred from the paths and the
      stacked leading axis when omitted (they must agree).
    always_trainable: pattern(s) of parameters updated at every step. Default:
      every parameter outside the decoder layers (embeddings, final norm,
      head), as in LMFlow. When given, only matching parameters are always
      trained and other non-layer parameters stay frozen; a pattern matching
      nothing raises.
    layer_pattern: `re.fullmatch` pattern of unrolled layer paths whose group
      1 is the layer index.
    stacked_pattern: pattern of stacked-layer paths (leading axis = layer).
    state_mode: "reset" or "keep".

  Returns:
    An `optax.GradientTransformationExtraArgs`; extra arguments go to `inner`.
    Parameters must be nested dicts. `update` takes either gradients for the
    whole params tree (and returns full updates, zero on frozen layers) or,
    given the full `params`, the active-only tree of
    `peft_jax.optim.lisa_split` (and returns updates of that shape; see
    `peft_jax.optim.lisa_grad`), which skips full-size gradient and update
    trees.

  Raises:
    ValueError: no layers found, layer counts disagree, layers differ in
      structure, or `n_layers` exceeds the layer count.

  References:
    Pan et al., `LISA: Layerwise Importance Sampling for Memory-Efficient
    Large Language Model Fine-Tuning <https://arxiv.org/abs/2403.17919>`_,
    NeurIPS 2024.
  """
  if state_mode not in ("reset", "keep"):
    raise ValueError(f"state_mode must be 'reset' or 'keep', got {state_mode!r}.")
  validation.integer(n_layers, "LISA n_layers")
  validation.integer(interval_steps, "LISA interval_steps")
  if num_layers is not None:
    validation.integer(num_layers, "LISA num_layers")
  inner = optax.with_extra_args_support(inner)

  def layout_of(flat):
    layout = _layout(flat, num_layers, always_trainable, layer_pattern, stacked_pattern)
    if n_layers > layout.num_layers:
      raise ValueError(f"n_layers={n_layers} exceeds the {layout.num_layers} layers.")
    return layout

  def trainable_flat(layout, flat):
    return {k: flat[k] for k, leaf in zip(layout.keys, layout.leaves) if leaf.kind != "frozen"}

  def compact_tree(layout, flat, active):
    return traverse_util.unflatten_dict(_compact_flat(layout, flat, active, n_layers))

  def init_fn(params):
    flat = traverse_util.flatten_dict(params)
    layout = layout_of(flat)
    prng = jax.random.key(key) if isinstance(key, int) else key
    active = _sample(prng, jnp.zeros([], jnp.int32), layout.num_layers, n_layers)
    if state_mode == "reset":
      inner_state = inner.init(compact_tree(layout, flat, active))
    else:
      inner_state = inner.init(traverse_util.unflatten_dict(trainable_flat(layout, flat)))
    return LisaState(
        count=jnp.zeros([], jnp.int32), key=prng, active_layers=active, inner_state=inner_state
    )

  def update_fn(updates, state, params=None, **extra_args):
    flat_updates = traverse_util.flatten_dict(updates)
    flat_params = None if params is None else traverse_util.flatten_dict(params)
    layout = layout_of(flat_updates if flat_params is None else flat_params)
    active = state.active_layers
    # Gradients for the active layers only (`lisa_split`'s compact tree) are
    # recognised against the full `params`; updates then stay compact too.
    active_only = flat_params is not None and _is_compact(
        layout, flat_updates, flat_params, n_layers
    )
    compact_updates = (
        traverse_util.unflatten_dict(flat_updates) if active_only
        else compact_tree(layout, flat_updates, active)
    )
    compact_params = (
        None if params is None
        else compact_tree(layout, flat_params, active)
    )
    full_trainable = traverse_util.unflatten_dict(
        trainable_flat(layout, flat_updates if flat_params is None else flat_params)
    )
    full_def = jax.tree.structure(full_trainable)
    compact_def = jax.tree.structure(compact_updates)

    if state_mode == "reset":
      # A new interval starts from a fresh inner state. The reset is applied
      # here, to the state coming in, rather than after the update that
      # switched: any select or cond on the moments after `inner.update` makes
      # XLA keep the new moments (or copies of the donated old ones) in
      # temporaries, about a params' size for Gemma 3 270M, whose 640 MiB
      # embedding is always trained; before it, the update stays in place.
      source = flat_updates if params is None else flat_params
      tree = compact_tree(layout, source, active)
      if params is None:
        tree = jax.tree.map(jnp.zeros_like, tree)
      new_interval = (state.count > 0) & (state.count % interval_steps == 0)
      inner_state = jax.tree.map(
          lambda fresh, old: jnp.where(new_interval, fresh, old),
          inner.init(tree), state.inner_state,
      )
    else:
      inner_state = _map_param_trees(
          lambda sub: compact_tree(layout, traverse_util.flatten_dict(sub), active),
          state.inner_state,
          full_def,
      )
    new_compact, inner_state = inner.update(
        compact_updates, inner_state, compact_params, **extra_args
    )
    if active_only:
      new_updates = new_compact
    else:
      zeros = {k: jnp.zeros_like(v) for k, v in flat_updates.items()}
      new_updates = traverse_util.unflatten_dict(
          _scatter_flat(layout, traverse_util.flatten_dict(new_compact), zeros, active, n_layers)
      )

    if state_mode == "keep":

      def scatter_state(old_sub, new_sub):
        old_flat = traverse_util.flatten_dict(old_sub)
        base_flat = {k: old_flat.get(k) for k in layout.keys}
        scattered = _scatter_flat(
            layout, traverse_util.flatten_dict(new_sub), base_flat, active, n_layers
        )
        return traverse_util.unflatten_dict(
            {k: v for k, v in scattered.items() if k in old_flat}
        )

      # Param-shaped subtrees scatter into the old full state; the rest
      # (counts, scalars) take the new value.
      inner_state = _zip_param_trees(
          scatter_state, state.inner_state, full_def, inner_state, compact_def
      )

    count = numerics.safe_int32_increment(state.count)
    switch = count % interval_steps == 0
    next_active = jax.lax.cond(
        switch,
        lambda: _sample(state.key, count // interval_steps, layout.num_layers, n_layers),
        lambda: active,
    )
    return new_updates, LisaState(
        count=count, key=state.key, active_layers=next_active, inner_state=inner_state
    )

  return base.GradientTransformationExtraArgs(init_fn, update_fn)


def lisa_active_layers(state: Any) -> jax.Array:
  """The layers the next update trains, from a `lisa` state or a chain's.

  Raises:
    ValueError: `state` holds no `LisaState`.
  """
  found = [
      s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, LisaState))
      if isinstance(s, LisaState)
  ]
  if not found:
    raise ValueError("No LisaState in this optimizer state.")
  return found[0].active_layers
