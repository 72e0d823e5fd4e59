"""``nf4_matmul``: ``x @ dequantize(w)`` without materializing the dense weight.

Implementations (all compute the same product; the tests hold them together):

* ``"pallas"``: the Pallas kernels of :mod:`peft_jax.quant.kernels`, Triton
  on GPU and Mosaic on TPU;
* ``"pallas_interpret"``: the same kernels in the Pallas interpreter (tests);
* ``"xla"``: the CPU path and the oracle of the kernels. For few rows
  (``M < 64``, decoding) a ``lax.scan`` over ``K`` tiles dequantizes one
  tile at a time and accumulates its product, so a tile stays in cache and
  the float weight is never written out; for a batch of rows (training,
  prefill) the weight is dequantized once, whole, in the compute dtype and
  used by one full-size matmul (thin ``K``-tile products are memory-bound
  at large ``M``), again in the backward pass rather than kept (so the
  float weights of all layers are never alive at once: ``_dequantized_after``);
* ``"reference"``: dequantize the whole weight, then one ``dot``.

The gradient flows to ``x`` only (``custom_vjp``): ``dx = dy @ W.T`` through
the same quantized weight; the codes and scales get zero cotangents.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import validation
from peft_jax.quant import kernels, sharded_matmul, tables
from peft_jax.quant.nf4 import NF4Array, decode_4bit, dequantize_array, is_quantized

IMPLS = ("xla", "pallas", "pallas_interpret", "reference")

# K rows per step of the XLA path: two 128-row decoded tiles of float32
# (2 x 128 x N x 4 bytes, 4 MiB at N=4096) measured fastest on a 2-core CPU.
_XLA_TILE_ROWS = 256
# Rows of x from which the XLA path dequantizes the whole weight once and
# runs one matmul, unless the dequantized weight would exceed the byte cap.
_DEQUANTIZE_ONCE_MIN_ROWS = 64
_DEQUANTIZE_ONCE_MAX_BYTES = 256 * 2**20


def _dequantize_once(w: NF4Array, m: int, compute_dtype) -> bool:
  k, n = w.matrix_shape
  return m >= _DEQUANTIZE_ONCE_MIN_ROWS and k * n * np.dtype(compute_dtype).itemsize <= (
      _DEQUANTIZE_ONCE_MAX_BYTES)


def can_use_pallas(w: NF4Array, m: int = 1, platform: str | None = None) -> bool:
  """Whether the Pallas kernels can tile ``x (m, K) @ w``."""
  if not is_quantized(w) or w.stack_shape or not w.tiled:
    return False
  platform = platform or _default_platform()
  if platform not in kernels.PLATFORMS:
    platform = "gpu"
  k, n = w.matrix_shape
  return kernels.choose_tiles(m, k, n, w.block_size, platform) is not None


def _default_platform() -> str:
  return jax.default_backend()


def select_impl(w: NF4Array, m: int, impl: str | None = None,
                platform: str | None = None) -> str:
  """The implementation ``nf4_matmul`` runs for ``x (m, K) @ w``.

  Args:
    w: the quantized weight.
    m: rows of ``x`` (after flattening leading axes).
    impl: ``None`` (choose), or one of ``IMPLS``. A Pallas request for a
      shape the kernels cannot tile falls back to ``"xla"``.
    platform: ``"gpu"``/``"tpu"``; default the default JAX backend.

  Returns:
    One of ``IMPLS``.
  """
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}.")
  if not w.tiled:
    return "reference"  # bitsandbytes' flat layout: dequantize, then dot
  platform = platform or _default_platform()
  if impl is None:
    impl = "pallas" if platform in kernels.PLATFORMS else "xla"
  if impl == "pallas" and platform not in kernels.PLATFORMS:
    impl = "pallas_interpret"
  if impl.startswith("pallas"):
    tile_platform = platform if platform in kernels.PLATFORMS else "gpu"
    if not can_use_pallas(w, m, tile_platform):
      return "xla"
  return impl


def nf4_matmul(x: jax.Array, w: NF4Array, *, impl: str | None = None,
               compute_dtype: Any = None, platform: str | None = None) -> jax.Array:
  """``x @ dequantize(w)`` over the trailing input axes of ``x``.

  Args:
    x: ``(..., *w.in_shape)`` activations, any leading axes.
    w: an unstacked :class:`NF4Array` (slice stacked ones per layer).
    impl: ``None`` to choose by backend and shape (Pallas on GPU/TPU when the
      shape tiles, else the fused XLA path), or ``"xla"``, ``"pallas"``,
      ``"pallas_interpret"``, ``"reference"``. A weight placed on a mesh
      (:mod:`peft_jax.quant.sharded_matmul`, as the sharded train step does)
      runs the Pallas kernels per shard inside ``jax.shard_map``.
    compute_dtype: dtype of the dequantized weight and of ``x`` inside the
      dot (accumulation is float32); default ``w.compute_dtype``, else
      ``x.dtype``.
    platform: target of ``impl="pallas"``: ``"gpu"`` (Triton) or ``"tpu"``
      (Mosaic); default the JAX default backend.

  Returns:
    ``(..., *w.out_shape)`` in ``x.dtype``.

  Raises:
    TypeError: if ``w`` is not quantized or ``x`` is not float.
    ValueError: for a stacked ``w``, mismatched input axes, or a
      ``compute_dtype`` that is not a float dtype.
  """
  if not is_quantized(w):
    raise TypeError(f"nf4_matmul needs an NF4Array, got {type(w).__name__}.")
  if w.stack_shape:
    raise ValueError(f"nf4_matmul takes one matrix; w has stack axes {w.stack_shape}.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a float array, got {x.dtype}.")
  in_shape = tuple(w.in_shape)
  if tuple(x.shape[x.ndim - len(in_shape):]) != in_shape or x.ndim < len(in_shape):
    raise ValueError(f"x of shape {x.shape} does not end in w's input axes {in_shape}.")
  lead = x.shape[:x.ndim - len(in_shape)]
  k, n = w.matrix_shape
  m = math.prod(lead)
  compute_dtype = validation.float_dtype(compute_dtype, "compute_dtype")
  compute_dtype = compute_dtype or w.compute_dtype or x.dtype
  chosen = select_impl(w, m, impl, platform)
  if sharded_matmul.is_placed(w):  # on a mesh: the kernels per shard, else XLA's path
    y = sharded_matmul.matmul_2d(x.reshape(m, k), w, impl=impl, compute_dtype=compute_dtype,
                                 platform=platform or _default_platform())
    if y is not None:
      return y.reshape(*lead, *w.out_shape)
    chosen = "reference" if chosen == "reference" else "xla"  # the partitioner splits these
  tile_platform = platform or _default_platform()
  if tile_platform not in kernels.PLATFORMS:
    tile_platform = "gpu"  # interpreter: any legal tiling
  y = _jitted_matmul_2d(x.reshape(m, k), w, chosen, np.dtype(compute_dtype), tile_platform)
  return y.reshape(*lead, *w.out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul_2d(x, w, impl, compute_dtype, platform):
  return _forward(x, w, impl, compute_dtype, platform).astype(x.dtype)


def _matmul_2d_fwd(x, w, impl, compute_dtype, platform):
  return _matmul_2d(x, w, impl, compute_dtype, platform), w


def _zero_cotangent(leaf):
  if leaf is None:
    return None
  if jnp.issubdtype(leaf.dtype, jnp.floating):
    return jnp.zeros(leaf.shape, leaf.dtype)
  return np.zeros(leaf.shape, jax.dtypes.float0)


def _matmul_2d_bwd(impl, compute_dtype, platform, w, grad):
  # The output has x's dtype, so its cotangent gives dx's dtype.
  dx = _transposed(grad, w, impl, compute_dtype, platform).astype(grad.dtype)
  return dx, jax.tree.map(_zero_cotangent, w)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)
_jitted_matmul_2d = jax.jit(_matmul_2d, static_argnums=(2, 3, 4))


def _dot(a, b, dims=None):
  precision = (jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None)
  dims = dims or (((a.ndim - 1,), (0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


def _forward(x, w, impl, compute_dtype, platform):
  """float32 ``(M, N)``."""
  if impl == "reference" or (impl == "xla" and _dequantize_once(w, x.shape[0], compute_dtype)):
    return _dot(x.astype(compute_dtype), _dequantized_after(w, x, compute_dtype))
  if impl == "xla":
    return _xla_forward(x.astype(compute_dtype), w, compute_dtype)
  k, n = w.matrix_shape
  tiles = kernels.choose_tiles(x.shape[0], k, n, w.block_size, platform)
  return kernels.matmul_forward(
      x, w.codes, w.scales(), block_size=w.block_size, quant_type=w.quant_type,
      compute_dtype=compute_dtype, tiles=tiles, platform=platform,
      interpret=impl == "pallas_interpret")


def _dequantized_after(w, x, compute_dtype):
  """``w`` dequantized in ``compute_dtype``, as a value that depends on ``x``.

  A zero made from ``x[0, 0]`` (``x * 0``, NaN and inf mapped to 0) is added
  to the weight, so XLA can neither hoist the dequantization to the start of
  the program nor merge the forward pass's with the backward pass's (an
  ``optimization_barrier`` does not survive XLA:CPU's pipeline): each layer's
  float weight exists only around its product, instead of every layer's from
  the forward pass to the backward (SmolLM2-135M QLoRA: 405 MiB of step
  scratch), at the price of dequantizing again in the backward pass.
  """
  if not x.size:
    return dequantize_array(w, compute_dtype)
  tie = (x[0, 0] * 0).astype(compute_dtype)
  return dequantize_array(w, compute_dtype) + jnp.where(tie == tie, tie, jnp.zeros_like(tie))


def _transposed(grad, w, impl, compute_dtype, platform):
  """float32 ``(M, K) = grad @ W.T``."""
  if impl == "reference" or (impl == "xla" and _dequantize_once(w, grad.shape[0], compute_dtype)):
    return _dot(grad.astype(compute_dtype), _dequantized_after(w, grad, compute_dtype),
                (((1,), (1,)), ((), ())))
  if impl == "xla":
    return _xla_transposed(grad.astype(compute_dtype), w, compute_dtype)
  k, n = w.matrix_shape
  tiles = kernels.choose_tiles(grad.shape[0], k, n, w.block_size, platform)
  return kernels.matmul_transposed(
      grad, w.codes, w.scales(), block_size=w.block_size, quant_type=w.quant_type,
      compute_dtype=compute_dtype, tiles=tiles, platform=platform,
      interpret=impl == "pallas_interpret")


def _xla_tiles(w: NF4Array):
  """``(steps, rows_per_step)``: K tiles of whole blocks for the XLA path."""
  k, _ = w.matrix_shape
  tile = max(w.block_size, _XLA_TILE_ROWS)
  while k % tile:
    tile //= 2  # stays a multiple of block_size: k % block_size == 0
  return k // tile, tile // 2


def _decoded_tiles(codes, scales, w, compute_dtype):
  """Scaled high/low nibble values of a ``(rows, N)`` code tile."""
  rows, n = codes.shape
  half_block = w.block_size // 2
  table = tables.code_table(w.quant_type)
  codes = codes.astype(jnp.int32)

  def scale(values):
    values = values.reshape(rows // half_block, half_block, n) * scales[:, None, :]
    return values.reshape(rows, n).astype(compute_dtype)

  return (scale(decode_4bit(codes >> 4, table)), scale(decode_4bit(codes & 0xF, table)))


def _xla_forward(x, w, compute_dtype):
  m = x.shape[0]
  _, n = w.matrix_shape
  steps, rows = _xla_tiles(w)
  groups = rows // (w.block_size // 2)
  codes = w.codes.reshape(steps, rows, n)
  scales = w.scales().reshape(steps, groups, n)
  x_even = x[:, 0::2].reshape(m, steps, rows).swapaxes(0, 1)
  x_odd = x[:, 1::2].reshape(m, steps, rows).swapaxes(0, 1)

  def step(acc, tile):
    codes_i, scales_i, even_i, odd_i = tile
    high, low = _decoded_tiles(codes_i, scales_i, w, compute_dtype)
    return acc + _dot(even_i, high) + _dot(odd_i, low), None

  acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32),
                        (codes, scales, x_even, x_odd))
  return acc


def _xla_transposed(grad, w, compute_dtype):
  m = grad.shape[0]
  k, n = w.matrix_shape
  steps, rows = _xla_tiles(w)
  groups = rows // (w.block_size // 2)
  codes = w.codes.reshape(steps, rows, n)
  scales = w.scales().reshape(steps, groups, n)
  contract_n = (((1,), (1,)), ((), ()))

  def step(_, tile):
    codes_i, scales_i = tile
    high, low = _decoded_tiles(codes_i, scales_i, w, compute_dtype)
    return None, (_dot(grad, high, contract_n), _dot(grad, low, contract_n))

  _, (even, odd) = jax.lax.scan(step, None, (codes, scales))
  # (steps, m, rows) x2 -> (m, steps, rows, 2) -> (m, K)
  dx = jnp.stack([even, odd], axis=-1).swapaxes(0, 1)
  return dx.reshape(m, k)
