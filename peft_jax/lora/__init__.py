"""LoRA, rsLoRA and DoRA: config, tree transformation, interceptor, merge."""

from peft_jax.lora.adalora import (
    AdaLoRAConfig,
    adalora_transform,
    kept_ranks,
    orthogonal_regularization,
    rank_pattern,
    resize_adapters,
)
from peft_jax.lora.config import DoRAConfig, LoRAConfig, config_from_dict
from peft_jax.lora.interceptor import apply, intercept
from peft_jax.lora.discover import kernel_layouts
from peft_jax.lora.layout import KernelLayout
from peft_jax.lora.merge import merge, merge_lora, unmerge
from peft_jax.lora.transform import apply_dora, apply_lora, lora_transform
from peft_jax.lora.tree import adapter_paths, combine, split

__all__ = [
    "AdaLoRAConfig", "adalora_transform", "kept_ranks", "orthogonal_regularization",
    "rank_pattern", "resize_adapters",
    "DoRAConfig", "KernelLayout", "LoRAConfig", "adapter_paths", "apply", "apply_dora", "apply_lora",
    "combine", "config_from_dict", "intercept", "kernel_layouts", "lora_transform",
    "merge", "merge_lora", "split", "unmerge",
]
