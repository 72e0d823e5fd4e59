"""``nf4_matmul`` of a weight placed on a mesh: the Pallas kernels per shard (``jax.shard_map``).

The XLA SPMD partitioner splits the XLA paths of ``nf4_matmul`` by the codes'
sharding, but a Pallas kernel is a custom call it cannot split: left to it,
the operands would be gathered whole. So the sharded train step marks every
tiled NF4 weight of the frozen base with its :class:`Placement` (the mesh,
the mesh axes of ``K`` and ``N``, the batch axes; :func:`place`), and
``nf4_matmul`` of a :class:`PlacedNF4Array` runs the kernels on each
device's blocks inside ``jax.shard_map``:

* mesh axes that split the batch (FSDP's) are gathered on the weight at the
  ``shard_map`` boundary: XLA all-gathers one layer's 4-bit codes and block
  scales, never a dequantized weight;
* the weight's other axes stay split: an ``N`` split gives each device its
  output columns (no collective), a ``K`` split gives partial products
  summed by a ``psum`` over those axes (the input arrives split on ``K``, as
  a row-parallel layer's input does);
* the backward pass (``dx = dy @ W.T``) is the same with ``K`` and ``N``
  exchanged: a ``psum`` over ``N``'s axes.

The kernels are chosen as without a mesh (Pallas on GPU/TPU, the XLA path on
CPU) from the per-device shapes; a product whose shards do not tile returns
``None`` and the caller runs the XLA path, which the partitioner splits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from peft_jax.quant import kernels
from peft_jax.quant.nf4 import NF4Array, is_quantized

__all__ = ["Placement", "PlacedNF4Array", "is_placed", "matmul_2d", "place"]


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a placed NF4 matrix lives (static, hashable).

  Attributes:
    mesh: the mesh.
    k_axes, n_axes: the mesh axes splitting the matrix's ``K`` (input) and
      ``N`` (output) axes.
    batch_axes: the mesh axes splitting the rows of ``x`` (the batch).
  """

  mesh: Mesh
  k_axes: tuple[str, ...]
  n_axes: tuple[str, ...]
  batch_axes: tuple[str, ...]


@dataclasses.dataclass(frozen=True, repr=False)
class PlacedNF4Array(NF4Array):
  """An :class:`NF4Array` that knows its :class:`Placement` (static metadata)."""

  placement: Placement


_NF4_FIELDS = [f.name for f in dataclasses.fields(NF4Array)]
jax.tree_util.register_dataclass(
    PlacedNF4Array,
    data_fields=["codes", "absmax", "nested_absmax", "offset"],
    meta_fields=[n for n in _NF4_FIELDS if n not in ("codes", "absmax", "nested_absmax",
                                                      "offset")] + ["placement"],
)


def is_placed(w: Any) -> bool:
  return isinstance(w, PlacedNF4Array)


def _names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(names: tuple[str, ...]) -> Any:
  return names if len(names) > 1 else (names[0] if names else None)


def place(tree: Any, specs: Any, mesh: Mesh, batch_axes: tuple[str, ...] = ("data", "fsdp")
          ) -> Any:
  """``tree`` with each tiled :class:`NF4Array` marked with its placement.

  Args:
    tree: params holding NF4 arrays (e.g. the frozen base), possibly traced.
    specs: :func:`peft_jax.sharding.param_specs` of ``tree`` (an NF4 leaf's
      spec is an ``NF4Array`` of ``PartitionSpec``).
    mesh: the mesh the specs refer to.
    batch_axes: the mesh axes the batch is split over (those in the mesh).

  Returns:
    The same tree; tiled NF4 leaves become :class:`PlacedNF4Array`, so that
    ``nf4_matmul`` runs them per shard.
  """
  batch = tuple(a for a in batch_axes if a in mesh.shape)

  def mark(leaf, spec):
    if not is_quantized(leaf) or not leaf.tiled:
      return leaf
    codes = list(spec.codes or ())
    codes = [None] * (leaf.codes.ndim - len(codes)) + codes
    placement = Placement(mesh, _names(codes[-2]), _names(codes[-1]), batch)
    return PlacedNF4Array(**{n: getattr(leaf, n) for n in _NF4_FIELDS}, placement=placement)

  return jax.tree.map(mark, tree, specs, is_leaf=is_quantized)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """One sharded product: the axes per operand and the per-device kernel settings."""

  mesh: Mesh
  batch: tuple[str, ...]
  k_axes: tuple[str, ...]
  n_axes: tuple[str, ...]
  block_size: int
  quant_type: str
  compute_dtype: Any
  tiles: kernels.TileConfig
  platform: str
  interpret: bool

  def kernel_args(self) -> dict[str, Any]:
    return dict(block_size=self.block_size, quant_type=self.quant_type,
                compute_dtype=self.compute_dtype, tiles=self.tiles, platform=self.platform,
                interpret=self.interpret)


