"""Running Flax modules whose kernel is an :class:`NF4Array` (QLoRA's base).

Linen's ``Dense`` checks a stored param's shape against its initializer, so a
quantized kernel cannot pass through the module's own ``__call__``: the LoRA
interceptor calls :func:`quantized_module_call` instead, which computes the
module's product with :func:`nf4_matmul` (the weight is never materialised in
full) and adds the bias. An ``nn.Embed`` with a quantized table (opt-in,
``quantize(..., include_embeddings=True)``) goes through
:func:`quantized_embed_call` for the same reason: a lookup dequantizes only
its rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from peft_jax.lora.layout import parse_einsum
from peft_jax.quant.embed import nf4_attend, nf4_lookup
from peft_jax.quant.matmul import nf4_matmul
from peft_jax.quant.nf4 import is_quantized


def _module_dtype(module: nn.Module, x, kernel):
  if getattr(module, "dtype", None) is not None:
    return jnp.dtype(module.dtype)
  return jnp.result_type(x.dtype, kernel.dtype)


def quantized_module_call(module: nn.Module, args: tuple, kwargs: Mapping[str, Any], *,
                          impl: str | None = None, platform: str | None = None):
  """The output of ``module(*args, **kwargs)`` with its quantized kernel.

  ``impl`` and ``platform`` go to :func:`nf4_matmul`.
  """
  kernel = module.get_variable("params", "kernel")
  x = args[0] if args else kwargs["inputs"]
  dtype = _module_dtype(module, x, kernel)
  x = x.astype(dtype)
  if isinstance(module, nn.Dense):
    y = nf4_matmul(x, kernel, impl=impl, platform=platform)
  elif isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError("Quantized DenseGeneral with batch_dims is not supported.")
    axis = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
    axis = tuple(a % x.ndim for a in axis)
    if axis != tuple(range(x.ndim - len(axis), x.ndim)):
      x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    y = nf4_matmul(x, kernel, impl=impl, platform=platform)
  elif isinstance(module, nn.Einsum):
    einsum_str = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
    x_sub, k_sub, y_sub = parse_einsum(einsum_str)
    y = jnp.einsum(f"{x_sub},{k_sub}->{y_sub}", x, kernel.dequantize(dtype))
  else:
    raise ValueError(f"Quantized kernels are not supported in {type(module).__name__} modules.")
  y = y.astype(dtype)
  if getattr(module, "use_bias", False) and module.has_variable("params", "bias"):
    y = y + module.get_variable("params", "bias").astype(dtype)
  return y


def has_quantized_table(module: nn.Embed) -> bool:
  return (module.scope is not None and module.has_variable("params", "embedding")
          and is_quantized(module.get_variable("params", "embedding")))


def quantized_embed_call(module: nn.Embed, method_name: str, args: tuple,
                         kwargs: Mapping[str, Any]):
  """``nn.Embed``'s ``setup``/``__call__``/``attend`` on its quantized (frozen) table."""
  if method_name == "setup":
    return None  # Embed.setup checks the stored table's shape against its initializer
  path = "/".join(module.scope.path)
  params = module.variables.get("params", {})
  if set(params) - {"embedding"}:
    raise ValueError(f"{path!r}: adapters or trainable copies ({sorted(set(params) - {'embedding'})})"
                     " on a quantized embedding are not supported; keep the table in float "
                     "(include_embeddings=False) to adapt it.")
  table = module.get_variable("params", "embedding")
  if method_name == "__call__":
    ids = args[0] if args else kwargs["inputs"]
    return nf4_lookup(table, ids, module.dtype or table.dtype)
  if method_name == "attend":  # a tied head: every row is needed
    query = args[0] if args else kwargs["query"]
    return nf4_attend(query, table, module.dtype)
  raise ValueError(f"{path!r}: nn.Embed.{method_name} is not supported on a quantized table.")
