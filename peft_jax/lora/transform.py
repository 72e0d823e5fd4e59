"""``lora_transform``: add adapter leaves beside the kernels they adapt."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from peft_jax import targeting
from peft_jax.lora.config import LoRAConfig
from peft_jax.lora import loftq
from peft_jax.lora import saved as saved_lib
from peft_jax.lora.layout import KernelLayout, default_layout, from_matrix, to_matrix

Params = Mapping[str, Any]


def is_quantized(leaf: Any) -> bool:
  """Whether a leaf is a quantized array (anything with ``dequantize()``)."""
  return hasattr(leaf, "dequantize") and not isinstance(leaf, jax.Array)


def kernel_value(leaf: Any, dtype=None) -> jax.Array:
  """A kernel leaf as a dense array (dequantized when quantized)."""
  value = leaf.dequantize() if is_quantized(leaf) else jnp.asarray(leaf)
  return value if dtype is None else value.astype(dtype)


def delta_kernel(lora_a: jax.Array, lora_b: jax.Array, layout: KernelLayout) -> jax.Array:
  """``B A`` in the kernel's own layout (batch axes included), unscaled."""
  k_sub, in_sub, out_sub = layout.letters()
  r = "z"
  return jnp.einsum(f"...{in_sub}{r},...{r}{out_sub}->...{k_sub}", lora_a, lora_b)


def weight_norm(kernel: jax.Array, layout: KernelLayout) -> jax.Array:
  """L2 norm over the input axes: one per output feature (DoRA's ``‖W‖_row``)."""
  b = layout.batch_ndim
  axes = tuple(b + i for i in layout.in_axes)
  k32 = kernel.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(k32 * k32, axis=axes))
  # jnp.sum keeps the remaining (output) axes in kernel order, as lora_magnitude does.
  return norm


def _init_default(key, fan_in, a_shape, b_shape, dtype, is_embedding):
  if is_embedding:
    # Hugging Face initialises embedding adapters the other way round: A = 0, B ~ N(0, 1).
    return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
  bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) on an (r, fan_in) weight
  return (jax.random.uniform(key, a_shape, dtype, -bound, bound), jnp.zeros(b_shape, dtype))


def _init_gaussian(key, rank, a_shape, b_shape, dtype, is_embedding):
  if is_embedding:
    return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
  return jax.random.normal(key, a_shape, dtype) / rank, jnp.zeros(b_shape, dtype)


def _pissa_matrix(w_in_out: jax.Array, rank: int, scale: float, niter: int | None, key):
  """PiSSA on one (fan_in, fan_out) matrix. Returns (A (in, r), B (r, out), residual)."""
  w = w_in_out.T  # torch layout (out, in): the reference's SVD convention
  if niter is None:
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
  else:
    u, s, vh = _svd_lowrank(w, rank, niter, key)
  s_r = s[:rank] / scale
  b = u[:, :rank] * jnp.sqrt(s_r)  # (out, r)
  a = jnp.sqrt(s_r)[:, None] * vh[:rank]  # (r, in)
  residual = w - scale * b @ a
  return a.T, b.T, residual.T


def _svd_lowrank(w, rank, niter, key):
  """Randomised SVD (Halko et al.), as torch.svd_lowrank with q = rank."""
  omega = jax.random.normal(key, (w.shape[1], rank), w.dtype)
  q, _ = jnp.linalg.qr(w @ omega)
  for _ in range(niter):
    q, _ = jnp.linalg.qr(w.T @ q)
    q, _ = jnp.linalg.qr(w @ q)
  u_small, s, vh = jnp.linalg.svd(q.T @ w, full_matrices=False)
  return q @ u_small, s, vh


def _olora_matrix(w_in_out: jax.Array, rank: int, scale: float):
  w = w_in_out.T
  q, r_mat = jnp.linalg.qr(w)  # reduced QR, LAPACK signs as torch.linalg.qr
  b = q[:, :rank]
  a = r_mat[:rank]
  residual = w - scale * b @ a
  return a.T, b.T, residual.T


