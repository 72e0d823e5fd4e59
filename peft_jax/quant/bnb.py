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

from peft_jax import validation
from peft_jax.quant import tables
from peft_jax.quant.nf4 import (NF4Array, _absmax_from_torch_order, _absmax_to_torch_order,
                                 check_block_size, check_quant_type)

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

  Every entry is checked before use: dtypes (uint8 codes, float32 or, with
  double quantization, uint8 absmax), sizes against the shape and block
  size, the code tables, the quant-state JSON fields, and finite scales.

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
    ValueError: one :class:`peft_jax.validation.InvalidValue` naming the
      key, the field and the value, for a missing key, a malformed quant
      state, a wrong dtype or size, an unknown code table, or non-finite
      scales.
  """
  compute_dtype = validation.float_dtype(compute_dtype, "compute_dtype")
  info = _quant_state(state_dict, prefix)
  quant_type = check_quant_type(info.get("quant_type"), f"{prefix} quant_state quant_type")
  block_size = check_block_size(info.get("blocksize"), f"{prefix} quant_state blocksize")
  torch_shape = info.get("shape")
  if (not isinstance(torch_shape, list) or len(torch_shape) not in (1, 2)
      or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                 for d in torch_shape)):
    raise _bad(f"{prefix} quant_state shape must be 1 or 2 positive integers, "
               f"got {torch_shape!r}.")
  torch_shape = tuple(torch_shape)
  if not isinstance(info.get("dtype"), str) or info["dtype"] not in _DTYPE_NAMES:
    raise _bad(f"{prefix} quant_state dtype must be one of {sorted(_DTYPE_NAMES)}, "
               f"got {info.get('dtype')!r}.")
  dtype = np.dtype(_DTYPE_NAMES[info["dtype"]])
  quant_map = _entry(state_dict, f"{prefix}.quant_map", (np.float32,))
  if quant_map.shape != (16,) or not np.array_equal(quant_map, tables.code_table(quant_type)):
    raise _bad(f"{prefix}.quant_map is not bitsandbytes' {quant_type} table.")

  if len(torch_shape) == 1:
    k, n = torch_shape[0], 1
    default_kernel_shape = torch_shape
  else:
    n, k = torch_shape
    default_kernel_shape = (k, n)
  kernel_shape = tuple(kernel_shape or default_kernel_shape)
  if (int(np.prod(kernel_shape[:in_ndim])), int(np.prod(kernel_shape[in_ndim:]))) != (k, n):
    raise _bad(f"kernel_shape {kernel_shape} with in_ndim={in_ndim} does not "
               f"match the PyTorch shape {torch_shape}.")

  numel = k * n
  nblocks = -(-numel // block_size)
  nested_keys = [key for key in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map")
                 if key in state_dict]
  nested_fields = [f for f in ("nested_blocksize", "nested_offset") if f in info]
  double_quant = bool(nested_keys or nested_fields)
  packed = _entry(state_dict, prefix, (np.uint8,)).reshape(-1)
  absmax = _entry(state_dict, f"{prefix}.absmax",
                  (np.uint8,) if double_quant else (np.float32,)).reshape(-1)
  if packed.size != -(-numel // 2) or absmax.size != nblocks:
    raise _bad(f"{prefix}: {packed.size} packed bytes and {absmax.size} absmax "
               f"values do not fit shape {torch_shape} at block size {block_size} "
               f"(expected {-(-numel // 2)} and {nblocks}).")
  tiled = k % block_size == 0
  codes = packed.reshape(n, k // 2).T if tiled else packed
  nested = offset = None
  if double_quant:
    nested_blocksize = info.get("nested_blocksize")
    if nested_blocksize != tables.NESTED_BLOCK_SIZE:
      raise _bad(f"{prefix} quant_state nested_blocksize must be {tables.NESTED_BLOCK_SIZE}, "
                 f"got {nested_blocksize!r}.")
    nested_map = _entry(state_dict, f"{prefix}.nested_quant_map", (np.float32,))
    if nested_map.shape != (256,) or not np.array_equal(nested_map, tables.DYNAMIC_MAP_256):
      raise _bad(f"{prefix}.nested_quant_map is not the 256-entry dynamic map.")
    nested_np = _entry(state_dict, f"{prefix}.nested_absmax", (np.float32,)).reshape(-1)
    n_nested = -(-nblocks // tables.NESTED_BLOCK_SIZE)
    if nested_np.size != n_nested:
      raise _bad(f"{prefix}.nested_absmax has {nested_np.size} values; {nblocks} absmax "
                 f"blocks need {n_nested}.")
    _check_scales(nested_np, f"{prefix}.nested_absmax")
    offset_value = info.get("nested_offset")
    validation.number(offset_value, f"{prefix} quant_state nested_offset")
    nested = jnp.asarray(nested_np)
    offset = jnp.asarray(np.float32(offset_value))
  else:
    _check_scales(absmax, f"{prefix}.absmax")
  absmax = _absmax_from_torch_order(jnp.asarray(absmax), (k, n), block_size, tiled)
  return NF4Array(
      codes=jnp.asarray(np.ascontiguousarray(codes)), absmax=absmax,
      nested_absmax=nested, offset=offset, kernel_shape=kernel_shape,
      in_ndim=in_ndim, dtype=dtype, block_size=block_size, quant_type=quant_type,
      compute_dtype=compute_dtype)


def _bad(message: str) -> validation.InvalidValue:
  return validation.InvalidValue(message)


def _entry(state_dict: Mapping[str, Any], key: str, dtypes: tuple) -> np.ndarray:
  """``state_dict[key]`` as a NumPy array of one of ``dtypes`` (never cast)."""
  if key not in state_dict:
    raise _bad(f"the bitsandbytes state dict has no {key!r} entry.")
  try:
    value = np.asarray(state_dict[key])
  except (TypeError, ValueError, RuntimeError) as error:
    raise _bad(f"{key} is not an array: {error}") from None
  if value.dtype not in [np.dtype(d) for d in dtypes]:
    want = " or ".join(np.dtype(d).name for d in dtypes)
    raise _bad(f"{key} has dtype {value.dtype}; bitsandbytes stores it as {want}.")
  return value


def _check_scales(scales: np.ndarray, key: str) -> None:
  bad = ~np.isfinite(scales) | (scales < 0)
  if bad.any():
    i = int(np.argmax(bad))
    raise _bad(f"{key} holds {int(bad.sum())} negative or non-finite scale(s) "
               f"(first: {scales[i]} at index {i}).")


def _quant_state(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The parsed ``{prefix}.quant_state.bitsandbytes__<type>`` JSON."""
  if not isinstance(state_dict, Mapping):
    raise _bad(f"state_dict must be a mapping, got {type(state_dict).__name__}.")
  qs_keys = [k for k in state_dict
             if isinstance(k, str) and k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
  if len(qs_keys) != 1:
    raise _bad(f"expected one '{prefix}.quant_state.bitsandbytes__<type>' entry, "
               f"found {qs_keys}.")
  raw = _entry(state_dict, qs_keys[0], (np.uint8,))
  try:
    info = json.loads(raw.tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise _bad(f"{qs_keys[0]} is not UTF-8 JSON: {error}.") from None
  if not isinstance(info, dict):
    raise _bad(f"{qs_keys[0]} must hold a JSON object, got {type(info).__name__}.")
  suffix = qs_keys[0].rsplit("__", 1)[1]
  if info.get("quant_type") != suffix:
    raise _bad(f"{qs_keys[0]}: quant_type {info.get('quant_type')!r} does not match the "
               f"key's {suffix!r}.")
  return info
