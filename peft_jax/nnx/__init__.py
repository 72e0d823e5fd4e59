"""peft_jax on Flax NNX models (see README, "Flax NNX").

The same configs, targeting, leaf names, layouts and adapter files as the
linen path: an NNX model is read as its linen-shaped params dict
(:mod:`peft_jax.nnx.state`), transformed by the linen tools, and written back
(:mod:`peft_jax.nnx.transform`); adapted layers run their adapters in their
own ``__call__`` (:mod:`peft_jax.nnx.modules`).
"""

from peft_jax.nnx.mixed import attach, detach
from peft_jax.nnx.modules import is_peft_module
from peft_jax.nnx.optim import linen_paths
from peft_jax.nnx.state import Adapter, adapters, linen_path, params
from peft_jax.nnx.transform import (
    adalora_transform,
    apply_qlora,
    check,
    layouts,
    load_adapters,
    lora_transform,
    merge,
    model_config,
    quantize,
    sync,
)

__all__ = [
    "Adapter", "adalora_transform", "adapters", "apply_qlora", "attach", "check", "detach",
    "is_peft_module", "layouts",
    "linen_path", "linen_paths", "load_adapters", "lora_transform", "merge", "model_config",
    "params", "quantize", "sync",
]