def _rewrite_init(kernel, layout, rank, scale, init, key, is_embedding, path):
  """PiSSA / OLoRA: adapters from the kernel's factors, base kernel := residual."""
  if is_embedding:
    raise ValueError(f"init={init!r} supports Dense-like kernels only, not the embedding at {path!r}.")
  w = to_matrix(kernel_value(kernel, jnp.float32), layout)
  batch = w.shape[:-2]
  flat = w.reshape((-1,) + w.shape[-2:])
  keys = jax.random.split(key, flat.shape[0])
  if init == "olora":
    a, b, res = jax.vmap(lambda m: _olora_matrix(m, rank, scale))(flat)
  else:
    match = re.fullmatch(r"pissa_niter_(\d+)", init)
    niter = int(match.group(1)) if match else None
    a, b, res = jax.vmap(lambda m, k: _pissa_matrix(m, rank, scale, niter, k))(flat, keys)
  a = a.reshape(batch + a.shape[-2:])
  b = b.reshape(batch + b.shape[-2:])
  res = from_matrix(res.reshape(batch + res.shape[-2:]), kernel.shape, layout)
  return a, b, res


def _resolve_layout(path, leaf_name, kernel, layouts) -> KernelLayout:
  layout = (layouts or {}).get(path) or default_layout(kernel.shape)
  if layout is None:
    raise ValueError(
        f"The {leaf_name} at {path!r} has shape {tuple(kernel.shape)}: which axes are "
        "input, output or stacked layers cannot be told from the shape alone. Pass "
        "layouts=peft_jax.kernel_layouts(model, sample_input) to lora_transform.")
  if layout.batch_ndim + layout.kernel_ndim != len(kernel.shape):
    raise ValueError(
        f"Layout {layout} does not fit the {leaf_name} at {path!r} of shape {tuple(kernel.shape)}.")
  return layout


