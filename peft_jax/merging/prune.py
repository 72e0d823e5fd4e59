"""Magnitude and random pruning: PEFT's merge primitives and sparse adapters.

``prune_by_magnitude`` and ``prune_randomly`` follow
``peft/utils/merge_utils.py`` (0.21.2; ALGORITHMS.md 10.1); TIES, DARE and
``magnitude_prune`` in :mod:`peft_jax.merging.combine` build on them.
:func:`prune_lora_adapters` is the seed document's "LoRA + pruning".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peft_jax import targeting


def _check_density(density: float) -> bool:
  """Returns whether pruning applies (PEFT: density >= 1 keeps everything)."""
  if density < 0:
    raise ValueError(f"density must be >= 0, got {density}.")
  return density < 1


def prune_by_magnitude(tensor: jax.Array, density: float) -> jax.Array:
  """Keeps the ``int(density * size)`` entries of largest ``|tensor|``; zeros the rest.

  Ties at the threshold are broken by position (``jax.lax.top_k``), where
  ``torch.topk`` leaves the order unspecified.

  Args:
    tensor: any shape; ranked over all its entries.
    density: fraction of entries to keep; ``>= 1`` returns ``tensor`` unchanged.
  """
  if not _check_density(density):
    return tensor
  flat = tensor.reshape(-1)
  keep = int(density * flat.size)
  if keep == 0:
    return jnp.zeros_like(tensor)
  _, indices = jax.lax.top_k(jnp.abs(flat), keep)
  mask = jnp.zeros(flat.shape, tensor.dtype).at[indices].set(1)
  return (flat * mask).reshape(tensor.shape)


def prune_randomly(tensor: jax.Array, density: float, key: jax.Array, *,
                   rescale: bool = True) -> jax.Array:
  """DARE's drop: keep each entry with probability ``density`` (``tensor * Bernoulli(density)``).

  Args:
    tensor: any shape.
    density: keep probability ``1 - p``; ``>= 1`` returns ``tensor`` unchanged.
    key: PRNG key of the drop mask.
    rescale: divide the kept entries by ``density`` so the expectation is kept.
  """
  if not _check_density(density):
    return tensor
  if density == 0:
    return jnp.zeros_like(tensor)  # PEFT divides 0 by 0 here (NaN); nothing survives.
  mask = jax.random.bernoulli(key, density, tensor.shape).astype(tensor.dtype)
  pruned = tensor * mask
  return pruned / jnp.asarray(density, tensor.dtype) if rescale else pruned


class PrunedAdapters(NamedTuple):
  """Result of :func:`prune_lora_adapters`.

  Attributes:
    adapters: the adapter tree with pruned ``lora_a``/``lora_b``.
    sparsity: achieved fraction of zeros over all pruned leaves.
    leaf_sparsity: ``{leaf_path: fraction of zeros}``.
  """

  adapters: dict[str, Any]
  sparsity: float
  leaf_sparsity: dict[str, float]


def prune_lora_adapters(adapters: Mapping[str, Any], sparsity: float) -> PrunedAdapters:
  """Zeros the smallest-magnitude entries of every ``lora_a`` and ``lora_b``.

  Each leaf is pruned on its own (A and B live on different scales), keeping
  its ``int((1 - sparsity) * size)`` largest entries. DoRA magnitudes are
  left alone. Exact zeros already present count towards the achieved
  sparsity, so it can exceed the request.

  Args:
    adapters: adapter tree (or full params; only adapter leaves are pruned).
    sparsity: requested fraction of zeros in ``[0, 1]``.

  Returns:
    :class:`PrunedAdapters` with the tree and the achieved sparsity.

  Example::

    pruned = prune_lora_adapters(adapters, sparsity=0.5)
    print(f"{pruned.sparsity:.1%} of adapter weights are zero")
  """
  if not 0.0 <= sparsity <= 1.0:
    raise ValueError(f"sparsity must be in [0, 1], got {sparsity}.")
  inner, wrapped = targeting.unwrap_params(adapters)
  flat = targeting.flatten(inner)
  zeros, total, leaf_sparsity = 0, 0, {}
  for path, leaf in flat.items():
    if path.rsplit("/", 1)[-1] not in ("lora_a", "lora_b"):
      continue
    pruned = prune_by_magnitude(jnp.asarray(leaf), 1.0 - sparsity)
    flat[path] = pruned
    leaf_zeros = int(jnp.sum(pruned == 0))
    leaf_sparsity[path] = leaf_zeros / max(pruned.size, 1)
    zeros += leaf_zeros
    total += pruned.size
  if total == 0:
    raise ValueError("No lora_a / lora_b leaves to prune.")
  out = targeting.unflatten(flat)
  return PrunedAdapters({"params": out} if wrapped else out, zeros / total, leaf_sparsity)
