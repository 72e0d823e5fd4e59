"""Pallas kernels for the 4-bit dequantize-matmul (GPU Triton and TPU Mosaic).

Both products read the packed codes of a tiled :class:`NF4Array` (``codes``
``(K/2, N)``: row ``r`` holds ``W[2r]`` in the high nibble and ``W[2r+1]`` in
the low nibble) and float32 block scales ``(K/block_size, N)``. The
activations arrive split into even and odd input columns, so that

    x @ W = x[:, 0::2] @ decode(codes >> 4) + x[:, 1::2] @ decode(codes & 15)

needs no interleaving of weights inside the kernel. Each program owns one
``(block_m, block_n)`` output tile and loops over ``K`` in chunks of
``chunk_rows`` code rows: it decodes a ``(chunk_rows, block_n)`` tile with 15
selects (no table gather, which Triton cannot lower), scales it per block,
and feeds it to the MXU / tensor cores. The dense weight never exists in
memory, only one decoded tile per program.

The transposed product (the gradient ``dx = dy @ W.T``) is the same loop with
the roles of ``K`` and ``N`` swapped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from peft_jax.quant import nf4 as nf4_lib
from peft_jax.quant import tables

PLATFORMS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Tile sizes of the kernels.

  Attributes:
    block_m: rows of ``x`` per program (``M`` is zero-padded to a multiple).
    block_n: output columns per program (forward) or per inner step (backward).
    chunk_rows: packed code rows (``2 * chunk_rows`` inputs) per inner step
      (forward) or per program (backward).
  """

  block_m: int
  block_n: int
  chunk_rows: int


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


# The VMEM a Mosaic kernel may use without raising the scoped limit: 16 MiB on
# v5e (the smallest default; v4/v5p/v6e allow 16-32 MiB). A TPU BlockSpec
# block is copied whole into VMEM, twice (double-buffered), so the tile choice
# below keeps every block of both kernels within it.
TPU_VMEM_BUDGET_BYTES = 16 * 2**20


