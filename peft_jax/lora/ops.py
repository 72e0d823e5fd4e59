"""Op-level adapters: add an adapter term wherever an adapted weight enters a product.

Built-in modules get their adapters from the module interceptor; any other
code (a custom linen module calling ``jnp.einsum``/``jnp.dot``/``@``/
``lax.dot_general`` on its own param, an NNX module) runs through
:func:`run`::

    out, report = run(fn, {"w": WeightSpec(w, AdapterSpec(lora_a, lora_b, scale=2.0))})

``fn(views)`` receives, for every registered weight, a *view*: a JAX tracer
that stands for the weight. The caller puts the views where the model reads
its weights (a linen scope, an NNX ``Variable``), runs the model, and gets
back plain values. While ``fn`` runs, a small JAX trace follows each view
through casts (``astype``), transposes and inner ``jit`` calls (``jnp.einsum``
is one); when a view is an operand of a ``dot_general`` (every product
``jnp.einsum``, ``jnp.dot``, ``jnp.matmul``, ``@`` and ``lax.dot_general``
compute, however the function was bound), the product gets its adapter term::

    LoRA:  y = x W + s (dropout(x) A) B
    DoRA:  y = x W + (g - 1) (dropout(x) W) + g s (dropout(x) A) B,
           g = m / stop_gradient(||W + s B A||)      (norm over the contracted axes)

The contracted axes of the product are the weight's input axes, its free axes
the output axes: the equation comes from the product itself. A view of an
:class:`~peft_jax.quant.NF4Array` weight makes the product a quantized
matmul. Any other use of a view (``w * 2``, a gather) gets the plain weight
and is reported in ``report.other_uses``; callers raise when an adapter
never contributed (``report.contributed``).

Works under ``jax.jit``, ``jax.grad``, ``nn.scan``/``nn.remat`` (the views
live only inside one ``run``); it adds Python work at trace time only.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import core  # the Trace API (stable since jax 0.4.36)

from peft_jax.lora import layout as layout_lib
from peft_jax.lora.transform import delta_kernel, kernel_value, weight_norm
from peft_jax.quant import nf4_matmul
from peft_jax.quant.nf4 import is_quantized


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """The adapter of one weight (per-layer shapes, see :mod:`peft_jax.lora.layout`).

  Attributes:
    lora_a: ``in_shape + (r,)``, ``in_shape`` the weight's contracted axes.
    lora_b: ``(r,) + out_shape``.
    scale: ``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``).
    magnitude: DoRA's ``out_shape`` magnitude, or None.
    lora_e: AdaLoRA's ``(r,)`` singular values, or None.
    dropout: rate on the adapter input.
    dropout_key: ``() -> PRNG key``, called only when ``dropout > 0``; None
      turns dropout off (deterministic).
    mixed: for mixed-adapter batches instead of ``lora_a``/``lora_b``:
      ``(a_stack (K, *in, r), b_stack (K, r, *out), scales (K,), index (batch,))``;
      the product's first non-weight axis is the example axis; index -1 adds
      nothing (see :func:`gather_stack`).
  """

  lora_a: Any = None
  lora_b: Any = None
  scale: float = 1.0
  magnitude: Any = None
  lora_e: Any = None
  dropout: float = 0.0
  dropout_key: Callable[[], jax.Array] | None = None
  mixed: tuple | None = None


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """One weight handed to :func:`run`.

  Attributes:
    value: the weight (an array or an :class:`~peft_jax.quant.NF4Array`).
    adapter: its :class:`AdapterSpec`, or None (a quantized weight without
      adapters, or a weight only being recorded).
    path: name used in error messages.
  """

  value: Any
  adapter: AdapterSpec | None = None
  path: str = ""


@dataclasses.dataclass
class Report:
  """What happened to the registered weights during one :func:`run`.

  Attributes:
    contributed: keys whose adapter term was added to at least one product.
    products: ``{key: [KernelLayout, ...]}`` the layout of every product that
      used the weight (contracted axes = input axes).
    other_uses: ``{key: [primitive name, ...]}`` uses that were not products.
  """

  contributed: set = dataclasses.field(default_factory=set)
  products: dict = dataclasses.field(default_factory=dict)
  other_uses: dict = dataclasses.field(default_factory=dict)


def run(fn: Callable[[dict[str, Any]], Any], weights: Mapping[str, WeightSpec], *,
        quant_impl: str | None = None, quant_platform: str | None = None) -> tuple[Any, Report]:
  """Runs ``fn(views)`` with adapter terms added to products of the weights.

  Args:
    fn: called once with ``{key: view}``; returns any pytree.
    weights: ``{key: WeightSpec}``.
    quant_impl, quant_platform: for quantized weights, as :func:`peft_jax.quant.nf4_matmul`.

  Returns:
    ``(output, report)``: the output with every view replaced by its plain
    value, and the :class:`Report`.
  """
  report = Report()
  parent = core.trace_ctx.trace
  trace = _OpTrace(parent, report, quant_impl, quant_platform)
  views = {k: _View(trace, spec.value, k, spec, None, None) for k, spec in weights.items()}
  with core.set_current_trace(trace):
    out = fn(views)
  return jax.tree.map(lambda v: trace.plain(v), out), report


def _letters(n: int, taken: str = "") -> str:
  pool = [c for c in string.ascii_letters if c not in taken and c != layout_lib.RANK_LETTER]
  if n > len(pool):
    raise ValueError(f"A product of {n} axes is too large to adapt.")
  return "".join(pool[:n])


class _View(core.Tracer):
  """A registered weight, possibly cast (``dtype``) and transposed (``perm``)."""

  __slots__ = ("raw", "key", "spec", "perm", "cast", "_dense")

  def __init__(self, trace, raw, key, spec, perm, cast, dense=None):
    shape = tuple(raw.shape)
    self.perm = tuple(range(len(shape))) if perm is None else tuple(perm)
    dtype = cast or raw.dtype
    aval = core.ShapedArray(tuple(shape[p] for p in self.perm), jnp.dtype(dtype))
    super().__init__(trace, aval)
    self.raw, self.key, self.spec, self.cast, self._dense = raw, key, spec, cast, dense

  def dense(self):
    """The view's plain value in the parent trace."""
    if self._dense is None:
      with core.set_current_trace(self._trace.parent):
        w = self.raw.dequantize(self.aval.dtype) if is_quantized(self.raw) else self.raw
        w = w.astype(self.aval.dtype) if self.cast is not None else w
        if self.perm != tuple(range(len(self.perm))):
          w = jax.lax.transpose(w, self.perm)
        self._dense = w
    return self._dense

  def to_concrete_value(self):
    return None


