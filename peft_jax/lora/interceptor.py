"""The Flax method interceptor that turns adapter leaves into behaviour.

Inside :func:`intercept`, every ``nn.Dense``, ``nn.DenseGeneral``,
``nn.Einsum``, ``nn.Conv`` and ``nn.Embed`` call whose module holds adapter
leaves computes::

    LoRA:  y = base(x) + s * (dropout(x) A) B
    DoRA:  y = base(x) + (g - 1) * (dropout(x) W0) + g * s * (dropout(x) A) B
           g = m / stop_gradient(||W0 + s B A||)   (norm over input axes, per output)

with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Modules without
adapter leaves, and every other method (``Embed.attend`` for tied heads), run
untouched. Under ``nn.scan`` the module sees its layer's slice of stacked
leaves, so scanned models need no special case.

Any other module holding adapter leaves (a custom module whose param enters
``jnp.einsum``/``jnp.dot``/``@``/``lax.dot_general``) runs through
:mod:`peft_jax.lora.ops`: its adapted weights are replaced, for the call, by
views that add the adapter term to every product they enter.

A module holding trainable copies (``<module>/saved``, from
``modules_to_save`` or ``bias``: :mod:`peft_jax.lora.saved`) runs with the
copies in place of its params (``nn.Embed`` in ``__call__`` only: a tied
head, ``Embed.attend``, keeps the original, as PEFT, unless the head itself
was saved: then ``attend`` uses its untied copy ``saved/untied_head``; with
``ensure_weight_tying`` both read the one copy ``saved/tied_embedding``, and
an adapted embedding's ``attend`` adds its LoRA term too).

Never silent: when an apply inside :func:`intercept` ends with an adapter
leaf that added nothing (its module was never called, or no product used its
weight), :func:`intercept` raises a ``ValueError`` naming those paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from peft_jax import targeting
from peft_jax.lora import layout as layout_lib
from peft_jax.lora import terms
from peft_jax.lora import ops, quantized
from peft_jax.lora import saved as saved_lib
from peft_jax.lora.config import LoRAConfig
from peft_jax.lora.nnx_guard import guard as nnx_guard
from peft_jax.lora.transform import is_quantized, kernel_value

SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)


def module_path(module: nn.Module) -> str:
  path = "/".join(str(p) for p in module.scope.path)
  return path[len("params/"):] if path.startswith("params/") else path


def _dropout(x, rate, module, deterministic):
  if rate == 0.0 or deterministic:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _bias_free(y, module):
  if getattr(module, "use_bias", False) and module.has_variable("params", "bias"):
    return y - module.get_variable("params", "bias").astype(y.dtype)
  return y


def _einsum_subscripts(module, args, kwargs, x):
  """(x, kernel, y) subscripts of the module's product, per layer."""
  if isinstance(module, nn.Dense):
    return "...a", "ab", "...b"
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f"LoRA on DenseGeneral with batch_dims is not supported ({module_path(module)!r}).")
    axis = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
    axis = tuple(a % x.ndim for a in axis)
    features = module.features if isinstance(module.features, tuple | list) else (module.features,)
    letters = "abcdefghijklmnopqrstuvwxy"
    x_sub = letters[: x.ndim]
    feat_sub = letters[x.ndim: x.ndim + len(features)]
    k_sub = "".join(x_sub[a] for a in axis) + feat_sub
    y_sub = "".join(c for i, c in enumerate(x_sub) if i not in axis) + feat_sub
    return x_sub, k_sub, y_sub
  einsum_str = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
  return layout_lib.parse_einsum(einsum_str)


def _adapter_leaves(module):
  get = lambda name: module.get_variable("params", name) if module.has_variable("params", name) else None
  return get("lora_a"), get("lora_b"), get("lora_magnitude"), get("lora_e")


def _check_rank(config, path, lora_a, lora_e):
  rank = lora_a.shape[-1]
  want = config.rank_for(path)
  if lora_e is None and rank != want:
    raise ValueError(
        f"Adapters at {path!r} have rank {rank} but the config gives rank {want} for this "
        "module: the config does not fit these params.")
  return rank


_SITE_LEAVES = ("lora_a", "lora_a_stack")


def _module_sites(params: Mapping[str, Any]) -> dict[str, tuple[str | None, Mapping[str, Any]]]:
  """``{site relative to the module: (weight name, adapter leaves)}`` of one module."""
  sites = {}
  if any(n in params for n in _SITE_LEAVES):
    sites[""] = (next((n for n in targeting.KERNEL_LEAVES if n in params), None), params)
  for key, value in params.items():
    if (key.endswith(targeting.SITE_SUFFIX) and isinstance(value, Mapping)
        and any(n in value for n in _SITE_LEAVES)):
      sites[key] = (key[: -len(targeting.SITE_SUFFIX)], value)
  return sites


