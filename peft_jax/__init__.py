"""peft_jax: parameter-efficient fine-tuning for JAX and Flax.

Adapters are pure transformations of a Flax params tree; a Flax method
interceptor runs them; optimizers are optax transformations.
"""

from peft_jax import targeting
from peft_jax.lora import (
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

__version__ = "0.1.0"

__all__ = [
    "DoRAConfig", "KernelLayout", "LoRAConfig", "adapter_paths", "apply", "apply_dora",
    "apply_lora", "combine", "intercept", "kernel_layouts", "lora_transform", "merge",
    "merge_lora", "split", "targeting", "unmerge",
]