class _OpTrace(core.Trace):
  """Follows weight views to their products; everything else goes to the parent."""

  def __init__(self, parent, report, quant_impl, quant_platform):
    super().__init__()
    self.parent = parent
    self.report = report
    self.quant_impl = quant_impl
    self.quant_platform = quant_platform
    # Flax checks that module code runs in the trace its scope was made in;
    # to it (and to jit caches) this trace is the parent's, which it is in
    # effect: every value outside the views belongs to the parent.
    self._weakref = parent._weakref
    self.requires_low = getattr(parent, "requires_low", True)

  def plain(self, x):
    if isinstance(x, _View) and x._trace is self:
      self.report.other_uses.setdefault(x.key, []).append("returned")
      return x.dense()
    return x

  def _forward(self, primitive, args, params):
    for a in args:
      if isinstance(a, _View) and a._trace is self:
        self.report.other_uses.setdefault(a.key, []).append(primitive.name)
    args = [self.plain(a) for a in args]
    with core.set_current_trace(self.parent):
      return primitive.bind(*args, **params)

  def process_primitive(self, primitive, args, params, /):
    views = [isinstance(a, _View) and a._trace is self for a in args]
    if not any(views):
      return self._forward(primitive, args, params)
    name = primitive.name
    if name == "dot_general" and sum(views) == 1:
      return self._product(args, params, views.index(True))
    if name == "convert_element_type" and params.get("sharding") is None:
      v = args[0]
      raw = v.raw
      if v.cast is not None:  # a second cast: keep the rounding of the first
        with core.set_current_trace(self.parent):
          raw = raw.dequantize(v.cast) if is_quantized(raw) else raw.astype(v.cast)
      return _View(self, raw, v.key, v.spec, v.perm, params["new_dtype"])
    if name == "transpose":
      v = args[0]
      perm = tuple(v.perm[p] for p in params["permutation"])
      return _View(self, v.raw, v.key, v.spec, perm, v.cast)
    if name in ("jit", "pjit") and "jaxpr" in params:
      closed = params["jaxpr"]
      with core.set_current_trace(self):
        return core.eval_jaxpr(closed.jaxpr, closed.consts, *args)
    return self._forward(primitive, args, params)

  def process_call(self, primitive, f, tracers, params, /):
    tracers = [self.plain(t) for t in tracers]
    return self.parent.process_call(primitive, f, tracers, params)

  def process_custom_jvp_call(self, primitive, fun, jvp, tracers, /, *, symbolic_zeros):
    tracers = [self.plain(t) for t in tracers]
    return self.parent.process_custom_jvp_call(primitive, fun, jvp, tracers,
                                               symbolic_zeros=symbolic_zeros)

  def process_custom_vjp_call(self, primitive, fun, fwd, bwd, tracers, /, *, out_trees,
                              symbolic_zeros):
    tracers = [self.plain(t) for t in tracers]
    return self.parent.process_custom_vjp_call(primitive, fun, fwd, bwd, tracers,
                                               out_trees=out_trees, symbolic_zeros=symbolic_zeros)

  def cur_qdd(self, x):  # jax < 0.11
    return self.parent.cur_qdd(self.plain(x))

  def stage_value(self, val):  # jax >= 0.11 (lax.stage: jnp.asarray of a constant, ...)
    if isinstance(val, _View) and val._trace is self:
      return val
    return self.parent.stage_value(val)

  # -- the product -------------------------------------------------------------------
  def _product(self, args, params, side):
    v, x = args[side], self.plain(args[1 - side])
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    v_con, x_con = (rc, lc) if side == 1 else (lc, rc)
    v_bat = rb if side == 1 else lb
    spec = v.spec
    if v_bat:
      raise ValueError(
          f"The weight {spec.path or v.key!r} enters a product with batch axes {tuple(v_bat)} "
          "(a per-head weight shared by input and output): adapters on such products are "
          "not supported.")
    w_ndim = v.ndim
    v_free = [j for j in range(w_ndim) if j not in v_con]
    in_axes = tuple(sorted(v.perm[j] for j in v_con))
    out_axes = tuple(sorted(v.perm[j] for j in v_free))
    self.report.products.setdefault(v.key, []).append(layout_lib.KernelLayout(in_axes, out_axes))
    adapter = spec.adapter
    with core.set_current_trace(self.parent):
      base = self._base(v, x, params, side, in_axes, out_axes)
      if adapter is None:
        return base
      # einsum subscripts: x's axes, the weight's axes (in weight order), the output.
      x_sub = _letters(x.ndim)
      w_letters = [""] * w_ndim
      for xa, va in zip(x_con, v_con):
        w_letters[v.perm[va]] = x_sub[xa]
      fresh = iter(_letters(len(v_free), x_sub))
      for j in v_free:
        w_letters[v.perm[j]] = next(fresh)
      x_free = "".join(c for i, c in enumerate(x_sub) if i not in x_con)
      v_free_sub = "".join(w_letters[v.perm[j]] for j in v_free)
      y_sub = x_free + v_free_sub if side == 1 else v_free_sub + x_free
      in_sub = "".join(w_letters[a] for a in in_axes)
      out_sub = "".join(w_letters[a] for a in out_axes)
      term = _adapter_term(v, x, base, adapter, (x_sub, in_sub, out_sub, x_free, y_sub),
                           (in_axes, out_axes))
      self.report.contributed.add(v.key)
      return base + term.astype(base.dtype)

  def _base(self, v, x, params, side, in_axes, out_axes):
    """The product itself; for a quantized weight, the quantized matmul."""
    raw = v.raw
    if is_quantized(raw) and side == 1 and _nf4_fits(raw, in_axes, out_axes):
      (lc, rc), _ = params["dimension_numbers"]
      # Move x's contracted axes last, in the weight's input-axis order.
      order = sorted(zip(rc, lc), key=lambda p: v.perm[p[0]])
      x_con = [xa for _, xa in order]
      x_free = [i for i in range(x.ndim) if i not in x_con]
      order = x_free + x_con
      xt = x if order == list(range(x.ndim)) else jax.lax.transpose(x, tuple(order))
      dtype = v.aval.dtype
      y = nf4_matmul(xt.astype(dtype), raw, impl=self.quant_impl, platform=self.quant_platform)
      # y: x_free + weight out axes (weight order) -> x_free + view free order.
      v_free = [j for j in range(v.ndim) if j not in rc]
      want = [v.perm[j] for j in v_free]
      pos = {a: len(x_free) + i for i, a in enumerate(out_axes)}
      perm = list(range(len(x_free))) + [pos[a] for a in want]
      if perm != list(range(len(perm))):
        y = jax.lax.transpose(y, tuple(perm))
      out_dtype = params.get("preferred_element_type") or jnp.result_type(x.dtype, dtype)
      return y.astype(out_dtype)
    args = (x, v.dense()) if side == 1 else (v.dense(), x)
    return jax.lax.dot_general_p.bind(*args, **params)