def lora_transform(
    params: Params,
    config: LoRAConfig,
    *,
    key: jax.Array,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict[str, Any]:
  """Adds LoRA (or DoRA) adapter leaves beside every targeted kernel.

  A pure tree transformation: the model is not run. For each module selected
  by ``config.target_modules`` it adds ``lora_a`` and ``lora_b`` (and, for
  DoRA, ``lora_magnitude``) in the module's own dict, shaped after the
  kernel (see :mod:`peft_jax.lora.layout`); a weight named in
  ``config.weight_names`` gets them in ``<weight>_lora`` beside it. With the default init the adapted
  model computes exactly what the base model does. ``config.modules_to_save``
  and ``config.bias`` add trainable copies in ``<module>/saved`` (see
  :mod:`peft_jax.lora.saved`).

  Args:
    params: Flax params (``{'params': ...}`` or the inner dict). Kernels may be
      quantized arrays (QLoRA).
    config: the adapter configuration.
    key: PRNG key for the adapter initialisation.
    layouts: ``{module_path: KernelLayout}`` from :func:`kernel_layouts`;
      needed only for kernels of more than two axes (``DenseGeneral``,
      ``Einsum``, ``Conv``, scanned layers).

  Returns:
    A new params tree (same wrapping as the input) with the adapter leaves;
    for ``init='pissa'``/``'olora'`` the targeted kernels are replaced by
    their residuals so that the initial output is unchanged.

  Raises:
    ValueError: unmatched targets, a rank larger than a layer allows, a module
      that already holds adapters, or an ambiguous kernel layout.
  """
  inner, wrapped = targeting.unwrap_params(params)
  flat = targeting.flatten(inner)
  targets = saved_lib.tied_head_targets(  # a tied model's lm_head: its embedding, as PEFT
      flat, config, targeting.adaptable_modules(inner, config.weight_names))
  selected = targeting.select_modules(
      inner, targets, exclude_modules=config.exclude_modules,
      layers_to_transform=config.layers_to_transform, weight_names=config.weight_names)
  tied = saved_lib.tied_embedding(flat, saved_lib.TIED_HEAD) if config.ensure_weight_tying else None
  patterned = [*selected, saved_lib.TIED_HEAD] if tied in selected else list(selected)
  targeting.check_patterns_match(config.rank_pattern, patterned, "rank_pattern")
  targeting.check_patterns_match(config.alpha_pattern, patterned, "alpha_pattern")
  if tied in selected:  # the tied head's own rank must be the embedding's
    saved_lib.tied_head_scale(config, tied, config.rank_for(tied))
  keys = jax.random.split(key, len(selected))
  for module_key, (path, leaf_name) in zip(keys, selected.items()):
    site = targeting.site_path(path, leaf_name)
    weight = targeting.weight_path(path, leaf_name)
    if f"{site}/lora_a" in flat:
      raise ValueError(f"Module {path!r} already holds adapters; merge or split them off first.")
    kernel = flat[weight]
    if not (is_quantized(kernel) or jnp.issubdtype(kernel.dtype, jnp.floating)):
      raise ValueError(f"The {leaf_name} at {path!r} has dtype {kernel.dtype}; expected a float kernel.")
    layout = _resolve_layout(path, leaf_name, kernel, layouts)
    rank = config.rank_for(path)
    fan_in, fan_out = layout.matrix_dims(kernel.shape)
    if rank > min(fan_in, fan_out):
      raise ValueError(
          f"rank {rank} is larger than the layer {path!r} allows: kernel shape "
          f"{tuple(kernel.shape)} is a {fan_in} x {fan_out} map, so rank <= {min(fan_in, fan_out)}.")
    scale = config.scale_for(path, rank)
    dtype = jnp.dtype(config.adapter_dtype) if config.adapter_dtype else kernel.dtype
    batch = tuple(kernel.shape[: layout.batch_ndim])
    a_shape = batch + layout.in_shape(kernel.shape) + (rank,)
    b_shape = batch + (rank,) + layout.out_shape(kernel.shape)
    is_embedding = leaf_name == "embedding"
    init = config.init
    if init == "default":
      lora_a, lora_b = _init_default(module_key, fan_in, a_shape, b_shape, dtype, is_embedding)
    elif init == "gaussian":
      lora_a, lora_b = _init_gaussian(module_key, rank, a_shape, b_shape, dtype, is_embedding)
    elif init == "loftq":
      qkernel, lora_a, lora_b = loftq.loftq_for_kernel(
          kernel, layout, rank, config.loftq_iter, path=path)
      flat[weight] = qkernel
      lora_a = lora_a.reshape(a_shape).astype(dtype)
      lora_b = lora_b.reshape(b_shape).astype(dtype)
    else:
      if is_quantized(kernel):
        raise ValueError(
            f"init={init!r} rewrites the base kernel, but {path!r} is quantized: run it "
            "on the float params, then quantize (as the reference does for QLoRA).")
      lora_a, lora_b, residual = _rewrite_init(
          kernel, layout, rank, scale, init, module_key, is_embedding, path)
      lora_a = lora_a.reshape(a_shape).astype(dtype)
      lora_b = lora_b.reshape(b_shape).astype(dtype)
      flat[weight] = residual.astype(kernel.dtype)
    flat[f"{site}/lora_a"] = lora_a
    flat[f"{site}/lora_b"] = lora_b
    if config.use_dora:
      base = kernel_value(flat[weight], jnp.float32)
      adapted = base + scale * delta_kernel(
          lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), layout)
      flat[f"{site}/lora_magnitude"] = weight_norm(adapted, layout).astype(dtype)
  saved_lib.add_copies(flat, config)
  out = targeting.unflatten(flat)
  return {"params": out} if wrapped else out


def apply_lora(params: Params, config: LoRAConfig, *, key: jax.Array, **kwargs) -> dict[str, Any]:
  """The seed document's name for :func:`lora_transform`."""
  return lora_transform(params, config, key=key, **kwargs)


def apply_dora(params: Params, config: LoRAConfig, *, key: jax.Array, **kwargs) -> dict[str, Any]:
  """The seed document's ``apply_dora``: :func:`lora_transform` with DoRA on."""
  if not config.use_dora:
    config = config.replace(use_dora=True)
  return lora_transform(params, config, key=key, **kwargs)
