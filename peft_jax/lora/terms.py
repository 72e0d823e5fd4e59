"""The adapter terms shared by the linen interceptor and the NNX layers.

Given the einsum subscripts of a module's product ``y = x W`` (``x_sub``,
``k_sub``, ``y_sub``), :func:`einsum_lora` computes ``(x A) B`` and the
kernel's layout, and :func:`dora_output` recombines a DoRA output::

    y = base(x) + (g - 1) * (x W0) + g * s * (x A) B,
    g = m / stop_gradient(||W0 + s B A||)   (norm over input axes, per output)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from peft_jax.lora import layout as layout_lib
from peft_jax.lora.transform import delta_kernel, kernel_value, weight_norm


def einsum_lora(x, lora_a, lora_b, x_sub: str, k_sub: str, y_sub: str):
  """``((x A) B, layout, out_sub)`` for a kernel with subscripts ``k_sub``."""
  rank = layout_lib.RANK_LETTER
  in_sub = "".join(c for c in k_sub if c in x_sub)
  out_sub = "".join(c for c in k_sub if c in y_sub)
  h_sub = "".join(c for c in x_sub if c not in in_sub) + rank
  if len(in_sub) == 1 and len(out_sub) == 1 and x_sub[:-1] + out_sub == y_sub and (
      x_sub.endswith(in_sub)):
    lora = _matrix_lora(x, lora_a, lora_b)
  else:
    h = jnp.einsum(f"{x_sub},{in_sub}{rank}->{h_sub}", x, lora_a)
    lora = jnp.einsum(f"{h_sub},{rank}{out_sub}->{y_sub}", h, lora_b)
  layout = layout_lib.KernelLayout(
      tuple(i for i, c in enumerate(k_sub) if c in x_sub),
      tuple(i for i, c in enumerate(k_sub) if c in y_sub))
  return lora, layout, out_sub


@jax.custom_vjp
def _matrix_lora(x, lora_a, lora_b):
  """``(x A) B`` over the last axis of ``x``, as matrix products of the flattened tokens.

  The gradients are the autodiff ones (bit for bit), but ``dB = h^T g`` is written with
  the small ``h^T`` as the left operand: from autodiff's ``dot_general`` over the token
  axes XLA:CPU instead transposed the large ``g`` ([tokens, out] -> [out, tokens]) in the
  fusion that produced it, at every adapted site (Gemma 3 270M body, q/v: ~0.8x the
  site's backward time; ``benchmarks/bench_gemma_body.py``).
  """
  return _matrix_lora_fwd(x, lora_a, lora_b)[0]


def _matrix_lora_fwd(x, lora_a, lora_b):
  h = x.reshape(-1, x.shape[-1]) @ lora_a
  return (h @ lora_b).reshape(x.shape[:-1] + lora_b.shape[-1:]), (x, lora_a, lora_b, h)


def _matrix_lora_bwd(res, g):
  x, lora_a, lora_b, h = res
  g = g.reshape(-1, g.shape[-1])
  dh = g @ lora_b.T
  dx = (dh @ lora_a.T).reshape(x.shape)
  da = x.reshape(-1, x.shape[-1]).T @ dh
  return dx.astype(x.dtype), da.astype(lora_a.dtype), (h.T @ g).astype(lora_b.dtype)


_matrix_lora.defvjp(_matrix_lora_fwd, _matrix_lora_bwd)


def dora_output(base_out, x_w0, lora, *, kernel, lora_a, lora_b, magnitude, scale,
                layout: layout_lib.KernelLayout, y_sub: str, out_sub: str, dtype):
  """``base_out`` plus DoRA's ``(g - 1) x W0 + g s (x A) B`` (see module docstring).

  ``x_w0``: the bias-free product of the (dropped-out) input with ``W0``.
  """
  w0 = kernel_value(kernel, jnp.float32)
  adapted = w0 + scale * delta_kernel(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32),
                                      layout)
  norm = jax.lax.stop_gradient(weight_norm(adapted, layout))
  g = (magnitude.astype(jnp.float32) / norm).astype(dtype)
  mul = lambda y, v: jnp.einsum(f"{y_sub},{out_sub}->{y_sub}", y, v)
  extra = mul(x_w0.astype(dtype), g - 1) + mul(scale * lora, g)
  return base_out + extra.astype(base_out.dtype)


def conv_with(module, x, kernel, path: str):
  """``module``'s convolution (linen or NNX ``Conv``) of ``x`` with another ``kernel``.

  Used for LoRA's ``A`` (``kernel`` of ``kernel_size + (in, r)``) and for DoRA's
  ``x * W0``. Grouped or masked convolutions are refused, naming ``path``.
  """
  if module.feature_group_count != 1 or getattr(module, "mask", None) is not None:
    raise ValueError(f"LoRA on grouped or masked convolutions is not supported ({path!r}).")
  conv = nn.Conv(
      features=kernel.shape[-1], kernel_size=module.kernel_size, strides=module.strides,
      padding=module.padding, input_dilation=module.input_dilation,
      kernel_dilation=module.kernel_dilation, use_bias=False, dtype=kernel.dtype,
      param_dtype=kernel.dtype, precision=module.precision, parent=None)
  return conv.apply({"params": {"kernel": kernel}}, x)