def _nf4_fits(raw, in_axes, out_axes) -> bool:
  n_in = len(raw.in_shape)
  return (not raw.stack_shape and in_axes == tuple(range(n_in))
          and out_axes == tuple(range(n_in, n_in + len(raw.out_shape))))


def _dropout(x, spec: AdapterSpec):
  if spec.dropout == 0.0 or spec.dropout_key is None:
    return x
  keep = jax.random.bernoulli(spec.dropout_key(), 1.0 - spec.dropout, x.shape)
  return jnp.where(keep, x / (1.0 - spec.dropout), jnp.zeros_like(x))


def _adapter_term(v, x, base, spec: AdapterSpec, subs, axes):
  """The adapter's addition to one product (see the module docstring)."""
  in_axes, out_axes = axes
  w_shape = tuple(v.raw.shape)
  shapes = (tuple(w_shape[a] for a in in_axes), tuple(w_shape[a] for a in out_axes))
  name = v.spec.path or v.key
  terms = []
  if spec.mixed is not None:
    terms.append(mixed_term(x, *spec.mixed, subs, name, *shapes))
  if spec.lora_a is not None:
    terms.append(_single_term(v, x, base, spec, subs, axes, shapes, name))
  return sum(terms[1:], terms[0])


def _single_term(v, x, base, spec, subs, axes, shapes, name):
  x_sub, in_sub, out_sub, x_free, y_sub = subs
  in_axes, out_axes = axes
  in_shape, out_shape = shapes
  r = layout_lib.RANK_LETTER
  lora_a, lora_b = spec.lora_a, spec.lora_b
  if tuple(lora_a.shape[:-1]) != in_shape or tuple(lora_b.shape[1:]) != out_shape:
    raise ValueError(
        f"Adapters of {name!r} do not fit its product: the product contracts weight axes "
        f"{in_axes} {in_shape} and keeps {out_axes} {out_shape}, but lora_a is "
        f"{tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)}. Create them with "
        "layouts=peft_jax.kernel_layouts(model, sample_input).")
  adapter_dtype = lora_a.dtype
  if spec.lora_e is not None:
    lora_a = lora_a * spec.lora_e.reshape((1,) * len(in_axes) + spec.lora_e.shape[-1:])
  x_drop = _dropout(x, spec)
  h = jnp.einsum(f"{x_sub},{in_sub}{r}->{x_free}{r}", x_drop.astype(adapter_dtype), lora_a)
  lora = jnp.einsum(f"{x_free}{r},{r}{out_sub}->{y_sub}", h, lora_b)
  if spec.magnitude is None:
    return spec.scale * lora
  # DoRA, as the built-in path (peft_jax.lora.interceptor).
  layout = layout_lib.KernelLayout(in_axes, out_axes)
  w0 = kernel_value(v.raw, jnp.float32)
  adapted = w0 + spec.scale * delta_kernel(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32),
                                           layout)
  norm = jax.lax.stop_gradient(weight_norm(adapted, layout))
  g = (spec.magnitude.astype(jnp.float32) / norm).astype(adapter_dtype)
  if x_drop is x:
    x_w0 = base
  else:
    # Dropout changes the input of the (g - 1) term too, as in the reference.
    letters = dict(zip(in_axes, in_sub)) | dict(zip(out_axes, out_sub))
    w_sub = "".join(letters[a] for a in range(len(letters)))
    x_w0 = jnp.einsum(f"{x_sub},{w_sub}->{y_sub}", x_drop.astype(adapter_dtype),
                      w0.astype(adapter_dtype))
  mul = lambda y, s: jnp.einsum(f"{y_sub},{out_sub}->{y_sub}", y, s)
  return mul(x_w0.astype(adapter_dtype), g - 1) + mul(spec.scale * lora, g)


