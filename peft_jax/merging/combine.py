"""Combining several adapters: exact task arithmetic, and PEFT's ``add_weighted_adapter``.

Two ways, for two needs:

* :func:`task_arithmetic` (recommended): ``W' = W + sum_i w_i dW_i`` on the
  kernels, exact for any number of adapters, LoRA or DoRA (Ilharco et al.
  2023). The result is plain params (no adapter leaves).
* :func:`combine_adapters`: a new *adapter* from several, with the methods of
  Hugging Face PEFT 0.21.2 ``add_weighted_adapter`` (ALGORITHMS.md 10.2):

  ==========================  ================================================
  ``cat``                     ``A = [w_i s_i A_i]``, ``B = [B_i]``: exact, rank
                              ``sum r_i``.
  ``svd`` and ``*_svd``       SVD of the merged ``sum_i w_i dW_i`` (after TIES,
                              DARE or magnitude pruning of the ``dW_i``),
                              truncated to ``svd_rank``.
  ``linear``, ``ties``,       applied to the A and the B stacks separately
  ``dare_linear``,            with weights ``sign(w_i s_i) sqrt|w_i s_i|`` and
  ``dare_ties``,              ``sqrt|w_i s_i|``. **Not exact** for more than one
  ``magnitude_prune``         adapter: ``(sum_i a_i A_i)(sum_j b_j B_j)`` has the
                              cross terms ``i != j`` (PEFT issue #3004).
  ==========================  ================================================

The new adapter's config has ``alpha = r`` per module, so its scale is 1.

References:
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
  Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
  NeurIPS 2023.
  Yu et al., "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch" (DARE), ICML 2024.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from peft_jax import _lapack, targeting
from peft_jax.lora.tree import adapter_modules
from peft_jax.lora import layout as layout_lib
from peft_jax.lora.config import LoRAConfig
from peft_jax.lora.merge import merged_kernel
from peft_jax.lora.transform import kernel_value
from peft_jax.merging.prune import prune_by_magnitude, prune_randomly

STACK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat",) + STACK_METHODS + SVD_METHODS
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# -- primitives on a stack of task tensors ----------------------------------------
def elect_sign_mask(stack: jax.Array, method: str = "total") -> jax.Array:
  """TIES sign election: where each task tensor agrees with the elected sign.

  Args:
    stack: task tensors stacked on axis 0.
    method: ``"total"`` elects ``sign(sum_i t_i)``, ``"frequency"`` elects
      ``sign(sum_i sign(t_i))``; a zero sum elects ``+1``.

  Returns:
    Boolean mask of ``stack``'s shape; pruned zeros never agree.
  """
  sign = jnp.sign(stack)
  if method == "total":
    magnitude = jnp.sum(stack, axis=0)
  elif method == "frequency":
    magnitude = jnp.sum(sign, axis=0)
  else:
    raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}.")
  elected = jnp.where(magnitude >= 0, 1, -1).astype(stack.dtype)
  return sign == elected


def disjoint_merge(weighted_stack: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over the agreeing entries: ``sum_i t_i m_i / max(sum_i m_i, 1)``."""
  mask = mask.astype(weighted_stack.dtype)
  kept = jnp.sum(mask, axis=0)
  return jnp.sum(weighted_stack * mask, axis=0) / jnp.maximum(kept, 1.0)


def _weighted(stack: jax.Array, weights: jax.Array) -> jax.Array:
  return stack * weights.reshape(weights.shape + (1,) * (stack.ndim - 1)).astype(stack.dtype)


def merge_task_tensors(tensors: Sequence[jax.Array], weights: Sequence[float] | jax.Array,
                       method: str = "linear", *, density: float | None = None,
                       majority_sign_method: str = "total", key: jax.Array | None = None
                       ) -> jax.Array:
  """Merges same-shape task tensors as PEFT's ``merge_utils`` does.

  Methods (``density`` is the kept fraction):

  * ``linear``: ``sum_i w_i t_i`` (task arithmetic);
  * ``magnitude_prune``: prune each ``t_i`` by magnitude, then ``linear``;
  * ``ties``: prune by magnitude, elect signs on the *unweighted* pruned
    stack, weight, then :func:`disjoint_merge` (a mean, not a sum);
  * ``dare_linear`` / ``dare_ties``: random drop with rescale (needs ``key``),
    then ``linear`` / sign election + disjoint merge.

  Args:
    tensors: task tensors of one shape.
    weights: one weight per tensor.
    method: one of the above.
    density: kept fraction for the pruning methods.
    majority_sign_method: ``"total"`` or ``"frequency"`` (TIES variants).
    key: PRNG key for the DARE methods.

  Returns:
    The merged tensor.
  """
  weights = jnp.asarray(weights, jnp.float32)
  if method in _NEEDS_DENSITY and density is None:
    raise ValueError(f"method={method!r} needs a density.")
  if method.startswith("dare"):
    if key is None:
      raise ValueError(f"method={method!r} drops at random: pass a PRNG key.")
    keys = jax.random.split(key, len(tensors))
    tensors = [prune_randomly(t, density, k, rescale=True) for t, k in zip(tensors, keys)]
  elif method in ("ties", "magnitude_prune"):
    tensors = [prune_by_magnitude(t, density) for t in tensors]
  elif method != "linear":
    raise ValueError(f"Unknown method {method!r}; expected one of {STACK_METHODS}.")
  stack = jnp.stack(tensors)
  if method in ("ties", "dare_ties"):
    mask = elect_sign_mask(stack, majority_sign_method)
    return disjoint_merge(_weighted(stack, weights), mask)
  return jnp.sum(_weighted(stack, weights), axis=0)


