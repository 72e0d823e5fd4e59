"""Row lookup in a 4-bit quantized embedding table (QLoRA's frozen base, opt-in).

An embedding table ``(V, D)`` quantized with ``in_ndim=1`` (what
``quantize(..., include_embeddings=True)`` does) is tiled along the
vocabulary: ``codes (V/2, D)`` pack rows ``2r`` (high nibble) and ``2r + 1``
(low), and ``absmax (V/block, D)`` holds one scale per column for each block
of ``block`` rows. A lookup gathers only the looked-up rows' codes and scales
and dequantizes them, so the float table never exists; the values equal
``dequantize(table)[ids]`` bit for bit. The table is frozen: no gradient
flows to it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.quant import tables
from peft_jax.quant.nf4 import NF4Array, decode_4bit, is_quantized, undo_double_quant

__all__ = ["nf4_lookup"]


def nf4_lookup(table: NF4Array, ids: Any, dtype: Any = None) -> jax.Array:
  """``dequantize(table)[ids]`` without dequantizing the whole table.

  Args:
    table: an unstacked, tiled :class:`NF4Array` of kernel shape ``(V, D)``
      with ``in_ndim=1`` (``V`` a multiple of its block size).
    ids: integer ids, any shape; an id outside ``[0, V)`` gives a row of NaN.
    dtype: result dtype; default the table's original dtype.

  Returns:
    ``ids.shape + (D,)`` in ``dtype``.

  Raises:
    TypeError: for a table that is not quantized or ids that are not integers.
    ValueError: for a stacked, flat-layout or not ``(V, D)`` table.
  """
  if not is_quantized(table):
    raise TypeError(f"nf4_lookup needs an NF4Array table, got {type(table).__name__}.")
  if table.stack_shape or len(table.kernel_shape) != 2 or table.in_ndim != 1 or not table.tiled:
    raise ValueError(f"nf4_lookup needs an unstacked (V, D) table tiled along V (V a multiple of "
                     f"block_size {table.block_size}), got {table!r}.")
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"Embedding ids must be integers, got {ids.dtype}.")
  vocab, width = table.kernel_shape
  rows = ids.astype(jnp.int32)
  valid = (rows >= 0) & (rows < vocab)
  rows = jnp.where(valid, rows, 0)
  pair = jnp.take(table.codes, rows // 2, axis=0).astype(jnp.int32)  # (..., D)
  nibble = jnp.where((rows % 2 == 0)[..., None], pair >> 4, pair & 0xF)
  values = decode_4bit(nibble, tables.code_table(table.quant_type))
  block = rows // table.block_size
  scales = jnp.take(table.absmax, block, axis=0)
  if table.double_quant:
    blocks_per_column = vocab // table.block_size
    # bitsandbytes' order of the absmax: column-major over (V/block, D).
    position = jnp.arange(width, dtype=jnp.int32) * blocks_per_column + block[..., None]
    nested = jnp.take(table.nested_absmax, position // tables.NESTED_BLOCK_SIZE)
    scales = undo_double_quant(scales, nested, table.offset)
  out = values * scales.astype(jnp.float32)
  out = jnp.where(valid[..., None], out, jnp.nan)
  return out.astype(np.dtype(table.dtype) if dtype is None else dtype)