def gather_stack(a_stack, b_stack, scales, index, path: str = ""):
  """Each example's ``(A, B, scale)`` from stacked adapters; index -1: scale 0.

  A concrete ``index`` outside ``[-1, K)`` raises; under ``jax.jit`` (a traced
  index) such rows get a NaN scale, so their outputs are NaN, never a
  silently clamped adapter.
  """
  k_count = a_stack.shape[0]
  if not isinstance(index, core.Tracer):
    bad = [int(i) for i in jax.device_get(index).ravel() if not -1 <= int(i) < k_count]
    if bad:
      raise ValueError(f"adapter_index values {sorted(set(bad))} are out of range for the "
                       f"{k_count} adapters stacked at {path!r} (valid: -1 .. {k_count - 1}).")
  valid = (index >= -1) & (index < k_count)
  k = jnp.clip(index, 0, k_count - 1)
  scale = jnp.where(index >= 0, scales[k], 0.0)
  scale = jnp.where(valid, scale, jnp.nan)
  return a_stack[k], b_stack[k], scale


def mixed_term(x, a_stack, b_stack, scales, index, subs, name, in_shape, out_shape):
  """Each example's own adapter: ``scale[k] (x_b A[k]) B[k]``, ``k = index[b]``."""
  x_sub, in_sub, out_sub, x_free, y_sub = subs
  r = layout_lib.RANK_LETTER
  if tuple(a_stack.shape[1:-1]) != in_shape or tuple(b_stack.shape[2:]) != out_shape:
    raise ValueError(f"Stacked adapters of {name!r} ({tuple(a_stack.shape)}, "
                     f"{tuple(b_stack.shape)}) do not fit its product ({in_shape} -> {out_shape}).")
  if not x_free or x.shape[x_sub.index(x_free[0])] != index.shape[0]:
    raise ValueError(f"adapter_index has {index.shape[0]} entries but the product of {name!r} "
                     f"has no leading batch axis of that size (input shape {tuple(x.shape)}).")
  e = x_free[0]
  lora_a, lora_b, scale = gather_stack(a_stack, b_stack, scales, index, name)
  h = jnp.einsum(f"{x_sub},{e}{in_sub}{r}->{x_free}{r}", x.astype(lora_a.dtype), lora_a)
  lora = jnp.einsum(f"{x_free}{r},{e}{r}{out_sub}->{y_sub}", h, lora_b)
  return jnp.einsum(f"{y_sub},{e}->{y_sub}", lora, scale.astype(lora.dtype))


def per_row_term(x, a_stack, b_stack, scales, index, path: str = "", *, lookup: bool = False):
  """``scale[k_b] (x_b A[k_b]) B[k_b]`` for a 2-D kernel whose input's first axis is the row
  (a dense layer; ``lookup``: ``x`` are ids into an embedding table)."""
  if x.shape[0] != index.shape[0]:
    raise ValueError(f"adapter_index has {index.shape[0]} entries but the input of {path!r} "
                     f"has batch {x.shape[0]}.")
  lora_a, lora_b, scale = gather_stack(a_stack, b_stack, scales, index, path)
  if lookup:
    hidden = jax.vmap(lambda a, ids: jnp.take(a, ids, axis=0))(lora_a, x)
  else:
    hidden = jnp.einsum("b...i,bir->b...r", x.astype(lora_a.dtype), lora_a)
  lora = jnp.einsum("b...r,bro->b...o", hidden, lora_b)
  return lora * scale.reshape((-1,) + (1,) * (lora.ndim - 1)).astype(lora.dtype)
