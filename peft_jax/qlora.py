"""QLoRA in one call: a 4-bit NF4 base with LoRA (or DoRA) adapters on top.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs". The
base kernels become :class:`peft_jax.quant.NF4Array` leaves (real 4-bit
storage, bit-compatible with bitsandbytes), and the interceptor computes their
products with :func:`peft_jax.quant.nf4_matmul`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from peft_jax import targeting
from peft_jax.lora.config import LoRAConfig, _check_targets
from peft_jax.lora.transform import lora_transform
from peft_jax.quant import NF4, is_quantized, quantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class QLoRAConfig(LoRAConfig):
  """:class:`LoRAConfig` plus how to quantize the base (the seed's names).

  Attributes:
    bits: 4 (the only width QLoRA defines).
    quant_type: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"``.
    block_size: elements per absmax block (64, as bitsandbytes).
    double_quant: quantize the absmax too (4.127 instead of 4.5 bits/param).
    compute_dtype: dtype of the dequantized tiles in the matmul.
    quantize_modules: which kernels to quantize (``None``: every Dense-like
      kernel except the output head; embeddings never).
  """

  rank: int = 16
  alpha: float = 32.0
  target_modules: str | tuple[str, ...] = "all-linear"
  bits: int = 4
  quant_type: str = "nf4"
  block_size: int = 64
  double_quant: bool = True
  compute_dtype: str = "bfloat16"
  quantize_modules: str | tuple[str, ...] | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.bits != 4:
      raise ValueError(f"QLoRA quantizes to 4 bits; bits={self.bits} is not supported.")
    if self.quantize_modules is not None:
      object.__setattr__(self, "quantize_modules",
                         _check_targets(self.quantize_modules, "quantize_modules"))
    self.quant_spec()  # validates block size, quant type and compute dtype

  def quant_spec(self) -> NF4:
    """The :class:`peft_jax.quant.NF4` spec this config describes."""
    return NF4(block_size=self.block_size, double_quant=self.double_quant,
               compute_dtype=self.compute_dtype, quant_type=self.quant_type)


def apply_qlora(params: Mapping[str, Any], config: QLoRAConfig, *, key: jax.Array,
                layouts=None) -> dict[str, Any]:
  """Quantizes the base to NF4 and adds adapters: ``lora_transform(quantize(params))``.

  With ``init="loftq"`` the adapted kernels are quantized by LoftQ itself
  (adapters initialised on the quantization error) and the rest as usual.
  """
  if config.init == "loftq":
    params = lora_transform(params, config, key=key, layouts=layouts)
    inner, _ = targeting.unwrap_params(params)
    already = {p.rsplit("/", 1)[0] for p, v in targeting.flatten(inner).items() if is_quantized(v)}
    rest = [m for m in targeting.select_modules(
        inner, config.quantize_modules or "all-linear") if m not in already]
    if rest:
      params = quantize(params, config.quant_spec(), target_modules=rest)
    return params
  qparams = quantize(params, config.quant_spec(), target_modules=config.quantize_modules)
  return lora_transform(qparams, config, key=key, layouts=layouts)
