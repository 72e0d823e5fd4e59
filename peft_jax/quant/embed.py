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

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.quant import tables
from peft_jax.quant.nf4 import NF4Array, decode_4bit, is_quantized, undo_double_quant

__all__ = ["nf4_attend", "nf4_lookup"]

HEAD_CHUNK_ROWS = 16384  # rows of the table a tied head dequantizes at a time


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


def nf4_attend(query: jax.Array, table: NF4Array, dtype: Any = None, *,
               chunk_rows: int | None = None) -> jax.Array:
  """``query @ dequantize(table).T`` (a tied head's logits) without the float table.

  The vocabulary is read ``chunk_rows`` rows at a time (:func:`nf4_lookup` of
  a row range) in a loop that writes each chunk's logits into place, and the
  backward pass (a custom VJP) reads the rows again, chunk by chunk: the
  ``(V, D)`` float table never exists, in either pass. ``V`` not a multiple
  of ``chunk_rows``: one chunk. The table gets no gradient (frozen).

  Args:
    query: ``(..., D)``.
    table: as for :func:`nf4_lookup`.
    dtype: compute and result dtype; default ``result_type(query, table.dtype)``.
    chunk_rows: rows per chunk (default :data:`HEAD_CHUNK_ROWS`).

  Returns:
    ``query.shape[:-1] + (V,)`` in ``dtype``.
  """
  vocab, width = table.kernel_shape
  chunk_rows = HEAD_CHUNK_ROWS if chunk_rows is None else chunk_rows
  chunk = chunk_rows if 0 < chunk_rows < vocab and vocab % chunk_rows == 0 else vocab
  dtype = jnp.result_type(query.dtype, table.dtype) if dtype is None else dtype
  flat = query.reshape(-1, width).astype(dtype)
  out = _chunked_head(flat, table, chunk, np.dtype(dtype))
  return out.reshape(*query.shape[:-1], vocab)


def _rows(table: NF4Array, i, chunk: int, dtype) -> jax.Array:
  return nf4_lookup(table, i * chunk + jnp.arange(chunk, dtype=jnp.int32), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _chunked_head(q, table, chunk, dtype):
  vocab = table.kernel_shape[0]

  def body(i, out):
    return jax.lax.dynamic_update_slice(out, jnp.dot(q, _rows(table, i, chunk, dtype).T),
                                        (0, i * chunk))

  return jax.lax.fori_loop(0, vocab // chunk, body, jnp.zeros((q.shape[0], vocab), dtype))


def _chunked_head_fwd(q, table, chunk, dtype):
  return _chunked_head(q, table, chunk, dtype), table


def _chunked_head_bwd(chunk, dtype, table, grad):
  vocab, width = table.kernel_shape

  def body(i, dq):
    g = jax.lax.dynamic_slice(grad, (0, i * chunk), (grad.shape[0], chunk))
    return dq + jnp.dot(g, _rows(table, i, chunk, dtype))

  dq = jax.lax.fori_loop(0, vocab // chunk, body, jnp.zeros((grad.shape[0], width), dtype))
  return dq, jax.tree.map(_no_cotangent, table)


def _no_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


_chunked_head.defvjp(_chunked_head_fwd, _chunked_head_bwd)
