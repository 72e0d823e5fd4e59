"""GaLore: full-parameter training with Adam moments in a low-rank subspace.

A port of the reference implementation (jiaweizzhao/GaLore, `galore_torch/
adamw.py` and `galore_projector.py`) to Flax parameter trees. The
reference's rules are stated for PyTorch's `(out, in)` weights; a Flax
`Dense` kernel is `(in, out)`, so this module projects the Flax kernel on the
side that makes the result equal to the reference on the transposed weight,
square matrices included (see `proj_type`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from optax._src import base
from optax._src import numerics

from peft_jax import _lapack, validation
from peft_jax.optim import _paths

__all__ = [
    "GaLoreDimensionNumbers",
    "ScaleByGaLoreState",
    "galore",
    "galore_projected_paths",
    "scale_by_galore",
]

ProjType = Literal["std", "reverse_std", "left", "right", "full"]
RefreshMethod = Literal["auto", "svd", "randomized"]

# Attention and MLP kernels, the reference's choice ("attn" or "mlp" in the
# module name, `torchrun_main.py`). Embeddings, norms, biases and the head
# fall outside and get full-size AdamW.
DEFAULT_TARGETS = r".*(attn|attention|mlp|ffn|feed_forward).*/kernel"


class GaLoreDimensionNumbers(NamedTuple):
  """Which axes of a parameter form the `(in, out)` matrix GaLore projects.

  Axes named in neither field are batch axes: each index along them gets its
  own projector (stacked/scanned layers, `(L, in, out)`). The default, last
  two axes as `(in, out)` and any leading axes as batch, fits `nn.Dense`
  kernels, scanned or not. A `DenseGeneral` kernel `(embed, heads, head_dim)`
  takes `GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))`.

  Attributes:
    reduction_axis: axis or axes contracted with the input (Flax `in`).
    output_axis: axis or axes of the output features (Flax `out`).
  """

  reduction_axis: Union[int, Sequence[int]] = -2
  output_axis: Union[int, Sequence[int]] = -1


class ScaleByGaLoreState(NamedTuple):
  """State of `scale_by_galore`.

  For a projected parameter with batch shape `B` (stacked layers), input size
  `n` and output size `m` (Flax kernel `(*B, n, m)`) and rank `r`:

  Attributes:
    count: shape=(), dtype=int32. Updates taken so far; projectors refresh
      when `count % update_proj_gap == 0`, before the update.
    in_projector: per leaf (*B, n, r) when the input side is projected
      ("right" in the reference's `(out, in)` layout: `Vh[:r]ᵀ`), else an
      empty (0,) array.
    out_projector: per leaf (*B, m, r) when the output side is projected
      ("left": `U[:, :r]`), else an empty (0,) array.
    mu: first moments; (*B, r, m), (*B, n, r) or (*B, r, r) for projected
      leaves (input side, output side, both), the parameter's shape otherwise.
    nu: second moments, same shapes as `mu`.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  in_projector: base.Params  # (*B, n, r) or (0,) per leaf
  out_projector: base.Params  # (*B, m, r) or (0,) per leaf
  mu: base.Updates  # low-rank shape or parameter shape
  nu: base.Updates  # same as mu


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How one parameter is projected (static, derived from path and shape)."""

  perm: tuple[int, ...]  # moves axes to (*batch, *in, *out)
  inverse_perm: tuple[int, ...]
  permuted_shape: tuple[int, ...]
  batch_shape: tuple[int, ...]
  n_in: int
  n_out: int
  side: str  # "in", "out" or "both"
  rank: int

  @property
  def n_batch(self) -> int:
    return math.prod(self.batch_shape)

  def to_3d(self, x: jax.Array) -> jax.Array:
    return jnp.transpose(x, self.perm).reshape(self.n_batch, self.n_in, self.n_out)

  def from_3d(self, x: jax.Array) -> jax.Array:
    return jnp.transpose(x.reshape(self.permuted_shape), self.inverse_perm)

  def low_rank_shape(self) -> tuple[int, ...]:
    r = self.rank
    inner = {"in": (r, self.n_out), "out": (self.n_in, r), "both": (r, r)}[self.side]
    return self.batch_shape + inner

  def projector_shapes(self) -> tuple[Optional[tuple[int, ...]], Optional[tuple[int, ...]]]:
    in_shape = self.batch_shape + (self.n_in, self.rank)
    out_shape = self.batch_shape + (self.n_out, self.rank)
    return (
        in_shape if self.side in ("in", "both") else None,
        out_shape if self.side in ("out", "both") else None,
    )


def _side(proj_type: str, n_in: int, n_out: int) -> str:
  """The projected side of a Flax `(in, out)` kernel for a reference type.

  The reference works on `G` of shape `(m, n) = (out, in)`. "right" keeps
  `Vh[:r]`, i.e. projects the `in` axis; "left" keeps `U[:, :r]`, the `out`
  axis; "std" picks right when `m >= n` (square matrices included).
  """
  m, n = n_out, n_in
  if proj_type == "std":
    return "in" if m >= n else "out"
  if proj_type == "reverse_std":
    return "out" if m >= n else "in"
  if proj_type == "right":
    return "in"
  if proj_type == "left":
    return "out"
  if proj_type == "full":
    return "both"
  raise ValueError(
      f"proj_type must be one of 'std', 'reverse_std', 'left', 'right', "
      f"'full'; got {proj_type!r}."
  )


def _normalize_axes(axes: Union[int, Sequence[int]], ndim: int) -> tuple[int, ...]:
  if isinstance(axes, int):
    axes = (axes,)
  return tuple(a % ndim for a in axes)


def _make_plan(
    path: str, shape: tuple[int, ...], dims: GaLoreDimensionNumbers, rank: int, proj_type: str
) -> _Plan:
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
        f"GaLore projects matrices, but targeted parameter {path!r} has shape "
        f"{shape}; narrow `targets`."
    )
  in_axes = _normalize_axes(dims.reduction_axis, ndim)
  out_axes = _normalize_axes(dims.output_axis, ndim)
  if set(in_axes) & set(out_axes):
    raise ValueError(f"{path!r}: reduction and output axes overlap: {dims}.")
  batch_axes = tuple(a for a in range(ndim) if a not in in_axes + out_axes)
  perm = batch_axes + in_axes + out_axes
  inverse_perm = tuple(sorted(range(ndim), key=lambda i: perm[i]))
  permuted_shape = tuple(shape[a] for a in perm)
  batch_shape = tuple(shape[a] for a in batch_axes)
  n_in = math.prod(shape[a] for a in in_axes)
  n_out = math.prod(shape[a] for a in out_axes)
  if not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"GaLore rank for {path!r} must be a positive int, got {rank!r}.")
  return _Plan(
      perm=perm,
      inverse_perm=inverse_perm,
      permuted_shape=permuted_shape,
      batch_shape=batch_shape,
      n_in=n_in,
      n_out=n_out,
      side=_side(proj_type, n_in, n_out),
      rank=min(rank, n_in, n_out),
  )


def _build_plans(
    params: Any,
    rank: Union[int, Mapping[str, int], Callable[[str], int]],
    targets: _paths.Patterns,
    dimension_numbers: Any,
    proj_type: str,
) -> Any:
  """A tree like `params` of `_Plan` (projected) or None (plain AdamW)."""
  paths = _paths.flat_paths(params)
  target_patterns = _paths.compile_patterns(DEFAULT_TARGETS if targets is None else targets)
  for pattern in target_patterns:
    if not any(pattern.fullmatch(p) for p in paths):
      raise _paths.unmatched_error(pattern, paths, "GaLore target")
  rank_of = _paths.resolve_per_path(rank, paths, "GaLore rank", lambda x: isinstance(x, int))
  dims_of = _paths.resolve_per_path(
      GaLoreDimensionNumbers() if dimension_numbers is None else dimension_numbers,
      paths,
      "GaLore dimension_numbers",
      lambda x: isinstance(x, GaLoreDimensionNumbers),
  )

  def plan(key_path, leaf):
    path = _paths.path_to_str(key_path)
    if not _paths.matches_any(path, target_patterns):
      return None
    found, r = rank_of(path)
    if not found:
      raise ValueError(f"No GaLore rank pattern matches targeted parameter {path!r}.")
    found, dims = dims_of(path)
    if not found:
      dims = GaLoreDimensionNumbers()
    return _make_plan(path, tuple(leaf.shape), dims, r, proj_type)

  return jax.tree_util.tree_map_with_path(plan, params)


def _is_plan_leaf(x: Any) -> bool:
  return x is None or isinstance(x, _Plan)


def galore_projected_paths(
    params: Any,
    rank: Union[int, Mapping[str, int]] = 128,
    targets: _paths.Patterns = None,
    dimension_numbers: Any = None,
    proj_type: ProjType = "std",
) -> dict[str, dict[str, Any]]:
  """Which parameters GaLore projects, on which side and at which rank.

  Args:
    params: a parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    rank, targets, dimension_numbers, proj_type: as in `scale_by_galore`.

  Returns:
    `{path: {"side": "in"|"out"|"both", "rank": r, "batch_shape": B,
    "matrix": (n_in, n_out)}}` for each projected parameter.
  """
  plans = _build_plans(params, rank, targets, dimension_numbers, proj_type)
  out = {}
  for key_path, p in jax.tree_util.tree_leaves_with_path(plans, is_leaf=_is_plan_leaf):
    if p is not None:
      out[_paths.path_to_str(key_path)] = {
          "side": p.side,
          "rank": p.rank,
          "batch_shape": p.batch_shape,
          "matrix": (p.n_in, p.n_out),
      }
  return out


# --------------------------------------------------------------------------
# Projector refresh.


def _one_lapack_call_per_matrix(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` of a batch of matrices that, on CPU, hands LAPACK one matrix at a time.

  jaxlib's CPU LAPACK kernels (0.10) split a batch over XLA's intra-op
  thread pool and block until the pieces are done. When as many batched
  calls as the pool has threads run at once (the independent QRs, SVDs or
  eigendecompositions of one refresh), every pool thread is waiting and the
  pieces never run: the step hangs forever, asleep. `_lapack.map_matrices`
  runs one matrix per call on CPU (a batch of one runs inline); GPU and TPU
  keep the batched call.
  """
  return lambda *xs: _lapack.map_matrices(fn, *xs, batch_ndim=1)


@_one_lapack_call_per_matrix
def _svd(g: jax.Array) -> tuple[jax.Array, jax.Array]:
  u, _, vh = jnp.linalg.svd(g, full_matrices=False)
  return u, vh


@_one_lapack_call_per_matrix
def _orthonormal_range(y: jax.Array) -> jax.Array:
  q, _ = jnp.linalg.qr(y)
  return q


@_one_lapack_call_per_matrix
def _eigenvectors(m: jax.Array) -> jax.Array:
  """Eigenvectors of symmetric `m`, by ascending eigenvalue."""
  return jnp.linalg.eigh(m)[1]


def _svd_projectors(g3: jax.Array, plan: _Plan) -> tuple[jax.Array, jax.Array]:
  """Top-`rank` singular vectors, computed in the reference's layout.

  The SVD runs on `Gᵀ = (out, in)`, the matrix the reference decomposes, so
  LAPACK's sign conventions match it and the moments carried across a
  refresh land in the same basis.
  """
  g_torch = jnp.swapaxes(g3.astype(jnp.float32), -1, -2)  # (nb, out, in)
  u, vh = _svd(g_torch)
  in_projector = jnp.swapaxes(vh[:, : plan.rank, :], -1, -2)  # (nb, in, r)
  out_projector = u[:, :, : plan.rank]  # (nb, out, r)
  return in_projector, out_projector


def _randomized_projectors(
    g3: jax.Array, plan: _Plan, key: jax.Array, oversample: int, power_iterations: int
) -> tuple[jax.Array, jax.Array]:
  """Approximate top-`rank` singular vectors by a randomized range finder.

  Halko, Martinsson & Tropp (2011), Algorithms 4.4 and 5.1: sketch the range
  of the smaller side with `rank + oversample` Gaussian probes (one probe
  matrix for the whole batch), sharpen it with `power_iterations`
  QR-stabilised passes, then take an exact SVD of the small
  `(rank + oversample) x other` matrix. Cost `O(n m (r + p)(2q + 2))`
  instead of `O(n m min(n, m))`.
  """
  g = g3.astype(jnp.float32)  # (nb, n, m)
  nb, n, m = g.shape
  # Sketch the columns of whichever orientation has the smaller row count.
  transpose = n > m
  if transpose:
    g = jnp.swapaxes(g, -1, -2)
  rows, cols = g.shape[1:]
  k = min(plan.rank + oversample, rows, cols)
  omega = jax.random.normal(key, (cols, k), jnp.float32)
  q = _orthonormal_range(jnp.einsum("brc,ck->brk", g, omega))
  for _ in range(power_iterations):
    z = _orthonormal_range(jnp.swapaxes(g, -1, -2) @ q)
    q = _orthonormal_range(g @ z)
  b = jnp.swapaxes(q, -1, -2) @ g  # (nb, k, cols)
  ub, vbh = _svd(b)
  row_vectors = (q @ ub)[:, :, : plan.rank]  # (nb, rows, r)
  col_vectors = jnp.swapaxes(vbh[:, : plan.rank, :], -1, -2)  # (nb, cols, r)
  if transpose:
    row_vectors, col_vectors = col_vectors, row_vectors
  return row_vectors, col_vectors  # (nb, n, r), (nb, m, r)


def _nystrom_vectors(y: jax.Array, m: jax.Array, rank: int) -> jax.Array:
  """Top-`rank` eigenvectors of the Nystrom approximation `Y M⁻¹ Yᵀ` of one matrix.

  `Y = A X` (rows, k) and `M = Xᵀ A X` (k, k) for a symmetric PSD `A` and
  an orthonormal `X`; with `Y = Q R` and `M + nu I = L Lᵀ` the
  approximation is `Q (T Tᵀ) Qᵀ`, `T = R L⁻ᵀ`, so its eigenvectors are `Q`
  times those of the `k x k` matrix `T Tᵀ`. The shift `nu = 10 k eps
  max(diag M)` (float32 `eps`) keeps the Cholesky factorisation defined; if
  it still fails, the eigenvectors of `R Rᵀ` (the left singular vectors of
  `Y`) are taken instead.
  """
  k = m.shape[-1]
  t_ = lambda x: jnp.swapaxes(x, -1, -2)
  q, r = jnp.linalg.qr(y)
  nu = 10 * k * jnp.finfo(jnp.float32).eps * jnp.max(jnp.diagonal(m, axis1=-2, axis2=-1), -1)
  chol = jnp.linalg.cholesky(m + nu[..., None, None] * jnp.eye(k, dtype=m.dtype))
  t = jax.lax.linalg.triangular_solve(chol, r, left_side=False, lower=True, transpose_a=True)
  s = t @ t_(t)
  s = jnp.where(jnp.all(jnp.isfinite(s), (-2, -1), keepdims=True), s, r @ t_(r))
  vectors = jnp.linalg.eigh(s)[1]  # ascending eigenvalues
  return q @ vectors[..., ::-1][..., :rank]


def _one_side_projector(
    g3: jax.Array, plan: _Plan, key: jax.Array, oversample: int, power_iterations: int
) -> jax.Array:
  """Top-`rank` singular vectors of the projected side only, (nb, side, r).

  With `A` = the gradient with the projected side as rows and one Gaussian
  probe matrix `Ω` for the whole batch: `X = qr(A Ω)`, `power_iterations -
  1` passes `X <- qr(A Aᵀ X)`, then the last pass `Y = A (Aᵀ X)` feeds a
  Nystrom approximation of `A Aᵀ` (`_nystrom_vectors`, with `M = (Aᵀ X)ᵀ
  (Aᵀ X)`): the subspace of Halko et al.'s range finder with as many power
  passes, without its last product `Aᵀ Q`. Three matmuls per matrix at
  `power_iterations=1`, `2 rows cols k` flops each; LAPACK sees two
  `rows x k` QRs and a `k x k` Cholesky and eigenproblem. At
  `power_iterations=0`: `Q = qr(A Ω)`, then Rayleigh-Ritz on `B = Qᵀ A`
  (eigenvectors of `B Bᵀ`).
  """
  g = g3.astype(jnp.float32)  # (nb, in, out); XLA may copy it transposed once (out side)
  a_spec = "brc" if plan.side == "in" else "bcr"  # A: projected side r as rows
  times_cols = lambda x: jnp.einsum(f"{a_spec},bck->brk", g, x)  # A x
  times_rows = lambda y: jnp.einsum(f"{a_spec},brk->bck", g, y)  # Aᵀ y
  rows = plan.n_in if plan.side == "in" else plan.n_out
  cols = g.shape[1] * g.shape[2] // rows
  k = min(plan.rank + oversample, rows, cols)
  omega = jax.random.normal(key, (cols, k), jnp.float32)
  x = _orthonormal_range(jnp.einsum(f"{a_spec},ck->brk", g, omega))
  if power_iterations == 0:
    z = times_rows(x)  # Aᵀ Q = Bᵀ, (nb, cols, k)
    vectors = _eigenvectors(jnp.swapaxes(z, -1, -2) @ z)  # B Bᵀ; ascending eigenvalues
    return x @ vectors[:, :, ::-1][:, :, : plan.rank]
  for _ in range(power_iterations - 1):
    x = _orthonormal_range(times_cols(times_rows(x)))
  w = times_rows(x)  # Aᵀ X, (nb, cols, k)
  nystrom = _one_lapack_call_per_matrix(lambda y, m: _nystrom_vectors(y, m, plan.rank))
  return nystrom(times_cols(w), jnp.swapaxes(w, -1, -2) @ w)


_DEFAULT_OVERSAMPLE = 8


def _static_int(name: str, value: Any) -> int:
  """`value` as a Python int; it sets shapes or a loop count, so it cannot be traced."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"GaLore's {name} sets array shapes / a loop count and must be a Python int, got a "
        f"traced value; with optax.inject_hyperparams, list {name!r} in static_args."
    )
  return int(value)


def _resolve_refresh(method: str, plan: _Plan, oversample: Any) -> str:
  """"auto": the exact SVD where a sketch of `rank + oversample` probes would
  span the whole smaller side anyway (nothing to save), else "randomized".

  (A traced `oversample`, from `optax.inject_hyperparams`, decides with the
  default; the randomized refresh itself then asks for it to be static.)
  """
  if method != "auto":
    return method
  p = _DEFAULT_OVERSAMPLE if isinstance(oversample, jax.core.Tracer) else int(oversample)
  return "svd" if plan.rank + p >= min(plan.n_in, plan.n_out) else "randomized"


def _refresh_3d(
    g3: jax.Array, plan: _Plan, method: str, key: jax.Array, oversample: Any, power_iterations: Any
) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
  """Projectors `(nb, n_in, r)`, `(nb, n_out, r)` of `g3` (nb, n_in, n_out) by a resolved method."""
  if method == "svd":
    return _svd_projectors(g3, plan)
  sketch = (g3, plan, key, _static_int("oversample", oversample),
            _static_int("power_iterations", power_iterations))
  if plan.side == "both":
    return _randomized_projectors(*sketch)
  one = _one_side_projector(*sketch)
  return (one, None) if plan.side == "in" else (None, one)


def _refresh(
    g3: jax.Array,
    plan: _Plan,
    method: str,
    key: jax.Array,
    oversample: int,
    power_iterations: int,
    dtype: Any,
) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
  in_p, out_p = _refresh_3d(g3, plan, _resolve_refresh(method, plan, oversample), key,
                            oversample, power_iterations)
  in_shape, out_shape = plan.projector_shapes()
  in_p = None if in_shape is None else in_p.reshape(in_shape).astype(dtype)
  out_p = None if out_shape is None else out_p.reshape(out_shape).astype(dtype)
  return in_p, out_p


# Same-shape matrices are refreshed as one batch (a model's 30 `up_proj`s: one
# batched matmul / LAPACK call instead of 30), in chunks of at most this many
# bytes so the concatenated gradients stay a bounded extra buffer.
_GROUP_BYTES = 1 << 28


def _refresh_all(
    plans: Sequence[_Plan],
    grads: Sequence[jax.Array],
    method: str,
    key: jax.Array,
    oversample: Any,
    power_iterations: Any,
) -> tuple[list[Optional[jax.Array]], list[Optional[jax.Array]]]:
  """New `(in, out)` projectors of every projected leaf (None: side not projected).

  Leaves with the same matrix shape, side, rank, refresh method and dtype are
  concatenated along the batch axis and refreshed together.
  """
  groups: dict[tuple[Any, ...], list[list[int]]] = {}
  for j, (plan, g) in enumerate(zip(plans, grads)):
    signature = (_resolve_refresh(method, plan, oversample), plan.side, plan.n_in, plan.n_out,
                 plan.rank, jnp.dtype(g.dtype))
    chunks = groups.setdefault(signature, [[]])
    chunk_bytes = sum(plans[i].n_batch for i in chunks[-1]) * plan.n_in * plan.n_out * 4
    if chunks[-1] and chunk_bytes + plan.n_batch * plan.n_in * plan.n_out * 4 > _GROUP_BYTES:
      chunks.append([])
    chunks[-1].append(j)
  new_in: list[Optional[jax.Array]] = [None] * len(plans)
  new_out: list[Optional[jax.Array]] = [None] * len(plans)
  batches = [(sig, members) for sig, chunks in groups.items() for members in chunks]
  for b, (signature, members) in enumerate(batches):
    g3 = jnp.concatenate([plans[j].to_3d(grads[j]) for j in members], axis=0)
    in_p, out_p = _refresh_3d(g3, plans[members[0]], signature[0], jax.random.fold_in(key, b),
                              oversample, power_iterations)
    start = 0
    for j in members:
      stop = start + plans[j].n_batch
      in_shape, out_shape = plans[j].projector_shapes()
      if in_shape is not None:
        new_in[j] = in_p[start:stop].reshape(in_shape).astype(grads[j].dtype)
      if out_shape is not None:
        new_out[j] = out_p[start:stop].reshape(out_shape).astype(grads[j].dtype)
      start = stop
  return new_in, new_out


def _project(g3: jax.Array, in_p: jax.Array, out_p: jax.Array, plan: _Plan) -> jax.Array:
  """`R` of the reference, in Flax orientation; (nb, ...) low-rank."""
  if plan.side == "in":
    return jnp.einsum("bir,bio->bro", in_p, g3)
  if plan.side == "out":
    return jnp.einsum("bio,bor->bir", g3, out_p)
  return jnp.einsum("bir,bio,bos->brs", in_p, g3, out_p)


def _project_back(n: jax.Array, in_p: jax.Array, out_p: jax.Array, plan: _Plan) -> jax.Array:
  if plan.side == "in":
    return jnp.einsum("bir,bro->bio", in_p, n)
  if plan.side == "out":
    return jnp.einsum("bir,bor->bio", n, out_p)
  return jnp.einsum("bir,brs,bos->bio", in_p, n, out_p)


def _as_3d_projector(p: jax.Array, plan: _Plan) -> jax.Array:
  return p.reshape((plan.n_batch,) + p.shape[len(plan.batch_shape):])


# --------------------------------------------------------------------------
# The transformation.


def scale_by_galore(
    rank: Union[int, Mapping[str, int], Callable[[str], int]] = 128,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 0.25,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    *,
    targets: _paths.Patterns = None,
    dimension_numbers: Any = None,
    refresh: RefreshMethod = "auto",
    oversample: int = 8,
    power_iterations: int = 1,
    seed: int = 0,
    reset_moments: bool = False,
) -> base.GradientTransformation:
  r"""Adam with the moments of chosen matrices kept in a low-rank subspace.

  For a targeted matrix with gradient `G` (reference layout `(out, in)`) and
  projector `P` refreshed from the top singular vectors of `G` (see
  `refresh`) every `update_proj_gap` steps (before the update, so at steps
  0, gap, 2 gap, ...):

  .. math::

    R_t = \mathrm{project}(G_t), \quad
    m_t = b_1 m_{t-1} + (1 - b_1) R_t, \quad
    v_t = b_2 v_{t-1} + (1 - b_2) R_t^2, \\
    u_t = \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}\,
          \mathrm{scale}\cdot\mathrm{project\_back}\!\left(
          \frac{m_t}{\sqrt{v_t} + \epsilon}\right)

  with `eps` outside the bias correction, as the reference's (Hugging Face
  style) AdamW has it. Other parameters get the same Adam at full size with
  no `scale`. The moments are kept across a refresh, as the reference does
  (GaLore issue #54); `reset_moments=True` zeroes the projected moments and
  restarts their bias correction at each refresh instead.

  `proj_type` follows `galore_torch.GaLoreProjector` on the `(out, in)`
  matrix `W = Kᵀ` of a Flax kernel `K`: "std" projects the `in` axis when
  `out >= in` (so square matrices use the reference's "right"), otherwise
  the `out` axis; "reverse_std" the opposite; "right" always `in`; "left"
  always `out`; "full" both.

  Args:
    rank: projection rank, one int, a mapping from path patterns to ints
      (first `re.fullmatch` wins), or a callable of the path. Capped at the
      matrix's smaller side.
    update_proj_gap: steps between projector refreshes.
    scale: the reference's GaLore scale (alpha) on projected updates.
    proj_type: "std", "reverse_std", "left", "right" or "full".
    b1: exponential decay of the first moment.
    b2: exponential decay of the second moment.
    eps: added to `sqrt(v)` (not bias-corrected).
    targets: pattern(s) of the paths to project; default attention and MLP
      kernels (`DEFAULT_TARGETS`). A pattern matching nothing raises.
    dimension_numbers: `GaLoreDimensionNumbers`, a mapping from path patterns
      to them, or a callable of the path; default `(in, out)` = last two axes,
      leading axes batch (one projector per stacked layer).
    refresh: "auto" (default: "randomized" where `rank + oversample` is
      below the matrix's smaller side, else "svd"), "svd" (exact float32
      SVD, galore-torch's projectors step for step) or "randomized" (range
      finder with `power_iterations` QR-stabilised passes; for one-sided
      projections only that side's vectors are computed, from a
      `(rank + oversample)`-square eigenproblem). On CPU the exact SVD is
      LAPACK's level-2-bound bidiagonalisation, which is slow and fights
      XLA's threads for the cores; the randomized refresh is matmuls.
    oversample: extra probes of the randomized refresh.
    power_iterations: power iterations of the randomized refresh (1: at
      least 0.99 of the exact SVD's captured gradient energy on SmolLM2's
      shapes, see README; 2 for 0.997 at about 1.6x the cost).
    seed: seed of the randomized refresh's probes (folded with the step).
    reset_moments: zero the projected moments at each refresh.

  Returns:
    An `optax.GradientTransformation` whose updates are to be multiplied by
    `-learning_rate` (see `galore`).

  Raises:
    ValueError: a pattern matches no parameter, a targeted parameter is not
      a matrix, or `proj_type`/`refresh` is unknown.

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024.
    Halko, Martinsson & Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011.
  """
  if refresh not in ("auto", "svd", "randomized"):
    raise ValueError(f"refresh must be 'auto', 'svd' or 'randomized', got {refresh!r}.")
  _side(proj_type, 1, 1)  # validates proj_type early
  _check_hyperparameters(rank, update_proj_gap, scale, b1, b2, eps, oversample,
                         power_iterations)

  def plans_for(tree):
    return _build_plans(tree, rank, targets, dimension_numbers, proj_type)

  def init_fn(params):
    plans = plans_for(params)

    def init_leaf(plan, p):
      # Distinct buffers for every field, so a donated state never aliases.
      if plan is None:
        return (jnp.zeros((0,), p.dtype), jnp.zeros((0,), p.dtype),
                jnp.zeros_like(p), jnp.zeros_like(p))
      in_shape, out_shape = plan.projector_shapes()
      return (jnp.zeros(in_shape or (0,), p.dtype), jnp.zeros(out_shape or (0,), p.dtype),
              jnp.zeros(plan.low_rank_shape(), p.dtype), jnp.zeros(plan.low_rank_shape(), p.dtype))

    parts = jax.tree.map(init_leaf, plans, params, is_leaf=_is_plan_leaf)
    in_p, out_p, mu, nu = _unzip4(params, parts)
    return ScaleByGaLoreState(
        count=jnp.zeros([], jnp.int32), in_projector=in_p, out_projector=out_p, mu=mu, nu=nu
    )

  def update_fn(updates, state, params=None):
    del params
    plans = plans_for(updates)
    count = state.count
    count_inc = numerics.safe_int32_increment(count)
    do_refresh = count % update_proj_gap == 0

    plan_leaves, treedef = jax.tree.flatten(plans, is_leaf=_is_plan_leaf)
    grads = treedef.flatten_up_to(updates)
    in_ps = treedef.flatten_up_to(state.in_projector)
    out_ps = treedef.flatten_up_to(state.out_projector)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    projected = [i for i, p in enumerate(plan_leaves) if p is not None]

    # One cond for all refreshes: the SVDs run only on refresh steps, and the
    # cond stays outside any per-layer batching (a batched cond would run
    # both branches).
    def compute_new(operands):
      g_list, _ = operands
      key = jax.random.fold_in(jax.random.key(seed), count)
      fresh_in, fresh_out = _refresh_all([plan_leaves[i] for i in projected], g_list, refresh,
                                         key, oversample, power_iterations)
      new_in = [in_ps[i] if a is None else a for a, i in zip(fresh_in, projected)]
      new_out = [out_ps[i] if b is None else b for b, i in zip(fresh_out, projected)]
      return new_in, new_out

    def keep_old(operands):
      _, old = operands
      return old

    old = ([in_ps[i] for i in projected], [out_ps[i] for i in projected])
    if projected:
      new_in, new_out = jax.lax.cond(
          do_refresh, compute_new, keep_old, ([grads[i] for i in projected], old)
      )
    else:
      new_in, new_out = old
    in_ps, out_ps = list(in_ps), list(out_ps)
    for j, i in enumerate(projected):
      in_ps[i], out_ps[i] = new_in[j], new_out[j]

    b1_ = jnp.asarray(b1)
    b2_ = jnp.asarray(b2)
    t_full = count_inc.astype(jnp.float32)
    t_low = ((count % update_proj_gap) + 1).astype(jnp.float32) if reset_moments else t_full

    def adam(g, mu, nu, t):
      mu = b1_ * mu + (1 - b1_) * g
      nu = b2_ * nu + (1 - b2_) * jnp.square(g)
      correction = jnp.sqrt(1 - b2_**t) / (1 - b1_**t)
      direction = mu / (jnp.sqrt(nu) + eps)
      return direction, correction, mu, nu

    out_updates, new_mus, new_nus = [], [], []
    for i, plan in enumerate(plan_leaves):
      g, mu, nu = grads[i], mus[i], nus[i]
      if plan is None:
        direction, correction, mu, nu = adam(g, mu, nu, t_full)
        out_updates.append((correction * direction).astype(g.dtype))
      else:
        in_p = _as_3d_projector(in_ps[i], plan) if plan.side != "out" else None
        out_p = _as_3d_projector(out_ps[i], plan) if plan.side != "in" else None
        low = _project(plan.to_3d(g), in_p, out_p, plan).reshape(plan.low_rank_shape())
        if reset_moments:
          mu = jnp.where(do_refresh, jnp.zeros_like(mu), mu)
          nu = jnp.where(do_refresh, jnp.zeros_like(nu), nu)
        direction, correction, mu, nu = adam(low, mu, nu, t_low)
        direction = direction.reshape((plan.n_batch,) + direction.shape[len(plan.batch_shape):])
        full = plan.from_3d(_project_back(direction, in_p, out_p, plan))
        out_updates.append((correction * scale * full).astype(g.dtype))
      new_mus.append(mu)
      new_nus.append(nu)

    unflatten = treedef.unflatten
    return unflatten(out_updates), ScaleByGaLoreState(
        count=count_inc,
        in_projector=unflatten(in_ps),
        out_projector=unflatten(out_ps),
        mu=unflatten(new_mus),
        nu=unflatten(new_nus),
    )

  return base.GradientTransformation(init_fn, update_fn)


def _unzip4(params: Any, parts: Any) -> tuple[Any, Any, Any, Any]:
  treedef = jax.tree.structure(params)
  leaves = treedef.flatten_up_to(parts)
  return tuple(treedef.unflatten([leaf[k] for leaf in leaves]) for k in range(4))


class DecayAfterUpdateState(NamedTuple):
  """State of `_scale_by_learning_rate_then_decay`.

  Attributes:
    count: shape=(), dtype=int32. Steps taken, for learning-rate schedules.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32


def _scale_by_learning_rate_then_decay(
    learning_rate: base.ScalarOrSchedule,
    weight_decay: jax.typing.ArrayLike,
    mask: Optional[Union[Any, Callable[[base.Params], Any]]],
) -> base.GradientTransformation:
  r"""`-lr * u`, then decoupled decay of the *updated* parameter.

  The reference applies `p -= lr * wd * p` after `p -= lr * u`, so

  .. math:: \Delta = -\eta u - \eta\,\mathrm{wd}\,(p - \eta u).
  """

  def init_fn(params):
    del params
    return DecayAfterUpdateState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    stepped = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
    if not no_decay:
      if params is None:
        raise ValueError(base.NO_PARAMS_MSG)
      decay_mask = mask(params) if callable(mask) else mask
      if decay_mask is None:
        decay_mask = jax.tree.map(lambda _: True, params)

      def decay(u, p, m):
        if not m:
          return u
        return (u - lr * weight_decay * (p + u)).astype(u.dtype)

      stepped = jax.tree.map(decay, stepped, params, decay_mask)
    return stepped, DecayAfterUpdateState(count=numerics.safe_int32_increment(state.count))

  return base.GradientTransformation(init_fn, update_fn)


def _check_hyperparameters(rank, update_proj_gap, scale, b1, b2, eps, oversample,
                           power_iterations) -> None:
  """Raises :class:`validation.InvalidValue` naming the first bad setting."""
  if isinstance(rank, Mapping):
    for key, value in rank.items():
      validation.integer(value, f"GaLore rank[{key!r}]")
  elif not callable(rank):
    validation.integer(rank, "GaLore rank")
  validation.integer(update_proj_gap, "update_proj_gap")
  validation.number(scale, "GaLore scale")
  for name, beta in (("b1", b1), ("b2", b2)):
    validation.number(beta, name, low=0.0, high=1.0, high_open=True)
  validation.number(eps, "eps", low=0.0)
  validation.integer(oversample, "oversample", low=0)
  validation.integer(power_iterations, "power_iterations", low=0)


def galore(
    learning_rate: base.ScalarOrSchedule = 1e-3,
    rank: Union[int, Mapping[str, int], Callable[[str], int]] = 128,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 0.25,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Optional[Union[Any, Callable[[base.Params], Any]]] = None,
    *,
    targets: _paths.Patterns = None,
    dimension_numbers: Any = None,
    refresh: RefreshMethod = "auto",
    oversample: int = 8,
    power_iterations: int = 1,
    seed: int = 0,
    reset_moments: bool = False,
) -> base.GradientTransformation:
  r"""GaLore AdamW, matching `galore_torch.GaLoreAdamW` step for step.

  (Step for step with `refresh="svd"`, which the default `"auto"` uses
  wherever a randomized sketch would not be smaller than the matrix; on
  larger matrices `"auto"` takes the randomized refresh, which spans the same
  top subspace up to a small loss of captured gradient energy.)

  `scale_by_galore`, then `-learning_rate`, then the reference's decoupled
  weight decay, applied after the update to the new parameter
  (`p ← (p - η u)(1 - η wd)`), to projected and plain parameters alike
  (restrict it with `mask`). Defaults are the reference README's and Hugging
  Face's (`rank=128, update_proj_gap=200, scale=0.25, proj_type="std"`) and
  the reference AdamW's (`b1=0.9, b2=0.999, eps=1e-6`).

  Args:
    learning_rate: a float or an optax schedule.
    rank, update_proj_gap, scale, proj_type, b1, b2, eps: see
      `scale_by_galore`.
    weight_decay: decoupled weight decay (AdamW's `wd`).
    mask: tree of bools or callable `params -> tree` saying which leaves
      decay; default all.
    targets, dimension_numbers, refresh, oversample, power_iterations, seed,
      reset_moments: see `scale_by_galore`.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` needs `params` when
    `weight_decay` is not 0.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import peft_jax as pj
    >>> params = {"mlp": {"kernel": jnp.ones((8, 16))}, "norm": {"weight": jnp.ones(8)}}
    >>> tx = pj.optim.galore(learning_rate=1e-2, rank=2, update_proj_gap=10)
    >>> state = tx.init(params)
    >>> state[0].mu["mlp"]["kernel"].shape  # in side (8) projected: (r, out)
    (2, 16)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024.
  """
  validation.learning_rate(learning_rate)
  validation.number(weight_decay, "weight_decay", low=0.0)
  return optax.chain(
      scale_by_galore(
          rank=rank,
          update_proj_gap=update_proj_gap,
          scale=scale,
          proj_type=proj_type,
          b1=b1,
          b2=b2,
          eps=eps,
          targets=targets,
          dimension_numbers=dimension_numbers,
          refresh=refresh,
          oversample=oversample,
          power_iterations=power_iterations,
          seed=seed,
          reset_moments=reset_moments,
      ),
      _scale_by_learning_rate_then_decay(learning_rate, weight_decay, mask),
  )