def _sites_in_tree(params: Mapping[str, Any]) -> set[str]:
  """Adapter sites (paths holding ``lora_a`` or ``lora_a_stack``, and ``saved`` copies)."""
  found = set()
  for path in targeting.flatten(params):
    site, leaf = targeting.split_path(path)
    if leaf in _SITE_LEAVES or targeting.split_path(site)[1] == targeting.SAVED:
      found.add(site)
  return found


@contextlib.contextmanager
def substituted(scope, values: Mapping[str, Any]) -> Iterator[None]:
  """Makes ``scope`` read ``values`` for some of its params during the block."""
  variables = scope._variables  # pylint: disable=protected-access
  had = "params" in variables
  old = scope._collection("params")  # pylint: disable=protected-access
  new = dict(old)
  new.update(values)
  try:
    variables["params"] = new
  except TypeError as e:  # an immutable root collection
    raise ValueError(f"Cannot adapt the weights of the root module {type(scope).__name__}: "
                     "wrap it in a parent module.") from e
  try:
    yield
  finally:
    if had:
      variables["params"] = old
    else:
      del variables["params"]


def _embed_lookup(module: nn.Embed, copies: Mapping[str, Any], args, kwargs) -> jax.Array:
  """``nn.Embed.__call__`` on the saved copy (Embed reads its table in ``setup``,
  which ``attend`` shares: swapping the param there would change a tied head too)."""
  if set(copies) != {"embedding"}:
    raise ValueError(f"Saved copies {sorted(copies)} at {module_path(module)!r}: an nn.Embed "
                     "has only 'embedding'.")
  ids = args[0] if args else kwargs["inputs"]
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError("Input type must be an integer or unsigned integer.")
  table = copies["embedding"]
  if module.dtype is not None:
    table = table.astype(module.dtype)
  return jnp.take(table, ids, axis=0)


def _embed_attend(module: nn.Embed, table: jax.Array, args, kwargs) -> jax.Array:
  """``nn.Embed.attend`` on the untied head copy (``saved/untied_head``)."""
  query = args[0] if args else kwargs["query"]
  query, table = module.promote_dtype(query, table, dtype=module.dtype)
  return jnp.dot(query, table.T)


