"""Combining adapters (task arithmetic, PEFT's add_weighted_adapter) and pruning them."""

from peft_jax.merging.combine import (
    METHODS,
    combine_adapters,
    disjoint_merge,
    elect_sign_mask,
    merge_task_tensors,
    task_arithmetic,
)
from peft_jax.merging.prune import (
    PrunedAdapters,
    prune_by_magnitude,
    prune_lora_adapters,
    prune_randomly,
)

__all__ = [
    "METHODS", "PrunedAdapters", "combine_adapters", "disjoint_merge", "elect_sign_mask",
    "merge_task_tensors", "prune_by_magnitude", "prune_lora_adapters", "prune_randomly",
    "task_arithmetic",
]