def _size(mesh: Mesh, names: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in names)


def _kernel_impl(impl: str | None, platform: str) -> str | None:
  """``"pallas"``, ``"pallas_interpret"``, or ``None`` (an XLA path) as ``select_impl`` picks."""
  if impl is None:
    impl = "pallas" if platform in kernels.PLATFORMS else "xla"
  if impl == "pallas" and platform not in kernels.PLATFORMS:
    impl = "pallas_interpret"
  return impl if impl.startswith("pallas") else None


def matmul_2d(x: jax.Array, w: PlacedNF4Array, *, impl: str | None, compute_dtype: Any,
              platform: str) -> jax.Array | None:
  """``x (M, K) @ w`` in ``x.dtype`` with the kernels per shard, or ``None``.

  ``None`` when ``impl`` asks for an XLA path (``None`` on CPU, ``"xla"``,
  ``"reference"``) or the per-device shapes do not tile; ``platform`` is the
  backend (``"gpu"``, ``"tpu"``, ``"cpu"``: the interpreter tiles as for GPU).
  """
  kernel_impl = _kernel_impl(impl, platform)
  if kernel_impl is None:
    return None
  p = w.placement
  mesh = p.mesh
  m = x.shape[0]
  batch = p.batch_axes if m % _size(mesh, p.batch_axes) == 0 else ()
  k_axes = tuple(a for a in p.k_axes if a not in batch)
  n_axes = tuple(a for a in p.n_axes if a not in batch)
  k, n = w.matrix_shape
  k_local, n_local = k // _size(mesh, k_axes), n // _size(mesh, n_axes)
  if k_local % w.block_size or k % _size(mesh, k_axes) or n % _size(mesh, n_axes):
    return None
  tile_platform = platform if platform in kernels.PLATFORMS else "gpu"
  tiles = kernels.choose_tiles(m // _size(mesh, batch), k_local, n_local, w.block_size,
                               tile_platform)
  if tiles is None:
    return None
  plan = _Plan(mesh, batch, k_axes, n_axes, w.block_size, w.quant_type,
               np.dtype(compute_dtype), tiles, tile_platform, kernel_impl == "pallas_interpret")
  return _product(x, w.codes, w.scales(), plan).astype(x.dtype)


def _per_shard(kernel, a, codes, scales, plan: _Plan, a_axes, out_axes):
  """float32 ``kernel(a, W)`` on each device's blocks, summed over the contracted axes.

  ``a`` is split on ``(batch, a_axes)``, the result on ``(batch, out_axes)``;
  ``a_axes`` are the weight's axes of the contracted dimension (``K`` for
  the forward product, ``N`` for the transposed one), hence the ``psum``.
  """
  weight = P(_entry(plan.k_axes), _entry(plan.n_axes))

  def local(a, codes, scales):
    y = kernel(a, codes, scales, **plan.kernel_args())
    return jax.lax.psum(y, a_axes) if a_axes else y

  # The kernels are opaque to the replication checker; the psum makes the
  # result replicated over the axes its spec leaves out.
  return jax.shard_map(local, mesh=plan.mesh, check_vma=False,
                       in_specs=(P(_entry(plan.batch), _entry(a_axes)), weight, weight),
                       out_specs=P(_entry(plan.batch), _entry(out_axes)))(a, codes, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _product(x, codes, scales, plan):
  y = _per_shard(kernels.matmul_forward, x, codes, scales, plan, plan.k_axes, plan.n_axes)
  return y.astype(x.dtype)


def _product_fwd(x, codes, scales, plan):
  return _product(x, codes, scales, plan), (codes, scales)


def _product_bwd(plan, residuals, grad):
  codes, scales = residuals
  dx = _per_shard(kernels.matmul_transposed, grad, codes, scales, plan, plan.n_axes,
                  plan.k_axes).astype(grad.dtype)
  return dx, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(scales)


_product.defvjp(_product_fwd, _product_bwd)
