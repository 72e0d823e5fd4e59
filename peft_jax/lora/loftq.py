"""LoftQ initialisation: quantize the base and start the adapters on the error.

Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language
Models"; Hugging Face PEFT ``utils/loftq_utils.py::loftq_init``. In PyTorch
layout, with ``W`` the float weight::

    res = W
    for t in 1..T:
        Q = dequant(quant(res))            # NF4, block 64, no double quant
        U, S, Vh = svd(W - Q)
        L = U[:, :r] sqrt(S[:r]);  R = sqrt(S[:r]) Vh[:r]
        res = W - L R                      # (not after the last iteration)
    base := Q;  lora_A := R;  lora_B := L

As in the reference the LoRA scaling is ignored: ``B A`` approximates
``W - Q``, so the quantization error is cancelled exactly when ``alpha / r``
is 1.
"""

from __future__ import annotations

import jax.numpy as jnp

from peft_jax import _lapack
from peft_jax.lora.layout import KernelLayout, from_matrix, to_matrix
from peft_jax.quant.nf4 import NF4, is_quantized, quantize_array

LOFTQ_SPEC = NF4(block_size=64, double_quant=False, compute_dtype=jnp.float32)


def loftq_for_kernel(kernel, layout: KernelLayout, rank: int, num_iter: int, *,
                     path: str = "", spec: NF4 = LOFTQ_SPEC):
  """LoftQ for one (possibly stacked) kernel in Flax layout.

  Returns:
    ``(quantized_kernel, lora_a, lora_b)`` with ``lora_a`` of shape
    ``batch + (fan_in, r)`` and ``lora_b`` of shape ``batch + (r, fan_out)``
    (reshape to the kernel's input and output axes as the caller needs).

  Raises:
    ValueError: for an already quantized kernel (LoftQ needs the float
      weights) or a layout whose input axes do not lead.
  """
  if is_quantized(kernel):
    raise ValueError(
        f"init='loftq' needs the float kernel at {path!r}, which is already quantized: "
        "call lora_transform with init='loftq' on the float params; it quantizes them.")
  if layout.in_axes != tuple(range(len(layout.in_axes))):
    raise ValueError(f"init='loftq' needs input axes before output axes at {path!r}.")
  w = to_matrix(jnp.asarray(kernel, jnp.float32), layout)  # batch + (in, out)
  residual = w
  for i in range(num_iter):
    q = quantize_array(from_matrix(residual, kernel.shape, layout), spec,
                       stack_ndim=layout.batch_ndim, in_ndim=len(layout.in_axes))
    dense_q = to_matrix(q.dequantize(jnp.float32), layout)
    # SVD in torch layout (out, in) as the reference: L (out, r), R (r, in).
    # One LAPACK call per matrix on CPU: batched SVDs of two kernels in one
    # jitted program can deadlock jaxlib's thread pool (`_lapack`).
    u, s, vh = _lapack.map_matrices(lambda d: jnp.linalg.svd(d, full_matrices=False),
                                    jnp.swapaxes(w - dense_q, -1, -2),
                                    batch_ndim=w.ndim - 2)
    root = jnp.sqrt(s[..., :rank])
    left = u[..., :, :rank] * root[..., None, :]
    right = root[..., :, None] * vh[..., :rank, :]
    if i + 1 == num_iter:
      break
    residual = w - jnp.swapaxes(left @ right, -1, -2)
  lora_a = jnp.swapaxes(right, -1, -2)  # (in, r)
  lora_b = jnp.swapaxes(left, -1, -2)  # (r, out)
  return q, lora_a, lora_b
