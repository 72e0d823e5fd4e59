"""Per-matrix linear algebra that cannot deadlock jaxlib's CPU LAPACK kernels.

jaxlib's CPU LAPACK kernels (0.10) split a *batch* of matrices over XLA's
intra-op thread pool and block until the pieces finish; two batched calls
that run at once in one compiled program (independent SVDs of two stacked
kernels) can take every pool thread and wait forever. A single matrix runs
inline, so on CPU a batch becomes a `lax.map` loop; GPU and TPU keep one
batched (vmapped) call. See README, "GaLore's projector refresh".
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax


def map_matrices(fn: Callable[..., Any], *xs: jax.Array, batch_ndim: int) -> Any:
  """`fn` of single matrices applied over `batch_ndim` leading axes of every `xs`.

  Returns `fn`'s outputs with the batch axes in front, as `vmap` would.
  """
  if batch_ndim == 0:
    return fn(*xs)
  batch = xs[0].shape[:batch_ndim]
  flat = [x.reshape((math.prod(batch),) + x.shape[batch_ndim:]) for x in xs]

  def per_matrix(*ys):
    return jax.lax.map(lambda args: fn(*args), ys)

  out = jax.lax.platform_dependent(*flat, cpu=per_matrix, default=jax.vmap(fn))
  return jax.tree.map(lambda y: y.reshape(batch + y.shape[1:]), out)
