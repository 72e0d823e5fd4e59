"""Quantizing and dequantizing the kernels of a Flax params tree."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from peft_jax import targeting
from peft_jax.quant.nf4 import NF4, NF4Array, dequantize_array, is_quantized, quantize_array

KernelLayout = Callable[[str, tuple[int, ...]], tuple[int, int]]
"""``(module_path, kernel_shape) -> (stack_ndim, in_ndim)``."""


def default_kernel_layout(module_path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """Layout of a Dense-like kernel: ``(in, out)``, or ``(*layers, in, out)``.

  A 2-D kernel is one ``nn.Dense`` matrix. Axes before the last two are taken
  as a stack of layers (``nn.scan`` / ``nn.vmap`` params), each quantized on
  its own. ``DenseGeneral`` and ``Einsum`` kernels with several input or
  output axes need an explicit ``kernel_layout``.
  """
  del module_path
  return max(len(shape) - 2, 0), 1


def quantize(
    params: Mapping[str, Any],
    spec: NF4 = NF4(),
    target_modules: targeting.TargetSpec = None,
    *,
    exclude_modules: targeting.TargetSpec = None,
    kernel_layout: KernelLayout = default_kernel_layout,
    include_embeddings: bool = False,
) -> dict[str, Any]:
  """Replaces the targeted kernels of a params tree with :class:`NF4Array`.

  Args:
    params: Flax params (optionally wrapped as ``{'params': ...}``).
    spec: the quantization (default: NF4, block 64, double quantization,
      bfloat16 compute: the QLoRA recipe).
    target_modules: ``None`` for every Dense-like ``kernel`` except the output
      head (``lm_head``, ...); names (exact module name or ``/``-suffix), or a
      regex fully matching the ``/``-joined module path (see
      :mod:`peft_jax.targeting`). Embeddings are quantized only with
      ``include_embeddings``.
    exclude_modules: the same forms, removed from the selection.
    kernel_layout: ``(module_path, shape) -> (stack_ndim, in_ndim)``.
    include_embeddings: also quantize every ``nn.Embed`` table ``(V, D)``
      (``embedding`` leaves not excluded), tiled along the vocabulary, for
      :func:`peft_jax.quant.embed.nf4_lookup`: a lookup dequantizes only its
      rows, and a tied head (``attend``) dequantizes the table. Frozen (no
      adapters on it). Not bitsandbytes' ``Embedding4bit`` layout.

  Returns:
    A new params tree (plain dicts) with quantized kernels, in the same
    wrapping as the input.

  Raises:
    ValueError: when a pattern matches no module (the message lists close
      paths), a target is an embedding, or a kernel is already quantized.
    TypeError: for a non-float kernel.

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft_jax.quant import NF4, quantize, dequantize
    >>> params = {"dense": {"kernel": jnp.ones((64, 8)), "bias": jnp.zeros(8)}}
    >>> qparams = quantize(params, NF4(block_size=64))
    >>> qparams["dense"]["kernel"].shape
    (64, 8)
    >>> bool((dequantize(qparams)["dense"]["kernel"] == 1).all())
    True
  """
  inner, wrapped = targeting.unwrap_params(params)
  selected = targeting.select_modules(
      inner, targeting.ALL_LINEAR if target_modules is None else target_modules,
      exclude_modules=exclude_modules)
  flat = targeting.flatten(inner)
  if include_embeddings:
    selected.update({m: leaf for m, leaf in targeting.adaptable_modules(inner).items()
                     if leaf == "embedding" and not is_quantized(flat[f"{m}/{leaf}"])
                     and not (exclude_modules and targeting.matches(exclude_modules, m))})
  for module, leaf_name in selected.items():
    path = f"{module}/{leaf_name}"
    if leaf_name != "kernel" and not (include_embeddings and leaf_name == "embedding"):
      raise ValueError(
          f"{module!r} holds an {leaf_name!r}, not a kernel; only Dense-like kernels "
          "are quantized (embeddings too with include_embeddings=True).")
    leaf = flat[path]
    if is_quantized(leaf):
      raise ValueError(f"{path!r} is already quantized ({leaf!r}).")
    stack_ndim, in_ndim = kernel_layout(module, tuple(leaf.shape))
    if leaf_name == "embedding":
      stack_ndim, in_ndim = 0, 1
      if len(leaf.shape) != 2 or leaf.shape[0] % spec.block_size:
        raise ValueError(f"{path}: an embedding of shape {tuple(leaf.shape)} cannot be "
                         f"quantized for row lookup; it needs (V, D) with V a multiple of "
                         f"block_size {spec.block_size}.")
    try:
      flat[path] = quantize_array(leaf, spec, stack_ndim=stack_ndim, in_ndim=in_ndim)
    except (TypeError, ValueError) as e:
      raise type(e)(f"{path}: {e}") from e
  out = targeting.unflatten(flat)
  return {"params": out} if wrapped else out


def dequantize(qparams: Any, dtype: Any = None) -> Any:
  """Replaces every :class:`NF4Array` in a tree by its dense array.

  Args:
    qparams: any pytree.
    dtype: result dtype; default each array's original dtype.
  """
  return jax.tree.map(
      lambda leaf: dequantize_array(leaf, dtype) if is_quantized(leaf) else leaf,
      qparams, is_leaf=is_quantized)


def quantized_paths(params: Any) -> list[str]:
  """``/``-joined paths of the quantized leaves of a tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
  return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, leaf in leaves if isinstance(leaf, NF4Array)]