class _Interceptor:
  """Callable for ``nn.intercept_methods`` (see module docstring)."""

  def __init__(self, config: LoRAConfig | None, deterministic: bool | None,
               quant_impl: str | None = None, quant_platform: str | None = None,
               adapter_index: jax.Array | None = None):
    self.config = config
    self.deterministic = deterministic
    self.quant_impl = quant_impl
    self.quant_platform = quant_platform
    self.adapter_index = None if adapter_index is None else jnp.asarray(adapter_index, jnp.int32)
    # Never silent: adapter sites in the params, those whose module ran, those that added.
    self.present: set[str] = set()
    self.called: set[str] = set()
    self.contributed: set[str] = set()
    self.other_uses: dict[str, list[str]] = {}
    self._active: set[int] = set()
    self.failed = False

  def __call__(self, next_fun, args, kwargs, context):
    try:
      return self._dispatch(next_fun, args, kwargs, context)
    except BaseException:
      self.failed = True  # an apply that raised has no output to check
      raise

  def _dispatch(self, next_fun, args, kwargs, context):
    module = context.module
    scope = module.scope
    if isinstance(module, nn.Embed) and quantized.has_quantized_table(module):
      return quantized.quantized_embed_call(module, context.method_name, args, kwargs)
    if scope is None or context.method_name == "setup" or id(scope) in self._active:
      return next_fun(*args, **kwargs)
    if scope.parent is None and not scope.path:
      self.present |= _sites_in_tree(module.variables.get("params", {}))
    copies = self._copies(module, context.method_name)
    if not copies:
      return self._route(module, next_fun, args, kwargs, context)
    # A saved module or bias (peft_jax.lora.saved): the copies stand in.
    self.contributed.add(f"{module_path(module)}/{targeting.SAVED}")
    if isinstance(module, nn.Embed) and context.method_name == "attend":
      return _embed_attend(module, copies[saved_lib.HEAD], args, kwargs)
    if isinstance(module, nn.Embed):
      return _embed_lookup(module, copies, args, kwargs)
    with substituted(scope, copies):
      return self._route(module, next_fun, args, kwargs, context)

  @staticmethod
  def _copies(module, method_name):
    """The module's trainable copies; a tied head (``Embed.attend``) keeps the original
    unless the head was copied untied (``saved/untied_head``, :mod:`peft_jax.lora.saved`)
    or shares the lookup's copy (``saved/tied_embedding``, ``ensure_weight_tying``)."""
    if not module.has_variable("params", targeting.SAVED):
      return {}
    copies = module.get_variable("params", targeting.SAVED)
    copies = dict(copies) if isinstance(copies, Mapping) else {}
    if isinstance(module, nn.Embed):
      head = copies.pop(saved_lib.HEAD, None)
      tied = copies.pop(saved_lib.TIED, None)  # ensure_weight_tying: both uses read it
      if tied is not None:
        head, copies = tied, {**copies, "embedding": tied}
      if method_name == "attend":
        return {} if head is None else {saved_lib.HEAD: head}
      if method_name != "__call__":
        return {}
    return copies

  def _route(self, module, next_fun, args, kwargs, context):
    if isinstance(module, SUPPORTED):
      if (context.method_name == "attend" and self.config is not None
          and self.config.ensure_weight_tying and module.has_variable("params", "lora_a")):
        return self._tied_attend(module, next_fun, args, kwargs)
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      return self._builtin(module, next_fun, args, kwargs)
    return self._op_call(module, next_fun, args, kwargs)

  def _tied_attend(self, module, next_fun, args, kwargs):
    """A tied head with ``ensure_weight_tying``: ``attend`` adds the embedding's LoRA term,
    ``s * (dropout(q) B^T) A^T`` (PEFT's lm_head LoRA with A = B_emb^T, B = A_emb^T; ``s``
    the head's own, see :func:`peft_jax.lora.saved.tied_head_scale`)."""
    path = module_path(module)
    lora_a, lora_b, magnitude, lora_e = _adapter_leaves(module)
    if magnitude is not None or lora_e is not None:
      raise ValueError(f"ensure_weight_tying ties plain LoRA only; {path!r} holds DoRA or "
                       "AdaLoRA leaves.")
    scale = saved_lib.tied_head_scale(self.config, path,
                                      _check_rank(self.config, path, lora_a, lora_e))
    out = next_fun(*args, **kwargs)
    query = args[0] if args else kwargs["query"]
    query = _dropout(query, self.config.dropout, module, self._is_deterministic(module))
    lora = (query.astype(lora_b.dtype) @ lora_b.T) @ lora_a.T
    return out + (scale * lora).astype(out.dtype)

  def _builtin(self, module, next_fun, args, kwargs):
    path = module_path(module)
    stacked = self.adapter_index is not None and module.has_variable("params", "lora_a_stack")
    if stacked and not isinstance(module, (nn.Dense, nn.Embed)):
      if isinstance(module, nn.Conv):
        raise ValueError(f"Mixed-adapter batches do not support Conv modules ({path!r}): "
                         "merge that adapter per task instead.")
      return self._op_call(module, next_fun, args, kwargs)
    if module.has_variable("params", "lora_a"):
      self.called.add(path)
      out = self._adapted(module, next_fun, args, kwargs)
      self.contributed.add(path)
    elif self._has_quantized_kernel(module):
      out = self._quantized_base(module, args, kwargs)
    else:
      out = next_fun(*args, **kwargs)
    if stacked:
      out = out + self._mixed_builtin(module, args, kwargs).astype(out.dtype)
      self.contributed.add(path)
    return out

  def _mixed_builtin(self, module, args, kwargs):
    """``scale[k_b] * (x_b A[k_b]) B[k_b]`` for nn.Dense / nn.Embed (k_b = adapter_index[b])."""
    x = args[0] if args else kwargs["inputs"]
    stack = [module.get_variable("params", n)
             for n in ("lora_a_stack", "lora_b_stack", "lora_scale_stack")]
    return ops.per_row_term(x, *stack, self.adapter_index, module_path(module),
                            lookup=isinstance(module, nn.Embed))

  def _op_call(self, module, next_fun, args, kwargs):
    """A module whose weights enter products of its own code (see :mod:`peft_jax.lora.ops`)."""
    params = module.variables.get("params", {})
    base_path = module_path(module)
    weights = {}
    for rel, (name, leaves) in _module_sites(params).items():
      path = f"{base_path}/{rel}" if base_path and rel else (rel or base_path)
      if name is None or name not in params:
        raise ValueError(f"Adapters at {path!r} have no weight beside them.")
      self.called.add(path)
      weights[name] = ops.WeightSpec(params[name], self._adapter_spec(module, path, leaves), path)
    for name, value in params.items():
      if name not in weights and is_quantized(value):
        weights[name] = ops.WeightSpec(value, None, f"{base_path}/{name}")
    if not weights:
      return next_fun(*args, **kwargs)
    module._try_setup()  # pylint: disable=protected-access  # setup() must not see the views

    def call(views):
      with substituted(module.scope, views):
        return next_fun(*args, **kwargs)

    self._active.add(id(module.scope))
    try:
      out, report = ops.run(call, weights, quant_impl=self.quant_impl,
                            quant_platform=self.quant_platform)
    finally:
      self._active.discard(id(module.scope))
    for name in report.contributed:
      self.contributed.add(weights[name].path)
    for name, uses in report.other_uses.items():
      self.other_uses.setdefault(weights[name].path, []).extend(uses)
    return out

  def _adapter_spec(self, module, path, leaves):
    """The :class:`ops.AdapterSpec` of one site, or None when nothing can act."""
    lora_a, lora_b = leaves.get("lora_a"), leaves.get("lora_b")
    mixed = None
    if self.adapter_index is not None and "lora_a_stack" in leaves:
      mixed = (leaves["lora_a_stack"], leaves["lora_b_stack"], leaves["lora_scale_stack"],
               self.adapter_index)
    if lora_a is None and mixed is None:
      return None
    config = self.config
    scale, dropout = 1.0, 0.0
    if lora_a is not None:
      if config is None:
        raise ValueError(f"Module {path!r} holds adapters: pass its LoRAConfig to peft_jax.intercept.")
      rank = _check_rank(config, path, lora_a, leaves.get("lora_e"))
      scale, dropout = config.scale_for(path, rank), config.dropout
    key = None
    if dropout > 0.0 and not self._is_deterministic(module):
      key = lambda: module.make_rng("dropout")
    return ops.AdapterSpec(lora_a, lora_b, scale, leaves.get("lora_magnitude"), leaves.get("lora_e"),
                           dropout, key, mixed)

  def check(self) -> None:
    """Raises when an adapter in the params added nothing (see module docstring)."""
    missing = sorted(self.present - self.contributed)
    if not missing or self.failed:
      return
    lines = []
    for path in missing:
      if path in self.other_uses:
        why = f"its weight was used only by {sorted(set(self.other_uses[path]))}, never in a product"
      elif path in self.called:
        why = "its module ran but no product used the adapted weight"
      else:
        why = "its module was never called"
      lines.append(f"  {path}: {why}")
    raise ValueError(
        "These adapters added nothing to the output (training them would do nothing):\n"
        + "\n".join(lines) + "\nAdapters act where their weight enters a product "
        "(jnp.einsum, jnp.dot, @, lax.dot_general) or in nn.Dense/DenseGeneral/Einsum/Conv/Embed; "
        "stacked adapters need peft_jax.multitask.mixed_adapters.")

  @staticmethod
  def _has_quantized_kernel(module):
    return (not isinstance(module, nn.Embed) and module.scope is not None
            and module.has_variable("params", "kernel")
            and is_quantized(module.get_variable("params", "kernel")))

  def _quantized_base(self, module, args, kwargs):
    # A quantized kernel cannot pass through the module's own __call__ (which
    # checks the stored shape against its initializer), so the product is ours.
    return quantized.quantized_module_call(module, args, kwargs, impl=self.quant_impl,
                                         platform=self.quant_platform)

  def _is_deterministic(self, module) -> bool:
    if self.deterministic is not None:
      return self.deterministic
    return not module.has_rng("dropout")

  def _adapted(self, module, next_fun, args, kwargs):
    path = module_path(module)
    config = self.config
    if config is None:
      raise ValueError(f"Module {path!r} holds adapters: pass its LoRAConfig to peft_jax.intercept.")
    lora_a, lora_b, magnitude, lora_e = _adapter_leaves(module)
    rank = _check_rank(config, path, lora_a, lora_e)
    scale = config.scale_for(path, rank)
    if self._has_quantized_kernel(module):
      base_out = self._quantized_base(module, args, kwargs)
    else:
      base_out = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    adapter_dtype = lora_a.dtype
    if lora_e is not None:
      # AdaLoRA: scale * x @ (A * E) @ B; the masked singular values stay zeros.
      lora_a = lora_a * lora_e.reshape(lora_e.shape[:-1] + (1,) * (lora_a.ndim - lora_e.ndim) + lora_e.shape[-1:])
    deterministic = self._is_deterministic(module)

    if isinstance(module, nn.Embed):
      x_drop = x
      lora = jnp.take(lora_a, x, axis=0) @ lora_b
      kernel = module.get_variable("params", "embedding")
      layout = layout_lib.KernelLayout((0,), (1,))
      y_sub = "...b"
      out_sub = "b"
    elif isinstance(module, nn.Conv):
      x_drop = _dropout(x, config.dropout, module, deterministic)
      lora = self._conv(module, x_drop.astype(adapter_dtype), lora_a) @ lora_b
      kernel = module.get_variable("params", "kernel")
      window = lora_a.ndim - 2
      layout = layout_lib.KernelLayout(tuple(range(window + 1)), (window + 1,))
      y_sub, out_sub = "...b", "b"
    else:
      x_sub, k_sub, y_sub = _einsum_subscripts(module, args, kwargs, x)
      x_drop = _dropout(x, config.dropout, module, deterministic)
      lora, layout, out_sub = terms.einsum_lora(x_drop.astype(adapter_dtype), lora_a, lora_b,
                                                x_sub, k_sub, y_sub)
      kernel = module.get_variable("params", "kernel")

    if magnitude is None:
      return base_out + (scale * lora).astype(base_out.dtype)

    if x_drop is x:
      x_w0 = _bias_free(base_out, module)
    else:
      # Dropout changes the input of the (g - 1) term too, as in the reference.
      # (The module's own __call__ cannot run twice inside one interception.)
      w0 = kernel_value(kernel, jnp.float32).astype(adapter_dtype)
      x_w0 = self._kernel_product(module, x_drop, w0, args, kwargs)
    return terms.dora_output(base_out, x_w0, lora, kernel=kernel, lora_a=lora_a, lora_b=lora_b,
                             magnitude=magnitude, scale=scale, layout=layout, y_sub=y_sub,
                             out_sub=out_sub, dtype=adapter_dtype)

  def _kernel_product(self, module, x, kernel, args, kwargs):
    """``x W`` without bias, for a dense kernel value ``W`` of ``module``."""
    if isinstance(module, nn.Conv):
      return self._conv(module, x.astype(kernel.dtype), kernel)
    x_sub, k_sub, y_sub = _einsum_subscripts(module, args, kwargs, x)
    return jnp.einsum(f"{x_sub},{k_sub}->{y_sub}", x.astype(kernel.dtype), kernel)

  @staticmethod
  def _conv(module: nn.Conv, x, lora_a):
    return terms.conv_with(module, x, lora_a, module_path(module))