# -- exact task arithmetic ------------------------------------------------------------
def _as_configs(configs: LoRAConfig | Sequence[LoRAConfig], n: int) -> list[LoRAConfig]:
  if isinstance(configs, LoRAConfig):
    return [configs] * n
  configs = list(configs)
  if len(configs) != n:
    raise ValueError(f"Got {len(configs)} configs for {n} adapters.")
  return configs


def _modules(adapters: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  return adapter_modules(adapters)


def _check_inputs(adapters_list, weights):
  if not adapters_list:
    raise ValueError("Pass at least one adapter tree.")
  if len(weights) != len(adapters_list):
    raise ValueError(f"Got {len(weights)} weights for {len(adapters_list)} adapters.")


def task_arithmetic(base_params: Mapping[str, Any], adapters_list: Sequence[Mapping[str, Any]],
                    weights: Sequence[float], configs: LoRAConfig | Sequence[LoRAConfig], *,
                    layouts: Mapping[str, layout_lib.KernelLayout] | None = None
                    ) -> dict[str, Any]:
  """Exact weighted merge into the kernels: ``W' = W + sum_i w_i dW_i``.

  ``dW_i`` is what adapter ``i`` alone adds to ``W`` once merged
  (``s_i B_i A_i`` for LoRA, the re-normalised update for DoRA), so one
  weight of 1 reproduces :func:`peft_jax.merge`. Modules an adapter does not
  touch get no contribution from it.

  Args:
    base_params: params without adapter leaves (kernels may be quantized:
      merged kernels come out dense in the compute dtype).
    adapters_list: adapter trees over that base.
    weights: one weight per adapter (negative subtracts a task).
    configs: one config for all, or one per adapter.
    layouts: for interleaved ``nn.Einsum`` kernels only.

  Returns:
    Plain params for the unmodified model.
  """
  _check_inputs(adapters_list, weights)
  configs = _as_configs(configs, len(adapters_list))
  inner, wrapped = targeting.unwrap_params(base_params)
  flat = targeting.flatten(inner)
  kernels = targeting.adaptable_modules(inner)
  deltas: dict[str, jax.Array] = {}
  for adapters, weight, config in zip(adapters_list, weights, configs):
    for module, leaves in _modules(adapters).items():
      if module not in kernels:
        raise ValueError(f"Adapter module {module!r} has no kernel in the base params.")
      kernel = flat[f"{module}/{kernels[module]}"]
      lora_a, lora_b = leaves["lora_a"], leaves["lora_b"]
      layout = (layouts or {}).get(module) or layout_lib.layout_from_adapters(
          kernel.shape, lora_a.shape, lora_b.shape)
      layout_lib.check_adapter_shapes(module, kernel.shape, lora_a.shape, lora_b.shape, layout)
      scale = config.scale_for(module, lora_a.shape[-1])
      w0 = kernel_value(kernel, jnp.float32)
      adapted = merged_kernel(kernel, lora_a, lora_b, leaves.get("lora_magnitude"),
                              leaves.get("lora_e"), scale, layout)
      deltas[module] = deltas.get(module, 0.0) + weight * (adapted - w0)
  for module, delta in deltas.items():
    path = f"{module}/{kernels[module]}"
    kernel = flat[path]
    flat[path] = (kernel_value(kernel, jnp.float32) + delta).astype(kernel.dtype)
  out = targeting.unflatten(flat)
  return {"params": out} if wrapped else out


# -- PEFT's add_weighted_adapter --------------------------------------------------
def _batch_ndim(module, lora_a, lora_b, layouts) -> int:
  layout = (layouts or {}).get(module)
  if layout is not None:
    return layout.batch_ndim
  batch = lora_a.ndim - 2  # one input axis: Dense, Embed, stacked Dense
  if batch < 0 or lora_b.ndim != lora_a.ndim:
    raise ValueError(f"Cannot tell the axes of the adapters at {module!r} "
                     f"({lora_a.shape}, {lora_b.shape}); pass layouts=.")
  return batch


def _as_matrices(lora_a, lora_b, batch):
  """batch + (fan_in, r) and batch + (r, fan_out) views."""
  lead = lora_a.shape[:batch]
  r = lora_a.shape[-1]
  return lora_a.reshape(lead + (-1, r)), lora_b.reshape(lead + (r, -1))


def _per_matrix(fn, batch):
  """Applies ``fn`` to each matrix of leading ``batch`` axes."""
  for _ in range(batch):
    fn = jax.vmap(fn)
  return fn


def _merge_per_matrix(tensors, weights, method, batch, key, **kwargs):
  """:func:`merge_task_tensors` on each matrix, with its own DARE key."""
  merge = lambda k, *ts: merge_task_tensors(ts, weights, method, key=k, **kwargs)
  if key is None:
    return _per_matrix(lambda *ts: merge(None, *ts), batch)(*tensors)
  keys = jax.random.split(key, tensors[0].shape[:batch]) if batch else key
  return _per_matrix(merge, batch)(keys, *tensors)


def _svd_factors(delta_t, rank, clamp):
  """PEFT's SVD step on a torch-layout ``(out, in)`` delta: ``(A (k, in), B (out, k))``."""
  u, s, vh = jnp.linalg.svd(delta_t, full_matrices=False)
  b = u[:, :rank] * s[:rank]
  a = vh[:rank]
  if clamp is not None:
    hi = jnp.quantile(jnp.concatenate([b.reshape(-1), a.reshape(-1)]), clamp)
    b, a = jnp.clip(b, -hi, hi), jnp.clip(a, -hi, hi)
  return a, b


def _combine_module(module, entries, method, batch, *, density, majority_sign_method, key,
                    svd_rank, svd_clamp):
  """New ``(lora_a, lora_b)`` of one module from ``[(weight, scale, a, b)]``."""
  a_shape, b_shape = entries[0][2].shape, entries[0][3].shape
  in_shape = a_shape[batch:-1]
  out_shape = b_shape[batch + 1:]
  if method == "cat":
    lora_a = jnp.concatenate([w * s * a for w, s, a, _ in entries], axis=-1)
    lora_b = jnp.concatenate([b for *_, b in entries], axis=batch)
    return lora_a, lora_b
  if method in STACK_METHODS:
    ranks = sorted({a.shape[-1] for _, _, a, _ in entries})
    if len(ranks) != 1:
      raise ValueError(f"method={method!r} needs equal ranks, but {module!r} has ranks {ranks}.")
    signed = [w * s for w, s, _, _ in entries]
    weights_a = jnp.asarray([math.copysign(math.sqrt(abs(v)), v) for v in signed])
    weights_b = jnp.asarray([math.sqrt(abs(v)) for v in signed])
    key_a, key_b = jax.random.split(key) if key is not None else (None, None)
    options = dict(density=density, majority_sign_method=majority_sign_method)
    lora_a = _merge_per_matrix([a for _, _, a, _ in entries], weights_a, method, batch, key_a,
                               **options)
    lora_b = _merge_per_matrix([b for *_, b in entries], weights_b, method, batch, key_b,
                               **options)
    return lora_a, lora_b
  # SVD family: merge the full deltas (torch layout, each already scaled), then factor.
  base_method = "linear" if method == "svd" else method[: -len("_svd")]
  deltas = []
  for w, s, a, b in entries:
    a_mat, b_mat = _as_matrices(a, b, batch)
    deltas.append(s * jnp.swapaxes(a_mat @ b_mat, -1, -2))
  merged = _merge_per_matrix(deltas, [w for w, *_ in entries], base_method, batch, key,
                             density=density, majority_sign_method=majority_sign_method)
  rank = min(svd_rank or max(a.shape[-1] for _, _, a, _ in entries), *merged.shape[-2:])
  # One LAPACK call per matrix on CPU (a batched SVD per module can deadlock, `_lapack`).
  a_t, b_t = _lapack.map_matrices(lambda d: _svd_factors(d, rank, svd_clamp), merged,
                                  batch_ndim=batch)
  lead = a_shape[:batch]
  lora_a = jnp.swapaxes(a_t, -1, -2).reshape(lead + in_shape + (rank,))
  lora_b = jnp.swapaxes(b_t, -1, -2).reshape(lead + (rank,) + out_shape)
  return lora_a, lora_b


def _merged_targets(configs: Sequence[LoRAConfig], modules: Sequence[str]):
  targets = [c.target_modules for c in configs]
  if all(isinstance(t, tuple) for t in targets):
    return tuple(dict.fromkeys(name for t in targets for name in t))
  if all(isinstance(t, str) for t in targets):
    return "|".join(f"({t})" for t in dict.fromkeys(targets))
  return tuple(sorted(modules))


def combine_adapters(adapters_list: Sequence[Mapping[str, Any]], weights: Sequence[float],
                     method: str = "cat", *, configs: LoRAConfig | Sequence[LoRAConfig],
                     density: float | None = None, majority_sign_method: str = "total",
                     key: jax.Array | None = None, svd_rank: int | None = None,
                     svd_clamp: float | None = None,
                     layouts: Mapping[str, layout_lib.KernelLayout] | None = None
                     ) -> tuple[dict[str, Any], LoRAConfig]:
  """A new adapter from weighted adapters, as PEFT's ``add_weighted_adapter``.

  See the module docstring for the methods. For a merged *model* prefer
  :func:`task_arithmetic`, which is exact; among adapter outputs ``cat`` is
  exact (at rank ``sum r_i``) and ``svd`` is the best rank-``k``
  approximation of the exact sum.

  Args:
    adapters_list: adapter trees; a module missing from some trees is
      combined from the others.
    weights: one weight per adapter (may be negative).
    method: one of :data:`METHODS`. One adapter always uses ``linear``, as
      in PEFT.
    configs: one config for all adapters, or one each (their scales count).
    density: kept fraction for TIES, DARE and magnitude pruning.
    majority_sign_method: ``"total"`` or ``"frequency"`` (TIES variants).
    key: PRNG key for the DARE methods (different parts of the tree get
      independent keys).
    svd_rank: rank of the ``*svd`` outputs (default: the largest input rank).
    svd_clamp: quantile at which the SVD factors are clamped (PEFT's
      ``svd_clamp``).
    layouts: for adapters of ``DenseGeneral``/``Einsum``/``Conv`` kernels,
      whose axes cannot be told from the adapter shapes.

  Returns:
    ``(adapters, config)``: ``config`` gives every module ``alpha = r``
    (scale 1); ranks differing by module go to ``rank_pattern``.

  Raises:
    ValueError: an unknown method, unequal ranks for the stack methods, a
      missing density or key, or DoRA/AdaLoRA adapters (their magnitudes and
      singular values have no weighted combination; use task_arithmetic).
  """
  _check_inputs(adapters_list, weights)
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
  configs = _as_configs(configs, len(adapters_list))
  if len(adapters_list) == 1:
    method = "linear"
  if (method in _NEEDS_DENSITY or method[: -len("_svd")] in _NEEDS_DENSITY) and density is None:
    raise ValueError(f"method={method!r} needs a density.")
  if method.startswith("dare") and key is None:
    raise ValueError(f"method={method!r} drops at random: pass a PRNG key.")
  per_module: dict[str, list] = collections.defaultdict(list)
  for adapters, weight, config in zip(adapters_list, weights, configs):
    for module, leaves in _modules(adapters).items():
      extra = sorted(set(leaves) - {"lora_a", "lora_b"})
      if extra:
        raise ValueError(f"{module!r} holds {extra}: DoRA/AdaLoRA adapters cannot be combined "
                         "into one adapter; use task_arithmetic (exact) instead.")
      lora_a = jnp.asarray(leaves["lora_a"], jnp.float32)
      scale = config.scale_for(module, lora_a.shape[-1])
      per_module[module].append((float(weight), scale, lora_a,
                                 jnp.asarray(leaves["lora_b"], jnp.float32)))
  dtype = jnp.result_type(*[leaf for a in adapters_list
                            for leaf in jax.tree.leaves(a)])
  keys = {}
  if key is not None:  # an independent DARE key per module
    keys = dict(zip(sorted(per_module), jax.random.split(key, len(per_module))))
  flat, ranks = {}, {}
  for module, entries in sorted(per_module.items()):
    batch = _batch_ndim(module, entries[0][2], entries[0][3], layouts)
    lora_a, lora_b = _combine_module(
        module, entries, method, batch, density=density,
        majority_sign_method=majority_sign_method, key=keys.get(module),
        svd_rank=svd_rank, svd_clamp=svd_clamp)
    flat[f"{module}/lora_a"] = lora_a.astype(dtype)
    flat[f"{module}/lora_b"] = lora_b.astype(dtype)
    ranks[module] = int(lora_a.shape[-1])
  default_rank = collections.Counter(ranks.values()).most_common(1)[0][0]
  patterns = {re.escape(m): r for m, r in ranks.items() if r != default_rank}
  config = configs[0].replace(
      rank=default_rank, alpha=float(default_rank), use_rslora=False, use_dora=False,
      rank_pattern=patterns, alpha_pattern={k: float(r) for k, r in patterns.items()},
      target_modules=_merged_targets(configs, list(ranks)), init="default",
      exclude_modules=None, layers_to_transform=None)
  out = targeting.unflatten(flat)
  wrapped = targeting.unwrap_params(adapters_list[0])[1]
  return ({"params": out} if wrapped else out), config
