"""Reference Flax models whose parameter names follow Hugging Face."""

from peft_jax.models.llama import (
    REMAT_POLICY_NAMES,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    causal_lm_loss,
    count_params,
    init_params,
    params_scanned_to_unrolled,
    params_unrolled_to_scanned,
)

__all__ = [
    "REMAT_POLICY_NAMES",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "causal_lm_loss",
    "count_params",
    "init_params",
    "params_scanned_to_unrolled",
    "params_unrolled_to_scanned",
]
