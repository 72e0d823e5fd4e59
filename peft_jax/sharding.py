"""Shardings for base weights, adapters, NF4 arrays and optimizer states on a mesh.

JAX's own sharding is the engine (``jax.sharding.Mesh``, ``NamedSharding``,
``jax.jit``); this module only says *where* each leaf lives. A user states
shardings for the frozen kernels, either as **rules** (a regex on the
``/``-joined leaf path, first full match wins, and a ``PartitionSpec`` of the
leaf's trailing axes) or by placing the base params themselves. Everything
else is derived from the kernel it belongs to:

* ``lora_a`` follows the kernel's input axes, ``lora_b`` its output axes,
  DoRA's ``lora_magnitude`` its output axes, AdaLoRA's ``lora_e`` only its
  stacked-layer axes; the rank axis is always replicated.
* A scanned model's leading layer axis takes the rule's leading entries when
  the spec is as long as the leaf, and is replicated when the spec covers
  only the per-layer axes (the usual case: one rule serves scanned and
  unrolled models).
* An :class:`~peft_jax.quant.NF4Array` of logical ``(K, N)`` is split on whole
  quantization blocks: ``codes (K/2, N)`` and ``absmax (K/block, N)`` take the
  kernel's ``(K, N)`` spec and ``K/block`` must divide by the mesh size of
  ``K``'s axes; the double-quantization ``nested_absmax`` and ``offset``
  (1/2048 of the codes' bytes) are replicated, so every device holds the
  nested scales of its blocks.
* An optimizer-state leaf whose dict path ends in a parameter's path (Adam
  moments, AdaLoRA's EMAs, LISA's compact slots, GaLore's moments and
  projectors) keeps the parameter's mesh axis on every axis of the same
  position and size; other axes (a rank axis, LISA's active-layer rows) are
  replicated. Unmatched leaves (step counters, keys, masks) are replicated.

A dimension a mesh axis does not divide is an error naming the leaf and the
sizes (``indivisible="error"``, the default); ``indivisible="replicate"``
replicates that axis instead and reports it with a
:class:`ShardingFallbackWarning`.

Trees are any nested mappings (linen params, NNX state dicts): only the
paths and the leaves' shapes are read, so the functions also run on
``jax.ShapeDtypeStruct`` trees and inside ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from peft_jax.lora.layout import layout_from_adapters
from peft_jax.quant.nf4 import NF4Array, is_quantized
from peft_jax.lora.saved import base_path as saved_base_path, is_saved_path

__all__ = [
    "Rules",
    "ShardingFallbackWarning",
    "batch_spec",
    "constrain",
    "llama_rules",
    "opt_state_specs",
    "param_specs",
    "parse_mesh",
    "rules_from_params",
    "make_mesh",
    "shard",
    "to_shardings",
    "train_specs",
]

Rules = Sequence[tuple[str, P]]
"""``((path_regex, spec), ...)``: first regex that fully matches a leaf path wins."""

_KERNEL_NAMES = ("kernel", "embedding")
_ADAPTER_NAMES = ("lora_a", "lora_b", "lora_magnitude", "lora_e")


class ShardingFallbackWarning(UserWarning):
  """An axis a mesh axis does not divide was replicated (``indivisible="replicate"``)."""


def llama_rules(*, fsdp: str | None = "fsdp", tp: str | None = "tp",
                mesh: Mesh | None = None) -> tuple[tuple[str, P], ...]:
  """FSDP + Megatron tensor parallelism for the reference Llama models.

  ``q/k/v/gate/up`` are column-parallel (output axis over ``tp``, input axis
  over ``fsdp``), ``o/down`` row-parallel (input over ``tp``, output over
  ``fsdp``); the embedding and head split the vocabulary over ``tp``; norms
  are replicated. Specs cover the per-layer axes, so scanned layers keep
  their leading layer axis replicated.

  Args:
    fsdp, tp: mesh axis names, or ``None`` to leave that kind out.
    mesh: when given, axis names the mesh lacks are left out (so one call
      serves ``data=8``, ``fsdp=8`` and ``data=2,fsdp=2,tp=2`` meshes).
  """
  if mesh is not None:
    fsdp = fsdp if fsdp in mesh.shape else None
    tp = tp if tp in mesh.shape else None
  return (
      (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", P(fsdp, tp)),
      (r".*(o_proj|down_proj)/kernel", P(tp, fsdp)),
      (r".*embed_tokens/embedding", P(tp, fsdp)),
      (r".*lm_head/kernel", P(fsdp, tp)),
      (r".*", P()),
  )


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,fsdp=2,tp=2"`` -> ``{"data": 2, "fsdp": 2, "tp": 2}`` (order kept)."""
  axes: dict[str, int] = {}
  for part in text.split(","):
    name, sep, size = part.strip().partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name) or not size.isdigit():
      raise ValueError(f"Bad mesh axis {part!r} in {text!r}; expected name=size, e.g. "
                       "data=2,fsdp=2,tp=2.")
    if name in axes:
      raise ValueError(f"Mesh axis {name!r} appears twice in {text!r}.")
    if int(size) < 1:
      raise ValueError(f"Mesh axis {name!r} has size {size}; sizes must be >= 1.")
    axes[name] = int(size)
  return axes


