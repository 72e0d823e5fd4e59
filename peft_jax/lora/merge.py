"""Merging adapters into their kernels for serving, and taking them out again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from peft_jax import targeting
from peft_jax.lora import layout as layout_lib
from peft_jax.lora import saved as saved_lib
from peft_jax.lora.config import LoRAConfig
from peft_jax.lora.transform import delta_kernel, kernel_value, weight_norm
from peft_jax.lora.tree import adapter_paths
from peft_jax.quant.nf4 import is_quantized, quantize_array


def _weight_path(flat, site):
  path = targeting.site_weight(flat, site)
  if path is None:
    raise ValueError(f"Adapters at {site!r} have no weight beside them (kernel, embedding, "
                     "or the weight their '<weight>_lora' site names).")
  return path


def _module_layout(module, kernel, lora_a, lora_b, layouts):
  layouts = layouts or {}
  layout = (layouts.get(module) or layouts.get(targeting.site_target(module))
            or layout_lib.layout_from_adapters(kernel.shape, lora_a.shape, lora_b.shape))
  layout_lib.check_adapter_shapes(module, kernel.shape, lora_a.shape, lora_b.shape, layout)
  return layout


def merged_kernel(kernel, lora_a, lora_b, magnitude, lora_e, scale, layout):
  """The dense kernel a plain module needs to compute the adapted output."""
  w0 = kernel_value(kernel, jnp.float32)
  a = _with_singular_values(lora_a.astype(jnp.float32), lora_e, layout)
  adapted = w0 + scale * delta_kernel(a, lora_b.astype(jnp.float32), layout)
  if magnitude is None:
    return adapted
  g = magnitude.astype(jnp.float32) / weight_norm(adapted, layout)
  return adapted * _expand_out(g, layout)


def _with_singular_values(a, lora_e, layout):
  """AdaLoRA's ``A * E``: E (batch + (r,)) broadcast over A's input axes."""
  if lora_e is None:
    return a
  e = lora_e.astype(a.dtype)
  n_in = len(layout.in_axes)
  return a * e.reshape(e.shape[:-1] + (1,) * n_in + e.shape[-1:])


def _expand_out(g, layout):
  """Reshapes a batch + out-shaped array to broadcast against the kernel."""
  b = layout.batch_ndim
  shape = list(g.shape[:b])
  out_iter = iter(g.shape[b:])
  for axis in range(layout.kernel_ndim):
    shape.append(next(out_iter) if axis in layout.out_axes else 1)
  return g.reshape(shape)


def merge(params: Mapping[str, Any], config: LoRAConfig, *,
          layouts: Mapping[str, layout_lib.KernelLayout] | None = None) -> dict[str, Any]:
  """Folds every adapter into its kernel: plain Flax params for serving.

  ``W' = W + s B A`` (LoRA, rsLoRA), ``W' = m / ||W + s B A|| * (W + s B A)``
  (DoRA). Saved copies (``modules_to_save``, ``bias``) replace the params
  they copy. The result has no adapter leaves and runs on the unmodified
  model without the interceptor.

  Args:
    params: params holding adapter leaves.
    config: the config the adapters were trained with.
    layouts: needed only for ``nn.Einsum`` kernels whose input and output
      axes interleave (see :mod:`peft_jax.lora.layout`).

  A quantized (NF4) kernel merges into a dense kernel of its compute dtype;
  :func:`merge_into_quantized` re-quantizes and reports the
  error.

  Raises:
    ValueError: when the params hold no adapters, or the config or layouts do
      not fit the adapter shapes.
  """
  inner, wrapped = targeting.unwrap_params(params)
  flat = targeting.flatten(inner)
  modules = [p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a")]
  if not modules:
    raise ValueError("These params hold no adapters (no 'lora_a' leaf): nothing to merge.")
  _check_tied_scales(flat, config)
  for module in modules:
    weight = _weight_path(flat, module)
    kernel = flat[weight]
    lora_a, lora_b = flat.pop(f"{module}/lora_a"), flat.pop(f"{module}/lora_b")
    magnitude = flat.pop(f"{module}/lora_magnitude", None)
    lora_e = flat.pop(f"{module}/lora_e", None)
    layout = _module_layout(module, kernel, lora_a, lora_b, layouts)
    rank = lora_a.shape[-1]
    if lora_e is None and rank != config.rank_for(module):
      raise ValueError(
          f"Adapters at {module!r} have rank {rank}, the config gives "
          f"{config.rank_for(module)}: the config does not fit these params.")
    scale = config.scale_for(module, rank)
    dense = merged_kernel(kernel, lora_a, lora_b, magnitude, lora_e, scale, layout)
    flat[weight] = dense.astype(kernel.dtype)
  saved_lib.merge_copies(flat)
  out = targeting.unflatten(flat)
  return {"params": out} if wrapped else out


def _check_tied_scales(flat: Mapping[str, Any], config: LoRAConfig) -> None:
  """A tied embedding's LoRA merges into the one table that the head reads too: exact only
  when the head scales it as the lookup does (``alpha_pattern`` can give the head its own)."""
  table = saved_lib.tied_lora_table(flat, config)
  if table is None:
    return
  rank = flat[f"{table}/lora_a"].shape[-1]
  lookup, head = config.scale_for(table, rank), saved_lib.tied_head_scale(config, table, rank)
  if lookup != head:
    raise ValueError(
        f"ensure_weight_tying: the embedding {table!r} scales its LoRA by {lookup:g} and the "
        f"tied head {saved_lib.TIED_HEAD!r} by {head:g} (alpha_pattern): one merged table "
        "cannot hold both. Keep the adapters unmerged, or train with one alpha for both.")


def unmerge(merged: Mapping[str, Any], adapters: Mapping[str, Any], config: LoRAConfig, *,
            layouts: Mapping[str, layout_lib.KernelLayout] | None = None) -> dict[str, Any]:
  """Takes LoRA adapters back out of merged kernels: ``W = W' - s B A``.

  Returns the base params with the adapters beside their kernels again (as
  before :func:`merge`). DoRA cannot be unmerged exactly from the merged
  kernel alone (the norm of the unmerged weight is lost), so it raises; keep
  the base params instead.
  """
  inner, wrapped = targeting.unwrap_params(merged)
  flat = targeting.flatten(inner)
  adapter_flat = targeting.flatten(targeting.unwrap_params(adapters)[0])
  modules = [p[: -len("/lora_a")] for p in adapter_flat if p.endswith("/lora_a")]
  if not modules:
    raise ValueError("The adapters tree holds no 'lora_a' leaf: nothing to unmerge.")
  copies = sorted(p for p in adapter_flat if saved_lib.is_saved_path(p))
  if copies:
    raise ValueError(
        f"merge replaced the params of saved modules and biases ({copies[:3]}...) by their "
        "trained copies: the originals are not in the merged params. Keep the base params.")
  for module in modules:
    if f"{module}/lora_magnitude" in adapter_flat:
      raise ValueError(
          f"DoRA adapters ({module!r}) cannot be unmerged exactly: the weight norm of "
          "the unmerged kernel is not recoverable from the merged one. Keep the base params.")
    weight = _weight_path(flat, module)
    kernel = flat[weight]
    lora_a, lora_b = adapter_flat[f"{module}/lora_a"], adapter_flat[f"{module}/lora_b"]
    lora_e = adapter_flat.get(f"{module}/lora_e")
    layout = _module_layout(module, kernel, lora_a, lora_b, layouts)
    a = _with_singular_values(lora_a.astype(jnp.float32), lora_e, layout)
    delta = config.scale_for(module, lora_a.shape[-1]) * delta_kernel(a, lora_b.astype(jnp.float32), layout)
    flat[weight] = (kernel.astype(jnp.float32) - delta).astype(kernel.dtype)
  for path, value in adapter_flat.items():
    flat[path] = value
  out = targeting.unflatten(flat)
  return {"params": out} if wrapped else out


def merge_lora(params: Mapping[str, Any], config: LoRAConfig, **kwargs) -> dict[str, Any]:
  """The seed document's name for :func:`merge`."""
  return merge(params, config, **kwargs)