def tpu_vmem_bytes(tiles: TileConfig, k: int, n: int, block_size: int,
                   x_itemsize: int = 4) -> int:
  """VMEM one TPU program holds: the larger of the forward and backward kernels.

  Counts every BlockSpec block twice (Mosaic double-buffers them) and the
  in-kernel temporaries once (the accumulators, one decoded high/low tile
  pair and the activation slices fed to the dots), for activations of
  ``x_itemsize`` bytes (4: float32, the worst case).
  """
  bm, bn, chunk = tiles.block_m, tiles.block_n, tiles.chunk_rows
  rows, half_block = k // 2, block_size // 2
  decoded = 2 * chunk * bn * 4
  forward = (2 * (2 * bm * rows * x_itemsize + rows * bn + rows // half_block * bn * 4)
             + 2 * bm * bn * 4 + bm * bn * 4 + decoded + 2 * bm * chunk * 4)
  backward = (2 * (bm * n * x_itemsize + chunk * n + chunk // half_block * n * 4)
              + 2 * 2 * bm * chunk * 4 + 2 * bm * chunk * 4 + decoded + bm * bn * 4)
  return max(forward, backward)


def choose_tiles(m: int, k: int, n: int, block_size: int, platform: str) -> TileConfig | None:
  """Tiles for an ``(m, k) @ (k, n)`` product, or ``None`` if it cannot tile.

  On TPU a block dimension is a multiple of 128 lanes / 8 sublanes or the
  whole axis, so widths such as 576 (SmolLM2) tile as one full-width block
  where no multiple of 128 divides them, and the tiles shrink
  (``chunk_rows`` to 128, then ``block_m``, then ``block_n``) until
  :func:`tpu_vmem_bytes` fits :data:`TPU_VMEM_BUDGET_BYTES`.

  Args:
    m, k, n: the product's sizes (``k % block_size == 0`` is assumed).
    block_size: the quantization block size.
    platform: ``"gpu"`` (Triton: power-of-two tiles, dot sizes >= 16) or
      ``"tpu"`` (Mosaic: lane dims multiples of 128 or whole, sublanes of
      8/32 or whole).

  Returns:
    A :class:`TileConfig`, or ``None`` when ``k`` or ``n`` do not divide into
    legal tiles (or none fits VMEM); callers then use the XLA path.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}.")
  half_block = block_size // 2
  rows = k // 2
  if platform == "gpu":
    block_m = min(max(16, _next_power_of_two(m)), 64)
    chunk_candidates = (128, 64, 32, 16)
    n_candidates = (128, 64, 32, 16)
  else:
    block_m = min(max(8, _next_power_of_two(m)), 256)
    chunk_candidates = (512, 256, 128)
    n_candidates = (512, 256, 128)
  legal_chunk = lambda c: rows % c == 0 and c % half_block == 0 and c >= half_block
  chunk = next((c for c in chunk_candidates if legal_chunk(c)), None)
  if chunk is None and platform == "gpu" and rows % half_block == 0 and half_block <= 128:
    chunk = half_block
  block_n = next((c for c in n_candidates if n % c == 0), None)
  if platform == "tpu":
    if chunk is None and rows % 32 == 0 and legal_chunk(rows):
      chunk = rows  # the whole K axis in one step (e.g. K = 576: 288 code rows)
    if block_n is None and n % 8 == 0:
      block_n = n  # the whole N axis (e.g. N = 576)
  if chunk is None or block_n is None:
    return None
  tiles = TileConfig(block_m=block_m, block_n=block_n, chunk_rows=chunk)
  if platform == "tpu":
    return _fit_vmem(tiles, k, n, block_size, legal_chunk)
  return tiles


def _fit_vmem(tiles: TileConfig, k: int, n: int, block_size: int, legal_chunk
              ) -> TileConfig | None:
  """Halves the TPU tiles until they fit :data:`TPU_VMEM_BUDGET_BYTES` (else None)."""
  while tpu_vmem_bytes(tiles, k, n, block_size) > TPU_VMEM_BUDGET_BYTES:
    bm, bn, chunk = tiles.block_m, tiles.block_n, tiles.chunk_rows
    if chunk % 256 == 0 and legal_chunk(chunk // 2):
      tiles = dataclasses.replace(tiles, chunk_rows=chunk // 2)
    elif bm > 8:
      tiles = dataclasses.replace(tiles, block_m=bm // 2)
    elif bn % 256 == 0 and n % (bn // 2) == 0:
      tiles = dataclasses.replace(tiles, block_n=bn // 2)
    else:
      return None
  return tiles


def _scaled_tile(codes: jax.Array, scales: jax.Array, half_block: int, table,
                 dtype) -> tuple[jax.Array, jax.Array]:
  """Decodes a ``(rows, cols)`` uint8 tile into scaled high/low nibble values.

  ``scales`` is ``(rows / half_block, cols)``: each block of ``half_block``
  code rows (``2 * half_block`` weights) shares one scale per column.
  """
  rows, cols = codes.shape
  codes = codes.astype(jnp.int32)
  groups = rows // half_block

  def scale(values):
    values = values.reshape(groups, half_block, cols) * scales[:, None, :]
    return values.reshape(rows, cols).astype(dtype)

  high = nf4_lib.decode_4bit(codes >> 4, table)
  low = nf4_lib.decode_4bit(codes & 0xF, table)
  return scale(high), scale(low)


def _forward_kernel(x_even_ref, x_odd_ref, codes_ref, scales_ref, out_ref, *,
                    chunk_rows: int, half_block: int, table, compute_dtype):
  rows = codes_ref.shape[0]
  groups = chunk_rows // half_block

  def step(i, acc):
    row = pl.multiple_of(i * chunk_rows, chunk_rows)
    group = pl.multiple_of(i * groups, groups)
    high, low = _scaled_tile(codes_ref[pl.ds(row, chunk_rows), :],
                             scales_ref[pl.ds(group, groups), :],
                             half_block, table, compute_dtype)
    x_even = x_even_ref[:, pl.ds(row, chunk_rows)].astype(compute_dtype)
    x_odd = x_odd_ref[:, pl.ds(row, chunk_rows)].astype(compute_dtype)
    acc += jnp.dot(x_even, high, preferred_element_type=jnp.float32)
    acc += jnp.dot(x_odd, low, preferred_element_type=jnp.float32)
    return acc

  acc = jnp.zeros(out_ref.shape, jnp.float32)
  out_ref[...] = jax.lax.fori_loop(0, rows // chunk_rows, step, acc)


def _backward_kernel(grad_ref, codes_ref, scales_ref, dx_even_ref, dx_odd_ref, *,
                     block_n: int, half_block: int, table, compute_dtype):
  n = codes_ref.shape[1]
  contract_last = (((1,), (1,)), ((), ()))  # a @ b.T

  def step(j, carry):
    acc_even, acc_odd = carry
    col = pl.multiple_of(j * block_n, block_n)
    high, low = _scaled_tile(codes_ref[:, pl.ds(col, block_n)],
                             scales_ref[:, pl.ds(col, block_n)],
                             half_block, table, compute_dtype)
    grad = grad_ref[:, pl.ds(col, block_n)].astype(compute_dtype)
    acc_even += jax.lax.dot_general(grad, high, contract_last,
                                    preferred_element_type=jnp.float32)
    acc_odd += jax.lax.dot_general(grad, low, contract_last,
                                   preferred_element_type=jnp.float32)
    return acc_even, acc_odd

  zeros = jnp.zeros(dx_even_ref.shape, jnp.float32)
  acc_even, acc_odd = jax.lax.fori_loop(0, n // block_n, step, (zeros, zeros))
  dx_even_ref[...] = acc_even
  dx_odd_ref[...] = acc_odd


def _compiler_params(platform: str, num_grid_axes: int) -> Any:
  if platform == "gpu":
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=2)
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_grid_axes)


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
  pad = -a.shape[0] % multiple
  return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def _pallas_call(kernel, *, platform: str, interpret: bool, num_grid_axes: int, **kwargs):
  compiler_params = None if interpret else _compiler_params(platform, num_grid_axes)
  return pl.pallas_call(kernel, interpret=interpret, compiler_params=compiler_params,
                        **kwargs)


@functools.partial(jax.jit, static_argnames=("block_size", "quant_type", "compute_dtype",
                                              "tiles", "platform", "interpret"))
def matmul_forward(x: jax.Array, codes: jax.Array, scales: jax.Array, *, block_size: int,
                   quant_type: str, compute_dtype: Any, tiles: TileConfig,
                   platform: str = "gpu", interpret: bool = False) -> jax.Array:
  """``x (M, K) @ W (K, N)`` in float32, ``W`` given by tiled codes and scales.

  Args:
    x: activations ``(M, K)``; ``M`` need not divide into tiles.
    codes: uint8 ``(K/2, N)``.
    scales: float32 ``(K/block_size, N)``.
    block_size, quant_type: the quantization.
    compute_dtype: dtype of the decoded weight tile and of ``x`` in the dot.
    tiles: from :func:`choose_tiles`.
    platform: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).
    interpret: run the kernel in the Pallas interpreter (any backend).

  Returns:
    float32 ``(M, N)``.
  """
  m = x.shape[0]
  rows, n = codes.shape
  table = tables.code_table(quant_type)
  x = _pad_rows(x, tiles.block_m)
  x_even, x_odd = x[:, 0::2], x[:, 1::2]
  groups = rows // (block_size // 2)
  grid = (x.shape[0] // tiles.block_m, n // tiles.block_n)
  kernel = functools.partial(_forward_kernel, chunk_rows=tiles.chunk_rows,
                             half_block=block_size // 2, table=table,
                             compute_dtype=compute_dtype)
  out = _pallas_call(
      kernel, platform=platform, interpret=interpret, num_grid_axes=2,
      grid=grid,
      in_specs=[
          pl.BlockSpec((tiles.block_m, rows), lambda i, j: (i, 0)),
          pl.BlockSpec((tiles.block_m, rows), lambda i, j: (i, 0)),
          pl.BlockSpec((rows, tiles.block_n), lambda i, j: (0, j)),
          pl.BlockSpec((groups, tiles.block_n), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((tiles.block_m, tiles.block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
  )(x_even, x_odd, codes, scales)
  return out[:m]


@functools.partial(jax.jit, static_argnames=("block_size", "quant_type", "compute_dtype",
                                              "tiles", "platform", "interpret"))
def matmul_transposed(grad: jax.Array, codes: jax.Array, scales: jax.Array, *,
                      block_size: int, quant_type: str, compute_dtype: Any,
                      tiles: TileConfig, platform: str = "gpu",
                      interpret: bool = False) -> jax.Array:
  """``grad (M, N) @ W.T`` in float32, ``(M, K)``: the gradient of ``x @ W``.

  Args are as in :func:`matmul_forward`; here ``tiles.chunk_rows`` code rows
  form one program's output columns and ``tiles.block_n`` the inner step.
  """
  m = grad.shape[0]
  rows, n = codes.shape
  half_block = block_size // 2
  table = tables.code_table(quant_type)
  grad = _pad_rows(grad, tiles.block_m)
  groups = tiles.chunk_rows // half_block
  grid = (grad.shape[0] // tiles.block_m, rows // tiles.chunk_rows)
  kernel = functools.partial(_backward_kernel, block_n=tiles.block_n,
                             half_block=half_block, table=table,
                             compute_dtype=compute_dtype)
  out_block = pl.BlockSpec((tiles.block_m, tiles.chunk_rows), lambda i, j: (i, j))
  dx_even, dx_odd = _pallas_call(
      kernel, platform=platform, interpret=interpret, num_grid_axes=2,
      grid=grid,
      in_specs=[
          pl.BlockSpec((tiles.block_m, n), lambda i, j: (i, 0)),
          pl.BlockSpec((tiles.chunk_rows, n), lambda i, j: (j, 0)),
          pl.BlockSpec((groups, n), lambda i, j: (j, 0)),
      ],
      out_specs=[out_block, out_block],
      out_shape=[jax.ShapeDtypeStruct((grad.shape[0], rows), jnp.float32)] * 2,
  )(grad, codes, scales)
  dx = jnp.stack([dx_even, dx_odd], axis=-1).reshape(grad.shape[0], 2 * rows)
  return dx[:m]
