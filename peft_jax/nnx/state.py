"""Flax NNX models seen as linen-shaped params dicts.

Every peft_jax tool (targeting, ``lora_transform``, merge, checkpoints) reads
a nested params dict keyed like a linen model's. An NNX model maps onto one
by its attribute paths, with list indices joined to the attribute name as
linen names list submodules: ``('layers', 3, 'q_proj', 'kernel')`` is
``layers_3/q_proj/kernel``. So an NNX model and its linen twin share module
paths, ``layers_to_transform`` and adapter files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from peft_jax import targeting


class Adapter(nnx.LoRAParam):
  """A trainable adapter leaf (``lora_a``, ``lora_b``, ``lora_magnitude``, ``lora_e``).

  Subclasses ``nnx.LoRAParam``: ``nnx.Optimizer(model, tx, wrt=Adapter)``
  (or ``wrt=nnx.LoRAParam``) trains the adapters only.
  """


def linen_path(path: tuple) -> str:
  """An NNX path as a linen module path: ``('layers', 3, 'q')`` -> ``'layers_3/q'``."""
  parts: list[str] = []
  for key in path:
    if isinstance(key, int) and parts:
      parts[-1] = f"{parts[-1]}_{key}"
    else:
      parts.append(str(key))
  return "/".join(parts)


def _flat_state(tree) -> list[tuple[tuple, Any]]:
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  return list(nnx.to_flat_state(state))


def variables(tree, kind: type = nnx.Param) -> dict[str, nnx.Variable]:
  """``{linen leaf path: Variable}`` of a model (or ``nnx.State``), for one variable type."""
  return {linen_path(path): var for path, var in _flat_state(tree) if isinstance(var, kind)}


def modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{linen module path: module}`` (the root is ``''``)."""
  return {linen_path(path): module for path, module in nnx.iter_modules(model)}


def _value(leaf: Any) -> Any:
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def to_linen(tree: Any) -> tuple[dict[str, Any], list[tuple]]:
  """An ``nnx.State`` (of Variables or arrays, e.g. gradients) as a linen-shaped
  nested dict of arrays, and its NNX paths in order (for :func:`from_linen`)."""
  flat = _flat_state(tree if isinstance(tree, nnx.State | nnx.Module) else nnx.State(tree))
  linen = {linen_path(path): _value(leaf) for path, leaf in flat}
  if len(linen) != len(flat):
    raise ValueError("Two NNX paths map to the same linen path; rename the attributes.")
  return targeting.unflatten(linen), [path for path, _ in flat]


def from_linen(tree: Mapping[str, Any], paths: list[tuple]) -> nnx.State:
  """Inverse of :func:`to_linen`: the ``nnx.State`` of arrays at ``paths``."""
  flat = targeting.flatten(tree)
  return nnx.from_flat_state([(path, flat[linen_path(path)]) for path in paths])


def params(tree) -> dict[str, Any]:
  """The model's ``nnx.Param`` values (adapters included) as a linen-shaped nested dict."""
  return targeting.unflatten({p: v.get_value() for p, v in variables(tree).items()})


def adapters(tree) -> dict[str, Any]:
  """Only the adapter leaves, as a linen-shaped nested dict (what checkpoints save)."""
  flat = {p: v for p, v in targeting.flatten(params(tree)).items()
          if targeting.split_path(p)[1] in targeting.ADAPTER_LEAVES
          or targeting.split_path(targeting.split_path(p)[0])[1] == targeting.SAVED}
  if not flat:
    raise ValueError("This model holds no adapter leaves: call peft_jax.nnx.lora_transform "
                     "or peft_jax.nnx.load_adapters first.")
  return targeting.unflatten(flat)
