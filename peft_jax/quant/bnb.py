"""Conversion between :class:`NF4Array` and bitsandbytes' 4-bit state dict.

bitsandbytes' ``Linear4bit`` saves a quantized weight as (``QuantState.as_dict(
packed=True)``, keys under the weight's name)::

    weight                                       uint8 (ceil(numel/2), 1) packed codes
    weight.absmax                                float32 (nblocks,) | uint8 if nested
    weight.quant_map                             float32 (16,) code table
    weight.nested_absmax                         float32 (ceil(nblocks/256),)  [nested]
    weight.nested_quant_map                      float32 (256,) dynamic map    [nested]
    weight.quant_state.bitsandbytes__nf4         uint8 UTF-8 JSON: quant_type, blocksize,
                                                 dtype, shape, nested_blocksize,
                                                 nested_dtype, nested_offset

for the PyTorch weight of shape ``(out, in)``, the transpose of a Flax kernel.
For kernels whose input dimension is a multiple of the block size both
directions are a transpose of the stored bytes; for any other shape the
array already holds bitsandbytes' buffers. Nothing is requantized.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from peft_jax.quant import tables
from peft_jax.quant.nf4 import NF4Array, _absmax_from_torch_order, _absmax_to_torch_order

_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                "float16": jnp.float16, "float64": jnp.float64}


def _torch_shape(w: NF4Array) -> list[int]:
  if len(w.kernel_shape) == 1:
    return [int(w.kernel_shape[0])]
  k, n = w.matrix_shape
  return [int(n), int(k)]


def to_bnb(w: NF4Array, prefix: str = "weight") -> dict[str, np.ndarray]:
  """The bitsandbytes ``Linear4bit`` state-dict entries of one quantized kernel.

  Args:
    w: an unstacked quantized kernel (slice stacked ones first, e.g.
      ``jax.tree.map(lambda leaf: leaf[i], w)``).
    prefix: the weight's state-dict key.

  Returns:
    ``{prefix: packed, prefix + ".absmax": ..., ...}`` as NumPy arrays, equal
    to ``QuantState.as_dict(packed=True)`` plus the packed weight.

  Raises:
    ValueError: for a stacked array.
  """
  if w.stack_shape:
    raise ValueError(
        f"to_bnb converts one matrix; this array has stack axes {w.stack_shape}. "
        "Slice it first: jax.tree.map(lambda leaf: leaf[i], w).")
  codes = np.asarray(w.codes)
  if w.tiled:
    codes = codes.T  # (K/2, N) -> bitsandbytes' row-major (N, K/2)
  absmax = np.asarray(_absmax_to_torch_order(w.absmax, w.tiled))
  state = {
      prefix: np.ascontiguousarray(codes).reshape(-1, 1),
      f"{prefix}.absmax": absmax,
      f"{prefix}.quant_map": tables.code_table(w.quant_type).copy(),
  }
  info: dict[str, Any] = {
      "quant_type": w.quant_type,
      "blocksize": w.block_size,
      "dtype": np.dtype(w.dtype).name,
      "shape": _torch_shape(w),
  }
  if w.double_quant:
    state[f"{prefix}.nested_absmax"] = np.asarray(w.nested_absmax, np.float32)
    state[f"{prefix}.nested_quant_map"] = tables.DYNAMIC_MAP_256.copy()
    info.update(nested_blocksize=tables.NESTED_BLOCK_SIZE, nested_dtype="float32",
                nested_offset=float(np.asarray(w.offset, np.float32)))
  state[f"{prefix}.quant_state.bitsandbytes__{w.quant_type}"] = np.frombuffer(
      json.dumps(info).encode("utf-8"), dtype=np.uint8).copy()
  return state


def from_bnb(state_dict: Mapping[str, Any], prefix: str = "weight", *,
             kernel_shape: tuple[int, ...] | None = None, in_ndim: int = 1,
             compute_dtype: Any = jnp.bfloat16) -> NF4Array:
  """Reads one bitsandbytes 4-bit weight into an :class:`NF4Array`.

  Args:
    state_dict: a mapping holding the keys written by ``Linear4bit`` (NumPy
      arrays or anything ``np.asarray`` accepts, e.g. CPU torch tensors).
    prefix: the weight's key.
    kernel_shape: Flax kernel shape to give the ``(in, out)`` matrix, e.g.
      ``(D, H, Dh)`` for a ``DenseGeneral``; default ``(in, out)``.
    in_ndim: leading ``kernel_shape`` axes that form ``in``.
    compute_dtype: default compute dtype of ``nf4_matmul``.

  Returns:
    The quantized kernel, in Flax layout ``(in, out)``.

  Raises:
    KeyError: when a required key is missing.
    ValueError: for an unknown code table or inconsistent sizes.
  """
  qs_keys = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
  if len(qs_keys) != 1:
    raise KeyError(f"Expected one '{prefix}.quant_state.bitsandbytes__<type>' entry, "
                   f"found {qs_keys}.")
  info = json.loads(bytes(np.asarray(state_dict[qs_keys[0]], np.uint8).tolist()))
  quant_type = info["quant_type"]
  block_size = int(info["blocksize"])
  torch_shape = tuple(int(d) for d in info["shape"])
  if info["dtype"] not in _DTYPE_NAMES:
    raise ValueError(f"Unsupported original dtype {info['dtype']!r}.")
  dtype = np.dtype(_DTYPE_NAMES[info["dtype"]])
  quant_map = np.asarray(state_dict[f"{prefix}.quant_map"], np.float32)
  if not np.array_equal(quant_map, tables.code_table(quant_type)):
    raise ValueError(f"{prefix}.quant_map is not bitsandbytes' {quant_type} table.")

  if len(torch_shape) == 1:
    k, n = torch_shape[0], 1
    default_kernel_shape = torch_shape
  elif len(torch_shape) == 2:
    n, k = torch_shape
    default_kernel_shape = (k, n)
  else:
    raise ValueError(f"Only 1-D and 2-D bitsandbytes weights are supported, got {torch_shape}.")
  kernel_shape = tuple(kernel_shape or default_kernel_shape)
  if (int(np.prod(kernel_shape[:in_ndim])), int(np.prod(kernel_shape[in_ndim:]))) != (k, n):
    raise ValueError(f"kernel_shape {kernel_shape} with in_ndim={in_ndim} does not "
                     f"match the PyTorch shape {torch_shape}.")

  numel = k * n
  packed = np.asarray(state_dict[prefix], np.uint8).reshape(-1)
  absmax = np.asarray(state_dict[f"{prefix}.absmax"]).reshape(-1)
  nblocks = -(-numel // block_size)
  if packed.size != -(-numel // 2) or absmax.size != nblocks:
    raise ValueError(f"{prefix}: {packed.size} packed bytes and {absmax.size} absmax "
                     f"values do not fit shape {torch_shape} at block size {block_size}.")
  tiled = k % block_size == 0
  codes = packed.reshape(n, k // 2).T if tiled else packed
  nested = offset = None
  if f"{prefix}.nested_absmax" in state_dict:
    if int(info.get("nested_blocksize", tables.NESTED_BLOCK_SIZE)) != tables.NESTED_BLOCK_SIZE:
      raise ValueError(f"nested_blocksize must be {tables.NESTED_BLOCK_SIZE}.")
    nested_map = np.asarray(state_dict[f"{prefix}.nested_quant_map"], np.float32)
    if not np.array_equal(nested_map, tables.DYNAMIC_MAP_256):
      raise ValueError(f"{prefix}.nested_quant_map is not the 256-entry dynamic map.")
    nested = jnp.asarray(np.asarray(state_dict[f"{prefix}.nested_absmax"], np.float32))
    offset = jnp.asarray(np.float32(info["nested_offset"]))
    absmax = absmax.astype(np.uint8)
  else:
    absmax = absmax.astype(np.float32)
  absmax = _absmax_from_torch_order(jnp.asarray(absmax), (k, n), block_size, tiled)
  return NF4Array(
      codes=jnp.asarray(np.ascontiguousarray(codes)), absmax=absmax,
      nested_absmax=nested, offset=offset, kernel_shape=kernel_shape,
      in_ndim=in_ndim, dtype=dtype, block_size=block_size, quant_type=quant_type,
      compute_dtype=None if compute_dtype is None else np.dtype(compute_dtype))