def merge_into_quantized(params: Mapping[str, Any], config, spec, *, layouts=None
                         ) -> tuple[dict[str, Any], dict[str, float]]:
  """Merges adapters into an NF4 base and re-quantizes the merged kernels.

  Args:
    params: params whose adapted kernels are :class:`NF4Array` leaves.
    config: the adapters' :class:`peft_jax.LoRAConfig`.
    spec: the :class:`peft_jax.quant.NF4` spec for the merged kernels.
    layouts: as for :func:`peft_jax.merge`.

  Returns:
    ``(qparams, errors)``: params with re-quantized merged kernels, and per
    module the relative Frobenius error ``||deq(q(W')) - W'|| / ||W'||`` that
    re-quantization adds to the merged kernel ``W'``.
  """
  inner, wrapped = targeting.unwrap_params(params)
  flat_before = targeting.flatten(inner)
  merged = targeting.flatten(targeting.unwrap_params(merge(params, config, layouts=layouts))[0])
  errors = {}
  for module in adapter_paths(inner):
    path = targeting.site_weight(flat_before, module)
    old = flat_before.get(path)
    if not is_quantized(old):
      continue
    dense = merged[path]
    q = quantize_array(dense, spec, stack_ndim=len(old.stack_shape), in_ndim=len(old.in_shape))
    diff = q.dequantize(jnp.float32) - dense.astype(jnp.float32)
    errors[module] = float(jnp.linalg.norm(diff.ravel()) / jnp.linalg.norm(dense.astype(jnp.float32).ravel()))
    merged[path] = q
  out = targeting.unflatten(merged)
  return ({"params": out} if wrapped else out), errors
