"""4-bit NormalFloat / FP4 quantized arrays, bit-compatible with bitsandbytes.

A kernel ``W`` of logical shape ``(*stack, *in_shape, *out_shape)`` is viewed
as a stack of matrices ``(K, N)`` with ``K = prod(in_shape)`` (the contracted
axes of ``x @ W``) and ``N = prod(out_shape)``. bitsandbytes quantizes the
PyTorch weight ``W.T`` of shape ``(N, K)``: it flattens it row-major, cuts it
into consecutive blocks of ``block_size`` elements, stores each block's
absolute maximum, and packs two 4-bit codes per byte (element ``2i`` in the
high nibble). Each matrix of the stack is quantized on its own, as each
``nn.Linear`` is in PyTorch.

Two storage layouts hold those same codes and scales:

* **tiled** (``K % block_size == 0``, every LLM projection): a block never
  crosses a PyTorch row, so block ``b`` of column ``n`` is
  ``W[b*block_size:(b+1)*block_size, n]``. ``codes`` has shape
  ``(*stack, K // 2, N)`` (row ``r`` packs ``W[2r]`` high, ``W[2r+1]`` low)
  and ``absmax`` has shape ``(*stack, K // block_size, N)``: a transpose of
  bitsandbytes' buffers, and a layout in which the matmul kernels can tile
  ``K`` and ``N`` directly.
* **flat** (any other shape): ``codes`` and ``absmax`` are bitsandbytes'
  buffers verbatim, ``(*stack, ceil(K*N/2))`` and ``(*stack, nblocks)``,
  including a partial last block and an odd-length pad.

With double quantization, ``absmax`` holds ``uint8`` codes over the 256-entry
dynamic map, quantized in blocks of 256 over bitsandbytes' flattened absmax
after subtracting its mean ``offset``; ``nested_absmax`` holds the float32
block scales.

Only the per-matrix shape is static metadata. The leading ``stack`` axes are
read off the leaves, so ``nn.scan`` (which slices leaves but shares static
fields) turns a stacked ``(L, K, N)`` array into valid per-layer arrays.

References:
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023.
  bitsandbytes ``functional.quantize_4bit`` and ``backends/default/ops.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import validation
from peft_jax.quant import tables


def _safe_divisor(absmax: jax.Array) -> jax.Array:
  """``absmax`` with zeros replaced by one.

  bitsandbytes divides by ``clamp(absmax, min=1e-38)``, so an all-zero block
  scales to zeros. 1e-38 is subnormal in float32 and XLA flushes subnormals to
  zero (1/0 = inf, 0 * inf = NaN), so replace zeros explicitly.
  """
  return jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4:
  """How to quantize: the QLoRA defaults (NF4, block 64, double quantization).

  Attributes:
    block_size: elements per absmax block, a power of two >= 16
      (bitsandbytes and QLoRA use 64).
    double_quant: quantize the absmax to 8 bits (block 256, mean offset),
      4.127 instead of 4.5 bits per parameter.
    compute_dtype: dtype of the dequantized weight in ``nf4_matmul``;
      ``None`` uses the activations' dtype.
    quant_type: ``"nf4"`` (normal float) or ``"fp4"`` (e2m1 float).
  """

  block_size: int = 64
  double_quant: bool = True
  compute_dtype: Any = jnp.bfloat16
  quant_type: str = "nf4"

  def __post_init__(self):
    object.__setattr__(self, "block_size", check_block_size(self.block_size))
    check_quant_type(self.quant_type)
    object.__setattr__(self, "double_quant",
                       validation.boolean(self.double_quant, "double_quant"))
    object.__setattr__(self, "compute_dtype",
                       validation.float_dtype(self.compute_dtype, "compute_dtype"))


def check_block_size(block_size: Any, name: str = "block_size") -> int:
  """``block_size`` as an int; raises unless it is a power of two >= 16."""
  try:
    bs = validation.integer(block_size, name, low=16)
  except validation.InvalidValue:
    bs = 0
  if bs & (bs - 1) or not bs:
    raise validation.InvalidValue(f"{name} must be a power of two >= 16, got {block_size!r}.")
  return bs


def check_quant_type(quant_type: Any, name: str = "quant_type") -> str:
  """``quant_type``; raises unless it is one of :data:`tables.QUANT_TYPES`."""
  if not isinstance(quant_type, str) or quant_type not in tables.QUANT_TYPES:
    raise validation.InvalidValue(
        f"{name} must be one of {tables.QUANT_TYPES}, got {quant_type!r}.")
  return quant_type


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP4(NF4):
  """``NF4`` with ``quant_type="fp4"`` (bitsandbytes' 4-bit float)."""

  quant_type: str = "fp4"


@dataclasses.dataclass(frozen=True)
class NF4Array:
  """A 4-bit blockwise-quantized kernel (NF4 or FP4), a pytree.

  Leaves (see the module docstring for the two layouts):
    codes: ``uint8``, two 4-bit codes per byte.
    absmax: per-block scales, ``float32``; ``uint8`` with double quantization.
    nested_absmax: ``float32 (*stack, ceil(nblocks / 256))`` second-level
      scales, or ``None``.
    offset: ``float32 (*stack,)`` mean subtracted before the nested
      quantization, or ``None``.

  Static metadata (shared by every matrix of a stack):
    kernel_shape: logical shape of one matrix, ``in_shape + out_shape``.
    in_ndim: number of leading ``kernel_shape`` axes contracted by ``x @ W``.
    dtype: the original dtype; ``dequantize()`` returns it.
    block_size, quant_type: as in :class:`NF4`.
    compute_dtype: default compute dtype of ``nf4_matmul`` (or ``None``).
  """

  codes: jax.Array
  absmax: jax.Array
  nested_absmax: jax.Array | None
  offset: jax.Array | None
  kernel_shape: tuple[int, ...]
  in_ndim: int
  dtype: np.dtype
  block_size: int
  quant_type: str
  compute_dtype: np.dtype | None

  # -- geometry ---------------------------------------------------------------
  @property
  def in_shape(self) -> tuple[int, ...]:
    return self.kernel_shape[:self.in_ndim]

  @property
  def out_shape(self) -> tuple[int, ...]:
    return self.kernel_shape[self.in_ndim:]

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """``(K, N)``: the kernel as a matrix, ``x (M, K) @ W (K, N)``."""
    return math.prod(self.in_shape), math.prod(self.out_shape)

  @property
  def tiled(self) -> bool:
    """Whether blocks run along ``K`` inside one column (``K % block_size == 0``)."""
    return self.matrix_shape[0] % self.block_size == 0

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[:-2] if self.tiled else self.codes.shape[:-1])

  @property
  def shape(self) -> tuple[int, ...]:
    return self.stack_shape + tuple(self.kernel_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def double_quant(self) -> bool:
    return self.nested_absmax is not None

  @property
  def num_blocks(self) -> int:
    """Absmax blocks per matrix."""
    k, n = self.matrix_shape
    return -(-(k * n) // self.block_size)

  @property
  def nbytes(self) -> int:
    """Bytes of all leaves (codes and scales)."""
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(self))

  @property
  def bits_per_param(self) -> float:
    return 8.0 * self.nbytes / max(self.size, 1)

  def __repr__(self) -> str:
    dq = ", double_quant" if self.double_quant else ""
    return (f"NF4Array(shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
            f"quant_type={self.quant_type}, block_size={self.block_size}{dq}, "
            f"bits/param={self.bits_per_param:.3f})")

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The dense array, in ``dtype`` (default: the original dtype)."""
    return dequantize_array(self, dtype)

  def scales(self) -> jax.Array:
    """The float32 per-block absmax, in this array's layout (double quant undone)."""
    return _absmax_float32(self)


jax.tree_util.register_dataclass(
    NF4Array,
    data_fields=["codes", "absmax", "nested_absmax", "offset"],
    meta_fields=["kernel_shape", "in_ndim", "dtype", "block_size", "quant_type",
                 "compute_dtype"],
)


def is_quantized(leaf: Any) -> bool:
  """Whether ``leaf`` is a quantized array (stops ``jax.tree`` recursion too)."""
  return isinstance(leaf, NF4Array)


# -- code lookup ----------------------------------------------------------------
def decode_4bit(index: jax.Array, table: np.ndarray, dtype: Any = jnp.float32) -> jax.Array:
  """``table[index]`` for 4-bit indices, as a tree of 15 ``jnp.where``.

  Selects instead of a gather: they vectorize on CPU and lower in Pallas on
  GPU (Triton) and TPU (Mosaic), where gathers from a table do not.

  Args:
    index: integer array with values in ``[0, 16)``.
    table: the 16 code values.
    dtype: result dtype (the constants are rounded to it once).

  Returns:
    An array of ``index.shape`` and ``dtype``.
  """
  index = index.astype(jnp.int32)
  values = [jnp.asarray(v, dtype) for v in np.asarray(table, np.float32)]
  for bit in range(4):
    is_set = (index & (1 << bit)) != 0
    values = [jnp.where(is_set, values[2 * j + 1], values[2 * j])
              for j in range(len(values) // 2)]
  return values[0]


def _nearest_code(scaled: jax.Array, midpoints: np.ndarray) -> jax.Array:
  """Number of midpoints strictly below ``scaled``: nearest code, ties to lower."""
  if len(midpoints) <= 16:
    count = jnp.zeros(scaled.shape, jnp.int32)
    for m in midpoints:
      count = count + (scaled > m).astype(jnp.int32)
    return count
  return jnp.searchsorted(jnp.asarray(midpoints), scaled, side="left",
                          method="scan_unrolled").astype(jnp.int32)


def _blockwise_scale(flat: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """bitsandbytes' blockwise absmax scaling over the last axis.

  Args:
    flat: float32 ``(*stack, n)``.
    block_size: elements per block.

  Returns:
    ``(scaled, absmax)``: ``scaled`` is ``(*stack, nblocks * block_size)``,
    zero-padded, in ``[-1, 1]``; ``absmax`` is ``(*stack, nblocks)``. Full
    blocks are multiplied by ``1 / absmax`` and a partial last block divided by
    its absmax, as in bitsandbytes' reference kernel, so codes match bit for
    bit.
  """
  *stack, n = flat.shape
  nblocks = -(-n // block_size)
  pad = nblocks * block_size - n
  blocks = jnp.pad(flat, [(0, 0)] * len(stack) + [(0, pad)])
  blocks = blocks.reshape(*stack, nblocks, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  floor = _safe_divisor(absmax)[..., None]
  scaled = blocks * (1.0 / floor)
  if pad:
    scaled = scaled.at[..., -1, :].set(blocks[..., -1, :] / floor[..., -1, :])
  scaled = jnp.clip(scaled, -1.0, 1.0)
  return scaled.reshape(*stack, nblocks * block_size), absmax


def _pack_pairs(codes: jax.Array, axis: int) -> jax.Array:
  """Packs pairs along ``axis`` (even index -> high nibble) into uint8."""
  codes = jnp.moveaxis(codes.astype(jnp.uint8), axis, -1)
  packed = (codes[..., 0::2] << 4) | codes[..., 1::2]
  return jnp.moveaxis(packed, -1, axis)


def _accurate_sum(x: jax.Array) -> jax.Array:
  """Sum over the last axis in float32, rounded once (pairwise two-sum).

  bitsandbytes takes the nested offset as ``absmax.mean()`` (torch: float32
  sum, then divide). Torch's summation order depends on its SIMD width and
  device, so no fixed order reproduces it everywhere; a compensated pairwise
  sum gives the correctly rounded float32 sum independent of XLA's reduction
  order, so our offset is deterministic and at most one ulp from torch's.
  """
  n = x.shape[-1]
  size = 1 << max(n - 1, 0).bit_length()
  hi = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - n)])
  lo = jnp.zeros_like(hi)
  while hi.shape[-1] > 1:
    half = hi.shape[-1] // 2
    a, b = hi[..., :half], hi[..., half:]
    s = a + b
    b_virtual = s - a
    err = (a - (s - b_virtual)) + (b - b_virtual)
    err = err + lo[..., :half] + lo[..., half:]
    hi = s + err
    lo = err - (hi - s)
  return hi[..., 0]


def _absmax_to_torch_order(absmax: jax.Array, tiled: bool) -> jax.Array:
  """``(*stack, KB, N)`` (tiled) or ``(*stack, nblocks)`` -> ``(*stack, nblocks)``."""
  if not tiled:
    return absmax
  *stack, kb, n = absmax.shape
  return jnp.swapaxes(absmax, -1, -2).reshape(*stack, n * kb)


def _absmax_from_torch_order(flat: jax.Array, matrix_shape, block_size, tiled: bool):
  if not tiled:
    return flat
  k, n = matrix_shape
  *stack, _ = flat.shape
  return jnp.swapaxes(flat.reshape(*stack, n, k // block_size), -1, -2)


def _double_quantize(absmax_flat: jax.Array, offset: jax.Array | None = None):
  """Nested 8-bit quantization of ``(*stack, nblocks)`` float32 absmax.

  Args:
    absmax_flat: the absmax in bitsandbytes' (PyTorch) order.
    offset: the mean to subtract, ``(*stack,)``; default: the float32 sum,
      rounded once, divided by ``nblocks``. bitsandbytes uses
      ``absmax.mean()``, whose last bit depends on torch's reduction order
      (SIMD width, device), so the two may differ by one ulp.

  Returns:
    ``(codes uint8 (*stack, nblocks), nested_absmax (*stack, n2), offset (*stack,))``.
  """
  nblocks = absmax_flat.shape[-1]
  if offset is None:
    # A data-dependent divisor (exactly nblocks) keeps XLA from turning the
    # division by a constant into a multiplication by its rounded reciprocal.
    count = jnp.float32(nblocks) + 0.0 * absmax_flat[..., 0]
    offset = _accurate_sum(absmax_flat) / count
  offset = jnp.asarray(offset, jnp.float32)
  scaled, nested = _blockwise_scale(absmax_flat - offset[..., None],
                                    tables.NESTED_BLOCK_SIZE)
  codes = _nearest_code(scaled[..., :nblocks], tables.DYNAMIC_MAP_MIDPOINTS)
  return codes.astype(jnp.uint8), nested, offset


def _nested_index(matrix_shape, block_size: int, tiled: bool) -> np.ndarray:
  """Nested-block index of each absmax entry, in the array's layout."""
  k, n = matrix_shape
  if tiled:
    kb = k // block_size
    torch_pos = np.arange(n)[None, :] * kb + np.arange(kb)[:, None]
  else:
    torch_pos = np.arange(-(-(k * n) // block_size))
  return (torch_pos // tables.NESTED_BLOCK_SIZE).astype(np.int32)


def _absmax_float32(w: NF4Array) -> jax.Array:
  """Float32 absmax in ``w``'s layout, undoing double quantization.

  Same float32 operations as bitsandbytes: ``code[q] * nested`` then
  ``+ offset``, each rounded.
  """
  if not w.double_quant:
    return w.absmax.astype(jnp.float32)
  index = _nested_index(w.matrix_shape, w.block_size, w.tiled)
  nested = jnp.take(w.nested_absmax, jnp.asarray(index), axis=-1)
  stack_axes = (None,) * index.ndim
  return undo_double_quant(w.absmax, nested, w.offset[(...,) + stack_axes])


def undo_double_quant(codes: jax.Array, nested: jax.Array, offset: jax.Array) -> jax.Array:
  """float32 absmax ``code[codes] * nested + offset`` (operands broadcast together)."""
  code = jnp.take(jnp.asarray(tables.DYNAMIC_MAP_256), codes.astype(jnp.int32))
  product = code * nested
  # The select (a no-op for non-NaN values) sits between the multiply and the
  # add so that LLVM cannot contract them into an FMA, which would round once
  # instead of twice as bitsandbytes does.
  product = jnp.where(product == product, product, jnp.zeros_like(product))
  return product + offset


def _check_layout_args(shape, stack_ndim: int, in_ndim: int):
  if not 0 <= stack_ndim < len(shape):
    raise ValueError(
        f"stack_ndim={stack_ndim} leaves no kernel axes in an array of shape {shape}.")
  kernel_shape = tuple(shape[stack_ndim:])
  if not 1 <= in_ndim <= len(kernel_shape):
    raise ValueError(
        f"in_ndim={in_ndim} must be in [1, {len(kernel_shape)}] for kernel shape "
        f"{kernel_shape}.")
  return kernel_shape


def quantize_array(x: Any, spec: NF4 = NF4(), *, stack_ndim: int = 0,
                   in_ndim: int = 1) -> NF4Array:
  """Quantizes one array blockwise to 4 bits, exactly as bitsandbytes does.

  Args:
    x: a float array (float32, bfloat16, float16, ...) in Flax layout
      ``(*stack, *in_shape, *out_shape)``.
    spec: block size, quant type, double quantization and compute dtype.
    stack_ndim: leading axes holding independent matrices (a scanned layer
      axis); each matrix is quantized on its own.
    in_ndim: kernel axes after the stack that ``x @ W`` contracts (1 for
      ``nn.Dense``).

  Returns:
    An :class:`NF4Array` whose codes and scales equal bitsandbytes'
    ``quantize_4bit(W_torch, blocksize, compress_statistics=double_quant,
    quant_type)`` for each PyTorch-layout matrix ``W_torch`` (see
    :func:`peft_jax.quant.bnb.to_bnb`).

  Raises:
    TypeError: for a non-float input.
    ValueError: for an already quantized input, a bad layout, or (for a
      concrete input) NaN or infinite values, which would poison every
      element of their block.
  """
  if is_quantized(x):
    raise ValueError(f"The array is already quantized: {x!r}.")
  if not isinstance(spec, NF4):
    raise TypeError(f"spec must be an NF4/FP4 spec, got {type(spec).__name__}.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"Only float arrays can be quantized, got dtype {x.dtype}.")
  _check_layout_args(x.shape, stack_ndim, in_ndim)
  validation.finite_array(x, "the array to quantize")
  return _quantize(x, spec, stack_ndim, in_ndim)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x: jax.Array, spec: NF4, stack_ndim: int, in_ndim: int) -> NF4Array:
  kernel_shape = tuple(x.shape[stack_ndim:])
  stack = tuple(x.shape[:stack_ndim])
  k = math.prod(kernel_shape[:in_ndim])
  n = math.prod(kernel_shape[in_ndim:])
  bs = spec.block_size
  midpoints, sorted_to_code = tables.sorted_code_and_midpoints(spec.quant_type)
  matrix = x.reshape(*stack, k, n).astype(jnp.float32)

  tiled = k % bs == 0
  if tiled:
    # Blocks of `bs` consecutive rows of one column: a block of the flattened
    # PyTorch weight (N, K). Scale as `_blockwise_scale` does for full blocks.
    blocks = matrix.reshape(*stack, k // bs, bs, n)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)
    scaled = blocks * (1.0 / _safe_divisor(absmax))[..., None, :]
    scaled = jnp.clip(scaled, -1.0, 1.0).reshape(*stack, k, n)
    pack_axis = -2
  else:
    flat = jnp.swapaxes(matrix, -1, -2).reshape(*stack, n * k)
    scaled, absmax = _blockwise_scale(flat, bs)
    scaled = scaled[..., :2 * (-(-(n * k) // 2))]  # odd length: one 0.0 pad
    pack_axis = -1
  codes = _nearest_code(scaled, midpoints)
  if sorted_to_code is not None:
    codes = jnp.take(jnp.asarray(sorted_to_code), codes)
  codes = _pack_pairs(codes, pack_axis)

  nested = offset = None
  if spec.double_quant:
    qabsmax, nested, offset = _double_quantize(_absmax_to_torch_order(absmax, tiled))
    absmax = _absmax_from_torch_order(qabsmax, (k, n), bs, tiled)
  return NF4Array(
      codes=codes, absmax=absmax, nested_absmax=nested, offset=offset,
      kernel_shape=kernel_shape, in_ndim=in_ndim, dtype=np.dtype(x.dtype),
      block_size=bs, quant_type=spec.quant_type, compute_dtype=spec.compute_dtype)


def unpack_codes(w: NF4Array) -> jax.Array:
  """The 4-bit codes as int32, one per element, in the array's layout.

  Tiled: ``(*stack, K, N)``. Flat: ``(*stack, 2 * ceil(K*N/2))`` in PyTorch order.
  """
  codes = w.codes.astype(jnp.int32)
  axis = -2 if w.tiled else -1
  shape = list(codes.shape)
  shape[axis] *= 2
  # A broadcast and a shift rather than a stack (a concatenate), so that XLA
  # fuses the unpacking into its consumer instead of writing int32 codes out.
  shifts = jnp.array([4, 0], jnp.int32).reshape((2, 1) if w.tiled else (2,))
  pair = (jnp.expand_dims(codes, axis) >> shifts) & 0xF
  return pair.reshape(shape)


def dequantize_array(w: NF4Array, dtype: Any = None) -> jax.Array:
  """Dense ``(*stack, *kernel_shape)`` array of a quantized kernel.

  Computes ``code[q] * absmax`` in float32 (as bitsandbytes does) and casts the
  result to ``dtype`` (default: the original dtype).
  """
  if not is_quantized(w):
    raise TypeError(f"Expected an NF4Array, got {type(w).__name__}.")
  return _dequantize(w, np.dtype(w.dtype) if dtype is None else validation.float_dtype(
      dtype, "dtype"))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(w: NF4Array, dtype: np.dtype) -> jax.Array:
  k, n = w.matrix_shape
  bs = w.block_size
  stack = w.stack_shape
  values = decode_4bit(unpack_codes(w), tables.code_table(w.quant_type))
  absmax = _absmax_float32(w)
  if w.tiled:
    values = values.reshape(*stack, k // bs, bs, n) * absmax[..., None, :]
    matrix = values.reshape(*stack, k, n)
  else:
    nblocks = absmax.shape[-1]
    values = jnp.pad(values, [(0, 0)] * len(stack)
                     + [(0, nblocks * bs - values.shape[-1])])
    values = values.reshape(*stack, nblocks, bs) * absmax[..., None]
    matrix = jnp.swapaxes(values.reshape(*stack, -1)[..., :n * k].reshape(*stack, n, k),
                          -1, -2)
  return matrix.reshape(*stack, *w.kernel_shape).astype(dtype)
