"""Which kernel axes an adapter contracts with the input, and which it produces.

A kernel of a ``Dense``-like module has *input axes* (contracted with the
activation) and *output axes* (appear in the result); a scanned or vmapped
module adds leading *batch axes* (one slice per layer). Adapters follow the
kernel's layout::

    lora_a: batch + [kernel.shape[i] for i in in_axes]  + (r,)
    lora_b: batch + (r,) + [kernel.shape[o] for o in out_axes]
    lora_magnitude (DoRA): batch + [kernel.shape[o] for o in out_axes]

For ``Dense`` (``(in, out)``), ``Embed`` (``(vocab, features)``, the vocabulary
axis counts as input), ``DenseGeneral`` and ``Conv`` (``(*window, in, out)``)
the input axes lead and the layout follows from the adapter shapes. Only a
``nn.Einsum`` kernel can interleave them (``"BTD,NDH->BTNH"``); for those, and
to resolve a 3-D kernel that could be a stacked ``Dense`` or a
``DenseGeneral``, :func:`kernel_layouts` reads the layouts off the model.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from peft_jax import targeting


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """Axes of one (per-layer) kernel.

  Attributes:
    in_axes: kernel axes contracted with the module input.
    out_axes: kernel axes that appear in the module output, in kernel order.
    batch_ndim: leading stacked axes added by ``nn.scan``/``nn.vmap``.
  """

  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  batch_ndim: int = 0

  @property
  def kernel_ndim(self) -> int:
    return len(self.in_axes) + len(self.out_axes)

  def in_shape(self, kernel_shape) -> tuple[int, ...]:
    per_layer = tuple(kernel_shape)[self.batch_ndim:]
    return tuple(per_layer[i] for i in self.in_axes)

  def out_shape(self, kernel_shape) -> tuple[int, ...]:
    per_layer = tuple(kernel_shape)[self.batch_ndim:]
    return tuple(per_layer[o] for o in self.out_axes)

  def matrix_dims(self, kernel_shape) -> tuple[int, int]:
    """(fan_in, fan_out) of the kernel seen as a matrix."""
    return math.prod(self.in_shape(kernel_shape)), math.prod(self.out_shape(kernel_shape))

  def letters(self) -> tuple[str, str, str]:
    """Einsum subscripts ``(kernel, in, out)`` of one per-layer kernel."""
    kernel = string.ascii_lowercase[: self.kernel_ndim]
    return (kernel, "".join(kernel[i] for i in self.in_axes),
            "".join(kernel[o] for o in self.out_axes))


def to_matrix(kernel: jax.Array, layout: KernelLayout) -> jax.Array:
  """Per-layer kernel (batch + kernel axes) -> batch + (fan_in, fan_out)."""
  b = layout.batch_ndim
  perm = tuple(range(b)) + tuple(b + i for i in layout.in_axes) + tuple(b + o for o in layout.out_axes)
  fan_in, fan_out = layout.matrix_dims(kernel.shape)
  return jnp.transpose(kernel, perm).reshape(kernel.shape[:b] + (fan_in, fan_out))


def from_matrix(matrix: jax.Array, kernel_shape, layout: KernelLayout) -> jax.Array:
  """Inverse of :func:`to_matrix` for a kernel of ``kernel_shape``."""
  b = layout.batch_ndim
  kernel_shape = tuple(kernel_shape)
  batch = kernel_shape[:b]
  permuted = batch + layout.in_shape(kernel_shape) + layout.out_shape(kernel_shape)
  perm = tuple(range(b)) + tuple(b + i for i in layout.in_axes) + tuple(b + o for o in layout.out_axes)
  inverse = [0] * len(perm)
  for dst, src in enumerate(perm):
    inverse[src] = dst
  return jnp.transpose(matrix.reshape(permuted), inverse)


RANK_LETTER = "z"  # never among the kernel letters (kernels have < 25 axes)


def default_layout(kernel_shape) -> KernelLayout | None:
  """The layout of a 2-D kernel or embedding; None when ambiguous (ndim > 2)."""
  if len(kernel_shape) == 2:
    return KernelLayout(in_axes=(0,), out_axes=(1,))
  return None


def layout_from_adapters(kernel_shape, a_shape, b_shape) -> KernelLayout:
  """Infers an input-axes-first layout from adapter shapes (see module doc)."""
  batch = len(a_shape) + len(b_shape) - 2 - len(kernel_shape)
  n_in = len(a_shape) - 1 - batch
  n_out = len(b_shape) - 1 - batch
  if batch < 0 or n_in < 1 or n_out < 1:
    raise ValueError(
        f"Adapter shapes lora_a{tuple(a_shape)} / lora_b{tuple(b_shape)} do not fit "
        f"kernel shape {tuple(kernel_shape)}.")
  layout = KernelLayout(tuple(range(n_in)), tuple(range(n_in, n_in + n_out)), batch)
  return layout


def check_adapter_shapes(path: str, kernel_shape, a_shape, b_shape,
                         layout: KernelLayout) -> int:
  """Validates adapter shapes against a kernel; returns the rank."""
  kernel_shape = tuple(kernel_shape)
  batch = kernel_shape[: layout.batch_ndim]
  rank = a_shape[-1] if a_shape else None
  want_a = batch + layout.in_shape(kernel_shape) + (rank,)
  want_b = batch + (rank,) + layout.out_shape(kernel_shape)
  if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
    raise ValueError(
        f"Adapters at {path!r} do not fit its kernel {kernel_shape}: lora_a "
        f"{tuple(a_shape)} (want {want_a}), lora_b {tuple(b_shape)} (want {want_b}).")
  return int(rank)


def _dense_general_layout(module: nn.DenseGeneral) -> KernelLayout:
  axis = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
  features = module.features if isinstance(module.features, tuple | list) else (module.features,)
  return KernelLayout(tuple(range(len(axis))),
                      tuple(range(len(axis), len(axis) + len(features))))


def parse_einsum(einsum_str: str) -> tuple[str, str, str]:
  """``'BTD,DNH->BTNH'`` -> ``('BTD', 'DNH', 'BTNH')`` with spaces removed."""
  einsum_str = einsum_str.replace(" ", "")
  if "->" not in einsum_str or einsum_str.count(",") != 1:
    raise ValueError(f"Expected an einsum of two operands 'x,k->y', got {einsum_str!r}.")
  lhs, out = einsum_str.split("->")
  x_sub, k_sub = lhs.split(",")
  return x_sub, k_sub, out


def einsum_layout(einsum_str: str) -> KernelLayout:
  """The layout of an ``nn.Einsum`` kernel from its einsum string."""
  x_sub, k_sub, y_sub = parse_einsum(einsum_str)
  if "." in k_sub:
    raise ValueError(f"Einsum kernel subscripts cannot hold an ellipsis: {einsum_str!r}.")
  in_axes, out_axes = [], []
  for i, letter in enumerate(k_sub):
    in_x, in_y = letter in x_sub, letter in y_sub
    if in_x and in_y:
      raise ValueError(
          f"Einsum {einsum_str!r}: kernel axis {letter!r} is shared by the input and "
          "the output (a per-head weight); LoRA on such kernels is not supported.")
    if in_x:
      in_axes.append(i)
    elif in_y:
      out_axes.append(i)
    else:
      raise ValueError(f"Einsum {einsum_str!r}: kernel axis {letter!r} is summed out.")
  if not in_axes or not out_axes:
    raise ValueError(f"Einsum {einsum_str!r} has no input or no output kernel axes.")
  return KernelLayout(tuple(in_axes), tuple(out_axes))


def module_layout(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> KernelLayout | None:
  """The per-layer kernel layout of a supported module call, else None."""
  if isinstance(module, nn.Dense):
    return KernelLayout((0,), (1,))
  if isinstance(module, nn.Embed):
    return KernelLayout((0,), (1,))
  if isinstance(module, nn.DenseGeneral):
    return _dense_general_layout(module)
  if isinstance(module, nn.Einsum):
    einsum_str = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
    return einsum_layout(einsum_str)
  if isinstance(module, nn.Conv):
    window = len(module.kernel_size) if isinstance(module.kernel_size, tuple | list) else 1
    return KernelLayout(tuple(range(window + 1)), (window + 1,))
  return None
