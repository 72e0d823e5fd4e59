"""4-bit quantized kernels (QLoRA's NF4 and FP4), bit-compatible with bitsandbytes.

Public API:

* :class:`NF4` / :class:`FP4`: the quantization spec (block size, double
  quantization, compute dtype, quant type).
* :class:`NF4Array`: a quantized kernel, a pytree (packed ``uint8`` codes,
  per-block scales, optional double-quantized scales) with ``shape``,
  ``dtype``, ``ndim``, ``size``, ``nbytes``, ``bits_per_param`` and
  ``dequantize()``. Stacked ``(L, in, out)`` kernels slice per layer under
  ``nn.scan``.
* :func:`quantize` / :func:`dequantize`: over a params tree, with
  ``target_modules`` (default: every Dense-like kernel except the output head;
  embedding tables only with ``include_embeddings=True``, looked up row by row
  with :func:`peft_jax.quant.embed.nf4_lookup`).
* :func:`quantize_array` / :func:`dequantize_array`: one array.
* :func:`is_quantized`: ``isinstance(leaf, NF4Array)``, usable as ``is_leaf``.
* :func:`nf4_matmul`: ``x (..., in) @ dequantize(w)`` without materializing
  the weight (Pallas on GPU/TPU, a K-tiled XLA path on CPU), gradients to
  ``x`` only.
* :func:`to_bnb` / :func:`from_bnb`: bitsandbytes ``Linear4bit`` state-dict
  entries, bit for bit.
"""

from peft_jax.quant.bnb import from_bnb, to_bnb
from peft_jax.quant.matmul import IMPLS, can_use_pallas, nf4_matmul, select_impl
from peft_jax.quant.nf4 import (
    FP4,
    NF4,
    NF4Array,
    dequantize_array,
    is_quantized,
    quantize_array,
)
from peft_jax.quant.tree import default_kernel_layout, dequantize, quantize, quantized_paths

__all__ = [
    "FP4",
    "IMPLS",
    "NF4",
    "NF4Array",
    "can_use_pallas",
    "default_kernel_layout",
    "dequantize",
    "dequantize_array",
    "from_bnb",
    "is_quantized",
    "nf4_matmul",
    "quantize",
    "quantize_array",
    "quantized_paths",
    "select_impl",
    "to_bnb",
]
