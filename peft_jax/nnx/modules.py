"""NNX built-in layers that run their adapters and quantized kernels.

:func:`peft_jax.nnx.lora_transform` gives an adapted ``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` or ``nnx.Embed`` (and any
of them with an :class:`~peft_jax.quant.NF4Array` kernel) the class
``Peft<Name>``, a subclass of its own class, whose ``__call__`` computes the
same output as the linen interceptor (:mod:`peft_jax.lora.interceptor`)::

    LoRA:  y = base(x) + s * (dropout(x) A) B
    DoRA:  y = base(x) + (g - 1) * (dropout(x) W0) + g * s * (dropout(x) A) B

so the model runs its adapters wherever it is called: eagerly, under
``nnx.jit``, ``nnx.scan`` (each layer sees its slice of stacked leaves) or
inside ``peft_jax.intercept``. The built-ins call their products through
functions bound at construction (``self.dot_general``, ``self.einsum_op``),
which no interception of ``jax.lax`` can reach; owning ``__call__`` is the
place where it always works. :func:`peft_jax.nnx.merge` gives the plain class
back.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import module as linen_module

from peft_jax import targeting
from peft_jax.lora import layout as layout_lib
from peft_jax.lora import ops
from peft_jax.lora import saved as saved_lib
from peft_jax.lora import terms
from peft_jax.lora.nnx_guard import PEFT_MARKER
from peft_jax.lora.transform import is_quantized, kernel_value
from peft_jax.quant.embed import nf4_attend, nf4_lookup
from peft_jax.quant.matmul import nf4_matmul

BUILTINS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)


def kernel_name(module: nnx.Module) -> str:
  return "embedding" if isinstance(module, nnx.Embed) else "kernel"


def builtin_layout(module: nnx.Module) -> layout_lib.KernelLayout | None:
  """The per-layer kernel layout of a built-in, read off its attributes (None: unknown)."""
  if isinstance(module, (nnx.Linear, nnx.Embed)):
    return layout_lib.KernelLayout((0,), (1,))
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      return None
    n_in, n_out = len(module.axis), len(module.out_features)
    return layout_lib.KernelLayout(tuple(range(n_in)), tuple(range(n_in, n_in + n_out)))
  if isinstance(module, nnx.Einsum):
    return layout_lib.einsum_layout(module.einsum_str) if module.einsum_str else None
  if isinstance(module, nnx.Conv):
    window = len(module.kernel_size)
    return layout_lib.KernelLayout(tuple(range(window + 1)), (window + 1,))
  return None


def _peft_call(self, *args, **kwargs):
  """Runs the layer with its adapters and quantized kernel (see module docstring).

  Static attributes set by :func:`peft_jax.nnx.lora_transform`: ``lora_path``
  (the linen module path, for scales and messages) and ``lora_config``;
  ``lora_dropout`` is an ``nnx.Dropout`` when the config has adapter dropout
  (``model.train()`` / ``model.eval()`` switch it).
  """
  return with_copies(self, lambda: adapted_call(self, super(type(self), self).__call__, args, kwargs))


def with_copies(module, call):
  """``call()`` with the module's trainable copies (its ``saved`` dict, see
  :mod:`peft_jax.lora.saved`) standing in for its params. Only ``__call__``
  runs here: a tied head (``Embed.attend``) keeps the original, as in PEFT,
  unless the head was saved (``saved/untied_head``) or tied to the lookup's copy
  (``saved/tied_embedding``), see :func:`_peft_attend`."""
  copies = getattr(module, targeting.SAVED, None)
  if not isinstance(copies, nnx.Dict):
    return call()
  values = {name: var.get_value() for name, var in copies.items() if name != saved_lib.HEAD}
  if saved_lib.TIED in values:  # ensure_weight_tying: the lookup reads the shared copy
    values["embedding"] = values.pop(saved_lib.TIED)
  originals = {name: getattr(module, name).get_value() for name in values}
  try:
    for name, value in values.items():
      getattr(module, name).set_value(value)
    return call()
  finally:
    for name, value in originals.items():
      getattr(module, name).set_value(value)


def _peft_attend(self, query):
  """``Embed.attend`` (a tied head) on the untied head copy when the head was saved, or on
  the copy it shares with the lookup (``saved/tied_embedding``, ``ensure_weight_tying``)."""
  copies = getattr(self, targeting.SAVED, None)
  head = super(type(self), self).attend
  copies = dict(copies.items()) if isinstance(copies, nnx.Dict) else {}
  copy = copies.get(saved_lib.HEAD, copies.get(saved_lib.TIED))
  table = self.embedding.get_value()
  if copy is None:  # an NF4 table: the tied head reads it chunk by chunk, never whole
    out = nf4_attend(query, table, self.dtype) if is_quantized(table) else head(query)
    lora = _tied_lora(self, query)
    return out if lora is None else out + lora.astype(out.dtype)
  original = self.embedding.get_value()
  try:
    self.embedding.set_value(copy.get_value())
    return head(query)
  finally:
    self.embedding.set_value(original)


def _tied_lora(module, query):
  """With ``ensure_weight_tying``, a tied head adds the embedding's LoRA term
  ``s * (dropout(q) B^T) A^T`` (as the linen interceptor's ``_tied_attend``, ``s`` the
  head's own); else None."""
  lora_a = _leaf(module, "lora_a")
  config = getattr(module, "lora_config", None)
  if lora_a is None or config is None or not config.ensure_weight_tying:
    return None
  if _leaf(module, "lora_magnitude") is not None or _leaf(module, "lora_e") is not None:
    raise ValueError(f"ensure_weight_tying ties plain LoRA only; {module.lora_path!r} holds "
                     "DoRA or AdaLoRA leaves.")
  _rank_and_scale(module, lora_a, None)  # the config fits the embedding's adapters
  scale = saved_lib.tied_head_scale(config, module.lora_path, lora_a.shape[-1])
  dropout = getattr(module, "lora_dropout", None)
  if dropout is not None and not _no_dropout():
    query = dropout(query)
  lora_b = _leaf(module, "lora_b")
  return scale * ((query.astype(lora_b.dtype) @ lora_b.T) @ lora_a.T)


def _subclass(base: type, call) -> type:
  if is_peft_class(base):
    return base
  methods = {"__module__": __name__, "__call__": call, PEFT_MARKER: base}
  if issubclass(base, nnx.Embed):
    methods["attend"] = _peft_attend
  return type(f"Peft{base.__name__}", (base,), methods)


@functools.cache
def peft_class(base: type) -> type:
  """``Peft<Name>``: the built-in ``base`` running its adapters (one class per base)."""
  return _subclass(base, _peft_call)


def is_peft_class(cls: type) -> bool:
  return PEFT_MARKER in vars(cls)


def is_peft_module(module: Any) -> bool:
  """Whether ``module`` is a ``Peft<Name>`` layer (runs adapters / quantized kernels)."""
  return is_peft_class(type(module))


def plain_class(cls: type) -> type:
  """The built-in class a ``Peft<Name>`` class adapts."""
  return vars(cls)[PEFT_MARKER]


def _interceptor():
  """The innermost enclosing ``peft_jax.intercept`` (None outside one)."""
  stack = getattr(linen_module, "_global_interceptor_stack", ())  # pylint: disable=protected-access
  for interceptor in reversed(list(stack)):
    if hasattr(interceptor, "quant_impl") and hasattr(interceptor, "config"):
      return interceptor
  return None


def _intercept_options() -> tuple[Any, str | None, str | None]:
  """``(config, quant_impl, quant_platform)`` of an enclosing ``peft_jax.intercept``."""
  interceptor = _interceptor()
  if interceptor is None:
    return None, None, None
  return interceptor.config, interceptor.quant_impl, getattr(interceptor, "quant_platform", None)


def _no_dropout() -> bool:
  """An enclosing ``intercept(deterministic=True)`` (e.g. ``mixed_adapters``) turns dropout off."""
  return getattr(_interceptor(), "deterministic", None) is True


STACK_LEAVES = ("lora_a_stack", "lora_b_stack", "lora_scale_stack")


def _stack(site, path: str):
  """``(a_stack, b_stack, scales, adapter_index)`` of a site holding stacked adapters, or None.

  Raises:
    ValueError: stacked adapters outside ``peft_jax.multitask.mixed_adapters``
      (they would add nothing).
  """
  leaves = [_site_leaf(site, n) for n in STACK_LEAVES]
  if leaves[0] is None:
    return None
  index = getattr(_interceptor(), "adapter_index", None)
  if index is None:
    raise ValueError(
        f"{path!r} holds stacked adapters (lora_a_stack), which act only in a mixed batch: "
        "run the model inside peft_jax.multitask.mixed_adapters(adapter_index).")
  return (*leaves, index)


def _explicit(x_sub: str, k_sub: str, y_sub: str, ndim: int) -> tuple[str, str, str]:
  """Einsum subscripts with ``...`` spelled out for an input of ``ndim`` axes."""
  if "..." not in x_sub:
    return x_sub, k_sub, y_sub
  fresh = "".join(c for c in "ABCDEFGHIJKLMNOPQSTUVWXYZ" if c not in x_sub + k_sub + y_sub)
  dots = fresh[: ndim - (len(x_sub) - 3)]
  return x_sub.replace("...", dots), k_sub.replace("...", dots), y_sub.replace("...", dots)


def _mixed_call(module, args, kwargs, stack):
  """Each row's own stacked adapter for a built-in (see
  :func:`peft_jax.lora.ops.per_row_term` / :func:`~peft_jax.lora.ops.mixed_term`)."""
  path = module.lora_path
  x = _input(args, kwargs)
  if isinstance(module, (nnx.Linear, nnx.Embed)):
    return ops.per_row_term(x, *stack, path, lookup=isinstance(module, nnx.Embed))
  if isinstance(module, nnx.Conv):
    raise ValueError(f"Mixed-adapter batches do not support Conv modules ({path!r}): "
                     "merge that adapter per task instead.")
  x_sub, k_sub, y_sub = _explicit(*_subscripts(module, x, args, kwargs), x.ndim)
  in_sub = "".join(c for c in k_sub if c in x_sub)
  out_sub = "".join(c for c in k_sub if c in y_sub)
  x_free = "".join(c for c in x_sub if c not in in_sub)
  shape = _leaf(module, "kernel").shape
  in_shape = tuple(shape[k_sub.index(c)] for c in in_sub)
  out_shape = tuple(shape[k_sub.index(c)] for c in out_sub)
  return ops.mixed_term(x, *stack, (x_sub, in_sub, out_sub, x_free, y_sub), path,
                        in_shape, out_shape)


def _input(args, kwargs):
  return args[0] if args else kwargs["inputs"]


def _subscripts(module, x, args, kwargs) -> tuple[str, str, str]:
  """(x, kernel, y) einsum subscripts of the module's product, per layer."""
  if isinstance(module, nnx.Linear):
    return "...a", "ab", "...b"
  if isinstance(module, nnx.LinearGeneral):
    axis = tuple(a % x.ndim for a in module.axis)
    letters = "abcdefghijklmnopqrstuvwxy"
    x_sub = letters[: x.ndim]
    feat_sub = letters[x.ndim: x.ndim + len(module.out_features)]
    k_sub = "".join(x_sub[a] for a in axis) + feat_sub
    y_sub = "".join(c for i, c in enumerate(x_sub) if i not in axis) + feat_sub
    return x_sub, k_sub, y_sub
  einsum_str = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
  return layout_lib.parse_einsum(einsum_str)


def _compute_dtype(module, x, kernel):
  if getattr(module, "dtype", None) is not None:
    return jnp.dtype(module.dtype)
  return jnp.result_type(x.dtype, kernel.dtype)


def _bias(module):
  bias = getattr(module, "bias", None)
  return None if bias is None else bias.get_value()


def _quantized_base(module, kernel, args, kwargs, impl, platform):
  """The module's output with its NF4 kernel (never dequantized whole for Linear; an
  Embed's lookup dequantizes only its rows)."""
  x = _input(args, kwargs)
  if isinstance(module, nnx.Embed):
    return nf4_lookup(kernel, x, module.dtype or kernel.dtype)
  dtype = _compute_dtype(module, x, kernel)
  x = x.astype(dtype)
  bias = _bias(module)
  if isinstance(module, nnx.Linear):
    y = nf4_matmul(x, kernel, impl=impl, platform=platform).astype(dtype)
    return y if bias is None else y + bias.astype(dtype)
  if isinstance(module, (nnx.LinearGeneral, nnx.Einsum)):
    x_sub, k_sub, y_sub = _subscripts(module, x, args, kwargs)
    dense = kernel.dequantize(dtype)
    y = jnp.einsum(f"{x_sub},{k_sub}->{y_sub}", x, dense).astype(dtype)
    if bias is None:
      return y
    if isinstance(module, nnx.Einsum):
      bias = bias.reshape(module._infer_broadcasted_bias_shape(f"{x_sub},{k_sub}->{y_sub}", x, dense))  # pylint: disable=protected-access
    return y + bias.astype(dtype)
  raise ValueError(f"Quantized kernels are not supported in {type(module).__name__} modules "
                   f"({module.lora_path!r}).")


def _rank_and_scale(module, lora_a, lora_e):
  config, path = module.lora_config, module.lora_path
  rank = lora_a.shape[-1]
  if lora_e is None and rank != config.rank_for(path):
    raise ValueError(
        f"Adapters at {path!r} have rank {rank} but the config gives rank "
        f"{config.rank_for(path)} for this module: the config does not fit these adapters.")
  return config.scale_for(path, rank)


def _effective(config, path, rank):
  return config.rank_for(path), config.scale_for(path, rank), config.dropout


def _leaf(module, name):
  var = getattr(module, name, None)
  return None if var is None else var.get_value()


def _lora_conv(module, x, lora_a):
  return terms.conv_with(module, x, lora_a, module.lora_path)


def adapted_call(module, base_call, args, kwargs):
  """``module(*args, **kwargs)`` with its adapters, stacked adapters (mixed batches) and
  quantized kernel (see module doc)."""
  out = _adapted_single(module, base_call, args, kwargs)
  stack = _stack(module, module.lora_path)
  if stack is None:
    return out
  return out + _mixed_call(module, args, kwargs, stack).astype(out.dtype)


def _adapted_single(module, base_call, args, kwargs):
  intercept_config, impl, platform = _intercept_options()
  kernel = _leaf(module, kernel_name(module))
  if is_quantized(kernel):
    base_out = _quantized_base(module, kernel, args, kwargs, impl, platform)
  else:
    base_out = base_call(*args, **kwargs)
  lora_a = _leaf(module, "lora_a")
  if lora_a is None:
    return base_out
  config, path = module.lora_config, module.lora_path
  lora_b, magnitude, lora_e = _leaf(module, "lora_b"), _leaf(module, "lora_magnitude"), _leaf(module, "lora_e")
  scale = _rank_and_scale(module, lora_a, lora_e)
  if intercept_config is not None and _effective(intercept_config, path, lora_a.shape[-1]) != (
      _effective(config, path, lora_a.shape[-1])):
    raise ValueError(
        f"peft_jax.intercept was given a config that would run the adapters at {path!r} "
        f"differently (rank, scale, dropout) from the one they were made with "
        f"{_effective(config, path, lora_a.shape[-1])}; pass the same config (or none).")
  x = _input(args, kwargs)
  adapter_dtype = lora_a.dtype
  if lora_e is not None:
    # AdaLoRA: scale * x @ (A * E) @ B; the masked singular values stay zeros.
    lora_a = lora_a * lora_e.reshape(lora_e.shape[:-1] + (1,) * (lora_a.ndim - lora_e.ndim) + lora_e.shape[-1:])
  dropout = getattr(module, "lora_dropout", None)
  drop = (lambda v: v) if dropout is None or _no_dropout() else dropout

  x_drop = x if isinstance(module, nnx.Embed) else drop(x)
  if isinstance(module, nnx.Embed):
    lora = jnp.take(lora_a, x, axis=0) @ lora_b
    layout = layout_lib.KernelLayout((0,), (1,))
    y_sub, out_sub = "...b", "b"
  elif isinstance(module, nnx.Conv):
    lora = _lora_conv(module, x_drop.astype(adapter_dtype), lora_a) @ lora_b
    window = lora_a.ndim - 2
    layout = layout_lib.KernelLayout(tuple(range(window + 1)), (window + 1,))
    y_sub, out_sub = "...b", "b"
  else:
    x_sub, k_sub, y_sub = _subscripts(module, x, args, kwargs)
    lora, layout, out_sub = terms.einsum_lora(x_drop.astype(adapter_dtype), lora_a, lora_b,
                                              x_sub, k_sub, y_sub)

  if magnitude is None:
    return base_out + (scale * lora).astype(base_out.dtype)

  if x_drop is x:
    bias = _bias(module)
    x_w0 = base_out if bias is None else base_out - bias.astype(base_out.dtype)
  elif isinstance(module, nnx.Conv):
    x_w0 = _lora_conv(module, x_drop.astype(adapter_dtype), kernel_value(kernel, jnp.float32).astype(adapter_dtype))
  else:
    # Dropout changes the input of the (g - 1) term too, as in the reference.
    x_w0 = jnp.einsum(f"{x_sub},{k_sub}->{y_sub}", x_drop.astype(adapter_dtype),
                      kernel_value(kernel, jnp.float32).astype(adapter_dtype))
  return terms.dora_output(base_out, x_w0, lora, kernel=kernel, lora_a=lora_a, lora_b=lora_b,
                           magnitude=magnitude, scale=scale, layout=layout, y_sub=y_sub,
                           out_sub=out_sub, dtype=adapter_dtype)


# -- any other module: op-level adapters ------------------------------------------
def _op_peft_call(self, *args, **kwargs):
  """A custom layer's ``__call__`` with adapter terms on every product of its weights."""
  return with_copies(self, lambda: op_call(self, super(type(self), self).__call__, args, kwargs))


@functools.cache
def op_class(base: type) -> type:
  """``Peft<Name>`` for a custom module: its weights' products get adapter terms."""
  return _subclass(base, _op_peft_call)


def weight_sites(module) -> dict[str, nnx.Module | None]:
  """``{weight name: adapter site}`` of a module's adapted weights (see
  :mod:`peft_jax.targeting`): the module itself for ``kernel``/``embedding``,
  the ``<weight>_lora`` dict for another weight."""
  sites = {}
  for name, value in vars(module).items():
    if not isinstance(value, nnx.Param) or isinstance(value, nnx.LoRAParam):
      continue
    if name in ("kernel", "embedding") and any(isinstance(getattr(module, leaf, None), nnx.Variable)
                                               for leaf in ("lora_a", "lora_a_stack")):
      sites[name] = module
    elif isinstance(getattr(module, name + "_lora", None), nnx.Dict):
      sites[name] = getattr(module, name + "_lora")
  return sites


def _site_leaf(site, name):
  var = site.get(name) if isinstance(site, nnx.Dict) else getattr(site, name, None)
  return None if var is None else var.get_value()


def layer_shape(module) -> tuple[int, ...]:
  """The leading stacked-layer axes of a module's adapters (``nnx.vmap``-created layers):
  ``lora_a`` is ``layers + in + (r,)``, ``lora_b`` ``layers + (r,) + out``, the weight
  ``layers + in + out``."""
  for name, site in weight_sites(module).items():
    lora_a, lora_b = _site_leaf(site, "lora_a"), _site_leaf(site, "lora_b")
    if lora_a is not None and lora_b is not None:
      n = lora_a.ndim + lora_b.ndim - 2 - len(getattr(module, name).get_value().shape)
      return tuple(lora_a.shape[:n])
  return ()


def _dropout_key(module):
  dropout = getattr(module, "lora_dropout", None)
  if dropout is None or dropout.deterministic or _no_dropout():
    return None
  return dropout.rngs


def op_call(module, base_call, args, kwargs):
  """Runs ``base_call`` with views of the module's adapted (and quantized) weights
  (:func:`peft_jax.lora.ops.run`); raises when an adapter added nothing."""
  _, impl, platform = _intercept_options()
  config, path = module.lora_config, module.lora_path
  weights = {}
  for name, site in weight_sites(module).items():
    target = path if name in ("kernel", "embedding") else "/".join(filter(None, (path, name)))
    lora_a, lora_e = _site_leaf(site, "lora_a"), _site_leaf(site, "lora_e")
    mixed = _stack(site, target)
    if lora_a is None:  # stacked adapters only
      weights[name] = ops.WeightSpec(getattr(module, name).get_value(),
                                     ops.AdapterSpec(mixed=mixed), path=target)
      continue
    rank = lora_a.shape[-1]
    if lora_e is None and rank != config.rank_for(target):
      raise ValueError(f"Adapters at {target!r} have rank {rank} but the config gives rank "
                       f"{config.rank_for(target)}: the config does not fit these adapters.")
    spec = ops.AdapterSpec(lora_a, _site_leaf(site, "lora_b"), config.scale_for(target, rank),
                           _site_leaf(site, "lora_magnitude"), lora_e, config.dropout,
                           _dropout_key(module), mixed)
    weights[name] = ops.WeightSpec(getattr(module, name).get_value(), spec, path=target)
  for name, value in vars(module).items():
    if name not in weights and isinstance(value, nnx.Param) and is_quantized(value.get_value()):
      weights[name] = ops.WeightSpec(value.get_value(), None, path="/".join(filter(None, (path, name))))

  out, report = _run_with_views(module, base_call, args, kwargs, weights, impl, platform)
  idle = sorted(weights[k].path for k in weights
                if weights[k].adapter is not None and k not in report.contributed)
  if idle:
    uses = {weights[k].path: report.other_uses.get(k, []) for k in weights}
    raise ValueError(
        f"The adapters of {idle} added nothing: no product (einsum, dot, matmul, "
        f"dot_general) of {type(module).__name__}.__call__ used the adapted weight "
        f"(other uses: {uses}). They would train nothing.")
  return out


def _run_with_views(module, base_call, args, kwargs, weights, impl=None, platform=None):
  """``base_call`` with the named weights of ``module`` replaced by ops views."""

  def run(views):
    saved = {name: getattr(module, name).get_value() for name in views}
    try:
      for name, view in views.items():
        getattr(module, name).set_value(view)
      return base_call(*args, **kwargs)
    finally:
      for name, value in saved.items():
        getattr(module, name).set_value(value)

  return ops.run(run, weights, quant_impl=impl, quant_platform=platform)


# -- layout discovery for custom modules ------------------------------------------
_RECORDED: dict[str, layout_lib.KernelLayout] = {}


def _record_call(self, *args, **kwargs):
  """Runs a custom module, recording the layout of each candidate weight's first product."""
  weights = {name: ops.WeightSpec(var.get_value(), None, path=target)
             for name, var, target in _candidates(self, self.lora_weight_names, self.lora_path)}
  out, report = _run_with_views(self, super(type(self), self).__call__, args, kwargs, weights)
  for key, layouts in report.products.items():
    _RECORDED.setdefault(weights[key].path, layouts[0])
  return out


@functools.cache
def recorder_class(base: type) -> type:
  return type(f"Record{base.__name__}", (base,), {"__module__": __name__, "__call__": _record_call})


def _candidates(module, weight_names, path):
  for name, var in vars(module).items():
    if (name in weight_names and isinstance(var, nnx.Param) and not isinstance(var, nnx.LoRAParam)
        and len(getattr(var.get_value(), "shape", ())) >= 2):
      target = path if name in ("kernel", "embedding") else "/".join(filter(None, (path, name)))
      yield name, var, target