def make_mesh(axes: Mapping[str, int] | str, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over ``devices`` (default all), checked against their count.

  Raises:
    ValueError: when the product of the axis sizes is not the device count.
  """
  if isinstance(axes, str):
    axes = parse_mesh(axes)
  devices = list(jax.devices() if devices is None else devices)
  total = math.prod(axes.values())
  if total != len(devices):
    shape = ",".join(f"{k}={v}" for k, v in axes.items())
    raise ValueError(f"Mesh {shape} needs {total} devices; jax.device_count() is "
                     f"{len(devices)}.")
  return Mesh(np.asarray(devices, dtype=object).reshape(tuple(axes.values())), tuple(axes))


def batch_spec(mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> P:
  """Spec of a ``(batch, ...)`` array: the batch over those of ``axes`` in the mesh."""
  present = tuple(a for a in axes if a in mesh.shape)
  return P(present or None)


# -- paths and specs ------------------------------------------------------------
def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_variable_value(key: Any) -> bool:
  """The ``.value`` step of an NNX ``Variable`` (``q_proj/kernel/value``): not in paths."""
  return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def _flat(tree: Any) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` with NF4 arrays kept whole; ``path`` joins the keys."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
  return [("/".join(_key_name(k) for k in path if not _is_variable_value(k)), leaf)
          for path, leaf in leaves]


def _entries(spec: P | None, ndim: int, path: str) -> list[Any]:
  """A spec as ``ndim`` entries, left-padded with ``None`` (stacked axes)."""
  entries = list(spec or ())
  if len(entries) > ndim:
    raise ValueError(f"Spec {spec} has {len(entries)} entries for {path!r} of rank {ndim}.")
  return [None] * (ndim - len(entries)) + entries


def _axis_size(mesh_shape: Mapping[str, int], entry: Any) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  size = 1
  for name in names:
    if name is None:
      continue
    if name not in mesh_shape:
      raise ValueError(f"Mesh axis {name!r} is not in the mesh {dict(mesh_shape)}.")
    size *= mesh_shape[name]
  return size


@dataclasses.dataclass
class _Checker:
  """Divisibility checks with the chosen policy; collects fallbacks."""

  mesh_shape: Mapping[str, int]
  indivisible: str
  fallbacks: list[str] = dataclasses.field(default_factory=list)

  def fit(self, path: str, dims: Sequence[int], entries: list[Any],
          units: Sequence[int] | None = None, what: str = "") -> list[Any]:
    """``entries`` with every axis checked: ``dims[i] / units[i]`` must divide."""
    out = list(entries)
    for i, (dim, entry) in enumerate(zip(dims, entries)):
      if entry is None:
        continue
      size = _axis_size(self.mesh_shape, entry)
      unit = units[i] if units else 1
      if (dim // unit) % size == 0 and dim % unit == 0:
        continue
      detail = (f"{path!r}{what}: axis {i} of size {dim}"
                + (f" ({dim // unit} blocks of {unit})" if unit > 1 else "")
                + f" is not divisible by mesh axis {entry!r} of size {size}")
      if self.indivisible == "error":
        raise ValueError(detail + "; change the rules or the mesh, or pass "
                         "indivisible='replicate'.")
      self.fallbacks.append(detail + "; replicated")
      out[i] = None
    return out

  def report(self) -> None:
    if self.fallbacks:
      warnings.warn("Replicated axes that the mesh does not divide:\n  "
                    + "\n  ".join(self.fallbacks), ShardingFallbackWarning, stacklevel=3)


def _rule_spec(rules: Rules, path: str) -> P:
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      return spec
  return P()


def _nf4_specs(path: str, w: NF4Array, kernel: list[Any], check: _Checker) -> NF4Array:
  """Specs of an NF4 array's leaves from its logical kernel spec (full rank)."""
  stack_nd = len(w.stack_shape)
  stack, per_layer = kernel[:stack_nd], kernel[stack_nd:]
  if not w.tiled:
    check.fallbacks.append(f"{path!r}: flat (untiled) NF4 layout, codes replicated")
    matrix = [None, None]
  else:
    in_e, out_e = per_layer[:w.in_ndim], per_layer[w.in_ndim:]
    if any(e is not None for e in in_e[1:]) or any(e is not None for e in out_e[1:]):
      raise ValueError(f"{path!r}: an NF4 kernel can be split on its first input and first "
                       f"output axis only; the spec is {tuple(per_layer)}.")
    k, n = w.matrix_shape
    matrix = [in_e[0], out_e[0]]
    dims = list(w.stack_shape) + [k, n]
    fitted = check.fit(path, dims, stack + matrix, units=[1] * stack_nd + [w.block_size, 1],
                       what=" (NF4 quantization blocks)")
    stack, matrix = fitted[:stack_nd], fitted[stack_nd:]
  tiled = P(*stack, *matrix) if w.tiled else P(*stack, None)
  return dataclasses.replace(
      w, codes=tiled, absmax=tiled,
      nested_absmax=None if w.nested_absmax is None else P(*stack, None),
      offset=None if w.offset is None else P(*stack))


def _adapter_spec(name: str, shape, kernel_shape, a_shape, b_shape, kernel: list[Any],
                  spread: Mapping[str, int] | None = None) -> list[Any]:
  """An adapter leaf's entries from its kernel's; ``spread``: the mesh, to spread over."""
  layout = layout_from_adapters(kernel_shape, a_shape, b_shape)
  batch = kernel[:layout.batch_ndim]
  per_layer = kernel[layout.batch_ndim:]
  ins = [per_layer[i] for i in layout.in_axes]
  outs = [per_layer[o] for o in layout.out_axes]
  entries = {"lora_a": batch + ins + [None], "lora_b": batch + [None] + outs,
             "lora_magnitude": batch + outs, "lora_e": batch + [None]}[name]
  if spread is None or name == "lora_e":
    return entries
  # The first non-rank axis of the leaf also over the mesh axes the leaf leaves unused.
  axis = layout.batch_ndim + (name == "lora_b")
  names = list(_names(entries[axis]))
  used = {n for e in entries for n in _names(e)}
  for extra in (a for a in spread if a not in used and spread[a] > 1):
    if shape[axis] % _axis_size(spread, tuple(names + [extra])) == 0:
      names.append(extra)
  entries[axis] = tuple(names) if len(names) > 1 else (names[0] if names else None)
  return entries


def _names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _kernel_spec_from_leaf(leaf: Any) -> P | None:
  """The logical spec of a placed kernel (its NamedSharding), or None."""
  if is_quantized(leaf):
    spec = getattr(getattr(leaf.codes, "sharding", None), "spec", None)
    if spec is None or not leaf.tiled:
      return None
    entries = _entries(spec, leaf.codes.ndim, "")
    stack, (k, n) = entries[:-2], entries[-2:]
    return P(*stack, k, *([None] * (leaf.in_ndim - 1)), n,
             *([None] * (len(leaf.kernel_shape) - leaf.in_ndim - 1)))
  return getattr(getattr(leaf, "sharding", None), "spec", None)


def rules_from_params(base: Any) -> tuple[tuple[str, P], ...]:
  """Rules that reproduce the shardings of placed base params, one per leaf.

  For base params already on a mesh (loaded sharded, or placed by hand):
  ``param_specs(adapters, rules_from_params(base), mesh, base=base)`` gives
  the adapters' specs. An NF4 array contributes its logical kernel spec,
  read off its codes.
  """
  rules = []
  for path, leaf in _flat(base):
    spec = _kernel_spec_from_leaf(leaf)
    if spec is None:
      raise ValueError(f"{path!r} has no NamedSharding to read a spec from; place it with "
                       "jax.device_put(x, NamedSharding(mesh, spec)) or write rules.")
    rules.append((re.escape(path), spec))
  return tuple(rules)


def param_specs(params: Any, rules: Rules, mesh: Mesh | Mapping[str, int], *,
                base: Any = None, indivisible: str = "error",
                spread_adapters: bool = False) -> Any:
  """A ``PartitionSpec`` for every leaf of ``params`` (NF4 arrays get NF4 specs).

  Args:
    params: base params, adapters, or both (any nested mapping).
    rules: ``((path_regex, spec), ...)`` for plain leaves and kernels (for
      base params already placed: :func:`rules_from_params`).
    mesh: the mesh (or its ``{axis: size}``), for the divisibility checks.
    base: the frozen tree when ``params`` holds adapters whose kernels live
      elsewhere (the output of :func:`peft_jax.split`).
    indivisible: ``"error"`` or ``"replicate"`` (reported with a warning).
    spread_adapters: also split each adapter leaf's first non-rank axis
      (``lora_a``'s input, ``lora_b``'s and ``lora_magnitude``'s output)
      over the mesh axes its own spec leaves unused (e.g. ``lora_a`` of a
      ``P("fsdp", "tp")`` kernel over ``("fsdp", "tp")``), as many as divide
      it: FSDP for the adapter state; its optimizer moments follow.

  Returns:
    A tree of ``PartitionSpec`` shaped like ``params``; an ``NF4Array`` leaf
    becomes an ``NF4Array`` whose leaves are specs.

  Raises:
    ValueError: for a dimension a mesh axis does not divide (with
      ``indivisible="error"``), an unknown mesh axis, or a spec longer than
      its leaf.
  """
  if indivisible not in ("error", "replicate"):
    raise ValueError(f"indivisible must be 'error' or 'replicate', got {indivisible!r}.")
  mesh_shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
  check = _Checker(mesh_shape, indivisible)
  flat = _flat(params)
  context = dict(_flat(base)) if base is not None else {}
  context.update(flat)

  def kernel_entries(path: str, leaf: Any) -> list[Any]:
    return _entries(_rule_spec(rules, path), len(leaf.shape), path)

  specs = []
  for path, leaf in flat:
    module, _, name = path.rpartition("/")
    if is_quantized(leaf):
      specs.append(_nf4_specs(path, leaf, kernel_entries(path, leaf), check))
      continue
    if name in _ADAPTER_NAMES:
      prefix = f"{module}/" if module else ""
      kernel_path = next((prefix + k for k in _KERNEL_NAMES if prefix + k in context), None)
      a, b = context.get(prefix + "lora_a"), context.get(prefix + "lora_b")
      if kernel_path is None or a is None or b is None:
        raise ValueError(f"Adapter leaf {path!r} has no kernel (or no lora_a/lora_b) beside "
                         "it; pass the frozen tree as base=.")
      kernel = context[kernel_path]
      entries = _adapter_spec(name, leaf.shape, kernel.shape, a.shape, b.shape,
                              kernel_entries(kernel_path, kernel),
                              mesh_shape if spread_adapters else None)
    elif is_saved_path(path):  # a trainable copy is placed as the param it copies
      entries = kernel_entries(saved_base_path(path), leaf)
    else:
      entries = kernel_entries(path, leaf)
    specs.append(P(*check.fit(path, leaf.shape, entries)))
  check.report()
  treedef = jax.tree.structure(params, is_leaf=is_quantized)
  return jax.tree.unflatten(treedef, specs)


def opt_state_specs(opt_state: Any, params: Any, specs: Any) -> Any:
  """Specs for an optimizer state from its parameters' specs.

  A state leaf whose mapping keys, joined by ``/``, end in a parameter's
  path belongs to that parameter. It keeps the parameter's entry on every
  axis of equal position and size (GaLore's ``out_projector (*B, m, r)`` is
  compared with the kernel's transposed shape); other axes and unmatched
  leaves are replicated.

  Args:
    opt_state: the state (arrays or ``jax.ShapeDtypeStruct``), e.g.
      ``optimizer.init(trainable)`` or ``jax.eval_shape`` of it.
    params: the trainable tree the optimizer was initialised with.
    specs: :func:`param_specs` of ``params``.
  """
  by_path = {path: (leaf, spec) for (path, leaf), spec in
             zip(_flat(params), jax.tree.leaves(specs, is_leaf=_is_spec))}

  def spec_for(key_path, leaf) -> P:
    if leaf is None or not hasattr(leaf, "shape"):
      return leaf
    dict_keys = [_key_name(k) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
    fields = {_key_name(k) for k in key_path if isinstance(k, jax.tree_util.GetAttrKey)}
    parts = "/".join(dict_keys).split("/")
    suffixes = ("/".join(parts[i:]) for i in range(len(parts)))  # longest first
    match = next((path for path in suffixes if path in by_path), None)
    if match is None:
      return P()
    param, spec = by_path[match]
    shape, entries = list(param.shape), _entries(spec, len(param.shape), match)
    if "out_projector" in fields and len(shape) >= 2:
      shape[-2], shape[-1] = shape[-1], shape[-2]
      entries[-2], entries[-1] = entries[-1], entries[-2]
    if len(leaf.shape) != len(shape):
      return P()
    return P(*[e if d == s else None for d, s, e in zip(leaf.shape, shape, entries)])

  return jax.tree_util.tree_map_with_path(spec_for, opt_state)


def _is_spec(x: Any) -> bool:
  return isinstance(x, (P, NF4Array))


def to_shardings(specs: Any, mesh: Mesh) -> Any:
  """``NamedSharding(mesh, spec)`` for every spec of a tree (NF4 structure kept)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def shard(tree: Any, specs: Any, mesh: Mesh) -> Any:
  """``jax.device_put`` of every leaf onto its spec's ``NamedSharding``."""
  return jax.device_put(tree, to_shardings(specs, mesh))


def constrain(tree: Any, specs: Any, mesh: Mesh) -> Any:
  """``with_sharding_constraint`` of a traced tree to its specs (inside ``jit``)."""
  return jax.lax.with_sharding_constraint(tree, to_shardings(specs, mesh))


def train_specs(state: Any, base: Any, rules: Rules, mesh: Mesh, *,
                indivisible: str = "error", spread_adapters: bool = False
                ) -> tuple[Any, Any]:
  """``(state_specs, base_specs)`` of a :class:`peft_jax.training.TrainState` and its base.

  ``indivisible``, ``spread_adapters``: as for :func:`param_specs`.
  """
  base_specs = param_specs(base, rules, mesh, indivisible=indivisible) if base else base
  trainable_specs = param_specs(state.trainable, rules, mesh, base=base or None,
                                indivisible=indivisible, spread_adapters=spread_adapters)
  opt_specs = opt_state_specs(state.opt_state, state.trainable, trainable_specs)
  state_specs = type(state)(P(), trainable_specs, opt_specs)
  return state_specs, base_specs

