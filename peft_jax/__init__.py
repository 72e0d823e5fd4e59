"""peft_jax: parameter-efficient fine-tuning for JAX and Flax.

Adapters are pure transformations of a Flax params tree; a Flax method
interceptor runs them; optimizers are optax transformations.
"""

from peft_jax import checkpoint, merging, multitask, optim, quant, targeting
from peft_jax.checkpoint import (
    export_peft,
    import_peft,
    load_lora_state_dict,
    save_lora_state_dict,
)
from peft_jax.lora import (
    AdaLoRAConfig,
    adalora_transform,
    orthogonal_regularization,
    resize_adapters,
    DoRAConfig,
    KernelLayout,
    LoRAConfig,
    adapter_paths,
    apply,
    apply_dora,
    apply_lora,
    combine,
    intercept,
    kernel_layouts,
    lora_transform,
    merge,
    merge_lora,
    split,
    unmerge,
)
from peft_jax.merging import combine_adapters, prune_lora_adapters, task_arithmetic
from peft_jax.quant import NF4, FP4, NF4Array, quantize, dequantize, nf4_matmul
from peft_jax.lora.merge import merge_into_quantized
from peft_jax.qlora import QLoRAConfig, apply_qlora
from peft_jax import nnx  # Flax NNX models (peft_jax.nnx)

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig", "adalora_transform", "orthogonal_regularization", "resize_adapters",
    "DoRAConfig", "FP4", "KernelLayout", "LoRAConfig", "NF4", "NF4Array", "QLoRAConfig",
    "adapter_paths", "apply", "apply_dora", "apply_lora", "apply_qlora", "checkpoint",
    "combine", "combine_adapters", "dequantize", "export_peft", "import_peft", "intercept",
    "kernel_layouts", "load_lora_state_dict", "lora_transform", "merge", "merge_into_quantized",
    "merge_lora", "merging", "multitask", "nnx", "nf4_matmul", "optim", "prune_lora_adapters", "quant",
    "quantize", "save_lora_state_dict", "split", "targeting", "task_arithmetic", "unmerge",
]