@contextlib.contextmanager
def intercept(config: LoRAConfig | None = None, *, deterministic: bool | None = None,
              quant_impl: str | None = None, quant_platform: str | None = None,
              adapter_index: jax.Array | None = None) -> Iterator[None]:
  """Runs Flax modules with their adapters (and quantized kernels).

  Args:
    config: the config the adapters were created with (scales, dropout). May be
      None for a model that only has quantized kernels.
    deterministic: ``True`` turns adapter dropout off, ``False`` forces it on
      (a ``'dropout'`` rng is then required); ``None`` applies dropout exactly
      when a ``'dropout'`` rng is passed to ``apply``.
    quant_impl: for quantized kernels, the :func:`peft_jax.quant.nf4_matmul`
      implementation (``None`` chooses by backend: Pallas on GPU/TPU, XLA on CPU).
    quant_platform: ``"gpu"`` or ``"tpu"``: the Pallas target, e.g. to lower
      for an accelerator from a CPU host; default the JAX default backend.
    adapter_index: for stacked adapters (:func:`peft_jax.multitask.mixed_adapters`).

  Raises:
    ValueError: on leaving the block, when an adapter in the params of an
      apply added nothing to its output (module never called, or its weight
      never entered a product), naming each path. Checked when the model is
      traced: a cached ``jax.jit`` call runs no Python and checks nothing.

  Example::

    with peft_jax.intercept(config):
      logits = model.apply({"params": params}, tokens, rngs={"dropout": key})
  """
  interceptor = _Interceptor(config, deterministic, quant_impl, quant_platform, adapter_index)
  with nn.intercept_methods(interceptor), nnx_guard():
    yield
  interceptor.check()


def apply(model: nn.Module, variables: Mapping[str, Any], *args, config: LoRAConfig | None = None,
          deterministic: bool | None = None, **kwargs) -> Any:
  """``model.apply`` with adapters active: the functional form of :func:`intercept`."""
  if "params" not in variables:
    variables = {"params": variables}
  with intercept(config, deterministic=deterministic):
    return model.apply(variables, *args, **kwargs)
