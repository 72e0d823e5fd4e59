"""Reference Flax models whose parameter names follow Hugging Face."""

from peft_jax.models.gguf import llama_config_from_gguf, load_gguf
from peft_jax.models.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from peft_jax.models.pretrained import PretrainedLlama, load_smollm2, smollm2_gguf_path
from peft_jax.models.tokenizer import PretrainedTokenizer, load_hf_tokenizer, tokenizer_from_gguf
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
    "PretrainedLlama",
    "PretrainedTokenizer",
    "llama_config_from_gguf",
    "load_gguf",
    "load_hf_checkpoint",
    "load_hf_tokenizer",
    "load_smollm2",
    "save_hf_checkpoint",
    "smollm2_gguf_path",
    "tokenizer_from_gguf",
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
